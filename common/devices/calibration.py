"""Compare the simulated GPU model (``sim.operating_point``) with measurements from a real GPU.

``bench/gpu_calibration.py`` measures a GPU under a power-cap sweep (clock, power, throughput,
temperature per cap level, one steady workload at a time) and hands the points here. Everything
in this module is pure arithmetic on those points so it can be tested without a GPU.

What is compared, per cap level of a compute-bound workload:

- the SM clock the model's DVFS rule predicts under the cap, against the clock NVML reports;
- the board power the model predicts, against NVML's power reading;
- the slowdown the model predicts (f_uncapped / f_capped, which is how the sim engines and the
  planner's perf model stretch latency under a cap), against the measured throughput ratio.

The workload's activity factor u (the model's "utilization") is fitted from the uncapped point:
u = (P - P_ctx) / P_dyn(u=1, f, m), with m the workload's bandwidth-bound share (0 for the GEMM,
1 for the GEMV, measured from the pure workloads for a mix). The DVFS exponent k is also fitted
(least squares of log(P - P_idle) on log f) and reported beside the model's value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from common.devices.gpu_specs import GpuSpec
from common.devices.physics import operating_point


@dataclass(frozen=True)
class CapPoint:
    """Medians over one steady window of one workload at one power limit."""

    workload: str  # "compute" (bf16 GEMM) or "memory" (bandwidth-bound GEMV, like LLM decode)
    power_limit_w: float
    power_w: float
    sm_clock_mhz: float
    temperature_c: float
    throughput: float  # work units per second (TFLOP/s or GB/s); only ratios are compared
    energy_per_unit_j: float  # from the device's energy counter over the window
    throttle_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class PointComparison:
    power_limit_w: float
    measured_clock_mhz: float
    model_clock_mhz: float
    measured_power_w: float
    model_power_w: float
    measured_slowdown: float  # uncapped throughput / throughput at this cap
    model_slowdown: float  # model clock uncapped / model clock at this cap

    @property
    def clock_error_pct(self) -> float:
        return pct_error(self.model_clock_mhz, self.measured_clock_mhz)

    @property
    def power_error_pct(self) -> float:
        return pct_error(self.model_power_w, self.measured_power_w)

    @property
    def slowdown_error_pct(self) -> float:
        return pct_error(self.model_slowdown, self.measured_slowdown)


def pct_error(model: float, measured: float) -> float:
    """Signed error of the model in percent of the measurement."""
    return 100.0 * (model - measured) / measured


def mean_abs(values: Sequence[float]) -> float:
    return sum(abs(v) for v in values) / len(values) if values else float("nan")


def fit_dvfs_exponent(points: Sequence[CapPoint], idle_power_w: float, max_clock_mhz: float) -> float | None:
    """k in P - P_idle = A * (f / f_max)^k by least squares in log space; None with under two usable points."""
    xs, ys = [], []
    for p in points:
        if p.power_w > idle_power_w and p.sm_clock_mhz > 0:
            xs.append(math.log(p.sm_clock_mhz / max_clock_mhz))
            ys.append(math.log(p.power_w - idle_power_w))
    if len(xs) < 2 or max(xs) - min(xs) < 1e-6:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    return sxy / sxx


def fit_activity(spec: GpuSpec, uncapped: CapPoint, memory_bound_share: float = 0.0) -> float:
    """The model's activity u that reproduces the uncapped point's power at its clock. Above 1 when the work
    is power-limited even at the highest limit (a bf16 GEMM on an H100 holds 1365 MHz at 700 W)."""
    dynamic_full_w = spec.dynamic_power_w(1.0, uncapped.sm_clock_mhz, memory_bound_share)
    if dynamic_full_w <= 0:
        return 1.0
    return max(0.0, (uncapped.power_w - spec.busy_idle_power_w) / dynamic_full_w)


def compare(spec: GpuSpec, points: Sequence[CapPoint], activity: float,
            memory_bound_share: float = 0.0) -> list[PointComparison]:
    """Model against measurement at every cap level of one workload; the highest limit is the reference."""
    ordered = sorted(points, key=lambda p: -p.power_limit_w)
    reference = ordered[0]
    ref = operating_point(spec, activity, reference.power_limit_w, reference.temperature_c, memory_bound_share)
    rows = []
    for p in ordered:
        point = operating_point(spec, activity, p.power_limit_w, p.temperature_c, memory_bound_share)
        rows.append(PointComparison(
            power_limit_w=p.power_limit_w, measured_clock_mhz=p.sm_clock_mhz, model_clock_mhz=point.sm_clock_mhz,
            measured_power_w=p.power_w, model_power_w=point.power_w,
            measured_slowdown=reference.throughput / p.throughput, model_slowdown=point.slowdown / ref.slowdown))
    return rows


def mixed_share(compute_s: float, memory_s: float) -> float:
    """The bandwidth-bound share of a mix whose uncapped parts take these times."""
    total = compute_s + memory_s
    if total <= 0:
        raise ValueError("a mix needs some time in its parts")
    return memory_s / total


@dataclass(frozen=True)
class ThermalFit:
    """T(t) = T_ss + (T_0 - T_ss) exp(-t / tau), fitted to a warm-up at constant load."""

    steady_temperature_c: float
    time_constant_s: float
    rms_error_c: float


def _geometric(start: float, stop: float, factor: float) -> list[float]:
    values = []
    while start <= stop:
        values.append(start)
        start *= factor
    return values


def fit_thermal_ramp(times_s: Sequence[float], temperatures_c: Sequence[float]) -> ThermalFit | None:
    """Least-squares fit of a first-order warm-up; a grid over tau with T_ss solved in closed form."""
    if len(times_s) < 5:
        return None
    t0 = temperatures_c[0]
    best: tuple[float, float, float] | None = None
    for tau in _geometric(2.0, 2000.0, 1.05):
        # T - T0 = (T_ss - T0) * (1 - exp(-t/tau)): linear in (T_ss - T0).
        gs = [1.0 - math.exp(-t / tau) for t in times_s]
        denominator = sum(g * g for g in gs)
        if denominator > 0:
            rise = sum(g * (temp - t0) for g, temp in zip(gs, temperatures_c)) / denominator
            sse = sum((t0 + rise * g - temp) ** 2 for g, temp in zip(gs, temperatures_c))
            if best is None or sse < best[0]:
                best = (sse, tau, t0 + rise)
    if best is None:
        return None
    sse, tau, steady = best
    return ThermalFit(steady_temperature_c=steady, time_constant_s=tau, rms_error_c=math.sqrt(sse / len(times_s)))


@dataclass(frozen=True)
class TwoPoleThermalFit:
    """T(t) = T_0 + a (1 - exp(-t / tau_fast)) + b (1 - exp(-t / tau_slow)): die and heatsink."""

    fast_rise_c: float
    fast_time_constant_s: float
    slow_rise_c: float
    slow_time_constant_s: float
    rms_error_c: float


def fit_thermal_ramp_two_pole(times_s: Sequence[float], temperatures_c: Sequence[float]) -> TwoPoleThermalFit | None:
    """Least squares over a grid of (tau_fast, tau_slow); the two rises solved in closed form (2x2 normal equations).

    A real GPU's die answers a load step within seconds and its heatsink or cold plate over
    minutes; one time constant cannot follow both (the fit's residual says how much it misses).
    """
    if len(times_s) < 8:
        return None
    t0 = temperatures_c[0]
    ys = [temp - t0 for temp in temperatures_c]
    best: tuple[float, TwoPoleThermalFit] | None = None
    for fast in _geometric(0.2, 20.0, 1.15):
        gs = [1.0 - math.exp(-t / fast) for t in times_s]
        for slow in _geometric(fast * 2.0, 3000.0, 1.15):
            hs = [1.0 - math.exp(-t / slow) for t in times_s]
            sgg = sum(g * g for g in gs)
            shh = sum(h * h for h in hs)
            sgh = sum(g * h for g, h in zip(gs, hs))
            det = sgg * shh - sgh * sgh
            if abs(det) < 1e-12:
                continue
            sgy = sum(g * y for g, y in zip(gs, ys))
            shy = sum(h * y for h, y in zip(hs, ys))
            a = (shh * sgy - sgh * shy) / det
            b = (sgg * shy - sgh * sgy) / det
            sse = sum((a * g + b * h - y) ** 2 for g, h, y in zip(gs, hs, ys))
            if best is None or sse < best[0]:
                best = (sse, TwoPoleThermalFit(a, fast, b, slow, math.sqrt(sse / len(ys))))
    return best[1] if best else None


def calibrated_spec(spec: GpuSpec, *, context_idle_power_w: float | None, dvfs_power_exponent: float | None,
                    time_constant_s: float | None, steady_rise_k_per_w: float | None) -> GpuSpec:
    """The spec with measured constants in place of the estimates (those that were measured)."""
    changes: dict[str, Any] = {}
    if context_idle_power_w is not None and spec.idle_power_w <= context_idle_power_w < spec.power_limit_min_w:
        changes["context_idle_power_w"] = context_idle_power_w
    if dvfs_power_exponent is not None and dvfs_power_exponent >= 1.0:
        changes["dvfs_power_exponent"] = dvfs_power_exponent
    if steady_rise_k_per_w is not None and steady_rise_k_per_w > 0:
        changes["thermal_resistance_k_per_w"] = steady_rise_k_per_w
    if time_constant_s is not None and time_constant_s > 0:
        resistance = changes.get("thermal_resistance_k_per_w", spec.thermal_resistance_k_per_w)
        changes["heat_capacity_j_per_k"] = time_constant_s / resistance
    return replace(spec, **changes)


def comparison_report(rows: Sequence[PointComparison]) -> dict[str, Any]:
    """Per-point rows and mean absolute errors, ready for JSON."""
    return {
        "points": [asdict(r) | {"clock_error_pct": r.clock_error_pct, "power_error_pct": r.power_error_pct,
                                "slowdown_error_pct": r.slowdown_error_pct} for r in rows],
        "mean_abs_clock_error_pct": mean_abs([r.clock_error_pct for r in rows]),
        "mean_abs_power_error_pct": mean_abs([r.power_error_pct for r in rows]),
        "mean_abs_slowdown_error_pct": mean_abs([r.slowdown_error_pct for r in rows]),
    }
