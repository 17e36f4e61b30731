"""Real NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

Units are converted at this boundary: NVML speaks mW and mJ, the rest of Murakkab W and J.
A field this GPU does not support (NVML_ERROR_NOT_SUPPORTED) reads as None instead of
failing the sample; a GPU that fell off the bus (NVML_ERROR_GPU_IS_LOST) reports health
"lost" from then on. Xid errors arrive as NVML events, polled without blocking at each
sample. Every call goes through the module attribute ``pynvml`` so tests can substitute
a fake NVML.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pynvml

from agent.devices.base import Device, DeviceError, PowerLimitOutOfRange, PowerLimitUnsupported
from common.protocol import DeviceInfo, DeviceTelemetry

log = logging.getLogger(__name__)

# Clocks-event reason bits (called "throttle reasons" before NVML 12.2), named as the sim names them.
# (constant suffix in pynvml, reason string); both naming families carry the same values.
_REASONS: tuple[tuple[str, str], ...] = (
    ("GpuIdle", "gpu_idle"),
    ("ApplicationsClocksSetting", "applications_clocks_setting"),
    ("SwPowerCap", "sw_power_cap"),
    ("HwSlowdown", "hw_slowdown"),
    ("SyncBoost", "sync_boost"),
    ("SwThermalSlowdown", "sw_thermal_slowdown"),
    ("HwThermalSlowdown", "hw_thermal_slowdown"),
    ("HwPowerBrakeSlowdown", "hw_power_brake_slowdown"),
    ("DisplayClockSetting", "display_clock_setting"),
)


def throttle_reason_bits(nvml: Any) -> tuple[tuple[int, str], ...]:
    """(bit, name) pairs from the bindings' own constants, new names first, old as fallback."""
    bits = []
    for suffix, name in _REASONS:
        value = getattr(nvml, f"nvmlClocksEventReason{suffix}", None)
        if value is None:
            value = getattr(nvml, f"nvmlClocksThrottleReason{suffix}", None)
        if value is not None:
            bits.append((int(value), name))
    return tuple(bits)


THROTTLE_REASONS = throttle_reason_bits(pynvml)


def decode_throttle_reasons(mask: int) -> tuple[str, ...]:
    """Reason names for the bits set in an NVML clocks-event mask, in bit order; unknown bits are dropped."""
    return tuple(name for bit, name in THROTTLE_REASONS if mask & bit)


