"""The NVML adapter, tested against a FAKE NVML: an adapter test, not a driver test.

CI has no GPU, so a fake ``pynvml`` module object is injected in place of the real one.
It mimics the real API surface the adapter uses (function names and signatures, NVML's
own units: mW, mJ, MHz, C; error codes raised as the real ``pynvml.NVMLError``
subclasses; clocks-event bit constants copied from the real bindings). What this checks
is the adapter: unit conversions, constraint checks, error mapping, reason decoding,
lost GPUs and Xid events. Whether the real driver behaves as the fake does is checked
on a GPU host (see bench/).
"""

from __future__ import annotations

import types
from typing import Any

import pynvml as real_pynvml
import pytest

from agent.devices import nvml as nvml_backend
from agent.devices.base import DeviceError, PowerLimitOutOfRange, PowerLimitUnsupported

MW = 1000  # NVML's milliwatts (and millijoules) per watt (joule)


class FakeGpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.name = b"NVIDIA H100 80GB HBM3"  # older bindings return bytes
        self.uuid = f"GPU-fake-{index}"
        self.limit_mw = 700 * MW
        self.constraints_mw = (200 * MW, 700 * MW)
        self.power_mw = 512_345
        self.energy_mj = 9_876_543
        self.temperature_c = 61
        self.clock_mhz = 1755
        self.reasons = real_pynvml.nvmlClocksEventReasonSwPowerCap | real_pynvml.nvmlClocksEventReasonSwThermalSlowdown
        self.unsupported: set[str] = set()
        self.failing: dict[str, int] = {}  # function name -> NVML error code
        self.lost = False
        self.xids: list[int] = []


class FakeNvml(types.SimpleNamespace):
    """A stand-in for the pynvml module: same names, same units, the real error classes."""

    NVMLError = real_pynvml.NVMLError

    def __init__(self, gpus: int = 1, init_error: int | None = None, new_reason_names: bool = True) -> None:
        super().__init__()
        for name in dir(real_pynvml):  # constants: error codes, enums, clocks-event and event-type bits
            if name.startswith(("NVML_", "nvmlClocksThrottleReason", "nvmlEventType")) or \
                    (new_reason_names and name.startswith("nvmlClocksEventReason")):
                setattr(self, name, getattr(real_pynvml, name))
        self.gpus = [FakeGpu(i) for i in range(gpus)]
        self.init_error = init_error
        self.references = 0
        self.permission = True
        self.calls: list[str] = []
        if new_reason_names:
            self.nvmlDeviceGetCurrentClocksEventReasons = self._reasons
        else:  # bindings before 12.535 only know the "throttle" name
            self.nvmlDeviceGetCurrentClocksThrottleReasons = self._reasons

    # library lifecycle
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise real_pynvml.NVMLError(self.init_error)
        self.references += 1

    def nvmlShutdown(self) -> None:
        if self.references == 0:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_UNINITIALIZED)
        self.references -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._initialized()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._initialized()
        return self.gpus[index]

    def _initialized(self) -> None:
        if self.references == 0:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_UNINITIALIZED)

    def _call(self, name: str, gpu: FakeGpu) -> None:
        self.calls.append(name)
        self._initialized()
        if gpu.lost:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.unsupported:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_NOT_SUPPORTED)
        if name in gpu.failing:
            raise real_pynvml.NVMLError(gpu.failing[name])

    # device queries, in NVML's units
    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:
        self._call("nvmlDeviceGetName", gpu)
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        self._call("nvmlDeviceGetUUID", gpu)
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        self._call("nvmlDeviceGetMemoryInfo", gpu)
        return types.SimpleNamespace(total=80 << 30, used=10 << 30, free=70 << 30)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, gpu: FakeGpu) -> tuple[int, int]:
        self._call("nvmlDeviceGetPowerManagementLimitConstraints", gpu)
        return gpu.constraints_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, gpu: FakeGpu) -> int:
        self._call("nvmlDeviceGetPowerManagementDefaultLimit", gpu)
        return 700 * MW

    def nvmlDeviceGetPowerManagementLimit(self, gpu: FakeGpu) -> int:
        self._call("nvmlDeviceGetPowerManagementLimit", gpu)
        return gpu.limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, gpu: FakeGpu, limit_mw: int) -> None:
        self._call("nvmlDeviceSetPowerManagementLimit", gpu)
        if not self.permission:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_NO_PERMISSION)
        if not gpu.constraints_mw[0] <= limit_mw <= gpu.constraints_mw[1]:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu.limit_mw = limit_mw

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._call("nvmlDeviceGetPowerUsage", gpu)
        return gpu.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, gpu: FakeGpu) -> int:
        self._call("nvmlDeviceGetTotalEnergyConsumption", gpu)
        return gpu.energy_mj

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature", gpu)
        assert sensor == real_pynvml.NVML_TEMPERATURE_GPU
        return gpu.temperature_c

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        self._call("nvmlDeviceGetUtilizationRates", gpu)
        return types.SimpleNamespace(gpu=93, memory=40)

    def nvmlDeviceGetClockInfo(self, gpu: FakeGpu, clock_type: int) -> int:
        self._call("nvmlDeviceGetClockInfo", gpu)
        assert clock_type == real_pynvml.NVML_CLOCK_SM
        return gpu.clock_mhz

    def _reasons(self, gpu: FakeGpu) -> int:
        self._call("clocks reasons", gpu)
        return gpu.reasons

    # Xid events: one set per device in this fake
    def nvmlEventSetCreate(self) -> dict[str, Any]:
        self._initialized()
        return {"gpu": None, "freed": False}

    def nvmlDeviceRegisterEvents(self, gpu: FakeGpu, event_types: int, event_set: dict[str, Any]) -> None:
        self._call("nvmlDeviceRegisterEvents", gpu)
        assert event_types & real_pynvml.nvmlEventTypeXidCriticalError
        event_set["gpu"] = gpu

    def nvmlEventSetWait_v2(self, event_set: dict[str, Any], timeout_ms: int) -> Any:
        gpu = event_set["gpu"]
        assert timeout_ms == 0  # the adapter must never block the sample loop
        if gpu.lost:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_GPU_IS_LOST)
        if not gpu.xids:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_TIMEOUT)
        return types.SimpleNamespace(eventType=real_pynvml.nvmlEventTypeXidCriticalError, eventData=gpu.xids.pop(0))

    def nvmlEventSetFree(self, event_set: dict[str, Any]) -> None:
        event_set["freed"] = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml(gpus=2)
    monkeypatch.setattr(nvml_backend, "pynvml", nvml)
    return nvml


