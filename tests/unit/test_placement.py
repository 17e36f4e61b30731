"""Placement: memory, rack power, thermal headroom, node states, spread, sticky, power limits, reasons."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.devices.gpu_specs import GPU_SPECS
from common.protocol import DeviceInfo, DeviceTelemetry
from common.workflow.catalog import ExecutorSpec
from policies.model import HardwareType, InstanceConfig, Perf
from policies.placement import (
    DeviceState, NodeState, PlacementLimits, PlacementResult, device_state, hardware_key, place,
    temperature_trend_c_per_s,
)
from policies.plan import PlacedComponent

GIB = 1 << 30
H100 = GPU_SPECS["h100"]


# --- builders ----------------------------------------------------------------------------------


def executor(name: str, engine: str = "sim", device: str = "gpu", gpu_gib: float = 10, cpu_cores: float = 1.0,
             memory_gib: float = 0, gpu_models: tuple[str, ...] = ()) -> ExecutorSpec:
    data: dict[str, Any] = {
        "name": name, "task": "chat", "engine": engine,
        "resources": {"device": device, "gpu_memory_bytes": int(gpu_gib * GIB) if device == "gpu" else 0,
                      "cpu_cores": cpu_cores, "memory_bytes": int(memory_gib * GIB), "gpu_models": list(gpu_models)},
    }
    if engine == "sim":
        data["sim"] = {"latency_s": 1.0}
    elif engine == "vllm":
        data["vllm"] = {"model": "/models/x"}
    else:
        data["tool"] = {"entry_point": "agent.tools.x:run"}
    return ExecutorSpec.model_validate(data)


def gpu(index: int, hw: str = "h100", temperature_c: float | None = None, power_w: float | None = None,
        trend: float | None = None, used_gib: float = 0, simulated: bool = True, health: str = "ok") -> DeviceState:
    spec = GPU_SPECS[hw]
    return DeviceState(index=index, kind="gpu", model=f"{spec.name}{' (simulated)' if simulated else ''}",
                       hardware=hw, simulated=simulated, memory_total_bytes=spec.memory_total_bytes,
                       memory_used_bytes=int(used_gib * GIB), temperature_c=temperature_c, power_w=power_w,
                       power_limit_w=spec.power_limit_default_w, power_limit_min_w=spec.power_limit_min_w,
                       power_limit_max_w=spec.tdp_w, temperature_trend_c_per_s=trend,
                       power_limit_default_w=spec.power_limit_default_w, health=health)


def node(name: str, *devices: DeviceState, gpus: int = 0, hw: str = "h100", rack: str | None = None,
         liveness: str = "ready", admin: str = "active", cpu_cores: int = 16, cpu_device: bool = False,
         memory_gib: float = 256) -> NodeState:
    devs = list(devices) or [gpu(i, hw) for i in range(gpus)]
    if cpu_device:
        devs.append(DeviceState(len(devs), "cpu", "x86_64", "cpu", False, int(memory_gib * GIB)))
    labels = {"rack": rack} if rack is not None else {}
    return NodeState(name, liveness == "ready" and admin == "active", tuple(devs), cpu_cores, int(memory_gib * GIB),
                     labels, liveness, admin)


def cat(*executors: ExecutorSpec) -> dict[str, ExecutorSpec]:
    return {e.name: e for e in executors}


CHAT = executor("chat", gpu_gib=30)
BIG = executor("big", gpu_gib=50)
CATALOG = cat(CHAT, BIG, executor("tiny", gpu_gib=5), executor("tool", engine="tool", device="cpu", cpu_cores=2),
              executor("real", engine="vllm", gpu_gib=10))


def cfg(executor: str = "chat", hw: str = "h100", tp: int = 1, cap: float | None = None) -> InstanceConfig:
    return InstanceConfig(executor, hw, tp, cap)


def where(result: PlacementResult, executor: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((c.node, c.device_indexes) for c in result.components if executor in (None, c.executor))


# --- helpers --------------------------------------------------------------------------------


def test_hardware_key_from_model_names() -> None:
    assert hardware_key("NVIDIA H100 80GB HBM3") == "h100"
    assert hardware_key("NVIDIA H100 80GB HBM3 (simulated)") == "h100"
    assert hardware_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert hardware_key("NVIDIA L4") == "l4"
    assert hardware_key("NVIDIA L40S") == "l40s"  # not "l4"
    assert hardware_key("NVIDIA H200") == "h200"
    assert hardware_key("Intel Xeon", kind="cpu") == "cpu"
    assert hardware_key("NVIDIA H100 PCIe") == "h100"  # one key for the planner and for stored profiles
    assert hardware_key("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"


def test_device_state_from_protocol_and_trend() -> None:
    info = DeviceInfo(index=1, kind="gpu", model="NVIDIA H100 80GB HBM3", uuid="GPU-1", backend="nvml",
                      simulated=False, memory_total_bytes=80 * GIB, power_limit_min_w=200.0,
                      power_limit_max_w=700.0, power_limit_default_w=700.0)
    tele = DeviceTelemetry(index=1, power_w=350.0, energy_j=1.0, temperature_c=60.0, memory_used_bytes=GIB,
                           memory_total_bytes=80 * GIB, utilization_pct=50.0, sm_clock_mhz=1500, power_limit_w=500.0)
    state = device_state(info, tele, 0.1)
    assert (state.hardware, state.temperature_c, state.power_w, state.power_limit_w) == ("h100", 60.0, 350.0, 500.0)
    assert state.power_limit_min_w == 200.0 and state.temperature_trend_c_per_s == 0.1 and state.health == "ok"
    assert temperature_trend_c_per_s([(0.0, 50.0), (10.0, 51.0), (20.0, 52.0)]) == pytest.approx(0.1)
    assert temperature_trend_c_per_s([(5.0, 50.0)]) is None
    assert temperature_trend_c_per_s([(5.0, 50.0), (5.0, 52.0)]) is None


# --- memory ------------------------------------------------------------------------------------


def test_memory_fit_per_device_and_unplaced_reason() -> None:
    result = place({cfg("big"): 2}, [node("n1", gpus=1)], CATALOG)
    assert where(result) == [("n1", (0,))]
    assert result.unplaced == {cfg("big"): 1}
    assert "memory" in result.reasons[cfg("big")] and "n1" in result.reasons[cfg("big")]
    assert any("placed 1 of 2" in n for n in result.notes)


def test_small_instances_share_a_gpu_only_when_no_empty_one_is_left() -> None:
    two = place({cfg("chat"): 2}, [node("n1", gpus=2)], CATALOG, limits=PlacementLimits(spread=False))
    assert where(two) == [("n1", (0,)), ("n1", (1,))]  # empty GPUs first
    shared = place({cfg("chat"): 2}, [node("n1", gpus=1)], CATALOG)
    assert where(shared) == [("n1", (0,)), ("n1", (0,))] and not shared.unplaced
    assert any("shares GPU" in n for n in shared.notes)
    assert not any("shares" in n for n in two.notes)
    alone = place({cfg("chat"): 2}, [node("n1", gpus=1)], CATALOG, limits=PlacementLimits(allow_sharing=False))
    assert len(alone.components) == 1 and "sharing" in alone.reasons[cfg("chat")]
    three = place({cfg("chat"): 3}, [node("n1", gpus=1)], CATALOG)  # 3 x 30 GiB > 79.6 GiB
    assert len(three.components) == 2 and three.unplaced == {cfg("chat"): 1}


def test_memory_used_outside_the_plan_counts_but_not_on_devices_of_current_components() -> None:
    busy = node("n1", gpu(0, used_gib=60))
    assert place({cfg("chat"): 1}, [busy], CATALOG).unplaced == {cfg("chat"): 1}
    mine = PlacedComponent("chat-n1-g0-0", "chat", "n1", (0,), 700.0)
    kept = place({cfg("chat"): 1}, [busy], CATALOG, [mine])
    assert kept.components == (mine,)  # the 60 GiB in use is (mostly) the current component's own
    ignore = PlacementLimits(count_foreign_memory=False)
    assert place({cfg("chat"): 1}, [busy], CATALOG, limits=ignore).unplaced == {}


def test_tensor_parallel_takes_distinct_gpus_of_one_node() -> None:
    spread_out = [node("n1", gpus=1), node("n2", gpus=1)]
    result = place({cfg("big", tp=2): 1}, spread_out, CATALOG)
    assert result.unplaced == {cfg("big", tp=2): 1}
    result = place({cfg("big", tp=2): 1}, spread_out + [node("n3", gpus=2)], CATALOG)
    assert where(result) == [("n3", (0, 1))]
    assert result.components[0].component_id == "big-n3-g0-0"
    assert result.power_limits == {("n3", 0): 700.0, ("n3", 1): 700.0}


def test_hardware_engine_and_gpu_models_must_match() -> None:
    nodes = [node("a", gpus=1, hw="a100"), node("h", gpus=1)]
    assert where(place({cfg("chat", hw="a100"): 1}, nodes, CATALOG)) == [("a", (0,))]
    assert where(place({cfg("chat", hw="h100"): 1}, nodes, CATALOG)) == [("h", (0,))]
    assert where(place({cfg("real"): 1}, nodes, CATALOG)) == []  # vllm needs a real GPU
    real = [node("r", gpu(0, simulated=False))]
    assert where(place({cfg("real"): 1}, real, CATALOG)) == [("r", (0,))]
    pinned = cat(executor("pinned", gpu_gib=5, gpu_models=("A100",)))
    result = place({InstanceConfig("pinned", "h100"): 1}, nodes, pinned)
    assert result.unplaced and "gpu model" in result.reasons[InstanceConfig("pinned", "h100")]


# --- power ---------------------------------------------------------------------------------------


def rack_nodes() -> list[NodeState]:
    return [node("a1", gpus=1, rack="r1"), node("a2", gpus=1, rack="r1")]


def test_rack_power_budget_bounds_uncapped_instances() -> None:
    idle = 2 * H100.idle_power_w
    limits = PlacementLimits(rack_power_budget_w={"r1": idle + 700.0})  # room for one GPU at 700 W
    result = place({cfg("big"): 2}, rack_nodes(), CATALOG, limits=limits)
    assert len(result.components) == 1 and result.unplaced == {cfg("big"): 1}
    assert "rack power budget" in result.reasons[cfg("big")] and "r1" in result.reasons[cfg("big")]
    assert result.rack_power_w["r1"] == pytest.approx(700.0 + H100.idle_power_w)
    # The next rack, without a budget, takes what r1 cannot.
    more = place({cfg("big"): 2}, rack_nodes() + [node("b1", gpus=1, rack="r2")], CATALOG, limits=limits)
    assert not more.unplaced and sorted(c.node for c in more.components) == ["a1", "b1"]
    # Instances small enough to share a GPU already at its limit add nothing: the limit bounds the draw.
    shared = place({cfg("chat"): 2}, rack_nodes(), CATALOG, limits=limits)
    assert where(shared) == [("a1", (0,)), ("a1", (0,))] and not shared.unplaced


def test_power_caps_fit_more_instances_under_a_rack_budget() -> None:
    idle = 2 * H100.idle_power_w
    limits = PlacementLimits(rack_power_budget_w={"r1": idle + 700.0})
    result = place({cfg("chat", cap=350.0): 2}, rack_nodes(), CATALOG, limits=limits)
    assert not result.unplaced and len(result.components) == 2
    assert result.power_limits == {("a1", 0): 350.0, ("a2", 0): 350.0}
    assert all(c.power_limit_w == 350.0 for c in result.components)
    assert result.rack_power_w["r1"] == pytest.approx(700.0)


class FlatPerf:
    """A perf model: every instance draws ``busy_w`` in all at full load, holds ``memory_gib`` per device."""

    def __init__(self, busy_w: float, memory_gib: float = 10) -> None:
        self.busy_w, self.memory_gib = busy_w, memory_gib

    def perf(self, executor: ExecutorSpec, config: InstanceConfig, knobs: dict[str, Any],
             items: float = 1.0) -> Perf | None:
        idle = H100.busy_idle_power_w * config.tp  # an instance's GPU holds a CUDA context
        return Perf(1.0, 1.0, 1.0, self.busy_w * config.tp, idle, int(self.memory_gib * GIB))


def test_perf_model_power_and_memory_are_used_when_given() -> None:
    idle = 2 * H100.idle_power_w
    limits = PlacementLimits(rack_power_budget_w={"r1": idle + 2 * (400.0 - H100.idle_power_w)})
    without = place({cfg("big"): 2}, rack_nodes(), CATALOG, limits=limits)
    assert len(without.components) == 1  # worst case: 700 W each
    result = place({cfg("big"): 2}, rack_nodes(), CATALOG, limits=limits, perf=FlatPerf(400.0, memory_gib=50))
    assert not result.unplaced and where(result) == [("a1", (0,)), ("a2", (0,))]
    assert result.device_power_w == {("a1", 0): pytest.approx(400.0), ("a2", 0): pytest.approx(400.0)}
    # Memory from the perf model: 8 x 10 GiB instances on one 80 GB GPU.
    eight = place({cfg("chat"): 8}, [node("n1", gpus=1)], CATALOG, perf=FlatPerf(150.0, memory_gib=9.5))
    assert len(eight.components) == 8 and eight.device_power_w[("n1", 0)] == pytest.approx(
        H100.busy_idle_power_w + 8 * (150.0 - H100.busy_idle_power_w))


def test_bandwidth_bound_work_is_not_trusted_to_hold_a_deep_cap() -> None:
    """An H100 with a decode-shaped load draws 301 W at a 200 W limit: the rack budget must see that."""
    capped = InstanceConfig("big", "h100", 1, 200.0)
    decode = FlatPerf(301.0, memory_gib=50)
    loose = place({capped: 1}, [node("a1", gpus=1, rack="r1")], CATALOG, perf=decode)
    assert loose.device_power_w[("a1", 0)] == pytest.approx(301.0)  # above the 200 W limit it sets
    limits = PlacementLimits(rack_power_budget_w={"r1": 250.0})
    tight = place({capped: 1}, [node("a1", gpus=1, rack="r1")], CATALOG, limits=limits, perf=decode)
    assert tight.unplaced == {capped: 1} and "rack r1" in next(iter(tight.reasons.values()))
    compute = place({capped: 1}, [node("a1", gpus=1, rack="r1")], CATALOG, limits=limits, perf=FlatPerf(200.0))
    assert not compute.unplaced and compute.device_power_w[("a1", 0)] == pytest.approx(200.0)  # the cap holds
    unknown = place({capped: 1}, [node("a1", gpus=1, rack="r1")], CATALOG, limits=limits)
    assert not unknown.unplaced and unknown.device_power_w[("a1", 0)] == pytest.approx(200.0)  # no model: the cap


def test_cpu_instances_count_cores_and_rack_power() -> None:
    hw = {"cpu": HardwareType("cpu", "cpu", 0, 50.0, 200.0, None, 1.0)}
    nodes = [node("c1", cpu_cores=4, cpu_device=True, rack="r9")]
    result = place({InstanceConfig("tool", "cpu"): 9}, nodes, CATALOG, hardware=hw)
    assert len(result.components) == 8  # 2 cores each, a quarter counted, on 4 cores
    assert result.components[0].device_indexes == (0,) and result.components[0].power_limit_w is None
    assert result.components[0].component_id.startswith("tool-c1-cpu-")
    assert result.rack_power_w["r9"] == pytest.approx(8 * 200.0 * 2 / 4)  # busy: 2 of the node's 4 cores each
    assert "cpu core" in result.reasons[InstanceConfig("tool", "cpu")]
    budget = PlacementLimits(rack_power_budget_w={"r9": 250.0})
    assert len(place({InstanceConfig("tool", "cpu"): 9}, nodes, CATALOG, limits=budget, hardware=hw).components) == 2
    package = {"cpu": HardwareType("cpu", "cpu", 0, 50.0, 200.0, None, 1.0, cores=16)}  # 2 of its 16 cores
    assert place({InstanceConfig("tool", "cpu"): 1}, nodes, CATALOG, hardware=package).rack_power_w["r9"] == 25.0


# --- thermal ---------------------------------------------------------------------------------------


def test_hot_node_is_avoided() -> None:
    hot = node("a", gpu(0, temperature_c=86.0, power_w=300.0), gpu(1, temperature_c=40.0, power_w=80.0))
    cool = node("b", gpu(0, temperature_c=40.0, power_w=80.0))
    result = place({cfg("chat"): 1}, [hot, cool], CATALOG)
    assert where(result) == [("b", (0,))]
    only_hot = place({cfg("chat"): 1}, [hot], CATALOG)
    assert only_hot.unplaced and "hot node" in only_hot.reasons[cfg("chat")]


def test_heating_trend_makes_a_node_hot_before_it_is() -> None:
    heating = node("a", gpu(0, temperature_c=70.0, power_w=700.0, trend=0.5))  # heads to ~92 C
    assert place({cfg("tiny"): 1}, [heating, node("b", gpus=1)], CATALOG).components[0].node == "b"


def test_device_near_its_limit_gets_no_more_load() -> None:
    warm = gpu(0, temperature_c=79.0, power_w=300.0)  # 400 W more would add ~23 C
    result = place({cfg("chat"): 1}, [node("a", warm, gpu(1, temperature_c=45.0, power_w=80.0))], CATALOG)
    assert where(result) == [("a", (1,))]
    alone = place({cfg("chat"): 1}, [node("a", warm)], CATALOG)
    assert alone.unplaced and "thermal" in alone.reasons[cfg("chat")]
    # A cap low enough keeps the predicted temperature under the limit: 79 + (250 - 300) * R.
    capped = place({cfg("chat", cap=250.0): 1}, [node("a", warm)], CATALOG)
    assert where(capped) == [("a", (0,))]
    assert capped.device_temperature_c[("a", 0)] <= H100.max_operating_temperature_c - 5.0


def test_thermal_model_without_telemetry_uses_ambient_and_resistance() -> None:
    l4 = GPU_SPECS["l4"]
    hot_inlet = PlacementLimits(ambient_c=45.0)  # 45 + 72 W * 0.625 K/W = 90 C > 81 C
    nodes = [node("n", gpus=1, hw="l4")]
    tiny = cfg("tiny", hw="l4")
    assert place({tiny: 1}, nodes, CATALOG, limits=hot_inlet).unplaced == {tiny: 1}
    capped = cfg("tiny", hw="l4", cap=40.0)  # 45 + 40 * 0.625 = 70 C
    result = place({capped: 1}, nodes, CATALOG, limits=hot_inlet)
    assert not result.unplaced
    assert result.device_temperature_c[("n", 0)] == pytest.approx(45.0 + 40.0 * l4.thermal_resistance_k_per_w)
    strict = PlacementLimits(ambient_c=45.0, max_temperature_c=65.0)
    assert place({capped: 1}, nodes, CATALOG, limits=strict).unplaced == {capped: 1}


# --- node states ------------------------------------------------------------------------------------


@pytest.mark.parametrize("liveness,admin", [("suspect", "active"), ("lost", "active"), ("joining", "active"),
                                            ("ready", "draining"), ("ready", "drained")])
def test_unavailable_nodes_are_avoided_and_current_components_move_off(liveness: str, admin: str) -> None:
    bad = node("a", gpus=2, liveness=liveness, admin=admin)
    good = node("b", gpus=2)
    old = PlacedComponent("chat-a-g0-0", "chat", "a", (0,), 700.0)
    result = place({cfg("chat"): 2}, [bad, good], CATALOG, [old])
    assert {c.node for c in result.components} == {"b"} and not result.unplaced
    assert "chat-a-g0-0" not in {c.component_id for c in result.components}
    assert any("chat-a-g0-0 not kept" in n and (liveness if liveness != "ready" else admin) in n
               for n in result.notes)
    alone = place({cfg("chat"): 1}, [bad], CATALOG)
    assert alone.unplaced and f"node {liveness if liveness != 'ready' else admin}" in alone.reasons[cfg("chat")]


def test_unhealthy_gpus_take_nothing() -> None:
    result = place({cfg("chat"): 1}, [node("a", gpu(0, health="xid"), gpu(1))], CATALOG)
    assert where(result) == [("a", (1,))]


# --- spread ---------------------------------------------------------------------------------------


def test_replicas_spread_over_racks_then_nodes() -> None:
    nodes = [node("a1", gpus=2, rack="r1"), node("a2", gpus=2, rack="r1"), node("b1", gpus=2, rack="r2")]
    two = place({cfg("chat"): 2}, nodes, CATALOG)
    assert sorted(c.node for c in two.components) == ["a1", "b1"]  # one per rack
    three = place({cfg("chat"): 3}, nodes, CATALOG)
    assert sorted(c.node for c in three.components) == ["a1", "a2", "b1"]  # then one per node
    packed = place({cfg("chat"): 3}, nodes, CATALOG, limits=PlacementLimits(spread=False))
    assert sorted(c.node for c in packed.components) == ["a1", "a1", "a2"]


def test_spread_prefers_cooler_gpus_among_equals() -> None:
    nodes = [node("a", gpu(0, temperature_c=60.0, power_w=300.0)), node("b", gpu(0, temperature_c=40.0, power_w=80.0))]
    assert where(place({cfg("tiny"): 1}, nodes, CATALOG)) == [("b", (0,))]


# --- sticky ---------------------------------------------------------------------------------------------


def test_current_components_stay_where_they_still_fit() -> None:
    nodes = [node("a", gpus=2), node("b", gpus=2)]
    old = PlacedComponent("chat-b-g1-0", "chat", "b", (1,), 700.0)
    result = place({cfg("chat"): 2}, nodes, CATALOG, [old])
    assert old in result.components
    new = [c for c in result.components if c != old]
    assert [(c.node, c.component_id) for c in new] == [("a", "chat-a-g0-0")]
    not_sticky = place({cfg("chat"): 1}, nodes, CATALOG, [old], PlacementLimits(sticky=False))
    assert where(not_sticky) == [("a", (0,))]


def test_a_new_cap_keeps_the_component_and_changes_its_power_limit() -> None:
    old = PlacedComponent("chat-b-g1-0", "chat", "b", (1,), 700.0)
    result = place({cfg("chat", cap=400.0): 1}, [node("a", gpus=2), node("b", gpus=2)], CATALOG, [old])
    assert result.components == (PlacedComponent("chat-b-g1-0", "chat", "b", (1,), 400.0),)
    assert result.power_limits == {("b", 1): 400.0}
    assert any("chat-b-g1-0 kept, power limit 700.0 -> 400.0" in n for n in result.notes)


def test_surplus_and_misfit_current_components_are_dropped_and_ids_not_reused() -> None:
    nodes = [node("a", gpus=1), node("b", gpus=1)]
    current = [PlacedComponent("chat-a-g0-0", "chat", "a", (0,), 700.0),
               PlacedComponent("chat-b-g0-0", "chat", "b", (0,), 700.0),
               PlacedComponent("big-a-g0-0", "big", "a", (0,), 700.0)]
    result = place({cfg("chat"): 1}, nodes, CATALOG, current)
    assert result.components == (current[0],)
    assert any("not needed any more" in n and "chat-b-g0-0" in n and "big-a-g0-0" in n for n in result.notes)
    # A current component on a GPU that is now too hot moves, under a fresh id.
    hot = [node("a", gpu(0, temperature_c=90.0, power_w=700.0)), node("b", gpus=1)]
    moved = place({cfg("chat"): 1}, hot, CATALOG, current[:1])
    assert where(moved) == [("b", (0,))] and moved.components[0].component_id == "chat-b-g0-0"
    assert any("chat-a-g0-0 not kept" in n and "thermal" in n for n in moved.notes)
    taken = place({cfg("chat"): 1}, [node("b", gpus=1)], CATALOG, [current[1]], PlacementLimits(sticky=False))
    assert taken.components[0].component_id == "chat-b-g0-1"  # chat-b-g0-0 belongs to a stopping component


# --- power limits and reasons ------------------------------------------------------------------


def test_power_limits_per_device_and_caps_checked_against_the_device_range() -> None:
    result = place({cfg("chat", cap=500.0): 1, cfg("tiny"): 1}, [node("a", gpus=2)], CATALOG)
    assert result.power_limits == {("a", 0): 500.0, ("a", 1): 700.0}
    assert {c.executor: c.power_limit_w for c in result.components} == {"chat": 500.0, "tiny": 700.0}
    low = place({cfg("chat", cap=150.0): 1}, [node("a", gpus=1)], CATALOG)  # H100 minimum is 200 W
    assert low.unplaced and "outside its 200..700 W range" in low.reasons[cfg("chat", cap=150.0)]


def test_instances_with_different_power_limits_do_not_share_a_gpu() -> None:
    result = place({cfg("tiny", cap=300.0): 1, cfg("tiny"): 1}, [node("a", gpus=1)], CATALOG)
    assert len(result.components) == 1 and "power limit" in next(iter(result.reasons.values()))
    same = place({cfg("tiny", cap=300.0): 2}, [node("a", gpus=1)], CATALOG)
    assert len(same.components) == 2 and same.power_limits == {("a", 0): 300.0}


def test_unplaceable_configs_are_reported_with_reasons() -> None:
    nodes = [node("a", gpus=1)]
    wanted = {cfg("nope"): 1, InstanceConfig("tool", "h100"): 1, cfg("chat", hw="h200"): 2,
              InstanceConfig("chat", "cpu", 2): 1}
    result = place(wanted, nodes, CATALOG)
    assert result.unplaced == {cfg("nope"): 1, InstanceConfig("tool", "h100"): 1, cfg("chat", hw="h200"): 2,
                               InstanceConfig("chat", "cpu", 2): 1}
    assert "not in the catalog" in result.reasons[cfg("nope")]
    assert "runs on cpu" in result.reasons[InstanceConfig("tool", "h100")]
    assert "no node has h200" in result.reasons[cfg("chat", hw="h200")]
    assert "tp 2" in result.reasons[InstanceConfig("chat", "cpu", 2)]
    assert not result.components
    with pytest.raises(ValueError, match="whole number"):
        place({cfg(): -1}, nodes, CATALOG)
    with pytest.raises(ValueError, match="unique"):
        place({cfg(): 1}, nodes + nodes, CATALOG)


def test_deterministic_whatever_the_input_order() -> None:
    nodes = [node(f"n{i}", *(gpu(j, temperature_c=40.0 + i + j, power_w=100.0) for j in range(2)),
                  rack=f"r{i % 2}") for i in range(5)]
    wanted = {cfg("chat"): 3, cfg("tiny", cap=300.0): 4, cfg("big", tp=2): 1, InstanceConfig("tool", "cpu"): 2}
    current = [PlacedComponent("chat-n3-g1-0", "chat", "n3", (1,), 700.0),
               PlacedComponent("tiny-n0-g0-4", "tiny", "n0", (0,), 700.0)]
    limits = PlacementLimits(rack_power_budget_w={"r0": 2500.0})
    first = place(wanted, nodes, CATALOG, current, limits)
    rng = random.Random(7)
    for _ in range(5):
        shuffled_nodes, shuffled_current = list(nodes), list(current)
        rng.shuffle(shuffled_nodes)
        rng.shuffle(shuffled_current)
        items = list(wanted.items())
        rng.shuffle(items)
        assert place(dict(items), shuffled_nodes, CATALOG, shuffled_current, limits) == first


# --- property: nothing returned breaks a rule ------------------------------------------------------

HWS = ("h100", "a100", "l4")
PROP_CATALOG = cat(executor("e5", gpu_gib=5), executor("e20", gpu_gib=20), executor("e45", gpu_gib=45),
                   executor("t", engine="tool", device="cpu", cpu_cores=3, memory_gib=1))


@st.composite
def fleets(draw: Any) -> list[NodeState]:
    nodes = []
    for i in range(draw(st.integers(1, 8))):
        main = draw(st.sampled_from(HWS))
        devices = []
        for j in range(draw(st.integers(0, 4))):
            hw = draw(st.sampled_from((main,) * 4 + HWS))  # now and then a node with mixed GPUs
            temperature = draw(st.one_of(st.none(), st.none(), st.floats(20.0, 90.0)))
            used_fraction = draw(st.sampled_from((0, 0, 0.2, 0.9)))
            devices.append(gpu(j, hw, temperature_c=temperature,
                               power_w=None if temperature is None else draw(st.floats(10.0, 700.0)),
                               trend=draw(st.one_of(st.none(), st.floats(-0.2, 0.2))),
                               used_gib=used_fraction * GPU_SPECS[hw].memory_total_bytes / GIB,
                               health=draw(st.sampled_from(("ok",) * 7 + ("xid",)))))
        cpu_device = draw(st.booleans())
        if cpu_device:
            devices.append(DeviceState(len(devices), "cpu", "x86_64", "cpu", False, 64 * GIB))
        nodes.append(NodeState(
            f"n{i}", draw(st.sampled_from((True,) * 7 + (False,))), tuple(devices), draw(st.integers(0, 8)),
            int(draw(st.sampled_from((0.5, 64))) * GIB),
            {"rack": rack} if (rack := draw(st.sampled_from((None, "r1", "r2")))) is not None else {},
            draw(st.sampled_from(("ready",) * 5 + ("suspect",))),
            draw(st.sampled_from(("active",) * 8 + ("draining", "drained")))))
    return nodes


@st.composite
def later(draw: Any, nodes: list[NodeState]) -> list[NodeState]:
    """The same fleet a while later: some nodes drained or silent, some GPUs hotter or failed."""
    changed = []
    for n in nodes:
        devices = tuple(
            replace(d, temperature_c=draw(st.floats(80.0, 95.0)), power_w=d.power_limit_max_w)
            if d.kind == "gpu" and draw(st.integers(0, 5)) == 0 else
            replace(d, health="lost") if d.kind == "gpu" and draw(st.integers(0, 9)) == 0 else d
            for d in n.devices)
        admin = draw(st.sampled_from((n.admin,) * 6 + ("draining",)))
        liveness = draw(st.sampled_from((n.liveness,) * 6 + ("suspect",)))
        changed.append(replace(n, devices=devices, admin=admin, liveness=liveness))
    return changed


@st.composite
def solutions(draw: Any, hws: tuple[str, ...] = HWS) -> dict[InstanceConfig, int]:
    wanted: dict[InstanceConfig, int] = {}
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(sorted(PROP_CATALOG)))
        if name == "t":
            config = InstanceConfig("t", "cpu")
        else:
            hw = draw(st.sampled_from(hws))
            spec = GPU_SPECS[hw]
            cap = draw(st.sampled_from((None, spec.power_limit_min_w, (spec.power_limit_min_w + spec.tdp_w) / 2,
                                        None, spec.power_limit_min_w - 10.0)))  # the last is out of range
            config = InstanceConfig(name, hw, draw(st.integers(1, 2)), cap)
        wanted[config] = draw(st.integers(0, 3))
    return wanted


def predicted_c(d: DeviceState, power_w: float, limits: PlacementLimits) -> float:
    spec = GPU_SPECS[d.hardware]
    r = spec.thermal_resistance_k_per_w
    model = limits.ambient_c + power_w * r
    if d.temperature_c is None:
        return model
    seen = d.temperature_c + (d.temperature_trend_c_per_s or 0.0) * r * spec.heat_capacity_j_per_k
    return max(model, seen + (power_w - (d.power_w or 0.0)) * r)


def check(result: PlacementResult, wanted: dict[InstanceConfig, int], nodes: list[NodeState],
          current: list[PlacedComponent], limits: PlacementLimits) -> None:
    """Recomputes every rule from scratch (worst-case power: a GPU with instances draws its limit)."""
    by_node = {n.name: n for n in nodes}
    ids = [c.component_id for c in result.components]
    assert len(ids) == len(set(ids))
    count: Counter[InstanceConfig] = Counter()
    memory: Counter[tuple[str, int]] = Counter()
    device_limits: dict[tuple[str, int], set[float | None]] = {}
    cores: Counter[str] = Counter()
    host: Counter[str] = Counter()
    occupied = {(c.node, i) for c in current for i in c.device_indexes}
    for comp in result.components:
        n = by_node[comp.node]
        assert n.liveness == "ready" and n.admin == "active" and n.schedulable
        exe = PROP_CATALOG[comp.executor]
        devices = {d.index: d for d in n.devices}
        if exe.engine == "tool":
            assert comp.power_limit_w is None and all(devices[i].kind == "cpu" for i in comp.device_indexes)
            count[InstanceConfig(comp.executor, "cpu")] += 1
            cores[comp.node] += exe.resources.cpu_cores / 4
            host[comp.node] += exe.resources.memory_bytes
            continue
        gpus = [devices[i] for i in comp.device_indexes]
        assert len(set(comp.device_indexes)) == len(gpus) >= 1
        hw = gpus[0].hardware
        assert all(d.kind == "gpu" and d.hardware == hw and d.health == "ok" and d.simulated for d in gpus)
        spec = GPU_SPECS[hw]
        assert comp.power_limit_w is not None
        assert spec.power_limit_min_w <= comp.power_limit_w <= spec.tdp_w
        cap = None if comp.power_limit_w == spec.power_limit_default_w else comp.power_limit_w
        config = InstanceConfig(comp.executor, hw, len(gpus), cap)
        count[config] += 1
        for d in gpus:
            memory[(comp.node, d.index)] += -(-exe.resources.gpu_memory_bytes // len(gpus))
            device_limits.setdefault((comp.node, d.index), set()).add(comp.power_limit_w)
    for config, n_placed in count.items():
        assert n_placed + result.unplaced.get(config, 0) == wanted.get(config, 0)
    assert sum(count.values()) + sum(result.unplaced.values()) == sum(wanted.values())
    assert set(result.reasons) == set(result.unplaced)
    rack_w: Counter[str] = Counter()
    for n in nodes:
        assert cores[n.name] <= n.cpu_cores + 1e-9 and host[n.name] <= n.memory_total_bytes
        for d in n.devices:
            key = (n.name, d.index)
            if d.kind != "gpu":
                continue
            spec = GPU_SPECS[d.hardware]
            foreign = 0 if key in occupied else d.memory_used_bytes
            assert memory[key] <= d.memory_total_bytes - foreign
            if key in device_limits:
                assert len(device_limits[key]) == 1  # one power limit per GPU
                limit = device_limits[key].pop()
                assert result.power_limits[key] == limit
                assert predicted_c(d, limit, limits) <= spec.max_operating_temperature_c - 5.0 + 1e-6
                power = limit
            else:
                assert key not in result.power_limits
                power = spec.idle_power_w
            if "rack" in n.labels:
                rack_w[n.labels["rack"]] += power
    for rack, budget in limits.rack_power_budget_w.items():  # idle alone may exceed it: then nothing goes there
        if any(by_node[c.node].labels.get("rack") == rack for c in result.components):
            assert rack_w[rack] <= budget + 1e-6


def hot_nodes(nodes: list[NodeState]) -> set[str]:
    hot = set()
    for n in nodes:
        for d in n.devices:
            if d.kind == "gpu" and d.temperature_c is not None:
                spec = GPU_SPECS[d.hardware]
                horizon = spec.thermal_resistance_k_per_w * spec.heat_capacity_j_per_k
                if d.temperature_c + (d.temperature_trend_c_per_s or 0.0) * horizon >= \
                        spec.max_operating_temperature_c - 5.0:
                    hot.add(n.name)
    return hot


@st.composite
def cases(draw: Any) -> tuple[list[NodeState], list[NodeState], dict[InstanceConfig, int],
                              dict[InstanceConfig, int]]:
    """A fleet, the fleet later, and two solutions, mostly for hardware the fleet has."""
    nodes = draw(fleets())
    present = tuple(sorted({d.hardware for n in nodes for d in n.devices if d.kind == "gpu"})) or HWS
    hws = draw(st.sampled_from((present, present, present, HWS)))
    return nodes, draw(later(nodes)), draw(solutions(hws)), draw(solutions(hws))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.dictionaries(st.sampled_from(("r1", "r2")), st.floats(0.0, 3000.0)), st.booleans(), st.booleans())
def test_no_placement_breaks_a_rule(case: tuple[list[NodeState], list[NodeState], dict[InstanceConfig, int],
                                                dict[InstanceConfig, int]],
                                    budgets: dict[str, float], spread: bool, sharing: bool) -> None:
    nodes, nodes_later, first, second = case
    limits = PlacementLimits(rack_power_budget_w=budgets, spread=spread, allow_sharing=sharing)
    before = place(first, nodes, PROP_CATALOG, (), limits)
    check(before, first, nodes, [], limits)
    assert not any(c.node in hot_nodes(nodes) for c in before.components)
    # Re-plan over the first result on the changed fleet: kept components must obey the rules too.
    wanted = {**first, **second}
    after = place(wanted, nodes_later, PROP_CATALOG, before.components, limits)
    check(after, wanted, nodes_later, list(before.components), limits)
    hot = hot_nodes(nodes_later)
    kept = {c.component_id: c for c in before.components}
    for comp in after.components:
        if comp.component_id in kept:  # a kept component never moves
            assert (comp.node, comp.device_indexes) == (kept[comp.component_id].node,
                                                        kept[comp.component_id].device_indexes)
        else:
            assert comp.node not in hot


def test_avoided_executor_node_pairs_are_not_used_nor_kept() -> None:
    nodes = [node("a1", gpus=1), node("a2", gpus=1)]
    first = place({cfg("big"): 1}, nodes, CATALOG)
    assert where(first) == [("a1", (0,))]
    limits = PlacementLimits(avoid={("big", "a1"): "failed 3 times in a row there"})
    moved = place({cfg("big"): 1}, nodes, CATALOG, first.components, limits)
    assert where(moved) == [("a2", (0,))]
    assert any("not kept" in n and "avoided on a1" in n for n in moved.notes), moved.notes
    nowhere = place({cfg("big"): 1}, [node("a1", gpus=1)], CATALOG, limits=limits)
    assert nowhere.unplaced == {cfg("big"): 1} and "avoided" in nowhere.reasons[cfg("big")]
    assert where(place({cfg("chat"): 1}, [node("a1", gpus=1)], CATALOG, limits=limits)) == [("a1", (0,))]
