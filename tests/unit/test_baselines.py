"""Planning policies: static never re-plans, murakkab-epoch plans on the hour, murakkab every 300 s with
power caps; the shared reactive autoscaler."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import pytest

from common.workflow.loader import load_catalog_file, load_workflow_file
from policies.autopilot.planning import (
    ClusterState,
    EpochPolicy,
    MurakkabPolicy,
    PlanningInputs,
    ScaleBand,
    StaticPolicy,
    reactive_scale,
)
from policies.model import InstanceConfig, Solution
from policies.perf_model import CatalogPerfModel, standard_hardware
from policies.plan import Demand

ROOT = Path(__file__).resolve().parents[2]
RAG_BEST = Demand.of("rag-qa", {"accuracy": "best"})
RAG_FAIR = Demand.of("rag-qa", {"latency": "fair"})
VIDEO_GOOD = Demand.of("video-qa", {"accuracy": "good"})


@lru_cache(maxsize=1)
def inputs() -> PlanningInputs:
    catalog = {e.name: e for path in ("sim.yaml", "cpu.yaml")
               for e in load_catalog_file(ROOT / "examples/catalog" / path) if e.engine != "vllm"}
    workflows = {n: load_workflow_file(ROOT / f"examples/workflows/{n}.yaml") for n in ("rag-qa", "video-qa")}
    return PlanningInputs(workflows=workflows, catalog=catalog, perf=CatalogPerfModel(standard_hardware()),
                          stage_items={"rag-qa": {"embed_passages": 20, "retrieve": 20}, "video-qa": {"objects": 8}})


def state(instances: dict[InstanceConfig, int] | None = None, utilization: dict[InstanceConfig, float] | None = None,
          devices: dict[str, int] | None = None, peaks: dict[Demand, float] | None = None) -> ClusterState:
    return ClusterState(hardware=standard_hardware(),
                        devices_available=devices or {"h100": 64, "a100": 64, "l4": 64, "cpu": 8},
                        instances=instances or {}, utilization=utilization or {}, peak_rates=peaks)


def gpus(solution: Solution) -> float:
    return sum(n * solution.instance_devices[c] for c, n in solution.instances.items() if c.hardware != "cpu")


# --- static -------------------------------------------------------------------------------------------


def test_static_deploys_best_accuracy_on_the_fastest_gpu_once() -> None:
    policy = StaticPolicy(inputs(), headroom=1.5)
    peaks = {RAG_BEST: 2.0, RAG_FAIR: 1.0, VIDEO_GOOD: 0.5}
    decision = policy.decide(0.0, {RAG_BEST: 0.1}, state(peaks=peaks))
    assert decision is not None and "peak" in decision.reason
    solution = decision.solution
    for demand in peaks:  # tiers do not matter: every request gets the most accurate pipeline
        answer = solution.choices[demand]["answer"]
        assert answer.executor == "sim-llama-70b-chat" and answer.knobs == {"max_tokens": 512}
    assert solution.choices[VIDEO_GOOD]["objects"].executor == "sim-vlm-32b-detect"
    for config in solution.instances:
        assert config.power_cap_w is None
        assert config.hardware in ("h100", "cpu")  # the fastest GPU type
    chat = InstanceConfig("sim-llama-70b-chat", "h100", 2, None)
    perf = inputs().perf.perf(inputs().catalog["sim-llama-70b-chat"], chat, {"max_tokens": 512}, 1.0)
    assert perf is not None
    rag = math.ceil(1.5 * 3.0 / perf.capacity_rps / 0.8 - 1e-9)
    video = math.ceil(1.5 * 0.5 / perf.capacity_rps / 0.8 - 1e-9)
    assert solution.instances[chat] == rag + video  # one deployment per workflow: nothing shared
    for t in (60.0, 3600.0, 86400.0):  # never changes, whatever happens
        assert policy.decide(t, {RAG_BEST: 50.0}, state(utilization={chat: 1.0})) is None


def test_static_uses_the_next_fastest_gpu_when_the_fastest_is_absent() -> None:
    decision = StaticPolicy(inputs()).decide(0.0, {RAG_BEST: 1.0}, state(devices={"a100": 64, "l4": 64, "cpu": 8}))
    assert decision is not None
    assert {c.hardware for c in decision.solution.instances} == {"a100", "cpu"}


def test_static_reports_when_peak_provisioning_exceeds_the_devices() -> None:
    decision = StaticPolicy(inputs()).decide(0.0, {}, state(devices={"h100": 2, "cpu": 8}, peaks={RAG_BEST: 5.0}))
    assert decision is not None and decision.solution.status == "infeasible"
    assert any("devices h100" in b for b in decision.solution.binding)


# --- murakkab-epoch ---------------------------------------------------------------------------------------


def test_epoch_policy_plans_only_on_the_hour_without_caps() -> None:
    policy = EpochPolicy(inputs())
    observed = {RAG_BEST: 1.0, RAG_FAIR: 2.0}
    planned_at = []
    current: Solution | None = None
    for minute in range(181):
        now_s = 60.0 * minute
        instances = dict(current.instances) if current else {}
        decision = policy.decide(now_s, observed, state(instances, {c: 0.6 for c in instances}))
        if decision is not None:
            assert "MILP" in decision.reason
            planned_at.append(now_s)
            current = decision.solution
    assert planned_at == [0.0, 3600.0, 7200.0, 10800.0]
    assert current is not None and current.status == "optimal"
    assert all(c.power_cap_w is None for c in current.instances)


def test_epoch_policy_scales_reactively_between_epochs() -> None:
    policy = EpochPolicy(inputs())
    first = policy.decide(0.0, {RAG_BEST: 1.0}, state())
    assert first is not None
    hot = next(c for c in first.solution.instances if c.hardware != "cpu")
    before = first.solution.instances[hot]
    up = policy.decide(60.0, {RAG_BEST: 3.0}, state(first.solution.instances, {hot: 1.0}))
    assert up is not None and "reactive" in up.reason
    assert up.solution.instances[hot] == math.ceil(before * 1.0 / 0.6)
    assert up.solution.power_w > first.solution.power_w
    assert policy.decide(120.0, {RAG_BEST: 3.0}, state(up.solution.instances, {hot: 0.7})) is None  # in band
    down = policy.decide(180.0, {RAG_BEST: 0.1}, state(up.solution.instances, {hot: 0.05}))
    assert down is not None and down.solution.instances[hot] == 1


def test_murakkab_scales_only_near_shedding_and_back_to_its_band_target() -> None:
    ours, paper = MurakkabPolicy(inputs(), lift_caps_on_bursts=False), EpochPolicy(inputs())
    assert ours.inputs.utilization_target == pytest.approx(0.85) and inputs().utilization_target == pytest.approx(0.8)
    mine, theirs = ours.decide(0.0, {RAG_BEST: 1.0}, state()), paper.decide(0.0, {RAG_BEST: 1.0}, state())
    assert mine is not None and theirs is not None
    hot = max((c for c in mine.solution.instances if c.hardware != "cpu"), key=lambda c: mine.solution.instances[c])
    warm = next(c for c in theirs.solution.instances if c.hardware != "cpu")
    n = mine.solution.instances[hot]
    assert ours.decide(60.0, {RAG_BEST: 1.0}, state(mine.solution.instances, {hot: 0.9})) is None  # within 0.92
    up = ours.decide(120.0, {RAG_BEST: 1.2}, state(mine.solution.instances, {hot: 0.97}))
    assert up is not None and up.solution.instances[hot] == math.ceil(n * 0.97 / 0.8)
    assert paper.decide(60.0, {RAG_BEST: 1.0}, state(theirs.solution.instances, {warm: 0.9})) is not None  # > 0.85


@pytest.mark.parametrize("busy", [0.97, 1.4])
def test_murakkab_lifts_a_hot_pools_cap_before_adding_instances(busy: float) -> None:
    ours = MurakkabPolicy(inputs())
    first = ours.decide(0.0, {RAG_BEST: 1.0}, state())
    assert first is not None
    hot = max((c for c in first.solution.instances if c.power_cap_w is not None),
              key=lambda c: first.solution.instances[c])
    n = first.solution.instances[hot]
    free = replace(hot, power_cap_w=None)
    exe = ours.inputs.catalog[hot.executor]
    gain = (ours.inputs.perf.perf(exe, free, exe.knob_defaults()).capacity_rps
            / ours.inputs.perf.perf(exe, hot, exe.knob_defaults()).capacity_rps)
    assert gain > 1.05
    up = ours.decide(60.0, {RAG_BEST: 1.0}, state(first.solution.instances, {hot: busy}))
    assert up is not None and "lifted" in up.reason and "reactive" in up.reason
    assert hot not in up.solution.instances
    expected = n if busy / gain <= ours.scale_band.high else math.ceil(n * busy / gain / ours.scale_band.target)
    assert up.solution.instances[free] - first.solution.instances.get(free, 0) == expected
    assert all(c != hot for stages in up.solution.configs.values() for c in stages.values())  # routing follows
    assert up.solution.instance_busy_power_w[free] > first.solution.instance_busy_power_w[hot]
    assert up.solution.average_power_w > first.solution.average_power_w  # faster, hungrier
    # The next plan caps again for what it forecasts.
    again = ours.decide(300.0, {RAG_BEST: 1.0}, state(up.solution.instances))
    assert again is not None and "MILP" in again.reason
    assert any(c.power_cap_w is not None for c in again.solution.instances)


def test_scale_band_and_utilization_target_are_checked() -> None:
    with pytest.raises(ValueError, match="low < target < high"):
        ScaleBand(low=0.3, high=0.7, target=0.8)
    with pytest.raises(ValueError, match="utilization_target"):
        MurakkabPolicy(inputs(), utilization_target=1.2)
    assert MurakkabPolicy(inputs(), utilization_target=None).inputs.utilization_target == pytest.approx(0.8)


def test_a_new_demand_triggers_a_plan_before_the_epoch_ends() -> None:
    policy = EpochPolicy(inputs())
    assert policy.decide(0.0, {RAG_BEST: 1.0}, state()) is not None
    assert policy.decide(60.0, {RAG_BEST: 1.0}, state()) is None
    decision = policy.decide(120.0, {RAG_BEST: 1.0, VIDEO_GOOD: 0.5}, state())
    assert decision is not None and "new demand" in decision.reason
    assert VIDEO_GOOD in decision.solution.choices
    assert policy.forecast.mean(VIDEO_GOOD) == pytest.approx(0.5)  # starts at its first observation


# --- murakkab (ours) ---------------------------------------------------------------------------------------


def test_murakkab_plans_every_five_minutes_with_power_caps() -> None:
    policy = MurakkabPolicy(inputs())
    observed = {RAG_FAIR: 1.0, VIDEO_GOOD: 0.5}
    planned_at = []
    last: Solution | None = None
    for minute in range(16):
        decision = policy.decide(60.0 * minute, observed, state())
        if decision is not None:
            planned_at.append(60.0 * minute)
            last = decision.solution
    assert planned_at == [0.0, 300.0, 600.0, 900.0]
    assert last is not None and any(c.power_cap_w is not None for c in last.instances)
    epoch = EpochPolicy(inputs()).decide(0.0, observed, state())
    assert epoch is not None and last.average_power_w < epoch.solution.average_power_w


def test_murakkab_provisions_for_a_high_percentile_of_a_bursty_load() -> None:
    ours, paper = MurakkabPolicy(inputs(), epoch_s=60.0), EpochPolicy(inputs(), epoch_s=60.0)
    for minute, rate in enumerate([1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0]):
        mine = ours.decide(60.0 * minute, {RAG_BEST: rate}, state())
        theirs = paper.decide(60.0 * minute, {RAG_BEST: rate}, state())
    assert mine is not None and theirs is not None
    assert ours.forecast.forecast(RAG_BEST) > paper.forecast.forecast(RAG_BEST)
    assert sum(mine.solution.load.values()) > sum(theirs.solution.load.values())


# --- the reactive autoscaler ---------------------------------------------------------------------------------


A = InstanceConfig("a", "h100")
B = InstanceConfig("b", "h100", 2)
C = InstanceConfig("c", "cpu")


def test_reactive_scale_up_is_bounded_by_free_devices() -> None:
    scaled = reactive_scale({A: 2, B: 1}, {A: 0.9, B: 0.95}, {A: 1, B: 2}, {"h100": 7})
    assert scaled is not None
    assert scaled[B] == 2  # busiest first: wants ceil(1 * 0.95 / 0.6) = 2 -> 2 more GPUs
    assert scaled[A] == 3  # wants ceil(2 * 0.9 / 0.6) = 3 -> 1 more GPU; 4 + 3 = 7 GPUs in all
    squeezed = reactive_scale({A: 2, B: 1}, {A: 0.9, B: 0.95}, {A: 1, B: 2}, {"h100": 5})
    assert squeezed is not None and squeezed[B] == 1 and squeezed[A] == 3  # one GPU free: too few for B, A takes it


def test_reactive_scale_down_keeps_one_and_frees_devices_first() -> None:
    scaled = reactive_scale({A: 4, B: 1}, {A: 0.1, B: 0.99}, {A: 1, B: 2}, {"h100": 6})
    assert scaled is not None and scaled[A] == 1 and scaled[B] == 2  # A's freed GPUs let B grow
    assert reactive_scale({A: 1}, {A: 0.0}, {A: 1}, {"h100": 4}) is None  # already at the minimum


def test_reactive_scale_leaves_the_band_and_missing_readings_alone() -> None:
    assert reactive_scale({A: 2, C: 3}, {A: 0.5, C: 0.84}, {A: 1, C: 0.01}, {"h100": 4, "cpu": 1}) is None
    assert reactive_scale({A: 2}, {}, {A: 1}, {"h100": 4}) is None
    scaled = reactive_scale({C: 3}, {C: 1.2}, {C: 0.01}, {"cpu": 1})
    assert scaled == {C: 6}