def open_one(fake: FakeNvml) -> nvml_backend.NvmlGpu:
    return nvml_backend.open_nvml_devices()[0]


def test_units_are_converted_and_inventory_read(fake: FakeNvml) -> None:
    devices = nvml_backend.open_nvml_devices()
    assert [d.info.index for d in devices] == [0, 1]
    info = devices[0].info
    assert (info.model, info.uuid, info.backend, info.simulated, info.kind) == \
        ("NVIDIA H100 80GB HBM3", "GPU-fake-0", "nvml", False, "gpu")
    assert (info.power_limit_min_w, info.power_limit_max_w, info.power_limit_default_w) == (200.0, 700.0, 700.0)
    assert info.memory_total_bytes == 80 << 30
    sample = devices[0].sample(0.0)
    assert sample.power_w == pytest.approx(512.345)
    assert sample.energy_j == pytest.approx(9876.543)
    assert (sample.temperature_c, sample.utilization_pct, sample.sm_clock_mhz) == (61.0, 93.0, 1755)
    assert (sample.memory_used_bytes, sample.memory_total_bytes, sample.power_limit_w) == (10 << 30, 80 << 30, 700.0)
    assert (sample.health, sample.last_xid) == ("ok", None)


@pytest.mark.parametrize("new_reason_names", [True, False])
def test_clocks_event_reasons_decode_with_new_and_old_bindings(monkeypatch: pytest.MonkeyPatch,
                                                               new_reason_names: bool) -> None:
    nvml = FakeNvml(new_reason_names=new_reason_names)
    monkeypatch.setattr(nvml_backend, "pynvml", nvml)
    gpu = open_one(nvml)
    assert gpu.sample(0.0).throttle_reasons == ("sw_power_cap", "sw_thermal_slowdown")
    nvml.gpus[0].reasons = (real_pynvml.nvmlClocksThrottleReasonGpuIdle | real_pynvml.nvmlClocksThrottleReasonHwSlowdown
                            | real_pynvml.nvmlClocksThrottleReasonHwThermalSlowdown | 1 << 40)  # unknown bit dropped
    assert gpu.sample(1.0).throttle_reasons == ("gpu_idle", "hw_slowdown", "hw_thermal_slowdown")
    nvml.gpus[0].reasons = 0
    assert gpu.sample(2.0).throttle_reasons == ()


def test_power_limit_is_checked_converted_and_read_back(fake: FakeNvml) -> None:
    gpu = open_one(fake)
    assert gpu.set_power_limit(350.5) == 350.5
    assert fake.gpus[0].limit_mw == 350_500
    assert gpu.sample(0.0).power_limit_w == 350.5
    calls_before = len(fake.calls)
    for bad in (100.0, 700.001, float("nan")):
        with pytest.raises(PowerLimitOutOfRange, match="200-700 W"):
            gpu.set_power_limit(bad)
    assert "nvmlDeviceSetPowerManagementLimit" not in fake.calls[calls_before:]  # refused before NVML is asked


