"""Profiles: measured (or modeled) behaviour of an executor on one kind of hardware under load.

A ``ProfileSample`` is one point of a sweep: an executor with given knobs, on ``hardware``
(the planner's hardware type: "h100", "a100", "l4", "cpu"), serving ``concurrency`` clients
that each send requests back to back, with a prompt of ``prompt_tokens``, ``output_tokens``
generated per request, ``items`` elements in the largest list input, under a power cap.
It records the median end-to-end latency, time to first token, time per output token,
throughput and energy per request, with its provenance (node, device model, backend,
software versions, when) so a predictor can be refit from stored samples at any time.

``source`` is "measured" for real devices and engines and "modeled" for anything that came
from a model (a sim engine or a sim GPU, or ``modeled_samples`` from a ``PerfModel`` for
hardware that is not present): the two are never mixed up silently.

``Sweep`` says which points a profile run measures; it is pure data, shared by the profiler
(controller/profiler.py) and ``modeled_samples``. Pure: no clocks, files or sockets here.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from common.workflow.catalog import ExecutorSpec, same_value
from policies.model import HardwareType, InstanceConfig, PerfModel

Source = Literal["measured", "modeled"]
SOURCES = ("measured", "modeled")
MAX_SWEEP_POINTS = 500
MAX_CONCURRENCY = 256
MAX_REQUESTS_PER_CLIENT = 100
MAX_PASSES = 20
MAX_PROMPT_TOKENS = 32768
MAX_ITEMS = 1024
OUTPUT_TOKENS_KNOB = "max_tokens"
TTFT_MAX_TOKENS = 1  # the TTFT probe generates one token: its latency is queueing + prefill + one step


class ProfileError(ValueError):
    """A sample or sweep that is not valid; the message names the field."""


@dataclass(frozen=True)
class ProfileSample:
    """One measured or modeled point. Times are medians over ``samples`` requests.

    ``tpot_s`` (time per output token) is ``(latency_s - ttft_s) / (output_tokens - 1)``, with
    ``ttft_s`` the median latency of max_tokens=1 requests at the same concurrency, prompt and
    power cap; it assumes every request generates ``output_tokens`` tokens (the max_tokens knob).
    ``energy_j_per_request`` is the median of the per-request energies the agent attributes from
    the device energy counter (None where the device has none).
    """

    executor: str
    hardware: str  # "h100" | "a100" | "l4" | "cpu" | ...
    device_model: str
    backend: str  # "nvml" | "sim" | "cpu" | "model"
    node: str
    source: Source
    knobs: dict[str, Any]
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    items: int
    power_cap_w: float | None  # None: the device's default limit (or not cappable)
    latency_s: float
    ttft_s: float | None
    tpot_s: float | None
    throughput_rps: float
    energy_j_per_request: float | None
    samples: int
    software: dict[str, str]
    taken_at_unix_s: float
    tp: int = 1  # devices per instance
    power_limit_max_w: float | None = None  # the device's maximum limit, for the cap as a fraction
    latency_p90_s: float | None = None
    run_id: str = ""

    def __post_init__(self) -> None:
        problem = _sample_problem(self)
        if problem:
            raise ProfileError(problem)

    @property
    def power_cap_fraction(self) -> float:
        """The cap as a share of the device's maximum limit; 1.0 when uncapped or unknown."""
        if self.power_cap_w is None or not self.power_limit_max_w:
            return 1.0
        return min(1.0, self.power_cap_w / self.power_limit_max_w)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["knobs"] = dict(self.knobs)
        data["software"] = dict(self.software)
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ProfileSample":
        if not isinstance(data, dict):
            raise ProfileError(f"a profile sample is a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(ProfileSample)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ProfileError(f"unknown field(s) {unknown} in a profile sample")
        missing = [n for n in _REQUIRED if n not in data]
        if missing:
            raise ProfileError(f"profile sample lacks field(s) {missing}")
        try:
            return ProfileSample(**data)
        except TypeError as exc:
            raise ProfileError(f"bad profile sample: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @staticmethod
    def from_json(text: str) -> "ProfileSample":
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:
            raise ProfileError(f"profile sample is not JSON: {exc}") from None
        return ProfileSample.from_dict(data)


_REQUIRED = ("executor", "hardware", "device_model", "backend", "node", "source", "knobs", "concurrency",
             "prompt_tokens", "output_tokens", "items", "power_cap_w", "latency_s", "ttft_s", "tpot_s",
             "throughput_rps", "energy_j_per_request", "samples", "software", "taken_at_unix_s")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sample_problem(s: ProfileSample) -> str | None:
    for name in ("executor", "hardware", "device_model", "backend", "node", "run_id"):
        if not isinstance(getattr(s, name), str):
            return f"{name}: expected text, got {getattr(s, name)!r}"
    if not s.executor or not s.hardware:
        return "executor and hardware must not be empty"
    if s.source not in SOURCES:
        return f"source: expected one of {', '.join(SOURCES)}, got {s.source!r}"
    if not isinstance(s.knobs, dict) or not all(isinstance(k, str) for k in s.knobs):
        return "knobs: expected an object of knob name -> value"
    for knob, value in s.knobs.items():
        if not isinstance(value, (str, bool)) and not _is_number(value):
            return f"knobs.{knob}: expected a number, text or boolean, got {value!r}"
    if not isinstance(s.software, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in s.software.items()):
        return "software: expected an object of name -> version text"
    for name in ("concurrency", "samples", "tp"):
        value = getattr(s, name)
        if type(value) is not int or value < 1:
            return f"{name}: expected a positive integer, got {value!r}"
    for name in ("prompt_tokens", "output_tokens", "items"):
        value = getattr(s, name)
        if type(value) is not int or value < 0:
            return f"{name}: expected a non-negative integer, got {value!r}"
    for name in ("latency_s", "throughput_rps"):
        value = getattr(s, name)
        if not _is_number(value) or value <= 0:
            return f"{name}: expected a positive number, got {value!r}"
    for name in ("ttft_s", "tpot_s", "energy_j_per_request", "power_cap_w", "power_limit_max_w", "latency_p90_s"):
        value = getattr(s, name)
        if value is not None and (not _is_number(value) or value < 0):
            return f"{name}: expected a non-negative number or null, got {value!r}"
    if not _is_number(s.taken_at_unix_s):
        return f"taken_at_unix_s: expected a number, got {s.taken_at_unix_s!r}"
    return None


def samples_to_jsonl(samples: list[ProfileSample]) -> str:
    return "".join(s.to_json() + "\n" for s in samples)


def samples_from_jsonl(text: str, source_name: str = "profile") -> list[ProfileSample]:
    """Parse JSON lines (blank lines and lines starting with # are skipped); errors name the line."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            samples.append(ProfileSample.from_json(line))
        except ProfileError as exc:
            raise ProfileError(f"{source_name}:{number}: {exc}") from None
    return samples


# --- sweeps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """The points of a profile run: the cartesian product of every axis below.

    Each point runs ``concurrency`` clients that each send ``requests_per_client`` requests
    back to back (a closed loop), after ``warmup_requests`` unmeasured ones at the run's start.
    The whole sweep runs ``passes`` times, each pass in a shuffled order, and a point's sample
    pools its requests of every pass: load that comes and goes on a shared host (other
    processes, a noisy neighbour) then spreads over all points instead of biasing a few.
    ``knobs`` lists the values swept per knob (other knobs stay at their defaults);
    ``max_tokens`` may take any positive value (it is the output length), every other knob
    only values its executor allows. ``prompt_tokens`` applies to tasks with a text input and
    ``items`` to tasks with a list input. ``power_caps_w`` None means the device's own limit.
    """

    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    knobs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    prompt_tokens: tuple[int, ...] = (32,)
    items: tuple[int, ...] = (1,)
    power_caps_w: tuple[float | None, ...] = (None,)
    requests_per_client: int = 4
    warmup_requests: int = 2
    passes: int = 6
    ttft: bool = True
    timeout_s: float = 120.0
    allow_shared_device: bool = False

    def knob_points(self, executor: ExecutorSpec) -> list[dict[str, Any]]:
        """Every knob setting of the sweep, defaults filled in, in a stable order."""
        names = sorted(self.knobs)
        base = executor.knob_defaults()
        combos = itertools.product(*(self.knobs[n] for n in names))
        return [{**base, **dict(zip(names, combo, strict=True))} for combo in combos]

    def point_count(self, executor: ExecutorSpec) -> int:
        return (len(self.knob_points(executor)) * len(self.concurrency) * len(self.prompt_tokens)
                * len(self.items) * len(self.power_caps_w))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["knobs"] = {k: list(v) for k, v in self.knobs.items()}
        for name in ("concurrency", "prompt_tokens", "items", "power_caps_w"):
            data[name] = list(data[name])
        return data


def task_uses_prompt(executor: ExecutorSpec) -> bool:
    from common.workflow.tasks import TASKS

    task = TASKS.get(executor.task)
    return task is not None and any(i.type == "text" for i in task.inputs.values())


def task_uses_items(executor: ExecutorSpec) -> bool:
    from common.workflow.tasks import TASKS

    task = TASKS.get(executor.task)
    return task is not None and any(i.type.startswith("list[") and i.required for i in task.inputs.values())


def _spread(values: list[Any], most: int = 3) -> list[Any]:
    """At most ``most`` values: the smallest, the largest and one in the middle."""
    if len(values) <= most:
        return list(values)
    ordered = sorted(values) if all(_is_number(v) for v in values) else list(values)
    return [ordered[0], ordered[len(ordered) // 2], ordered[-1]]


def default_sweep(executor: ExecutorSpec, power_limit_min_w: float | None = None,
                  power_limit_max_w: float | None = None) -> Sweep:
    """The sweep a profile run uses when none is given.

    Concurrency 1, 2, 4, 8 (capped at the executor's max concurrency); up to three values of
    every knob (smallest, middle, largest); prompts of 32 tokens; 1, 4 and 16 items for tasks
    with list inputs; and, where the device has a settable power limit, caps at 100 %, 80 % and
    60 % of its maximum (never below its minimum).
    """
    concurrency = tuple(c for c in (1, 2, 4, 8) if c <= executor.max_concurrency) or (1,)
    knobs = {name: tuple(_spread(list(spec.values))) for name, spec in executor.knobs.items()}
    caps: tuple[float | None, ...] = (None,)
    if power_limit_min_w is not None and power_limit_max_w is not None:
        caps = tuple(dict.fromkeys(round(max(power_limit_min_w, f * power_limit_max_w), 1) for f in (1.0, 0.8, 0.6)))
    return Sweep(concurrency=concurrency, knobs=knobs, items=(1, 4, 16) if task_uses_items(executor) else (1,),
                 power_caps_w=caps)


def _tuple_of_ints(data: dict[str, Any], name: str, low: int, high: int, default: tuple[int, ...]) -> tuple[int, ...]:
    value = data.get(name, list(default))
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ProfileError(f"sweep.{name}: expected a non-empty list of integers, got {value!r}")
    for v in value:
        if type(v) is not int or not low <= v <= high:
            raise ProfileError(f"sweep.{name}: {v!r} is not an integer in [{low}, {high}]")
    return tuple(dict.fromkeys(value))


def sweep_from_dict(data: dict[str, Any] | None, executor: ExecutorSpec, power_limit_min_w: float | None = None,
                    power_limit_max_w: float | None = None) -> Sweep:
    """Validate a sweep (from YAML or the wire) against the executor and device; missing axes
    take the default sweep's values. Raises ProfileError naming the field."""
    base = default_sweep(executor, power_limit_min_w, power_limit_max_w)
    data = dict(data or {})
    allowed = {f.name for f in fields(Sweep)} | {"power_cap_fractions"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProfileError(f"sweep: unknown field(s) {unknown}; fields are {', '.join(sorted(allowed))}")
    concurrency = _tuple_of_ints(data, "concurrency", 1, min(MAX_CONCURRENCY, executor.max_concurrency),
                                 base.concurrency)
    prompt_tokens = _tuple_of_ints(data, "prompt_tokens", 1, MAX_PROMPT_TOKENS, base.prompt_tokens)
    items = _tuple_of_ints(data, "items", 1, MAX_ITEMS, base.items)
    knobs = dict(base.knobs)
    raw_knobs = data.get("knobs", {})
    if not isinstance(raw_knobs, dict):
        raise ProfileError(f"sweep.knobs: expected an object of knob -> list of values, got {raw_knobs!r}")
    for name, values in raw_knobs.items():
        spec = executor.knobs.get(name)
        if spec is None:
            raise ProfileError(f"sweep.knobs.{name}: executor {executor.name} has no knob {name!r} "
                               f"(knobs: {', '.join(sorted(executor.knobs)) or 'none'})")
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise ProfileError(f"sweep.knobs.{name}: give at least one value")
        for value in values:
            if name == OUTPUT_TOKENS_KNOB:
                if type(value) is not int or not 1 <= value <= MAX_PROMPT_TOKENS:
                    raise ProfileError(f"sweep.knobs.{name}: {value!r} is not a token count in "
                                       f"[1, {MAX_PROMPT_TOKENS}]")
            elif not spec.allows(value):
                raise ProfileError(f"sweep.knobs.{name}: {value!r} is not one of the allowed values {spec.values}")
        knobs[name] = tuple(v for i, v in enumerate(values) if not any(same_value(v, w) for w in values[:i]))
    caps = _caps(data, base, power_limit_min_w, power_limit_max_w)
    rpc = data.get("requests_per_client", base.requests_per_client)
    passes = data.get("passes", base.passes)
    if type(passes) is not int or not 1 <= passes <= MAX_PASSES:
        raise ProfileError(f"sweep.passes: expected an integer in [1, {MAX_PASSES}]")
    warmup = data.get("warmup_requests", base.warmup_requests)
    timeout_s = data.get("timeout_s", base.timeout_s)
    if type(rpc) is not int or not 1 <= rpc <= MAX_REQUESTS_PER_CLIENT:
        raise ProfileError(f"sweep.requests_per_client: expected an integer in [1, {MAX_REQUESTS_PER_CLIENT}]")
    if type(warmup) is not int or not 0 <= warmup <= 100:
        raise ProfileError("sweep.warmup_requests: expected an integer in [0, 100]")
    if not _is_number(timeout_s) or not 0 < timeout_s <= 3600:
        raise ProfileError("sweep.timeout_s: expected seconds in (0, 3600]")
    for flag in ("ttft", "allow_shared_device"):
        if not isinstance(data.get(flag, False), bool):
            raise ProfileError(f"sweep.{flag}: expected true or false")
    sweep = Sweep(concurrency=concurrency, knobs=knobs, prompt_tokens=prompt_tokens, items=items, power_caps_w=caps,
                  requests_per_client=rpc, warmup_requests=warmup, passes=passes, ttft=data.get("ttft", base.ttft),
                  timeout_s=float(timeout_s), allow_shared_device=data.get("allow_shared_device", False))
    count = sweep.point_count(executor) * sweep.passes
    if count > MAX_SWEEP_POINTS:
        raise ProfileError(f"sweep has {count} points (all passes); at most {MAX_SWEEP_POINTS} (use fewer values "
                           "per axis or fewer passes)")
    return sweep


def _caps(data: dict[str, Any], base: Sweep, low: float | None, high: float | None) -> tuple[float | None, ...]:
    if "power_caps_w" in data and "power_cap_fractions" in data:
        raise ProfileError("sweep: give power_caps_w or power_cap_fractions, not both")
    if "power_cap_fractions" in data:
        fractions = data["power_cap_fractions"]
        if not isinstance(fractions, list) or not fractions or not all(_is_number(f) and 0 < f <= 1 for f in fractions):
            raise ProfileError("sweep.power_cap_fractions: expected a non-empty list of numbers in (0, 1]")
        if low is None or high is None:
            raise ProfileError("sweep.power_cap_fractions: this device has no settable power limit")
        return tuple(dict.fromkeys(round(max(low, f * high), 1) for f in fractions))
    if "power_caps_w" not in data:
        return base.power_caps_w
    caps = data["power_caps_w"]
    if not isinstance(caps, list) or not caps:
        raise ProfileError("sweep.power_caps_w: expected a non-empty list of watts (null: the device's own limit)")
    for cap in caps:
        if cap is None:
            continue
        if low is None or high is None:
            raise ProfileError("sweep.power_caps_w: this device has no settable power limit; use [null]")
        if not _is_number(cap) or not low <= cap <= high:
            raise ProfileError(f"sweep.power_caps_w: {cap!r} W is outside the device's range {low:g}-{high:g} W")
    return tuple(dict.fromkeys(None if c is None else float(c) for c in caps))


# --- modeled samples -----------------------------------------------------------------------


def modeled_samples(executor: ExecutorSpec, hardware: HardwareType, perf_model: PerfModel, sweep: Sweep,
                    *, taken_at_unix_s: float = 0.0, software: dict[str, str] | None = None) -> list[ProfileSample]:
    """Samples for hardware that is not present, from a PerfModel, labeled modeled.

    A PerfModel gives one instance's latency at its operating point and its capacity, not a
    curve over concurrency; a closed loop of ``c`` clients then sees (Little's law)
    throughput X = min(c / latency, capacity) and latency c / X, and the instance draws
    idle + (busy - idle) * X / capacity watts, so energy per request is that power over X.
    Prompt length does not enter the model; the grid still spans it so modeled and measured
    points line up one to one. Caps in the sweep that the hardware cannot take are skipped.
    """
    tp = executor.resources.gpu_count if hardware.kind == "gpu" else 1
    out: list[ProfileSample] = []
    caps = [c for c in sweep.power_caps_w if c is None or (hardware.min_power_cap_w is not None
                                                             and hardware.min_power_cap_w <= c <= hardware.max_power_w)]
    for cap, knobs, prompt, items in itertools.product(caps, sweep.knob_points(executor), sweep.prompt_tokens,
                                                       sweep.items):
        items_n = items if task_uses_items(executor) else 0
        perf = perf_model.perf(executor, InstanceConfig(executor.name, hardware.name, tp, cap), knobs,
                               float(max(items_n, 1) if task_uses_items(executor) else 1.0))
        if perf is None or perf.latency_s <= 0 or perf.capacity_rps <= 0:
            continue
        output_tokens = int(knobs.get(OUTPUT_TOKENS_KNOB, 0)) if _is_number(knobs.get(OUTPUT_TOKENS_KNOB)) else 0
        for c in sweep.concurrency:
            throughput = min(c / perf.latency_s, perf.capacity_rps)
            power_w = perf.idle_power_w + (perf.busy_power_w - perf.idle_power_w) * min(1.0, throughput
                                                                                        / perf.capacity_rps)
            out.append(ProfileSample(
                executor=executor.name, hardware=hardware.name, device_model=hardware.name, backend="model",
                node="", source="modeled", knobs=dict(knobs), concurrency=c,
                prompt_tokens=prompt if task_uses_prompt(executor) else 0, output_tokens=output_tokens,
                items=items_n, power_cap_w=cap, latency_s=c / throughput, ttft_s=None, tpot_s=None,
                throughput_rps=throughput, energy_j_per_request=power_w / throughput, samples=1,
                software=dict(software or {"model": type(perf_model).__name__}), taken_at_unix_s=taken_at_unix_s,
                tp=tp, power_limit_max_w=hardware.max_power_w if hardware.min_power_cap_w is not None else None))
    return out


def model_error(measured: list[ProfileSample], executor: ExecutorSpec, hardware: HardwareType,
                perf_model: PerfModel) -> dict[str, float | int]:
    """How far a PerfModel is from measured samples of the same points: MAPE of latency and
    energy (fractions, 0.1 = 10 %) over the measured samples it can predict."""
    lat_errors: list[float] = []
    energy_errors: list[float] = []
    for sample in measured:
        if sample.executor != executor.name or sample.hardware != hardware.name or sample.source != "measured":
            continue
        sweep = Sweep(concurrency=(sample.concurrency,), knobs={k: (v,) for k, v in sample.knobs.items()
                                                                if k in executor.knobs},
                      prompt_tokens=(max(1, sample.prompt_tokens),), items=(max(1, sample.items),),
                      power_caps_w=(sample.power_cap_w,))
        modeled = modeled_samples(executor, hardware, perf_model, sweep)
        if not modeled:
            continue
        lat_errors.append(abs(modeled[0].latency_s - sample.latency_s) / sample.latency_s)
        if sample.energy_j_per_request and modeled[0].energy_j_per_request is not None:
            energy_errors.append(abs(modeled[0].energy_j_per_request - sample.energy_j_per_request)
                                 / sample.energy_j_per_request)
    return {"points": len(lat_errors),
            "latency_mape": sum(lat_errors) / len(lat_errors) if lat_errors else math.nan,
            "energy_mape": sum(energy_errors) / len(energy_errors) if energy_errors else math.nan}
