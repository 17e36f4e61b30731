"""Profile runs inside the controller: measure an executor on a real (or simulated) device.

A run starts a dedicated component for the executor on one node's device through its agent
(StartComponent, with the controller epoch and the node's generation), waits for the agent to
report it ready in heartbeats, drives the sweep's points (closed-loop clients sending
Invoke requests back to back), sets and restores power limits for power-cap levels, stops
the component, and stores one ProfileSample per point with its provenance. Then the
predictors are refit from every stored sample (in a worker thread; nothing is pickled).

What is measured, per point (``concurrency`` clients x ``requests_per_client`` requests):
- latency: the median (and p90) of the agent's end-to-end ``InvocationResult.latency_s``;
- energy per request: the median of ``InvocationResult.energy_j`` (the device energy-counter
  delta split among concurrent invocations, see agent/components/energy.py);
- throughput: completed requests over the point's wall time;
- TTFT: the median latency of max_tokens=1 requests at the same concurrency, prompt and cap
  (a TTFT probe point; for single-generation tasks on real engines only);
- TPOT = (latency - TTFT) / (output_tokens - 1), assuming each request generates max_tokens
  tokens (a model may stop early at an end token; median latency is robust to a few that do).

The dedicated component runs a copy of the catalog's executor whose ``max_tokens`` values are
widened to the sweep's and to 1 (for the TTFT probe); nothing else about it changes. The
profiler owns its component: the workload reconciler never sees it (``claim``), so it is not
stopped as unplanned; once the run ends it is stopped and released. A run on a simulated
device or engine produces samples labeled ``modeled``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from common import __version__
from common.protocol import (
    CommandResult, ComponentReport, DeviceInfo, ErrorReply, GetProfileRun, InvocationResult, Invoke, ListProfiles,
    PredictorFit, ProfileList, ProfileRunStatus, ProfileStarted, StartComponent, StartProfile, StopComponent,
)
from common.transport import PeerUnreachable, RemoteError, RequestTimeout
from common.workflow.catalog import ExecutorSpec
from common.workflow.tasks import TASKS
from common.workflow.types import BLOBS, RECORDS, element_type
from controller.context import ControllerContext
from controller.profiles_store import ProfileStore, StoredRun
from controller.registry import Liveness, NodeRecord
from policies.perf_model import CatalogPerfModel, hardware_key, standard_hardware
from policies.predictors import Predictors, fit, group_samples, held_out_mape
from policies.profiles import (
    OUTPUT_TOKENS_KNOB, TTFT_MAX_TOKENS, ProfileError, ProfileSample, Sweep, model_error,
    sweep_from_dict, task_uses_items, task_uses_prompt,
)


log = logging.getLogger("murakkab.controller.profiler")

COMPONENT_PREFIX = "profile-"
TTFT_TASKS = frozenset({"chat", "object-detection"})  # one generation per request: TTFT is well defined
RUNNING_STATES = frozenset({"pending", "starting", "ready"})
REPLY_GRACE_S = 5.0
CLOSING_GRACE_S = 2.0  # per clean-up step of a run the controller's shutdown interrupts
MAX_LIST_SAMPLES = 1000  # ~600 bytes each: well under the 1 MiB frame limit
# Words the tiny test model's tokenizer (and most BPE vocabularies) keep whole: ~1 token each.
PROMPT_WORDS = ("the quick brown fox jumps over the lazy dog while the model answers a short question about "
                "energy power latency and the cluster that runs every node").split()


@dataclass(frozen=True)
class ProfilerConfig:
    command_timeout_s: float = 10.0
    poll_interval_s: float = 0.05
    stop_wait_s: float = 30.0
    ready_margin_s: float = 30.0  # on top of the engine's own start-up timeout


# --- the plan of a run (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One measurement point: ``kind`` "measure" (a sample) or "ttft" (a max_tokens=1 probe)."""

    kind: str
    power_cap_w: float | None
    knobs: dict[str, Any]
    prompt_tokens: int
    items: int
    concurrency: int

    def ttft_key(self) -> tuple[Any, ...]:
        return (self.power_cap_w, self.prompt_tokens, self.items, self.concurrency)


