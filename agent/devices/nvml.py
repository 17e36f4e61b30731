"""Real NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

Units are converted at this boundary (NVML speaks mW and mJ). A field the GPU does
not support reads as None instead of failing the whole sample; a GPU that fell off
the bus reports health "lost".
"""

from __future__ import annotations

from typing import Any

import pynvml

from agent.devices.base import Device, DeviceError, PowerLimitOutOfRange, PowerLimitUnsupported
from common.protocol import DeviceInfo, DeviceTelemetry

# NVML clocks-event (formerly "throttle") reason bits, named as the sim device names them.
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x0000000000000001, "gpu_idle"),
    (0x0000000000000002, "applications_clocks_setting"),
    (0x0000000000000004, "sw_power_cap"),
    (0x0000000000000008, "hw_slowdown"),
    (0x0000000000000010, "sync_boost"),
    (0x0000000000000020, "sw_thermal_slowdown"),
    (0x0000000000000040, "hw_thermal_slowdown"),
    (0x0000000000000080, "hw_power_brake_slowdown"),
    (0x0000000000000100, "display_clock_setting"),
)


def decode_throttle_reasons(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in THROTTLE_REASONS if mask & bit)


def _code(exc: Exception) -> int | None:
    return getattr(exc, "value", None) if isinstance(exc, pynvml.NVMLError) else None


class NvmlGpu(Device):
    def __init__(self, index: int, handle: Any) -> None:
        self.handle = handle
        name = _text(pynvml.nvmlDeviceGetName(handle))
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        low_w = high_w = default_w = None
        try:
            low_mw, high_mw = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            low_w, high_w = low_mw / 1000.0, high_mw / 1000.0
            default_w = pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000.0
        except pynvml.NVMLError as exc:
            if _code(exc) != pynvml.NVML_ERROR_NOT_SUPPORTED:
                raise
        self.info = DeviceInfo(index=index, kind="gpu", model=name, uuid=uuid, backend="nvml", simulated=False,
                               memory_total_bytes=int(memory.total), power_limit_min_w=low_w,
                               power_limit_max_w=high_w, power_limit_default_w=default_w)
        self.lost = False

    def _read(self, fn: Any, *args: Any) -> Any:
        """One NVML read; None where the GPU does not support it."""
        try:
            return fn(self.handle, *args)
        except pynvml.NVMLError as exc:
            code = _code(exc)
            if code == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return None
            if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                self.lost = True
                return None
            raise DeviceError(f"{self.info.uuid}: {fn.__name__} failed: {exc}") from None

    def sample(self, now_s: float) -> DeviceTelemetry:
        power_mw = self._read(pynvml.nvmlDeviceGetPowerUsage)
        energy_mj = self._read(pynvml.nvmlDeviceGetTotalEnergyConsumption)
        temperature = self._read(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        memory = self._read(pynvml.nvmlDeviceGetMemoryInfo)
        utilization = self._read(pynvml.nvmlDeviceGetUtilizationRates)
        clock = self._read(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        limit_mw = self._read(pynvml.nvmlDeviceGetPowerManagementLimit)
        reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = self._read(reasons_fn)
        return DeviceTelemetry(
            index=self.info.index,
            power_w=power_mw / 1000.0 if power_mw is not None else 0.0,
            energy_j=energy_mj / 1000.0 if energy_mj is not None else 0.0,
            temperature_c=float(temperature) if temperature is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else 0,
            memory_total_bytes=int(memory.total) if memory is not None else self.info.memory_total_bytes,
            utilization_pct=float(utilization.gpu) if utilization is not None else 0.0,
            sm_clock_mhz=int(clock) if clock is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            throttle_reasons=decode_throttle_reasons(mask) if mask is not None else (),
            health="lost" if self.lost else "ok",
        )

    def set_power_limit(self, power_limit_w: float) -> float:
        low, high = self.info.power_limit_min_w, self.info.power_limit_max_w
        if low is None or high is None:
            raise PowerLimitUnsupported(f"{self.info.model} does not support power limits")
        if not low <= power_limit_w <= high:
            raise PowerLimitOutOfRange(f"{power_limit_w:g} W is outside {self.info.model}'s power-limit range "
                                       f"{low:g}-{high:g} W")
        try:
            pynvml.nvmlDeviceSetPowerManagementLimit(self.handle, int(round(power_limit_w * 1000)))
        except pynvml.NVMLError as exc:
            if _code(exc) == pynvml.NVML_ERROR_NO_PERMISSION:
                raise DeviceError(f"setting the power limit of {self.info.uuid} needs root "
                                  "(run the agent as root or with CAP_SYS_ADMIN)") from None
            if _code(exc) == pynvml.NVML_ERROR_GPU_IS_LOST:
                self.lost = True
                raise DeviceError(f"{self.info.uuid} has fallen off the bus") from None
            raise DeviceError(f"{self.info.uuid}: setting the power limit failed: {exc}") from None
        applied_mw = self._read(pynvml.nvmlDeviceGetPowerManagementLimit)
        return applied_mw / 1000.0 if applied_mw is not None else float(power_limit_w)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_available() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def open_nvml_devices() -> list[NvmlGpu]:
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        return [NvmlGpu(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    except pynvml.NVMLError as exc:
        raise DeviceError(f"NVML did not initialize ({exc}); is the NVIDIA driver installed and a GPU present?") \
            from None
