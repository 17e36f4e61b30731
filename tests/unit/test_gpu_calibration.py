"""The calibration arithmetic that compares the sim GPU model with a real GPU (bench/gpu_calibration.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from common.devices.calibration import (
    CapPoint,
    calibrated_spec,
    compare,
    comparison_report,
    fit_activity,
    fit_dvfs_exponent,
    fit_thermal_ramp,
    fit_thermal_ramp_two_pole,
)
from common.devices.gpu_specs import gpu_spec
from common.devices.physics import operating_point

H100 = gpu_spec("h100")


def model_points(spec, activity: float, caps: list[float], *, throughput_at_max: float = 100.0) -> list[CapPoint]:
    """Points a GPU that behaves exactly like the model would report (throughput follows the clock)."""
    points = []
    for cap in caps:
        point = operating_point(spec, activity, cap, 50.0)
        points.append(CapPoint("compute", cap, point.power_w, point.sm_clock_mhz, 50.0,
                               throughput_at_max * point.sm_clock_mhz / spec.max_sm_clock_mhz, 1.0))
    return points


def test_a_gpu_that_behaves_like_the_model_has_no_error() -> None:
    points = model_points(H100, 0.9, [700, 600, 500, 400, 300, 200])
    activity = fit_activity(H100, points[0])
    assert activity == pytest.approx(0.9)
    report = comparison_report(compare(H100, points, activity))
    assert report["mean_abs_clock_error_pct"] == pytest.approx(0.0, abs=1e-6)
    assert report["mean_abs_power_error_pct"] == pytest.approx(0.0, abs=1e-6)
    assert report["mean_abs_slowdown_error_pct"] == pytest.approx(0.0, abs=1e-6)


def test_the_dvfs_exponent_is_recovered_from_a_cap_sweep() -> None:
    spec = dataclasses.replace(H100, dvfs_power_exponent=1.5)
    points = model_points(spec, 1.0, [650, 550, 450, 350, 250])
    assert fit_dvfs_exponent(points, spec.busy_idle_power_w, spec.max_sm_clock_mhz) == pytest.approx(1.5, rel=1e-6)
    assert fit_dvfs_exponent(points[:1], spec.idle_power_w, spec.max_sm_clock_mhz) is None


def test_a_slower_real_gpu_shows_up_as_underestimated_slowdown() -> None:
    points = model_points(H100, 1.0, [700, 400])
    slower = [points[0], dataclasses.replace(points[1], throughput=points[1].throughput / 1.5)]
    rows = compare(H100, slower, 1.0)
    assert rows[1].slowdown_error_pct == pytest.approx(100.0 * (1 / 1.5 - 1), rel=1e-6)


def test_thermal_fits_recover_known_time_constants() -> None:
    times = [0.1 * i for i in range(600)]
    one = [30.0 + 20.0 * (1 - math.exp(-t / 8.0)) for t in times]
    fit = fit_thermal_ramp(times, one)
    assert fit.time_constant_s == pytest.approx(8.0, rel=0.05)
    assert fit.steady_temperature_c == pytest.approx(50.0, abs=0.2)
    two = [30.0 + 12.0 * (1 - math.exp(-t / 0.5)) + 10.0 * (1 - math.exp(-t / 20.0)) for t in times]
    fit2 = fit_thermal_ramp_two_pole(times, two)
    assert fit2.fast_time_constant_s == pytest.approx(0.5, rel=0.1)
    assert fit2.slow_time_constant_s == pytest.approx(20.0, rel=0.1)
    assert fit2.fast_rise_c == pytest.approx(12.0, abs=0.5) and fit2.slow_rise_c == pytest.approx(10.0, abs=0.5)
    assert fit2.rms_error_c < fit_thermal_ramp(times, two).rms_error_c


def test_calibrated_spec_keeps_the_time_constant_and_ignores_implausible_values() -> None:
    tuned = calibrated_spec(H100, context_idle_power_w=120.0, dvfs_power_exponent=1.4, time_constant_s=30.0,
                            steady_rise_k_per_w=0.04)
    assert tuned.context_idle_power_w == 120.0 and tuned.dvfs_power_exponent == 1.4
    assert tuned.heat_capacity_j_per_k * tuned.thermal_resistance_k_per_w == pytest.approx(30.0)
    same = calibrated_spec(H100, context_idle_power_w=500.0, dvfs_power_exponent=0.5, time_constant_s=None,
                           steady_rise_k_per_w=None)
    assert same == H100
