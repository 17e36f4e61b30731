"""The simulated GPU's physical model: power under caps, DVFS, thermals, energy, faults, determinism."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.devices.base import DeviceError, PowerLimitOutOfRange
from agent.devices.gpu_specs import GPU_SPECS, gpu_spec
from agent.devices.sim import POWER_NOISE_FRACTION, SimFault, SimFaultSchedule, SimGpu, open_sim_devices

H100 = gpu_spec("h100")


def gpu(utilization: float = 1.0, seed: int = 1, model: str = "h100") -> SimGpu:
    return SimGpu(0, gpu_spec(model), seed=seed, node_name="n", utilization=utilization)


def run(device: SimGpu, until_s: float, step_s: float = 0.5) -> list:
    samples = []
    t = device.now_s
    while t < until_s:
        t = min(until_s, t + step_s)
        samples.append(device.sample(t))
    return samples


def test_same_seed_same_trace_and_different_seed_differs() -> None:
    a, b, c = gpu(seed=3), gpu(seed=3), gpu(seed=4)
    for device in (a, b, c):
        device.set_power_limit(400.0)
    ta, tb, tc = run(a, 30), run(b, 30), run(c, 30)
    assert ta == tb
    assert [s.power_w for s in ta] != [s.power_w for s in tc]


@pytest.mark.parametrize("model", sorted(GPU_SPECS))
def test_idle_and_full_load_power_match_the_spec(model: str) -> None:
    spec = gpu_spec(model)
    idle = run(gpu(0.0, model=model), 5)[-1]
    assert idle.power_w == pytest.approx(spec.idle_power_w, rel=0.03)
    assert "gpu_idle" in idle.throttle_reasons
    full = run(gpu(1.0, model=model), 5)[-1]
    assert full.power_w == pytest.approx(spec.tdp_w, rel=0.02)
    assert full.power_w <= spec.tdp_w
    assert full.sm_clock_mhz == spec.max_sm_clock_mhz


def test_lower_cap_lowers_power_and_clock_and_reports_power_cap() -> None:
    device = gpu(1.0)
    uncapped = run(device, 10)[-1]
    device.set_power_limit(300.0)
    capped = run(device, 20)[-1]
    assert capped.power_w <= 300.0
    assert capped.power_w > 290.0  # DVFS uses the budget it has
    assert capped.sm_clock_mhz < uncapped.sm_clock_mhz
    assert "sw_power_cap" in capped.throttle_reasons
    assert capped.power_limit_w == 300.0
    # Cubic DVFS: (300-70)/(700-70) of dynamic power needs about 71 % of the top clock.
    expected = H100.max_sm_clock_mhz * ((300 - H100.idle_power_w) / (H100.tdp_w - H100.idle_power_w)) ** (1 / 3)
    assert capped.sm_clock_mhz == pytest.approx(expected, abs=2)


def test_temperature_approaches_steady_state_and_falls_after_capping() -> None:
    device = gpu(0.0)
    idle_c = run(device, 5)[-1].temperature_c
    device.set_utilization(1.0)
    warming = run(device, 300, step_s=5)
    temps = [s.temperature_c for s in warming]
    assert temps == sorted(temps)  # monotonic warm-up
    steady_c = 25.0 + H100.tdp_w * H100.thermal_resistance_k_per_w
    assert temps[-1] == pytest.approx(steady_c, abs=0.5)
    assert idle_c < temps[5] < temps[-1] < H100.max_operating_temperature_c
    device.set_power_limit(300.0)
    cooling = [s.temperature_c for s in run(device, 600, step_s=5)]
    assert cooling == sorted(cooling, reverse=True)
    assert cooling[-1] == pytest.approx(25.0 + 300.0 * H100.thermal_resistance_k_per_w, abs=0.5)


def test_cooling_failure_heats_up_and_throttles() -> None:
    device = gpu(1.0)
    normal = run(device, 60)[-1]
    device.inject_cooling_failure()
    hot = run(device, 600, step_s=1)
    peak = max(s.temperature_c for s in hot)
    last = hot[-1]
    assert peak >= H100.max_operating_temperature_c
    assert peak < H100.shutdown_temperature_c  # throttling holds it below shutdown
    assert {"sw_thermal_slowdown", "hw_thermal_slowdown"} & set(last.throttle_reasons)
    assert last.sm_clock_mhz < normal.sm_clock_mhz
    assert last.power_w < normal.power_w
    device.clear_cooling_failure()
    recovered = run(device, 1200, step_s=5)[-1]
    assert recovered.temperature_c < H100.max_operating_temperature_c
    assert recovered.sm_clock_mhz == H100.max_sm_clock_mhz


def test_energy_is_the_integral_of_power() -> None:
    device = gpu(0.6)
    device.set_power_limit(450.0)
    step_s = 0.25  # the model's own sub-step, so a Riemann sum of true power is exact
    samples = run(device, 60, step_s=step_s)
    integral_j = sum(s.power_w * step_s for s in samples)
    assert samples[-1].energy_j == pytest.approx(integral_j, rel=3 * POWER_NOISE_FRACTION)
    energies = [s.energy_j for s in samples]
    assert energies == sorted(energies)


def test_out_of_range_limit_names_the_range() -> None:
    device = gpu()
    with pytest.raises(PowerLimitOutOfRange, match="200-700 W"):
        device.set_power_limit(150.0)
    with pytest.raises(PowerLimitOutOfRange):
        device.set_power_limit(701.0)
    assert device.set_power_limit(200.0) == 200.0


def test_xid_and_falling_off_the_bus() -> None:
    device = gpu()
    device.inject_xid(48)
    sample = device.sample(1.0)
    assert sample.health == "xid" and sample.last_xid == 48 and sample.power_w > 0
    device.fall_off_bus()
    lost = device.sample(2.0)
    assert lost.health == "lost" and lost.power_w == 0.0 and lost.temperature_c is None
    with pytest.raises(DeviceError, match="fallen off the bus"):
        device.set_power_limit(300.0)


def test_time_cannot_go_backwards() -> None:
    device = gpu()
    device.sample(5.0)
    assert device.sample(5.0).energy_j > 0  # the same instant twice is fine
    with pytest.raises(DeviceError, match="backwards"):
        device.sample(4.0)


def test_fault_schedule_fires_each_fault_once_at_its_time() -> None:
    devices = open_sim_devices(node_name="n", model="a100", count=2, seed=0, utilization=1.0, start_s=100.0)
    schedule = SimFaultSchedule([SimFault(10.0, 1, "xid", 13), SimFault(5.0, 0, "cooling_failure")], devices, 100.0)
    assert schedule(104.0) == []
    assert [f.kind for f in schedule(105.0)] == ["cooling_failure"]
    assert [f.kind for f in schedule(120.0)] == ["xid"]
    assert schedule(130.0) == []
    assert devices[1].sample(130.0).last_xid == 13
    assert devices[0].thermal_resistance_k_per_w > GPU_SPECS["a100"].thermal_resistance_k_per_w
    with pytest.raises(ValueError, match="devices are"):
        SimFaultSchedule([SimFault(1.0, 5, "xid")], devices, 0.0)


def test_devices_are_labeled_simulated() -> None:
    for device in open_sim_devices(node_name="n1", model="l4", count=3, seed=9):
        assert device.info.simulated and device.info.backend == "sim"
        assert "(simulated)" in device.info.model and device.info.uuid.startswith("SIM-GPU-n1-")


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0.01, 30.0), st.floats(0.0, 1.0), st.floats(200.0, 700.0)),
                      min_size=1, max_size=40),
       seed=st.integers(0, 1000))
def test_property_power_within_cap_energy_monotonic_temperature_bounded(steps, seed: int) -> None:
    device = gpu(0.0, seed=seed)
    t = 0.0
    last_energy = 0.0
    for dt, utilization, cap in steps:
        device.set_utilization(utilization)
        device.set_power_limit(cap)
        t += dt
        sample = device.sample(t)
        assert sample.power_w <= cap + 1e-9
        assert sample.energy_j >= last_energy
        assert 25.0 - 1e-6 <= sample.temperature_c < H100.shutdown_temperature_c
        assert H100.idle_sm_clock_mhz <= sample.sm_clock_mhz <= H100.max_sm_clock_mhz
        last_energy = sample.energy_j
