"""The modeled perf model (hardware speeds, tensor parallelism, power caps) and the load forecast."""

from __future__ import annotations

import math

import pytest

from common.devices.gpu_specs import GPU_SPECS
from common.devices.physics import operating_point
from policies.forecast import EwmaForecast
from policies.model import HardwareType, InstanceConfig
from policies.perf_model import CatalogPerfModel, power_cap_levels, standard_hardware
from policies.plan import Demand
from tests.unit.test_optimizer import GIB, _catalog, executor


def test_catalog_perf_model_scales_with_hardware_tp_and_caps() -> None:
    hardware = standard_hardware()
    model = CatalogPerfModel(hardware)
    exe = _catalog()["sim-llama-8b-chat"]
    h100 = model.perf(exe, InstanceConfig(exe.name, "h100"), {"max_tokens": 256}, 0)
    assert h100 is not None and h100.latency_s == pytest.approx(2.0)  # the catalog's number, on its hardware
    assert h100.capacity_rps == pytest.approx(16 / 2.0)
    assert h100.energy_j_per_request == pytest.approx(h100.busy_power_w * h100.latency_s / 16)
    assert h100.busy_power_w == pytest.approx(122.9 + 0.8 * (700 - 122.9))  # context idle + u x (TDP - that)
    assert h100.idle_power_w == pytest.approx(122.9)  # an idle engine holds a CUDA context
    a100 = model.perf(exe, InstanceConfig(exe.name, "a100"), {"max_tokens": 256}, 0)
    assert a100 is not None and a100.latency_s == pytest.approx(2.0 / 0.6)
    short = model.perf(exe, InstanceConfig(exe.name, "h100"), {"max_tokens": 128}, 0)
    assert short is not None and short.latency_s == pytest.approx(2.0 * 0.55)
    capped = model.perf(exe, InstanceConfig(exe.name, "h100", 1, 350.0), {"max_tokens": 256}, 0)
    assert capped is not None and capped.busy_power_w == pytest.approx(350.0)
    point = operating_point(GPU_SPECS["h100"], 0.8, 350.0, 25.0, 0.7)  # 8B chat: decode-heavy (share 0.7)
    assert capped.latency_s == pytest.approx(2.0 * point.slowdown)
    assert 1.0 < point.slowdown < GPU_SPECS["h100"].max_sm_clock_mhz / point.sm_clock_mhz  # decode slows less
    assert capped.energy_j_per_request < h100.energy_j_per_request
    tp2 = model.perf(exe, InstanceConfig(exe.name, "h100", 2), {"max_tokens": 256}, 0)
    assert tp2 is not None and tp2.latency_s < h100.latency_s and tp2.busy_power_w == pytest.approx(2 * h100.busy_power_w)
    big = _catalog()["sim-llama-70b-chat"]
    assert model.perf(big, InstanceConfig(big.name, "h100", 1), {}, 0) is None  # 152 GB on one 80 GB GPU
    assert "per device" in (model.why_not(big, InstanceConfig(big.name, "l4", 2)) or "")
    assert model.perf(big, InstanceConfig(big.name, "h100", 2), {}, 0) is not None
    assert model.perf(exe, InstanceConfig(exe.name, "h100", 1, 50.0), {}, 0) is None  # below the minimum cap
    tool = _catalog()["opencv-scenes"]
    cpu = model.perf(tool, InstanceConfig(tool.name, "cpu"), {}, 0)
    assert cpu is not None and cpu.latency_s == pytest.approx(1.0)
    assert cpu.busy_power_w == pytest.approx(700 / 96)  # one core's share of the package at full load
    assert model.perf(tool, InstanceConfig(tool.name, "h100"), {}, 0) is None
    pinned = executor("pinned", "chat", gpu_models=("A100",))
    assert model.reference_hardware(pinned) == "a100"
    on_a100 = model.perf(pinned, InstanceConfig("pinned", "a100"), {}, 0)
    assert on_a100 is not None and on_a100.latency_s == pytest.approx(1.0)
    assert model.perf(pinned, InstanceConfig("pinned", "h100"), {}, 0) is None


def test_catalog_perf_model_needs_speeds_for_every_gpu() -> None:
    hardware = {"x9": HardwareType("x9", "gpu", GIB, 1, 10, None, 1.0)}
    with pytest.raises(ValueError, match="no relative speed for GPU hardware x9"):
        CatalogPerfModel(hardware)


def test_standard_hardware_matches_the_gpu_specs() -> None:
    hardware = standard_hardware()
    assert set(hardware) == {"h100", "a100", "l4", "cpu"}
    assert hardware["h100"].max_power_w == 700 and hardware["h100"].min_power_cap_w == 200
    assert hardware["l4"].idle_power_w == 16 and hardware["cpu"].cores == 96
    assert hardware["h100"].price_per_hour_usd > hardware["a100"].price_per_hour_usd > hardware["l4"].price_per_hour_usd
    levels = power_cap_levels(hardware)
    assert levels["cpu"] == (None,) and levels["h100"][0] is None
    assert all(hardware["l4"].min_power_cap_w <= c <= 72 for c in levels["l4"][1:])


# --- forecast ------------------------------------------------------------------------------------------


def test_forecast_starts_at_the_first_observation_and_tracks_variance() -> None:
    forecast = EwmaForecast(alpha=0.5, percentile_z=1.64)
    demand, other = Demand.of("wf", {}), Demand.of("wf", {"latency": "best"})
    assert forecast.forecast(demand) == 0.0
    forecast.observe(demand, 10.0)
    assert forecast.forecast(demand) == 10.0 and forecast.std(demand) == 0.0
    for _ in range(20):
        forecast.observe(other, 4.0)
    assert forecast.forecast(other) == pytest.approx(4.0)
    forecast.observe(demand, 20.0)
    assert forecast.mean(demand) == pytest.approx(15.0)
    assert forecast.std(demand) == pytest.approx(math.sqrt(0.5 * 0.5 * 100))  # (1-a)(0 + a diff^2)
    assert forecast.forecast(demand) == pytest.approx(15.0 + 1.64 * 5.0)
    mean_only = EwmaForecast(alpha=0.5, percentile_z=0.0)
    for rate in (10.0, 20.0):
        mean_only.observe(demand, rate)
    assert mean_only.forecast(demand) == pytest.approx(15.0)


def test_forecast_follows_a_ramp_with_a_percentile_above_the_mean() -> None:
    forecast = EwmaForecast(alpha=0.3)
    demand = Demand.of("wf", {})
    for i in range(30):
        forecast.observe(demand, 1.0 + i)
    assert 20.0 < forecast.mean(demand) < 30.0
    assert forecast.forecast(demand) > forecast.mean(demand)
    with pytest.raises(ValueError):
        forecast.observe(demand, -1.0)
    with pytest.raises(ValueError):
        EwmaForecast(alpha=0.0)
