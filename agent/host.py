"""Host CPU and memory through psutil."""

from __future__ import annotations

import os
import platform

import psutil

from common.protocol import HostInfo, HostTelemetry


def host_info() -> HostInfo:
    return HostInfo(cpu_count=os.cpu_count() or 1, memory_total_bytes=psutil.virtual_memory().total,
                    os=f"{platform.system()} {platform.release()}", python_version=platform.python_version())


class HostSampler:
    """Reads host telemetry; one instance may serve several in-process agents (benchmarks)."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # primes the counter: the first call returns 0.0

    def sample(self) -> HostTelemetry:
        memory = psutil.virtual_memory()
        return HostTelemetry(cpu_utilization_pct=float(psutil.cpu_percent(interval=None)),
                             memory_used_bytes=int(memory.total - memory.available),
                             memory_total_bytes=int(memory.total), load_avg_1m=float(os.getloadavg()[0]))