def measures_ttft(executor: ExecutorSpec, sweep: Sweep) -> bool:
    return (sweep.ttft and executor.engine != "sim" and executor.task in TTFT_TASKS
            and OUTPUT_TOKENS_KNOB in executor.knobs)


def plan_steps(executor: ExecutorSpec, sweep: Sweep) -> list[Step]:
    """The points in the order they run: caps outermost (one limit change each), then prompt,
    items and concurrency; a TTFT probe comes before the points that use it."""
    steps: list[Step] = []
    ttft = measures_ttft(executor, sweep)
    defaults = executor.knob_defaults()
    for cap, prompt, items, concurrency in itertools.product(sweep.power_caps_w, sweep.prompt_tokens, sweep.items,
                                                             sweep.concurrency):
        if ttft:
            steps.append(Step("ttft", cap, {**defaults, OUTPUT_TOKENS_KNOB: TTFT_MAX_TOKENS}, prompt, items,
                              concurrency))
        for knobs in sweep.knob_points(executor):
            steps.append(Step("measure", cap, knobs, prompt, items, concurrency))
    return steps


def execution_order(steps: list[Step], passes: int, seed: int) -> list[int]:
    """Step indexes in the order they run, every step once per pass: per pass, caps in sweep
    order (one limit change each), and within a cap the TTFT probes first, then the points,
    each group shuffled (seeded), so slow phases of a shared host do not line up with an axis."""
    rng = random.Random(seed)
    caps = list(dict.fromkeys(step.power_cap_w for step in steps))
    order: list[int] = []
    for _ in range(passes):
        for cap in caps:
            for kind in ("ttft", "measure"):
                group = [i for i, step in enumerate(steps) if step.power_cap_w == cap and step.kind == kind]
                rng.shuffle(group)
                order += group
    return order


def profiling_spec(executor: ExecutorSpec, sweep: Sweep) -> dict[str, Any]:
    """The dedicated component's executor: the catalog's, with max_tokens widened to the sweep's values
    and to 1 for the TTFT probe."""
    data = executor.model_dump(mode="json")
    knob = data.get("knobs", {}).get(OUTPUT_TOKENS_KNOB)
    if knob is not None:
        values = list(knob["values"])
        for value in [*sweep.knobs.get(OUTPUT_TOKENS_KNOB, ()), TTFT_MAX_TOKENS]:
            if value not in values:
                values.append(value)
        knob["values"] = values
    return data


def prompt_text(tokens: int, seed: int = 0) -> str:
    """About ``tokens`` tokens of plain words (one word ~ one token in BPE vocabularies)."""
    start = seed % len(PROMPT_WORDS)
    return " ".join(PROMPT_WORDS[(start + i) % len(PROMPT_WORDS)] for i in range(max(1, tokens)))


def _value(type_expr: str, prompt_tokens: int, items: int, seed: int) -> Any:
    element = element_type(type_expr)
    if element is not None:
        return [_value(element, prompt_tokens, items, seed + i) for i in range(max(1, items))]
    if type_expr in ("text", "json"):
        return prompt_text(prompt_tokens, seed)
    if type_expr == "integer":
        return 1
    if type_expr == "number":
        return 1.0
    if type_expr == "boolean":
        return False
    if type_expr == "vector":
        return [math.sin(seed + i) for i in range(384)]
    if type_expr in BLOBS:
        return {"name": f"profile-{seed}.bin", "media_type": "application/octet-stream",
                "data": bytes((seed + i) % 256 for i in range(1024))}
    fields_ = RECORDS[type_expr]
    record: dict[str, Any] = {}
    for name, field_type in fields_.items():
        record[name] = f"profile-{seed}" if name == "id" else _value(field_type, prompt_tokens, items, seed)
    return record


def profile_inputs(executor: ExecutorSpec, prompt_tokens: int, items: int, seed: int = 0) -> dict[str, Any]:
    """Synthetic inputs for the executor's task: required inputs only; text of ``prompt_tokens``
    words; lists of ``items`` elements. Fine for engines (text and token counts are what cost
    time); tools that parse media need real files and reject these."""
    task = TASKS[executor.task]
    return {name: _value(spec.type, prompt_tokens, items, seed) for name, spec in task.inputs.items() if spec.required}


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)])


