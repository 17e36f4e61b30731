"""The host CPU as a compute device (for tools and CPU executors).

Power comes from the RAPL package energy counter where the kernel exposes it;
otherwise it is modeled as idle + (TDP - idle) * utilization, since RAPL is often
absent in VMs and on AMD hosts without the powercap driver.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil

from agent.devices.base import Device, PowerLimitUnsupported
from agent.host import CpuUtilization
from common.protocol import DeviceInfo, DeviceTelemetry

RAPL_DIR = Path("/sys/class/powercap/intel-rapl:0")
SLOW_READ_INTERVAL_S = 5.0


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


class RaplCounter:
    """Package energy in joules from RAPL, unwrapping the counter's wraparound."""

    def __init__(self, directory: Path = RAPL_DIR) -> None:
        self.energy_file = directory / "energy_uj"
        self.range_uj = int((directory / "max_energy_range_uj").read_text())
        self.last_uj = int(self.energy_file.read_text())
        self.total_j = 0.0

    def read_j(self) -> float:
        now_uj = int(self.energy_file.read_text())
        delta = now_uj - self.last_uj
        if delta < 0:
            delta += self.range_uj
        self.last_uj = now_uj
        self.total_j += delta / 1e6
        return self.total_j

    @classmethod
    def open(cls) -> "RaplCounter | None":
        try:
            return cls()
        except (OSError, ValueError):
            return None


class CpuDevice(Device):
    def __init__(self, index: int, *, tdp_w: float, idle_w: float, start_s: float,
                 utilization_reader: Callable[[], float] | None = None, rapl: RaplCounter | None = None) -> None:
        self.tdp_w, self.idle_w = tdp_w, idle_w
        self.read_utilization_pct = utilization_reader or CpuUtilization()
        self.rapl = rapl
        self.info = DeviceInfo(index=index, kind="cpu", model=cpu_model_name(), uuid=f"CPU-{index}", backend="cpu",
                               simulated=False, memory_total_bytes=int(psutil.virtual_memory().total))
        self.now_s = start_s
        self.energy_j = rapl.read_j() if rapl is not None else 0.0  # the baseline for the first power reading
        self.power_w = idle_w
        self._slow_read_at_s = float("-inf")
        self._temperature_c: float | None = None
        self._clock_mhz: int | None = None

    def sample(self, now_s: float) -> DeviceTelemetry:
        dt = max(0.0, now_s - self.now_s)
        utilization = min(100.0, max(0.0, self.read_utilization_pct()))
        if self.rapl is not None:
            energy = self.rapl.read_j()
            self.power_w = (energy - self.energy_j) / dt if dt > 0 else self.power_w
            self.energy_j = energy
        else:
            self.power_w = self.idle_w + (self.tdp_w - self.idle_w) * utilization / 100.0
            self.energy_j += self.power_w * dt
        self.now_s = max(self.now_s, now_s)
        memory = psutil.virtual_memory()
        if now_s - self._slow_read_at_s >= SLOW_READ_INTERVAL_S:
            # Temperature and clock come from globbing sysfs (hundreds of microseconds); they change slowly.
            freq = psutil.cpu_freq()
            self._temperature_c = _cpu_temperature_c()
            self._clock_mhz = int(freq.current) if freq and freq.current else None
            self._slow_read_at_s = now_s
        return DeviceTelemetry(
            index=self.info.index, power_w=round(self.power_w, 3), energy_j=round(self.energy_j, 3),
            temperature_c=self._temperature_c, memory_used_bytes=int(memory.total - memory.available),
            memory_total_bytes=int(memory.total), utilization_pct=utilization,
            sm_clock_mhz=self._clock_mhz, power_limit_w=None)

    def set_power_limit(self, power_limit_w: float) -> float:
        raise PowerLimitUnsupported(f"{self.info.model}: the CPU has no power limit this agent can set")


def _cpu_temperature_c() -> float | None:
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    for name in ("coretemp", "k10temp", "zenpower", "cpu_thermal"):
        readings = sensors.get(name)
        if readings:
            return float(max(r.current for r in readings))
    return None
