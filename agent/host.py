"""Host CPU and memory through psutil."""

from __future__ import annotations

import os
import platform

import psutil

from common.protocol import HostInfo, HostTelemetry


def host_info() -> HostInfo:
    return HostInfo(cpu_count=os.cpu_count() or 1, memory_total_bytes=psutil.virtual_memory().total,
                    os=f"{platform.system()} {platform.release()}", python_version=platform.python_version())


class CpuUtilization:
    """Host CPU busy share since this reader's previous call.

    Each reader keeps its own baseline; psutil.cpu_percent(interval=None) shares one
    module-wide baseline, so two callers at different rates would skew each other.
    """

    def __init__(self) -> None:
        self._last = psutil.cpu_times()

    def __call__(self) -> float:
        now = psutil.cpu_times()
        busy = sum(now) - sum(self._last)
        idle = (now.idle + getattr(now, "iowait", 0.0)) - (self._last.idle + getattr(self._last, "iowait", 0.0))
        self._last = now
        return 0.0 if busy <= 0 else max(0.0, min(100.0, 100.0 * (1.0 - idle / busy)))


class HostSampler:
    """Reads host telemetry; one instance may serve several in-process agents (benchmarks)."""

    def __init__(self) -> None:
        self.cpu_utilization_pct = CpuUtilization()

    def sample(self) -> HostTelemetry:
        memory = psutil.virtual_memory()
        return HostTelemetry(cpu_utilization_pct=self.cpu_utilization_pct(),
                             memory_used_bytes=int(memory.total - memory.available),
                             memory_total_bytes=int(memory.total), load_avg_1m=float(os.getloadavg()[0]))
