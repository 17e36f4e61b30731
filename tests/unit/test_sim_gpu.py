"""The simulated GPU's physical model: power under caps, DVFS, thermals, energy, faults, determinism."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.devices.base import DeviceError, PowerLimitOutOfRange
from common.devices.gpu_specs import GPU_SPECS, MIB, gpu_spec
from agent.devices.sim import (
    POWER_NOISE_FRACTION,
    POWER_NOISE_MAX_SIGMAS,
    SimFault,
    SimFaultSchedule,
    SimGpu,
    device_seed,
    open_sim_devices,
)
from common.devices.physics import operating_point
from common.protocol import DeviceTelemetry

H100 = gpu_spec("h100")
NOISE_BOUND = POWER_NOISE_FRACTION * POWER_NOISE_MAX_SIGMAS  # reported power is within this share of model power
THERMAL_REASONS = {"sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown"}


def gpu(utilization: float = 1.0, seed: int = 1, model: str = "h100", ambient_c: float = 25.0) -> SimGpu:
    return SimGpu(0, gpu_spec(model), seed=seed, node_name="n", utilization=utilization, ambient_c=ambient_c)


def run(device: SimGpu, until_s: float, step_s: float = 0.5) -> list[DeviceTelemetry]:
    samples = []
    t = device.now_s
    while t < until_s:
        t = min(until_s, t + step_s)
        samples.append(device.sample(t))
    return samples


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- specs ---------------------------------------------------------------------------------


def test_specs_carry_the_published_values() -> None:
    h100, a100, l4 = gpu_spec("H100"), gpu_spec("a100"), gpu_spec("l4")
    assert (h100.tdp_w, h100.power_limit_min_w, h100.max_sm_clock_mhz, h100.memory_total_bytes) == \
        (700.0, 200.0, 1980, 81559 * MIB)
    assert (a100.tdp_w, a100.power_limit_min_w, a100.max_sm_clock_mhz) == (400.0, 100.0, 1410)
    assert (l4.tdp_w, l4.power_limit_min_w, l4.max_sm_clock_mhz) == (72.0, 40.0, 2040)
    for spec in GPU_SPECS.values():
        assert spec.sources and 85.0 <= spec.slowdown_temperature_c <= 90.0
        # Full load under normal cooling at a 25 C inlet settles in the realistic 60-75 C band.
        assert 60.0 <= spec.steady_temperature_c(spec.tdp_w, 25.0) <= 75.0


def test_unknown_model_lists_the_known_ones_and_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="known models: a100, h100, l4"):
        gpu_spec("v100")
    with pytest.raises(ValueError, match="min limit"):
        dataclasses.replace(H100, power_limit_min_w=50.0)  # below idle power
    with pytest.raises(ValueError, match="slowdown"):
        dataclasses.replace(H100, slowdown_temperature_c=95.0)  # above shutdown


# --- determinism and labeling ---------------------------------------------------------------


def scripted_trace(seed: int) -> list[DeviceTelemetry]:
    device = gpu(0.3, seed=seed)
    trace = run(device, 20)
    device.set_utilization(1.0)
    device.set_power_limit(400.0)
    trace += run(device, 60, step_s=0.7)
    device.inject_cooling_failure()
    trace += run(device, 200, step_s=1.3)
    return trace


def test_same_seed_same_trace_and_different_seed_differs() -> None:
    assert scripted_trace(3) == scripted_trace(3)
    assert [s.power_w for s in scripted_trace(3)] != [s.power_w for s in scripted_trace(4)]
    a = open_sim_devices(node_name="n", model="a100", count=3, seed=7, utilization=0.5)
    b = open_sim_devices(node_name="n", model="a100", count=3, seed=7, utilization=0.5)
    assert [d.sample(5.0) for d in a] == [d.sample(5.0) for d in b]
    assert len({d.sample(6.0).power_w for d in a}) == 3  # devices of one node are seeded apart
    assert device_seed(7, 0) == device_seed(7, 0) != device_seed(7, 1) != device_seed(8, 1)


def test_devices_are_labeled_simulated() -> None:
    devices = open_sim_devices(node_name="n1", model="l4", count=3, seed=9)
    assert [d.info.index for d in devices] == [0, 1, 2]
    for device in devices:
        info = device.info
        assert info.simulated and info.backend == "sim" and info.kind == "gpu"
        assert info.model == "NVIDIA L4 (simulated)" and info.uuid == f"SIM-GPU-n1-{info.index}"
        assert (info.power_limit_min_w, info.power_limit_max_w, info.power_limit_default_w) == (40.0, 72.0, 72.0)


# --- power, clocks and the cap --------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(GPU_SPECS))
def test_idle_and_full_load_power_match_the_spec(model: str) -> None:
    spec = gpu_spec(model)
    idle = run(gpu(0.0, model=model), 10)
    assert mean([s.power_w for s in idle]) == pytest.approx(spec.idle_power_w, rel=0.01)
    assert all(s.throttle_reasons == ("gpu_idle",) and s.sm_clock_mhz == spec.idle_sm_clock_mhz for s in idle)
    full = run(gpu(1.0, model=model), 30)
    powers = [s.power_w for s in full]
    assert mean(powers) == pytest.approx(spec.tdp_w, rel=0.005)
    assert max(powers) <= spec.tdp_w * (1 + NOISE_BOUND)
    assert min(powers) >= spec.tdp_w * (1 - NOISE_BOUND)
    assert all(s.sm_clock_mhz == spec.max_sm_clock_mhz and s.throttle_reasons == () for s in full)
    assert full[-1].utilization_pct == 100.0


def test_half_load_draws_between_idle_and_tdp() -> None:
    device = gpu(0.5)
    power = mean([s.power_w for s in run(device, 10)])
    # Under load the GPU holds a CUDA context, so the floor is the context idle (calibrated: 122.9 W).
    idle_w = H100.busy_idle_power_w
    assert power == pytest.approx(idle_w + 0.5 * (H100.tdp_w - idle_w), rel=0.01)


def test_lower_cap_lowers_power_and_clock_and_reports_power_cap() -> None:
    device = gpu(1.0)
    uncapped = run(device, 10)[-1]
    assert device.set_power_limit(300.0) == 300.0
    capped = run(device, 40)
    powers = [s.power_w for s in capped]
    assert max(powers) <= 300.0 * (1 + NOISE_BOUND) + 1e-3  # truncated noise, rounded to the milliwatt
    assert mean(powers) == pytest.approx(300.0, rel=0.005)  # DVFS uses the budget it has
    last = capped[-1]
    assert last.sm_clock_mhz < uncapped.sm_clock_mhz
    assert last.throttle_reasons == ("sw_power_cap",) and last.power_limit_w == 300.0
    # DVFS with the calibrated exponent: (300 - 122.9) / (700 - 122.9) of the dynamic power leaves 44 % of
    # the top clock (a real H100 with a bf16 GEMM held 630-645 MHz at 300 W, from 1365 MHz at 700 W).
    idle_w, k = H100.busy_idle_power_w, H100.dvfs_power_exponent
    expected = H100.max_sm_clock_mhz * ((300 - idle_w) / (H100.tdp_w - idle_w)) ** (1 / k)
    assert last.sm_clock_mhz == pytest.approx(expected, abs=1)
    # A light load fits under the same cap at full clock: no capping reported.
    device.set_utilization(0.2)
    light = device.sample(41.0)
    assert light.sm_clock_mhz == H100.max_sm_clock_mhz and light.throttle_reasons == ()


def test_operating_point_is_a_pure_function_of_load_cap_and_temperature() -> None:
    assert operating_point(H100, 0.0, 700.0, 40.0).throttle_reasons == ("gpu_idle",)
    capped = operating_point(H100, 1.0, 200.0, 40.0)
    assert capped.power_w == pytest.approx(200.0) and capped.throttle_reasons == ("sw_power_cap",)
    hot = operating_point(H100, 1.0, 700.0, 88.0)
    assert hot.throttle_reasons == ("sw_thermal_slowdown",) and hot.sm_clock_mhz == pytest.approx(0.8 * 1980)
    hotter = operating_point(H100, 1.0, 700.0, 89.0)
    assert set(hotter.throttle_reasons) == THERMAL_REASONS and hotter.sm_clock_mhz == pytest.approx(0.3 * 1980)


# --- thermals -------------------------------------------------------------------------------


def test_temperature_approaches_steady_state_and_falls_after_capping() -> None:
    device = gpu(0.0)
    idle_c = run(device, 5)[-1].temperature_c
    assert idle_c == pytest.approx(H100.steady_temperature_c(H100.idle_power_w, 25.0), abs=0.05)
    device.set_utilization(1.0)
    tau_s = H100.thermal_resistance_k_per_w * H100.heat_capacity_j_per_k
    steady_c = H100.steady_temperature_c(H100.tdp_w, 25.0)
    after_tau = device.sample(5.0 + tau_s).temperature_c
    assert after_tau == pytest.approx(steady_c - (steady_c - idle_c) / math.e, abs=0.05)  # exact exponential
    warming = [s.temperature_c for s in run(device, 5.0 + 8 * tau_s, step_s=5)]
    assert warming == sorted(warming)
    assert warming[-1] == pytest.approx(steady_c, abs=0.1)
    assert warming[-1] < H100.max_operating_temperature_c
    device.set_power_limit(300.0)
    t0 = device.now_s
    cooling = [s.temperature_c for s in run(device, t0 + 8 * tau_s, step_s=5)]
    assert cooling == sorted(cooling, reverse=True)
    assert cooling[-1] == pytest.approx(H100.steady_temperature_c(300.0, 25.0), abs=0.1)


@pytest.mark.parametrize("model", sorted(GPU_SPECS))
def test_full_load_settles_below_slowdown_in_normal_cooling(model: str) -> None:
    spec = gpu_spec(model)
    for ambient_c in (25.0, 35.0):
        device = gpu(1.0, model=model, ambient_c=ambient_c)
        device.sample(0.0)
        settled = device.sample(3600.0)
        assert settled.temperature_c < spec.max_operating_temperature_c < spec.slowdown_temperature_c
        assert not THERMAL_REASONS & set(settled.throttle_reasons)


def test_one_long_step_equals_many_short_ones_in_normal_cooling() -> None:
    stepped, jumped = gpu(0.8), gpu(0.8)
    for device in (stepped, jumped):
        device.set_power_limit(500.0)
    last = run(stepped, 600.0, step_s=0.1)[-1]
    leap = jumped.sample(600.0)
    assert leap.energy_j == pytest.approx(last.energy_j, rel=1e-9)
    assert leap.temperature_c == pytest.approx(last.temperature_c, abs=0.01)


def test_cooling_failure_heats_up_and_throttles_then_recovers() -> None:
    device = gpu(1.0)
    normal = run(device, 60)
    device.inject_cooling_failure()
    hot = run(device, 900, step_s=1)
    peak_c = max(s.temperature_c for s in hot)
    assert H100.slowdown_temperature_c <= peak_c < H100.shutdown_temperature_c  # throttling holds it
    late = hot[-300:]
    assert all(THERMAL_REASONS & set(s.throttle_reasons) for s in late)
    assert any({"hw_slowdown", "hw_thermal_slowdown"} <= set(s.throttle_reasons) for s in late)
    assert mean([s.sm_clock_mhz for s in late]) < 0.8 * H100.max_sm_clock_mhz
    assert mean([s.power_w for s in late]) < 0.5 * mean([s.power_w for s in normal])
    assert all(s.health == "ok" for s in hot)
    device.clear_cooling_failure()
    recovered = run(device, 1800, step_s=5)[-1]
    assert recovered.temperature_c < H100.max_operating_temperature_c
    assert recovered.sm_clock_mhz == H100.max_sm_clock_mhz and recovered.throttle_reasons == ()


def test_throttling_reacts_within_long_sampling_intervals() -> None:
    """Sub-steps: a GPU sampled once a minute throttles like one sampled ten times a second."""
    fine, coarse = gpu(1.0), gpu(1.0)
    for device in (fine, coarse):
        device.inject_cooling_failure()
    fine_trace = run(fine, 600.0, step_s=0.1)
    coarse_trace = run(coarse, 600.0, step_s=60.0)
    assert all(s.health == "ok" for s in coarse_trace)  # one big step at 700 W would overshoot shutdown
    assert max(s.temperature_c for s in coarse_trace) < H100.shutdown_temperature_c
    # Sub-step boundaries differ (0.1 s samples vs 0.25 s steps), so the throttle cycles differ in phase only.
    assert coarse_trace[-1].energy_j == pytest.approx(fine_trace[-1].energy_j, rel=1e-3)
    assert coarse_trace[-1].temperature_c == pytest.approx(fine_trace[-1].temperature_c, abs=0.5)


def test_a_passive_card_without_airflow_reaches_thermal_shutdown_and_leaves_the_bus() -> None:
    l4 = gpu_spec("l4")
    device = gpu(1.0, model="l4")
    device.inject_cooling_failure()  # at full load even the lowest clock draws too much: R * 6 * 21 W > 66 K
    samples = run(device, 1200, step_s=1)
    alive = [s for s in samples if s.health == "ok"]
    assert alive and max(s.temperature_c for s in alive) < l4.shutdown_temperature_c
    assert any(THERMAL_REASONS & set(s.throttle_reasons) for s in alive)
    assert samples[-1].health == "lost" and samples[-1].last_xid == 79


# --- energy ---------------------------------------------------------------------------------


def test_energy_is_the_integral_of_power_and_monotonic() -> None:
    device = gpu(0.0)
    schedule = [(0.3, 700.0, 0.25), (1.0, 450.0, 0.5), (0.7, 200.0, 1.0), (0.0, 600.0, 0.5), (1.0, 650.0, 2.0)]
    samples, expected_j, reported_j = [], 0.0, 0.0
    for utilization, cap, step_s in schedule:
        device.set_utilization(utilization)
        device.set_power_limit(cap)
        # temperature-independent here; no device memory in use, so no CUDA context when idle
        model_w = operating_point(H100, utilization, cap, 40.0, context=False).power_w
        for _ in range(40):
            sample = device.sample(device.now_s + step_s)
            samples.append(sample)
            expected_j += model_w * step_s
            reported_j += sample.power_w * step_s
    energies = [s.energy_j for s in samples]
    assert energies == sorted(energies)
    assert energies[-1] == pytest.approx(expected_j, abs=0.01)  # exact against the model's power
    assert energies[-1] == pytest.approx(reported_j, rel=NOISE_BOUND)  # and against what was reported


# --- limits, faults, time -------------------------------------------------------------------


def test_out_of_range_limit_names_the_range_and_changes_nothing() -> None:
    device = gpu()
    device.set_power_limit(350.0)
    for bad in (150.0, 701.0, float("nan")):
        with pytest.raises(PowerLimitOutOfRange, match="200-700 W"):
            device.set_power_limit(bad)
    assert device.sample(1.0).power_limit_w == 350.0
    assert device.set_power_limit(200.0) == 200.0 and device.set_power_limit(700) == 700.0


def test_xid_keeps_the_gpu_reporting() -> None:
    device = gpu()
    device.inject_xid(48)
    sample = device.sample(1.0)
    assert sample.health == "xid" and sample.last_xid == 48
    assert sample.power_w > 600 and sample.temperature_c is not None
    assert device.set_power_limit(300.0) == 300.0
    assert device.sample(20.0).power_w <= 300.0 * (1 + NOISE_BOUND) + 1e-3


def test_falling_off_the_bus() -> None:
    device = gpu()
    before = device.sample(1.0)
    device.fall_off_bus()
    lost = device.sample(2.0)
    assert lost.health == "lost" and lost.last_xid == 79
    assert (lost.power_w, lost.utilization_pct, lost.memory_used_bytes) == (0.0, 0.0, 0)
    assert lost.temperature_c is None and lost.sm_clock_mhz is None and lost.power_limit_w is None
    assert lost.energy_j == before.energy_j  # faults land at the last sampled instant; nothing after is counted
    assert device.sample(100.0).energy_j == lost.energy_j  # nothing more is counted
    with pytest.raises(DeviceError, match="fallen off the bus"):
        device.set_power_limit(300.0)


def test_time_cannot_go_backwards() -> None:
    device = gpu()
    first = device.sample(5.0)
    again = device.sample(5.0)  # the same instant twice is fine and adds no energy
    assert again.energy_j == first.energy_j > 0
    with pytest.raises(DeviceError, match="backwards"):
        device.sample(4.999)


def test_fault_schedule_fires_each_fault_once_at_its_time() -> None:
    devices = open_sim_devices(node_name="n", model="a100", count=2, seed=0, utilization=1.0, start_s=100.0)
    schedule = SimFaultSchedule([SimFault(10.0, 1, "xid", 13), SimFault(5.0, 0, "cooling_failure")], devices, 100.0)
    assert schedule(104.0) == []
    assert [f.kind for f in schedule(106.5)] == ["cooling_failure"]
    assert devices[0].now_s == 105.0  # advanced to the fault's own instant before injecting
    assert [f.kind for f in schedule(120.0)] == ["xid"]
    assert schedule(130.0) == [] and schedule.pending == []
    assert devices[1].sample(130.0).last_xid == 13
    assert devices[0].thermal_resistance_k_per_w > GPU_SPECS["a100"].thermal_resistance_k_per_w
    late = SimFaultSchedule([SimFault(0.0, 0, "fall_off_bus")], devices, 0.0)
    assert len(late(200.0)) == 1 and devices[0].sample(200.0).health == "lost"  # never steps a device back
    with pytest.raises(ValueError, match="devices are"):
        SimFaultSchedule([SimFault(1.0, 5, "xid")], devices, 0.0)
    with pytest.raises(ValueError, match="unknown fault kind"):
        SimFault(1.0, 0, "meteor")  # type: ignore[arg-type]


def test_load_setters_validate() -> None:
    device = gpu()
    with pytest.raises(ValueError, match="0..1"):
        device.set_utilization(1.5)
    with pytest.raises(ValueError, match="memory used"):
        device.set_memory_used(H100.memory_total_bytes + 1)
    device.set_memory_used(40 << 30)
    assert device.sample(1.0).memory_used_bytes == 40 << 30


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(model=st.sampled_from(sorted(GPU_SPECS)),
       steps=st.lists(st.tuples(st.floats(0.0, 120.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
                      min_size=1, max_size=30),
       seed=st.integers(0, 1000))
def test_property_power_within_cap_energy_monotonic_temperature_bounded(model: str, steps, seed: int) -> None:
    spec = gpu_spec(model)
    device = gpu(0.0, seed=seed, model=model)
    t, last_energy = 0.0, 0.0
    for dt, utilization, cap_share in steps:
        cap = spec.power_limit_min_w + cap_share * (spec.tdp_w - spec.power_limit_min_w)
        device.set_utilization(utilization)
        device.set_power_limit(cap)
        t += dt
        sample = device.sample(t)
        # Truncated noise can reach the bound exactly; reported power is rounded to the milliwatt.
        assert sample.power_w <= cap * (1 + NOISE_BOUND) + 1e-3
        assert sample.energy_j >= last_energy
        assert 25.0 - 1.0 <= sample.temperature_c < spec.shutdown_temperature_c
        assert sample.temperature_c <= spec.max_operating_temperature_c  # normal cooling never throttles
        assert not THERMAL_REASONS & set(sample.throttle_reasons)
        assert spec.min_sm_clock_mhz <= sample.sm_clock_mhz <= spec.max_sm_clock_mhz
        assert sample.health == "ok"
        last_energy = sample.energy_j