def _code(exc: BaseException) -> int | None:
    return getattr(exc, "value", None) if isinstance(exc, pynvml.NVMLError) else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlGpu(Device):
    """One GPU behind an NVML handle; holds one NVML reference (released by ``close``)."""

    def __init__(self, index: int, handle: Any, *, owns_nvml_reference: bool = False) -> None:
        self.handle = handle
        self.owns_nvml_reference = owns_nvml_reference
        self.lost = False
        self.last_xid: int | None = None
        self.energy_j = 0.0  # last known counter, held while the GPU is lost
        self.energy_supported = True
        self.last_power_w: float | None = None
        self.last_sample_s: float | None = None
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
        self.event_set = self._register_xid_events()

    # --- reads -------------------------------------------------------------------------

    def _register_xid_events(self) -> Any:
        """An event set for this GPU's critical Xid errors, or None where NVML cannot deliver them."""
        try:
            event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as exc:
            log.info("%s: no Xid events (%s)", self.info.uuid, exc)
            return None
        try:
            pynvml.nvmlDeviceRegisterEvents(self.handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
        except pynvml.NVMLError as exc:
            log.info("%s: no Xid events (%s)", self.info.uuid, exc)
            pynvml.nvmlEventSetFree(event_set)
            return None
        return event_set

    def _poll_xid_events(self) -> None:
        """Drain pending Xid events without waiting; the latest code becomes ``last_xid``."""
        if self.event_set is None:
            return
        wait = getattr(pynvml, "nvmlEventSetWait_v2", None) or pynvml.nvmlEventSetWait
        for _ in range(64):  # bounded: a storm of events must not stall the sample loop
            try:
                event = wait(self.event_set, 0)
            except pynvml.NVMLError as exc:
                if _code(exc) == pynvml.NVML_ERROR_GPU_IS_LOST:
                    self.lost = True
                elif _code(exc) != pynvml.NVML_ERROR_TIMEOUT:
                    log.warning("%s: reading Xid events failed: %s", self.info.uuid, exc)
                return
            if event.eventType & pynvml.nvmlEventTypeXidCriticalError:
                self.last_xid = int(event.eventData)
                log.warning("%s: Xid %d", self.info.uuid, self.last_xid)

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML read; None where the GPU does not support it or is lost."""
        if self.lost:
            return None
        try:
            return fn(self.handle, *args)
        except pynvml.NVMLError as exc:
            code = _code(exc)
            if code == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return None
            if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                log.error("%s: GPU is lost (fallen off the bus)", self.info.uuid)
                self.lost = True
                return None
            raise DeviceError(f"{self.info.uuid}: {getattr(fn, '__name__', 'NVML call')} failed: {exc}") from None

    def _reasons_function(self) -> Callable[..., Any]:
        return getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons

    def sample(self, now_s: float) -> DeviceTelemetry:
        self._poll_xid_events()
        power_mw = self._read(pynvml.nvmlDeviceGetPowerUsage)
        energy_mj = self._read(pynvml.nvmlDeviceGetTotalEnergyConsumption) if self.energy_supported else None
        temperature = self._read(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        memory = self._read(pynvml.nvmlDeviceGetMemoryInfo)
        utilization = self._read(pynvml.nvmlDeviceGetUtilizationRates)
        clock = self._read(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        limit_mw = self._read(pynvml.nvmlDeviceGetPowerManagementLimit)
        mask = self._read(self._reasons_function())
        power_w = power_mw / 1000.0 if power_mw is not None else None
        self._update_energy(now_s, power_w, energy_mj)
        if self.lost:
            return DeviceTelemetry(
                index=self.info.index, power_w=0.0, energy_j=round(self.energy_j, 3), temperature_c=None,
                memory_used_bytes=0, memory_total_bytes=self.info.memory_total_bytes, utilization_pct=0.0,
                sm_clock_mhz=None, power_limit_w=None, throttle_reasons=(), health="lost", last_xid=self.last_xid)
        return DeviceTelemetry(
            index=self.info.index,
            power_w=power_w if power_w is not None else 0.0,
            energy_j=round(self.energy_j, 3),
            temperature_c=float(temperature) if temperature is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else 0,
            memory_total_bytes=int(memory.total) if memory is not None else self.info.memory_total_bytes,
            utilization_pct=float(utilization.gpu) if utilization is not None else 0.0,
            sm_clock_mhz=int(clock) if clock is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            throttle_reasons=decode_throttle_reasons(int(mask)) if mask is not None else (),
            health="xid" if self.last_xid is not None else "ok",
            last_xid=self.last_xid,
        )

    def _update_energy(self, now_s: float, power_w: float | None, energy_mj: int | None) -> None:
        """NVML's counter (mJ since driver load) where supported; else integrate power (trapezoid)."""
        if energy_mj is not None:
            self.energy_j = energy_mj / 1000.0
        elif not self.lost and self.energy_supported:
            self.energy_supported = False  # pre-Volta GPUs: count it ourselves from here on
            log.info("%s: no energy counter; integrating power instead", self.info.uuid)
        if not self.energy_supported and power_w is not None and not self.lost:
            if self.last_power_w is not None and self.last_sample_s is not None and now_s > self.last_sample_s:
                self.energy_j += (self.last_power_w + power_w) / 2.0 * (now_s - self.last_sample_s)
            self.last_power_w = power_w
        self.last_sample_s = now_s if self.last_sample_s is None else max(self.last_sample_s, now_s)

    # --- actuation and lifecycle -------------------------------------------------------

    def set_power_limit(self, power_limit_w: float) -> float:
        if self.lost:
            raise DeviceError(f"{self.info.uuid}: GPU has fallen off the bus; it needs a reset or a reboot")
        low, high = self.info.power_limit_min_w, self.info.power_limit_max_w
        if low is None or high is None:
            raise PowerLimitUnsupported(f"{self.info.model} ({self.info.uuid}) does not support power limits")
        if not low <= power_limit_w <= high:
            raise PowerLimitOutOfRange(f"{power_limit_w:g} W is outside the power-limit range of "
                                       f"{self.info.model}: {low:g}-{high:g} W")
        try:
            pynvml.nvmlDeviceSetPowerManagementLimit(self.handle, round(power_limit_w * 1000))
        except pynvml.NVMLError as exc:
            code = _code(exc)
            if code == pynvml.NVML_ERROR_NO_PERMISSION:
                raise DeviceError(f"setting the power limit of {self.info.uuid} needs root "
                                  "(run the agent as root or with CAP_SYS_ADMIN)") from None
            if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                self.lost = True
                raise DeviceError(f"{self.info.uuid}: GPU has fallen off the bus; it needs a reset or a reboot") \
                    from None
            raise DeviceError(f"{self.info.uuid}: setting the power limit failed: {exc}") from None
        applied_mw = self._read(pynvml.nvmlDeviceGetPowerManagementLimit)
        return applied_mw / 1000.0 if applied_mw is not None else float(power_limit_w)

    def close(self) -> None:
        """Free the event set and drop this device's NVML reference; safe to call twice."""
        if self.event_set is not None:
            try:
                pynvml.nvmlEventSetFree(self.event_set)
            except pynvml.NVMLError:
                pass
            self.event_set = None
        if self.owns_nvml_reference:
            self.owns_nvml_reference = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass


def nvml_available() -> bool:
    """Whether NVML initializes here (driver loaded); says nothing about how many GPUs there are."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def open_nvml_devices() -> list[NvmlGpu]:
    """Every GPU NVML sees, in NVML index order; an empty list where the driver sees none.

    NVML counts initializations: each device takes its own reference, so closing every
    device shuts NVML down and closing some leaves the others working.
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise DeviceError(f"NVML did not initialize ({exc}); is the NVIDIA driver installed and a GPU present?") \
            from None
    devices: list[NvmlGpu] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            pynvml.nvmlInit()  # the device's own reference
            try:
                devices.append(NvmlGpu(i, pynvml.nvmlDeviceGetHandleByIndex(i), owns_nvml_reference=True))
            except pynvml.NVMLError:
                pynvml.nvmlShutdown()
                raise
    except pynvml.NVMLError as exc:
        for device in devices:
            device.close()
        raise DeviceError(f"NVML could not open GPU {len(devices)}: {exc}") from None
    finally:
        pynvml.nvmlShutdown()  # the enumeration's reference
    return devices
