"""CPU device, backend selection, and the NVML adapter.

CI has no GPU, so the NVML adapter is tested against a fake NVML that mimics
pynvml's surface (mW and mJ units, error codes); it checks the adapter's unit
conversions, constraint checks and error mapping, not a real driver. The real
driver is exercised on GPU hosts (see bench/README.md).
"""

from __future__ import annotations

import types
from pathlib import Path

import pynvml
import pytest

from agent.devices import nvml as nvml_backend
from agent.devices.base import DeviceError, PowerLimitOutOfRange, PowerLimitUnsupported
from agent.devices.cpu import CpuDevice, RaplCounter
from agent.devices.select import CpuSettings, SimSettings, fault_hook, open_devices


def test_cpu_power_follows_utilization_and_energy_integrates() -> None:
    readings = iter([0.0, 50.0, 100.0])
    cpu = CpuDevice(0, tdp_w=100.0, idle_w=20.0, start_s=0.0, utilization_reader=lambda: next(readings))
    idle = cpu.sample(1.0)
    half = cpu.sample(2.0)
    full = cpu.sample(4.0)
    assert idle.power_w == 20.0 and half.power_w == 60.0 and full.power_w == 100.0
    assert full.energy_j == pytest.approx(20.0 + 60.0 + 2 * 100.0)
    assert full.power_limit_w is None and full.memory_total_bytes > 0
    assert not cpu.info.simulated and cpu.info.kind == "cpu"
    with pytest.raises(PowerLimitUnsupported):
        cpu.set_power_limit(50.0)


def test_rapl_counter_unwraps(tmp_path: Path) -> None:
    (tmp_path / "max_energy_range_uj").write_text("1000000\n")
    (tmp_path / "energy_uj").write_text("900000\n")
    counter = RaplCounter(tmp_path)
    (tmp_path / "energy_uj").write_text("950000\n")
    assert counter.read_j() == pytest.approx(0.05)
    (tmp_path / "energy_uj").write_text("50000\n")  # wrapped past the range
    assert counter.read_j() == pytest.approx(0.15)
    cpu = CpuDevice(0, tdp_w=100.0, idle_w=20.0, start_s=0.0, utilization_reader=lambda: 10.0, rapl=counter)
    (tmp_path / "energy_uj").write_text("150000\n")
    sample = cpu.sample(2.0)
    assert sample.energy_j == pytest.approx(0.25) and sample.power_w == pytest.approx(0.05)


def test_selection_sim_then_cpu_with_continuing_indexes() -> None:
    sim = SimSettings(model="a100", count=3, seed=1, utilization=0.5)
    devices = open_devices("sim", node_name="n", sim=sim, cpu=CpuSettings(), include_cpu=True, start_s=0.0)
    assert [(d.info.index, d.info.kind, d.info.backend) for d in devices] == [
        (0, "gpu", "sim"), (1, "gpu", "sim"), (2, "gpu", "sim"), (3, "cpu", "cpu")]


def test_auto_falls_back_to_cpu_only_without_nvml() -> None:
    if nvml_backend.nvml_available():
        pytest.skip("this machine has a working NVIDIA driver")
    devices = open_devices("auto", node_name="n", sim=None, cpu=None, include_cpu=False, start_s=0.0)
    assert [d.info.kind for d in devices] == ["cpu"]
    with pytest.raises(DeviceError, match="NVML did not initialize"):
        open_devices("nvml", node_name="n", sim=None, cpu=None, include_cpu=False, start_s=0.0)
    with pytest.raises(DeviceError, match="unknown device backend"):
        open_devices("tpu", node_name="n", sim=None, cpu=None, include_cpu=False, start_s=0.0)


def test_sim_settings_validate_model_and_faults() -> None:
    with pytest.raises(ValueError, match="unknown GPU model"):
        SimSettings(model="v100")
    with pytest.raises(ValueError, match="device 4"):
        SimSettings(count=2, faults=[{"at_s": 1, "device": 4, "kind": "xid"}])
    sim = SimSettings(count=2, utilization=1.0, faults=[{"at_s": 0, "device": 1, "kind": "fall_off_bus"}])
    devices = open_devices("sim", node_name="n", sim=sim, cpu=None, include_cpu=False, start_s=0.0)
    hook = fault_hook(sim, devices, 0.0)
    hook(0.5)
    assert devices[1].sample(1.0).health == "lost" and devices[0].sample(1.0).health == "ok"
    assert fault_hook(SimSettings(), devices, 0.0) is None