@dataclass(frozen=True)
class Provenance:
    executor: ExecutorSpec
    node: str
    device: DeviceInfo
    software: dict[str, str]
    run_id: str

    @property
    def source(self) -> str:
        return "modeled" if self.device.simulated or self.executor.engine == "sim" else "measured"


def summarize(step: Step, provenance: Provenance, results: list[InvocationResult], wall_s: float,
              ttft_s: float | None, taken_at_unix_s: float) -> ProfileSample:
    """One sample from a point's successful invocations (pure)."""
    exe = provenance.executor
    latencies = [r.latency_s for r in results]
    energies = [r.energy_j for r in results]
    latency_s = max(_median(latencies), 1e-9)
    output_tokens = step.knobs.get(OUTPUT_TOKENS_KNOB)
    output_tokens = int(output_tokens) if isinstance(output_tokens, int) and not isinstance(output_tokens, bool) else 0
    tpot_s = None
    if ttft_s is not None and output_tokens > 1:
        tpot_s = max(0.0, (latency_s - ttft_s) / (output_tokens - 1))
    simulated = any(r.simulated for r in results)
    device = provenance.device
    return ProfileSample(
        executor=exe.name, hardware=hardware_key(device.model, device.kind), device_model=device.model,
        backend=device.backend, node=provenance.node,
        source="modeled" if simulated or provenance.source == "modeled" else "measured", knobs=dict(step.knobs),
        concurrency=step.concurrency, prompt_tokens=step.prompt_tokens if task_uses_prompt(exe) else 0,
        output_tokens=output_tokens, items=step.items if task_uses_items(exe) else 0, power_cap_w=step.power_cap_w,
        latency_s=latency_s, ttft_s=ttft_s, tpot_s=tpot_s, throughput_rps=len(results) / max(wall_s, 1e-9),
        energy_j_per_request=_median([e for e in energies if e is not None]) if all(
            e is not None for e in energies) else None,
        samples=len(results), software=dict(provenance.software), taken_at_unix_s=taken_at_unix_s,
        tp=exe.resources.gpu_count if device.kind == "gpu" else 1, power_limit_max_w=device.power_limit_max_w,
        latency_p90_s=_p90(latencies), run_id=provenance.run_id)


class RunFailed(Exception):
    """Ends a run with a stored reason."""


def device_problem(executor: ExecutorSpec, node: NodeRecord, device_index: int) -> tuple[str, str] | None:
    """(code, message) when the executor cannot be profiled on that device, else None."""
    devices = {d.index: d for d in node.devices}
    device = devices.get(device_index)
    if device is None:
        listed = ", ".join(f"{d.index} ({d.kind} {d.model})" for d in node.devices) or "none"
        return "unknown_device", f"node {node.name} has no device {device_index} (devices: {listed})"
    want = executor.resources.device if executor.engine != "tool" else "cpu"
    if device.kind != want:
        return "device_kind_mismatch", (f"executor {executor.name} ({executor.engine}) runs on a {want} device; device "
                                        f"{device_index} of {node.name} is a {device.kind} ({device.model})")
    if want == "gpu":
        count = executor.resources.gpu_count
        indexes = list(range(device_index, device_index + count))
        missing = [i for i in indexes if i not in devices or devices[i].kind != "gpu"]
        if missing:
            return "unknown_device", (f"executor {executor.name} needs {count} GPUs; {node.name} has no GPU(s) "
                                      f"{missing} after device {device_index}")
        if executor.engine == "sim" and not device.simulated:
            return "device_kind_mismatch", (f"sim executor {executor.name} runs on simulated GPUs; "
                                            f"{device.model} is real")
        if executor.engine == "vllm" and device.simulated:
            return "device_kind_mismatch", (f"vllm executor {executor.name} needs a real GPU; device {device_index} of "
                                            f"{node.name} is simulated (profile a sim executor there)")
    return None


