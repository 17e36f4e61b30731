"""The NVML backend against a real NVIDIA GPU. Skipped where NVML sees no GPU (CI, CPU machines).

Run on a GPU host with ``.venv/bin/python -m pytest tests/gpu -v`` (as root for the power-limit
tests). Every test that changes a power limit restores the default limit, also when it fails.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator

import pytest

pynvml = pytest.importorskip("pynvml")

from agent.devices.base import PowerLimitOutOfRange  # noqa: E402
from agent.devices.nvml import NvmlGpu, nvml_available, open_nvml_devices  # noqa: E402
from agent.devices.select import open_devices  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not nvml_available(), reason="NVML does not initialize here (no NVIDIA driver)"),
]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="setting power limits needs root")


@pytest.fixture
def gpu() -> Iterator[NvmlGpu]:
    devices = open_nvml_devices()
    if not devices:
        pytest.skip("NVML sees no GPU")
    for other in devices[1:]:
        other.close()
    device = devices[0]
    try:
        yield device
    finally:
        if device.info.power_limit_default_w is not None and os.geteuid() == 0:
            device.set_power_limit(device.info.power_limit_default_w)
        device.close()


def test_info_describes_a_real_gpu(gpu: NvmlGpu) -> None:
    info = gpu.info
    assert info.backend == "nvml" and info.simulated is False and info.kind == "gpu"
    assert info.model.startswith("NVIDIA") and info.uuid.startswith("GPU-")
    assert info.memory_total_bytes > 1 << 30
    if info.power_limit_min_w is not None:
        assert 0 < info.power_limit_min_w <= info.power_limit_default_w <= info.power_limit_max_w


def test_samples_are_complete_and_energy_only_grows(gpu: NvmlGpu) -> None:
    first = gpu.sample(time.monotonic())
    time.sleep(1.0)
    second = gpu.sample(time.monotonic())
    for sample in (first, second):
        assert sample.health == "ok"
        assert sample.power_w > 0
        assert sample.temperature_c is not None and 0 < sample.temperature_c < 100
        assert sample.sm_clock_mhz is not None and sample.sm_clock_mhz > 0
        assert 0 <= sample.memory_used_bytes <= sample.memory_total_bytes
    assert second.energy_j > first.energy_j  # a powered GPU uses energy every second


def test_the_agent_picks_nvml_on_a_gpu_host() -> None:
    devices = open_devices("auto", node_name="gpu-test", sim=None, cpu=None, include_cpu=False,
                           start_s=time.monotonic())
    try:
        assert devices and all(isinstance(d, NvmlGpu) for d in devices)
    finally:
        for device in devices:
            device.close()


@needs_root
def test_power_limit_is_applied_read_back_and_range_checked(gpu: NvmlGpu) -> None:
    low, high = gpu.info.power_limit_min_w, gpu.info.power_limit_max_w
    if low is None or high is None:
        pytest.skip(f"{gpu.info.model} has no settable power limit")
    with pytest.raises(PowerLimitOutOfRange, match="outside the power-limit range"):
        gpu.set_power_limit(low - 1.0)
    with pytest.raises(PowerLimitOutOfRange):
        gpu.set_power_limit(high + 1.0)
    applied = gpu.set_power_limit(low)
    assert applied == pytest.approx(low, abs=1.0)
    assert gpu.sample(time.monotonic()).power_limit_w == pytest.approx(low, abs=1.0)


@needs_root
def test_a_power_cap_holds_under_full_load(gpu: NvmlGpu) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    low = gpu.info.power_limit_min_w
    if low is None:
        pytest.skip(f"{gpu.info.model} has no settable power limit")
    gpu.set_power_limit(low)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    samples = []
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        samples.append(gpu.sample(time.monotonic()))
    steady = samples[len(samples) // 3:]  # the driver needs a moment to settle on the cap
    assert statistics.median(s.power_w for s in steady) <= low * 1.05
    assert any("sw_power_cap" in s.throttle_reasons for s in steady)
    assert statistics.median(s.utilization_pct for s in steady) > 50