# --- NVML adapter against a fake NVML ---------------------------------------------------


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class FakeNvml:
    """Just enough of pynvml's API: values in NVML's own units (mW, mJ, MHz, C)."""

    def __init__(self) -> None:
        self.limit_mw = 700_000
        self.lost = False
        self.permission = True
        self.unsupported: set[str] = set()

    def _check(self, name: str) -> None:
        if self.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in self.unsupported:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def reader(name, value):
            def fn(handle, *args):
                self._check(name)
                return value() if callable(value) else value
            fn.__name__ = name
            return fn

        table = {
            "nvmlDeviceGetName": "NVIDIA H100 80GB HBM3", "nvmlDeviceGetUUID": b"GPU-1234",
            "nvmlDeviceGetMemoryInfo": types.SimpleNamespace(total=80 << 30, used=10 << 30, free=70 << 30),
            "nvmlDeviceGetPowerManagementLimitConstraints": (200_000, 700_000),
            "nvmlDeviceGetPowerManagementDefaultLimit": 700_000,
            "nvmlDeviceGetPowerUsage": 512_345, "nvmlDeviceGetTotalEnergyConsumption": 9_876_543,
            "nvmlDeviceGetTemperature": 61, "nvmlDeviceGetUtilizationRates": types.SimpleNamespace(gpu=93, memory=40),
            "nvmlDeviceGetClockInfo": 1755, "nvmlDeviceGetPowerManagementLimit": lambda: self.limit_mw,
            "nvmlDeviceGetCurrentClocksEventReasons": 0x4 | 0x20,
        }
        for name, value in table.items():
            monkeypatch.setattr(pynvml, name, reader(name, value))

        def set_limit(handle, limit_mw):
            self._check("nvmlDeviceSetPowerManagementLimit")
            if not self.permission:
                raise nvml_error(pynvml.NVML_ERROR_NO_PERMISSION)
            self.limit_mw = limit_mw

        monkeypatch.setattr(pynvml, "nvmlDeviceSetPowerManagementLimit", set_limit)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    fake.install(monkeypatch)
    return fake


def test_nvml_units_are_converted(fake_nvml: FakeNvml) -> None:
    gpu = nvml_backend.NvmlGpu(0, handle=object())
    assert gpu.info.uuid == "GPU-1234" and gpu.info.backend == "nvml" and not gpu.info.simulated
    assert (gpu.info.power_limit_min_w, gpu.info.power_limit_max_w) == (200.0, 700.0)
    sample = gpu.sample(0.0)
    assert sample.power_w == pytest.approx(512.345)
    assert sample.energy_j == pytest.approx(9876.543)
    assert sample.temperature_c == 61.0 and sample.utilization_pct == 93.0 and sample.sm_clock_mhz == 1755
    assert sample.memory_used_bytes == 10 << 30 and sample.power_limit_w == 700.0
    assert sample.throttle_reasons == ("sw_power_cap", "sw_thermal_slowdown")


def test_nvml_power_limit_checked_converted_and_permission_mapped(fake_nvml: FakeNvml) -> None:
    gpu = nvml_backend.NvmlGpu(0, handle=object())
    assert gpu.set_power_limit(350.5) == 350.5
    assert fake_nvml.limit_mw == 350_500
    with pytest.raises(PowerLimitOutOfRange, match="200-700 W"):
        gpu.set_power_limit(100.0)
    fake_nvml.permission = False
    with pytest.raises(DeviceError, match="needs root"):
        gpu.set_power_limit(300.0)


def test_nvml_unsupported_fields_read_as_none_and_lost_gpu_reports_lost(fake_nvml: FakeNvml) -> None:
    gpu = nvml_backend.NvmlGpu(0, handle=object())
    fake_nvml.unsupported = {"nvmlDeviceGetTemperature", "nvmlDeviceGetClockInfo"}
    sample = gpu.sample(0.0)
    assert sample.temperature_c is None and sample.sm_clock_mhz is None and sample.power_w > 0
    fake_nvml.lost = True
    assert gpu.sample(1.0).health == "lost"
    with pytest.raises(DeviceError, match="fallen off the bus"):
        gpu.set_power_limit(300.0)