def device_indexes(executor: ExecutorSpec, device: DeviceInfo) -> tuple[int, ...]:
    count = executor.resources.gpu_count if device.kind == "gpu" else 1
    return tuple(range(device.index, device.index + count))


# --- the service -------------------------------------------------------------------------------


@dataclass
class _Run:
    stored: StoredRun
    executor: ExecutorSpec
    sweep: Sweep
    steps: list[Step]
    devices: tuple[int, ...]
    component_id: str
    state: str = "starting"
    done: int = 0
    message: str = ""
    samples: list[ProfileSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. points where some requests failed
    task: asyncio.Task[None] | None = None


class ProfilerService:
    """Profile runs and the predictors fitted on stored samples."""

    def __init__(self, controller: ControllerContext, config: ProfilerConfig | None = None) -> None:
        self.c = controller
        self.config = config or ProfilerConfig(command_timeout_s=controller.settings.command_timeout_s)
        self.store = ProfileStore(controller.store.db)
        self.predictors = Predictors()
        self.runs: dict[str, _Run] = {}
        self.agent_versions: dict[str, str] = {}
        self._claimed: dict[str, dict[str, ComponentReport]] = {}  # node -> component id -> latest report
        self._refit: asyncio.Task[None] | None = None
        self._refit_again = False
        self._closing = False

    # --- start-up, heartbeats, shutdown ------------------------------------------------------

    def load(self) -> None:
        """End runs a previous controller left unfinished, then refit the predictors."""
        for run in self.store.unfinished_runs():
            self.store.update_run(run.run_id, state="failed", ended_at_unix_s=time.time(),
                                  message="the controller stopped during the run; its samples so far are kept")
            log.warning("profile run %s ended: the controller stopped during it", run.run_id)
        self.schedule_refit()

    def note_register(self, node: str, agent_version: str) -> None:
        self.agent_versions[node] = agent_version

    def claim(self, node: str, reports: tuple[ComponentReport, ...]) -> tuple[ComponentReport, ...]:
        """Keep the reports of components owned by live runs; return the others (for the workloads)."""
        owned = {r.component_id for r in self.runs.values() if r.stored.node == node and r.task is not None}
        if not owned:
            self._claimed.pop(node, None)
            return reports
        self._claimed[node] = {r.component_id: r for r in reports if r.component_id in owned}
        return tuple(r for r in reports if r.component_id not in owned)

    async def close(self) -> None:
        """Runs in progress end failed; their clean-up (stop, restore limits) gets a short grace."""
        self._closing = True
        tasks = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._refit is not None:
            self._refit.cancel()
            await asyncio.gather(self._refit, return_exceptions=True)

    # --- predictors ----------------------------------------------------------------------------

    def schedule_refit(self) -> None:
        """Refit from every stored sample in a worker thread (reads happen here, on the loop's thread)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.predictors = fit(self.store.samples())
            return
        if self._refit is not None and not self._refit.done():
            self._refit_again = True
            return
        self._refit = asyncio.ensure_future(self._refit_now())

    async def _refit_now(self) -> None:
        while True:
            self._refit_again = False
            samples = self.store.samples()
            try:
                self.predictors = await asyncio.to_thread(fit, samples)
                log.info("predictors refit on %d samples: %d (executor, hardware) groups", len(samples),
                         len(self.predictors))
            except Exception:  # a bad sample set must not take the controller down
                log.exception("refitting predictors failed; keeping the previous ones")
            if not self._refit_again:
                return

    async def refit_done(self) -> None:
        while self._refit is not None and not self._refit.done():
            await asyncio.gather(self._refit, return_exceptions=True)

    # --- admin ---------------------------------------------------------------------------------

    def start(self, msg: StartProfile) -> ProfileStarted | ErrorReply:
        executor = self.c.workloads.catalog.get(msg.executor)
        if executor is None:
            known = ", ".join(sorted(self.c.workloads.catalog)) or "none; apply a catalog first"
            return ErrorReply("unknown_executor", f"no executor named {msg.executor!r} (known: {known})")
        node = self.c.registry.nodes.get(msg.node)
        if node is None:
            known = ", ".join(sorted(self.c.registry.nodes)[:10]) or "none"
            return ErrorReply("unknown_node", f"no node named {msg.node!r} (known: {known})")
        if node.liveness is not Liveness.READY:
            return ErrorReply("node_not_ready", f"node {msg.node} is {node.state}; profile on a ready node")
        problem = device_problem(executor, node, msg.device_index)
        if problem is not None:
            return ErrorReply(*problem)
        device = next(d for d in node.devices if d.index == msg.device_index)
        try:
            sweep = sweep_from_dict(dict(msg.sweep), executor, device.power_limit_min_w, device.power_limit_max_w)
        except ProfileError as exc:
            return ErrorReply("invalid_sweep", str(exc))
        indexes = device_indexes(executor, device)
        busy = self._busy(node.name, indexes, sweep)
        if busy is not None:
            return ErrorReply("device_busy", busy)
        run_id = f"p-{uuid.uuid4().hex[:10]}"
        steps = plan_steps(executor, sweep)
        stored = StoredRun(run_id, executor.name, node.name, msg.device_index, "starting", 0,
                           len(steps) * sweep.passes, "", sweep.to_dict(), time.time(), None)
        self.store.insert_run(stored)
        run = _Run(stored, executor, sweep, steps, indexes, f"{COMPONENT_PREFIX}{run_id}")
        self.runs[run_id] = run
        run.task = asyncio.ensure_future(self._run(run))
        log.info("profile run %s: %s on %s device(s) %s, %d points x %d passes", run_id, executor.name, node.name,
                 list(indexes), len(steps), sweep.passes)
        return ProfileStarted(run_id, stored.total_points, sweep.to_dict())

    def _busy(self, node: str, indexes: tuple[int, ...], sweep: Sweep) -> str | None:
        for run in self.runs.values():
            if run.stored.node == node and run.task is not None and not run.task.done() \
                    and set(run.devices) & set(indexes):
                shared = sorted(set(run.devices) & set(indexes))
                return f"profile run {run.stored.run_id} is using device(s) {shared} of {node}; wait for it to end"
        if sweep.allow_shared_device:
            return None
        others = [r for r in self.c.workloads.reports.get(node, ())
                  if r.state in RUNNING_STATES and set(r.device_indexes) & set(indexes)]
        if others:
            names = ", ".join(f"{r.component_id} ({r.executor})" for r in others)
            return (f"device(s) {list(indexes)} of {node} run other components ({names}), which would distort the "
                    "measurements; drain the node or move them, or set allow_shared_device: true in the sweep")
        return None

    def status(self, msg: GetProfileRun) -> ProfileRunStatus | ErrorReply:
        run = self.runs.get(msg.run_id)
        stored = self.store.get_run(msg.run_id)
        if stored is None:
            return ErrorReply("unknown_profile_run", f"no profile run {msg.run_id!r}")
        samples = self.store.samples(run_id=msg.run_id) if msg.include_samples else []
        if run is not None and run.state not in ("succeeded", "failed", "cancelled"):
            state, done, message = run.state, run.done, run.message
        else:
            state, done, message = stored.state, stored.done_points, stored.message
        return ProfileRunStatus(stored.run_id, stored.executor, stored.node, stored.device_index, state, done,
                                stored.total_points, message, tuple(s.to_dict() for s in samples[:MAX_LIST_SAMPLES]),
                                stored.started_at_unix_s, stored.ended_at_unix_s)

    async def list_profiles(self, msg: ListProfiles) -> ProfileList | ErrorReply:
        if not 1 <= msg.limit <= MAX_LIST_SAMPLES:
            return ErrorReply("invalid_argument", f"limit must be 1-{MAX_LIST_SAMPLES}, got {msg.limit}")
        total = self.store.count_samples(msg.executor, msg.hardware, msg.run_id)
        samples = self.store.samples(msg.executor, msg.hardware, msg.run_id, limit=msg.limit)
        fits: tuple[PredictorFit, ...] = ()
        if msg.fit:
            everything = self.store.samples(msg.executor, msg.hardware, msg.run_id)
            report = await asyncio.to_thread(held_out_mape, everything)
            errors = self._model_errors(everything)
            fits = tuple(PredictorFit(
                executor, hardware, entry["source"], entry["samples"], entry["latency_model"], entry["energy_model"],
                _finite(entry["latency_mape"]), _finite(entry["energy_mape"]),
                *errors.get((executor, hardware), (None, None)))
                for (executor, hardware), entry in report.items())
        return ProfileList(tuple(s.to_dict() for s in samples), total, fits)

    def _model_errors(self, samples: list[ProfileSample]) -> dict[tuple[str, str], tuple[float | None, float | None]]:
        """The catalog model's latency and energy MAPE against measured samples, per group it can model."""
        hardware = standard_hardware()
        model = CatalogPerfModel(hardware)
        out: dict[tuple[str, str], tuple[float | None, float | None]] = {}
        for (executor, hw), group in group_samples(s for s in samples if s.source == "measured").items():
            spec = self.c.workloads.catalog.get(executor)
            if spec is None or hw not in hardware:
                continue
            error = model_error(group, spec, hardware[hw], model)
            if error["points"]:
                out[(executor, hw)] = (_finite(error["latency_mape"]), _finite(error["energy_mape"]))
        return out

    # --- one run -------------------------------------------------------------------------------

    def _node(self, run: _Run) -> NodeRecord:
        node = self.c.registry.nodes.get(run.stored.node)
        if node is None or node.liveness is not Liveness.READY:
            raise RunFailed(f"node {run.stored.node} is no longer ready ({node.state if node else 'unknown'})")
        return node

    def _set_state(self, run: _Run, state: str, message: str | None = None) -> None:
        run.state = state
        if message is not None:
            run.message = message
        self.store.update_run(run.stored.run_id, state=state, done_points=run.done, message=message)

    async def _run(self, run: _Run) -> None:
        started = False
        original_limits: dict[int, float] = {}
        state, message = "failed", ""
        try:
            node = self._node(run)
            device = next(d for d in node.devices if d.index == run.stored.device_index)
            host = node.host_info
            software = {"agent": self.agent_versions.get(node.name, "unknown"), "controller": __version__,
                        "engine": run.executor.engine}
            if host is not None:
                software.update(python=host.python_version, os=host.os)
            provenance = Provenance(run.executor, node.name, device, software, run.stored.run_id)
            started = True
            await self._start_component(run, node)
            self._set_state(run, "running", "measuring")
            await self._warm_up(run)
            order = execution_order(run.steps, run.sweep.passes, seed=int(run.stored.run_id.removeprefix("p-"), 16))
            remaining = {i: run.sweep.passes for i in range(len(run.steps))}
            pooled: dict[int, list[InvocationResult]] = {i: [] for i in range(len(run.steps))}
            wall: dict[int, float] = {i: 0.0 for i in range(len(run.steps))}
            ttft: dict[tuple[Any, ...], float] = {}
            cap: float | None = None
            for number, index in enumerate(order):
                step = run.steps[index]
                if number == 0 or step.power_cap_w != cap:
                    await self._apply_cap(run, step.power_cap_w, original_limits)
                    cap = step.power_cap_w
                results, wall_s = await self._measure(run, number, step)
                pooled[index] += results
                wall[index] += wall_s
                remaining[index] -= 1
                if remaining[index] == 0:  # its last pass: the probe's TTFT came earlier in this pass
                    if step.kind == "ttft":
                        ttft[step.ttft_key()] = _median([r.latency_s for r in pooled[index]])
                    else:
                        sample = summarize(step, provenance, pooled[index], wall[index], ttft.get(step.ttft_key()),
                                           time.time())
                        self.store.add_samples([sample])
                        run.samples.append(sample)
                run.done = number + 1
                self.store.update_run(run.stored.run_id, done_points=run.done)
            state, message = "succeeded", f"{len(run.samples)} samples stored"
            if run.notes:
                more = f" (and {len(run.notes) - 3} more)" if len(run.notes) > 3 else ""
                message += "; " + "; ".join(run.notes[:3]) + more
        except RunFailed as exc:
            state, message = "failed", str(exc)
        except asyncio.CancelledError:
            state, message = "failed", "the controller shut down during the run; its samples so far are kept"
        except Exception as exc:  # a bug must still end the run in a stored state
            log.exception("profile run %s crashed", run.stored.run_id)
            state, message = "failed", f"internal error: {type(exc).__name__}: {exc}"
        finally:
            self._set_state(run, "stopping")
            cleanup = []
            if original_limits:
                cleanup.append(await self._quietly(self._restore_caps(run, original_limits)))
            if started:
                cleanup.append(await self._quietly(self._stop_component(run)))
            notes = [c for c in cleanup if c]
            if notes:
                message = f"{message}; {'; '.join(notes)}"
            run.state, run.message = state, message
            self.store.update_run(run.stored.run_id, state=state, done_points=run.done, message=message,
                                  ended_at_unix_s=time.time())
            self.runs.pop(run.stored.run_id, None)
            level = logging.INFO if state == "succeeded" else logging.WARNING
            log.log(level, "profile run %s %s: %s", run.stored.run_id, state, message)
            if run.samples:
                self.schedule_refit()

    async def _quietly(self, coro: Any) -> str:
        """Clean-up steps run even after a failure or cancellation (briefly, while the controller
        shuts down); they report, never raise."""
        try:
            await asyncio.wait_for(asyncio.shield(coro), CLOSING_GRACE_S if self._closing else None)
        except (asyncio.CancelledError, TimeoutError):
            return "clean-up interrupted by shutdown"
        except Exception as exc:
            return f"clean-up: {exc}"
        return ""

    async def _command(self, node: NodeRecord, message: Any) -> CommandResult:
        assert self.c.agents is not None
        try:
            result = await self.c.agents.request(message, peer=node.name.encode(),
                                                 timeout_s=self.config.command_timeout_s)
        except (RequestTimeout, PeerUnreachable, RemoteError) as exc:
            raise RunFailed(f"{message.op} on {node.name} failed: {type(exc).__name__}: {exc}") from None
        self.c.metrics.commands.labels(message.op, "ok" if result.ok else "failed").inc()
        if not result.ok:
            raise RunFailed(f"{message.op} on {node.name} refused: {result.message}")
        return result

    def _report(self, run: _Run) -> ComponentReport | None:
        return self._claimed.get(run.stored.node, {}).get(run.component_id)

    async def _start_component(self, run: _Run, node: NodeRecord) -> None:
        spec = profiling_spec(run.executor, run.sweep)
        await self._command(node, StartComponent(f"{run.stored.run_id}-start", self.c.epoch, node.generation,
                                                 run.component_id, spec, run.devices))
        exe = run.executor
        startup_s = (exe.vllm.startup_timeout_s if exe.vllm else exe.sim.startup_s if exe.sim else 10.0)
        limit_s = startup_s + self.config.ready_margin_s
        deadline = time.monotonic() + limit_s
        while True:
            report = self._report(run)
            if report is not None and report.state == "ready":
                return
            if report is not None and report.state == "failed":
                raise RunFailed(f"component {run.component_id} failed to start: {report.reason or 'no reason given'}")
            if time.monotonic() > deadline:
                seen = report.state if report else "not reported"
                raise RunFailed(f"component {run.component_id} not ready within {limit_s:.0f} s ({seen})")
            self._node(run)
            await asyncio.sleep(self.config.poll_interval_s)

    async def _stop_component(self, run: _Run) -> None:
        node = self.c.registry.nodes.get(run.stored.node)
        if node is None or node.liveness is not Liveness.READY:
            return  # gone: the agent stops its orphans, the reconciler anything left when it is back
        await self._command(node, StopComponent(f"{run.stored.run_id}-stop", self.c.epoch, node.generation,
                                                run.component_id, 5.0))
        deadline = time.monotonic() + self.config.stop_wait_s
        while time.monotonic() < deadline:
            report = self._report(run)
            if report is None or report.state in ("stopped", "failed"):
                return
            await asyncio.sleep(self.config.poll_interval_s)
        raise RunFailed(f"component {run.component_id} still {self._report(run).state} after "  # type: ignore[union-attr]
                        f"{self.config.stop_wait_s:g} s")

    async def _apply_cap(self, run: _Run, cap_w: float | None, original: dict[int, float]) -> None:
        node = self._node(run)
        telemetry = {t.index: t for t in node.latest_telemetry()}
        infos = {d.index: d for d in node.devices}
        for index in run.devices:
            if index not in original:
                now = telemetry.get(index)
                limit = now.power_limit_w if now is not None and now.power_limit_w is not None \
                    else infos[index].power_limit_default_w
                if limit is None:
                    if cap_w is None:
                        continue
                    raise RunFailed(f"device {index} of {node.name} reports no power limit to restore")
                original[index] = limit
            target = original[index] if cap_w is None else cap_w
            result = await self.c.set_power_limit(node, index, target)
            if isinstance(result, ErrorReply) or not result.ok:
                text = result.message if not isinstance(result, ErrorReply) else f"{result.code}: {result.message}"
                raise RunFailed(f"setting device {index} of {node.name} to {target:g} W failed: {text}")

    async def _restore_caps(self, run: _Run, original: dict[int, float]) -> None:
        node = self.c.registry.nodes.get(run.stored.node)
        if node is None or node.liveness is not Liveness.READY:
            raise RunFailed(f"node {run.stored.node} is not ready; restore its power limits {original} by hand")
        for index, limit in original.items():
            result = await self.c.set_power_limit(node, index, limit)
            if isinstance(result, ErrorReply) or not result.ok:
                raise RunFailed(f"could not restore device {index} of {node.name} to {limit:g} W")

    async def _invoke(self, run: _Run, node: str, invocation_id: str, step: Step, seed: int) -> InvocationResult:
        assert self.c.agents is not None
        inputs = profile_inputs(run.executor, step.prompt_tokens, step.items, seed)
        message = Invoke(invocation_id, self.c.epoch, run.component_id, run.executor.task, inputs, dict(step.knobs),
                         float(run.sweep.timeout_s))
        try:
            return await self.c.agents.request(message, peer=node.encode(),
                                               timeout_s=run.sweep.timeout_s + REPLY_GRACE_S)
        except (RequestTimeout, PeerUnreachable, RemoteError) as exc:
            raise RunFailed(f"invocation {invocation_id} on {node}: {type(exc).__name__}: {exc}") from None

    async def _warm_up(self, run: _Run) -> None:
        """Unmeasured requests first: the first ones after start-up pay one-time costs."""
        node = self._node(run)
        step = Step("warmup", None, run.executor.knob_defaults(), run.sweep.prompt_tokens[0], run.sweep.items[0], 1)
        for i in range(run.sweep.warmup_requests):
            result = await self._invoke(run, node.name, f"{run.stored.run_id}-warmup-{i}", step, i)
            if not result.ok:
                raise RunFailed(f"warm-up request failed: {result.error_code}: {result.error}")

    async def _measure(self, run: _Run, number: int, step: Step) -> tuple[list[InvocationResult], float]:
        node = self._node(run)

        async def client(k: int) -> list[InvocationResult]:
            out = []
            for i in range(run.sweep.requests_per_client):
                out.append(await self._invoke(run, node.name, f"{run.stored.run_id}-{number}-{k}-{i}", step,
                                              number * 1000 + k * 100 + i))
            return out

        started = time.monotonic()
        batches = await asyncio.gather(*(client(k) for k in range(step.concurrency)))
        wall_s = time.monotonic() - started
        results = [r for batch in batches for r in batch]
        ok = [r for r in results if r.ok]
        if not ok:
            first = results[0]
            raise RunFailed(f"point {number + 1} ({step.kind}, concurrency {step.concurrency}, knobs {step.knobs}): "
                            f"every request failed, e.g. {first.error_code}: {first.error}")
        if len(ok) < len(results):
            failed = next(r for r in results if not r.ok)
            run.message = (f"{len(results) - len(ok)} of {len(results)} requests failed at point {number + 1} "
                           f"(e.g. {failed.error_code}: {failed.error}); medians use the rest")
            run.notes.append(run.message)
        return ok, wall_s
