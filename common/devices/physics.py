"""The DVFS and thermal-throttle operating point of a GPU: shared by the sim GPU, the planner and the simulator.

Given a load, a power limit and a temperature, which SM clock the driver settles on, the board
power at that clock, the clocks-event reasons NVML would report and how much slower the work
runs than at the max clock. The model and its calibration are described in ``gpu_specs``
(constants) and ``agent.devices.sim`` (the device that integrates it over time).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.devices.gpu_specs import GpuSpec

SW_THERMAL_CLOCK_LOSS_PER_K = 0.2  # estimate: how hard the driver pulls clocks per kelvin above max operating
# (with the calibrated DVFS exponent, 0.1 could not hold a GPU that lost most of its cooling below shutdown)
HW_SLOWDOWN_CLOCK_FACTOR = 0.5  # NVML: HW slowdown reduces "the core clocks by a factor of 2 or more"


@dataclass(frozen=True)
class OperatingPoint:
    """Clock, power and active clocks-event reasons for a given load, cap and temperature."""

    sm_clock_mhz: float
    power_w: float
    throttle_reasons: tuple[str, ...]
    slowdown: float = 1.0  # time of the work at this clock against the max clock (1 when idle)


def operating_point(spec: GpuSpec, utilization: float, power_limit_w: float, temperature_c: float,
                    memory_bound_share: float = 0.0, context: bool = True) -> OperatingPoint:
    """What the driver's DVFS settles on: the fastest clock that respects cap and temperature.

    ``memory_bound_share``: the share of the work that is bandwidth-bound (LLM decode) rather than
    compute-bound; ``context``: whether a CUDA context is held (only matters when idle).
    """
    if not 0.0 <= memory_bound_share <= 1.0:
        raise ValueError(f"memory_bound_share must be within 0..1, got {memory_bound_share}")
    if utilization <= 0.0:
        idle_w = spec.busy_idle_power_w if context else spec.idle_power_w
        return OperatingPoint(float(spec.idle_sm_clock_mhz), idle_w, ("gpu_idle",))
    f_max = float(spec.max_sm_clock_mhz)
    reasons: list[str] = []
    clock = f_max
    cap_clock = spec.clock_for_power_mhz(utilization, power_limit_w, memory_bound_share)
    thermal_clock = f_max
    if temperature_c > spec.max_operating_temperature_c:
        over_k = temperature_c - spec.max_operating_temperature_c
        thermal_clock = f_max * max(0.0, 1.0 - SW_THERMAL_CLOCK_LOSS_PER_K * over_k)
        reasons.append("sw_thermal_slowdown")
    if cap_clock < f_max and cap_clock <= thermal_clock:
        reasons.insert(0, "sw_power_cap")  # the cap, not temperature, is what binds
    clock = min(clock, cap_clock, thermal_clock)
    if temperature_c >= spec.slowdown_temperature_c:
        clock *= HW_SLOWDOWN_CLOCK_FACTOR
        reasons += ["hw_slowdown", "hw_thermal_slowdown"]  # NVML sets both bits for thermal HW slowdown
    clock = min(max(clock, float(spec.min_sm_clock_mhz)), f_max)
    power_w = spec.busy_idle_power_w + spec.dynamic_power_w(utilization, clock, memory_bound_share)
    return OperatingPoint(clock, power_w, tuple(reasons), spec.slowdown(clock, memory_bound_share))
