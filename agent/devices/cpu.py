"""The host CPU as a compute device (for tools and CPU executors).

Power comes from the RAPL package energy counters where the kernel exposes them and
this process may read them (``energy_uj`` is root-only on most kernels since 2020);
otherwise it is modeled as idle + (TDP - idle) * utilization, because RAPL is absent in
most VMs. ``power_source`` says which ("rapl" or "model"); the CPU itself is real, so
the device is not labeled simulated. Memory is host RAM.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import psutil

from agent.devices.base import Device, PowerLimitUnsupported
from agent.host import CpuUtilization
from common.protocol import DeviceInfo, DeviceTelemetry

log = logging.getLogger(__name__)

POWERCAP_DIR = Path("/sys/class/powercap")
RAPL_DIR = POWERCAP_DIR / "intel-rapl:0"  # package 0; AMD hosts expose the same names through intel_rapl_msr
SLOW_READ_INTERVAL_S = 5.0  # temperature and clock glob sysfs (hundreds of microseconds) and change slowly
CPU_TEMPERATURE_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal")


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The "model name" line of /proc/cpuinfo, or "CPU" where there is none (ARM, non-Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or "CPU"
    except OSError:
        pass
    return "CPU"


class RaplCounter:
    """Package energy in joules since this counter opened, summed over packages, unwrapping each counter."""

    def __init__(self, *directories: Path) -> None:
        self.zones = [(d / "energy_uj", int((d / "max_energy_range_uj").read_text())) for d in directories or (RAPL_DIR,)]
        self.last_uj = [int(path.read_text()) for path, _ in self.zones]
        self.total_j = 0.0

    def read_j(self) -> float:
        """Total joules so far; raises OSError or ValueError if a counter cannot be read."""
        for i, (path, range_uj) in enumerate(self.zones):
            now_uj = int(path.read_text())
            delta_uj = now_uj - self.last_uj[i]
            if delta_uj < 0:  # the counter wrapped past max_energy_range_uj
                delta_uj += range_uj
            self.last_uj[i] = now_uj
            self.total_j += delta_uj / 1e6
        return self.total_j

    @staticmethod
    def package_zones(powercap_dir: Path = POWERCAP_DIR) -> list[Path]:
        """Top-level RAPL zones that are CPU packages (not "psys", not core/dram sub-zones)."""
        zones = []
        for zone in sorted(powercap_dir.glob("intel-rapl:*")):
            if not re.fullmatch(r"intel-rapl:\d+", zone.name):
                continue
            try:
                if (zone / "name").read_text().strip().startswith("package"):
                    zones.append(zone)
            except OSError:
                continue
        return zones

    @classmethod
    def open(cls, powercap_dir: Path = POWERCAP_DIR) -> RaplCounter | None:
        """A counter over every package, or None where RAPL is absent or unreadable."""
        zones = cls.package_zones(powercap_dir)
        if not zones:
            return None
        try:
            return cls(*zones)
        except (OSError, ValueError) as exc:
            log.info("RAPL present but unreadable (%s); CPU power will be modeled from utilization", exc)
            return None


class CpuDevice(Device):
    """The host's CPUs as one device; sampled at wall-clock times, which it tolerates stepping backwards."""

    def __init__(self, index: int, *, tdp_w: float, idle_w: float, start_s: float,
                 utilization_reader: Callable[[], float] | None = None, rapl: RaplCounter | None = None,
                 node_name: str = "") -> None:
        if not 0 <= idle_w < tdp_w:
            raise ValueError(f"need 0 <= idle_w < tdp_w, got idle {idle_w} W and TDP {tdp_w} W")
        self.tdp_w, self.idle_w = float(tdp_w), float(idle_w)
        # Busy percent (0..100) since the reader's previous call (or its creation, for the first call).
        self.read_utilization_pct = utilization_reader or CpuUtilization()
        self.rapl = rapl
        self.power_source = "rapl" if rapl is not None else "model"
        self.info = DeviceInfo(
            index=index, kind="cpu", model=cpu_model_name(), uuid=f"CPU-{node_name}-{index}" if node_name else
            f"CPU-{index}", backend="cpu", simulated=False, memory_total_bytes=int(psutil.virtual_memory().total))
        self.now_s = float(start_s)
        self.energy_j = rapl.read_j() if rapl is not None else 0.0  # the baseline for the first power reading
        self.power_w = self.idle_w
        self._slow_read_at_s = float("-inf")
        self._temperature_c: float | None = None
        self._clock_mhz: int | None = None

    def _model_power_w(self, utilization_pct: float) -> float:
        return self.idle_w + (self.tdp_w - self.idle_w) * utilization_pct / 100.0

    def sample(self, now_s: float) -> DeviceTelemetry:
        dt = max(0.0, now_s - self.now_s)
        self.now_s = max(self.now_s, now_s)
        utilization = min(100.0, max(0.0, float(self.read_utilization_pct())))
        if self.rapl is not None:
            try:
                energy_j = self.rapl.read_j()
            except (OSError, ValueError) as exc:
                log.warning("RAPL stopped being readable (%s); modeling CPU power from utilization from now on", exc)
                self.rapl, self.power_source = None, "model"
            else:
                if dt > 0:
                    self.power_w = (energy_j - self.energy_j) / dt
                self.energy_j = energy_j
        if self.rapl is None:
            # The reader averages over the interval since its last call, so power * dt is the interval's energy.
            self.power_w = self._model_power_w(utilization)
            self.energy_j += self.power_w * dt
        if now_s - self._slow_read_at_s >= SLOW_READ_INTERVAL_S:
            self._temperature_c, self._clock_mhz = cpu_temperature_c(), cpu_clock_mhz()
            self._slow_read_at_s = now_s
        memory = psutil.virtual_memory()
        return DeviceTelemetry(
            index=self.info.index, power_w=round(self.power_w, 3), energy_j=round(self.energy_j, 3),
            temperature_c=self._temperature_c, memory_used_bytes=int(memory.total - memory.available),
            memory_total_bytes=int(memory.total), utilization_pct=round(utilization, 2),
            sm_clock_mhz=self._clock_mhz, power_limit_w=None)

    def set_power_limit(self, power_limit_w: float) -> float:
        raise PowerLimitUnsupported(f"{self.info.model}: this agent cannot set a CPU power limit")


def cpu_temperature_c() -> float | None:
    """The hottest CPU sensor psutil knows, or None (VMs, containers, non-Linux)."""
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError, RuntimeError):
        return None
    for name in CPU_TEMPERATURE_SENSORS:
        readings = sensors.get(name)
        if readings:
            return float(max(r.current for r in readings))
    return None


def cpu_clock_mhz() -> int | None:
    """Current average CPU clock, or None where the platform does not report it."""
    try:
        freq = psutil.cpu_freq()
    except (AttributeError, OSError, NotImplementedError, RuntimeError):  # psutil raises these where no cpufreq exists
        return None
    return int(freq.current) if freq is not None and freq.current else None