def test_power_limit_without_root_says_so(fake: FakeNvml) -> None:
    gpu = open_one(fake)
    fake.permission = False
    with pytest.raises(DeviceError, match="needs root"):
        gpu.set_power_limit(300.0)
    assert fake.gpus[0].limit_mw == 700 * MW


def test_gpu_without_power_management_reports_unsupported(fake: FakeNvml) -> None:
    fake.gpus[0].unsupported = {"nvmlDeviceGetPowerManagementLimitConstraints",
                                "nvmlDeviceGetPowerManagementDefaultLimit", "nvmlDeviceGetPowerManagementLimit"}
    gpu = open_one(fake)
    assert gpu.info.power_limit_min_w is None and gpu.info.power_limit_max_w is None
    assert gpu.sample(0.0).power_limit_w is None
    with pytest.raises(PowerLimitUnsupported):
        gpu.set_power_limit(300.0)


def test_unsupported_fields_read_as_none(fake: FakeNvml) -> None:
    gpu = open_one(fake)
    fake.gpus[0].unsupported = {"nvmlDeviceGetTemperature", "nvmlDeviceGetClockInfo", "clocks reasons"}
    sample = gpu.sample(0.0)
    assert sample.temperature_c is None and sample.sm_clock_mhz is None and sample.throttle_reasons == ()
    assert sample.power_w == pytest.approx(512.345) and sample.health == "ok"


def test_missing_energy_counter_is_integrated_from_power(fake: FakeNvml) -> None:
    fake.gpus[0].unsupported = {"nvmlDeviceGetTotalEnergyConsumption"}  # pre-Volta GPUs
    gpu = open_one(fake)
    fake.gpus[0].power_mw = 100 * MW
    assert gpu.sample(10.0).energy_j == 0.0
    fake.gpus[0].power_mw = 300 * MW
    assert gpu.sample(12.0).energy_j == pytest.approx(400.0)  # trapezoid: (100 + 300) / 2 * 2 s
    assert gpu.sample(13.0).energy_j == pytest.approx(700.0)


def test_lost_gpu_reports_lost_holds_energy_and_refuses_commands(fake: FakeNvml) -> None:
    gpu = open_one(fake)
    energy_j = gpu.sample(0.0).energy_j
    fake.gpus[0].lost = True
    lost = gpu.sample(1.0)
    assert lost.health == "lost" and lost.power_w == 0.0 and lost.temperature_c is None
    assert lost.energy_j == energy_j  # the counter holds; it does not drop to zero
    calls = len(fake.calls)
    assert gpu.sample(2.0).health == "lost"
    assert len(fake.calls) == calls  # a lost GPU is not queried again
    with pytest.raises(DeviceError, match="fallen off the bus"):
        gpu.set_power_limit(300.0)


def test_xid_events_set_health_without_blocking(fake: FakeNvml) -> None:
    gpu = open_one(fake)
    assert gpu.sample(0.0).health == "ok"
    fake.gpus[0].xids = [13, 48]
    sample = gpu.sample(1.0)
    assert (sample.health, sample.last_xid) == ("xid", 48)  # the latest one wins
    assert sample.power_w > 0  # an Xid does not stop telemetry
    assert gpu.sample(2.0).last_xid == 48


def test_other_nvml_errors_become_device_errors(fake: FakeNvml) -> None:
    gpu = open_one(fake)
    fake.gpus[0].failing = {"nvmlDeviceGetPowerUsage": real_pynvml.NVML_ERROR_UNKNOWN}
    with pytest.raises(DeviceError, match="nvmlDeviceGetPowerUsage failed"):
        gpu.sample(0.0)


def test_references_are_balanced_and_close_is_idempotent(fake: FakeNvml) -> None:
    devices = nvml_backend.open_nvml_devices()
    assert fake.references == 2  # one per device; the enumeration's own is released
    devices[0].close()
    devices[0].close()
    assert fake.references == 1
    assert devices[1].sample(0.0).health == "ok"  # the other device keeps working
    devices[1].close()
    assert fake.references == 0
    assert devices[0].event_set is None


def test_init_failure_is_a_clear_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(init_error=real_pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    monkeypatch.setattr(nvml_backend, "pynvml", nvml)
    assert not nvml_backend.nvml_available()
    with pytest.raises(DeviceError, match="NVML did not initialize.*NVIDIA driver"):
        nvml_backend.open_nvml_devices()


def test_a_gpu_failing_during_enumeration_releases_what_was_opened(fake: FakeNvml) -> None:
    fake.gpus[1].lost = True
    with pytest.raises(DeviceError, match="could not open GPU 1"):
        nvml_backend.open_nvml_devices()
    assert fake.references == 0


def test_no_gpus_is_an_empty_list(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(gpus=0)
    monkeypatch.setattr(nvml_backend, "pynvml", nvml)
    assert nvml_backend.nvml_available()
    assert nvml_backend.open_nvml_devices() == [] and nvml.references == 0
