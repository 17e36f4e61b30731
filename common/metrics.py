"""Prometheus exposition shared by the controller and the agent.

GPU gauges use the DCGM exporter's metric names (operators already graph them) with ``node`` and
``gpu`` labels, DCGM's own ``UUID`` and ``modelName`` labels (kept for dashboard compatibility, though
``promtool check metrics`` would have them lower case), plus ``simulated`` so modeled numbers are never
mistaken for measured ones. Host CPUs have families of their own (``murakkab_cpu_*``, labels ``node``
and ``cpu``), so a dashboard that sums ``DCGM_FI_DEV_POWER_USAGE`` counts GPUs only. All of them are
produced at scrape time from the latest telemetry, so a heartbeat costs no metric updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.protocol import DeviceInfo, DeviceTelemetry

# (DCGM name, help, telemetry attribute, scale): GPUs only
DEVICE_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (W).", "power_w", 1.0),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Energy since the counter started (mJ).", "energy_j", 1000.0),
    ("DCGM_FI_DEV_GPU_TEMP", "Device temperature (C).", "temperature_c", 1.0),
    ("DCGM_FI_DEV_FB_USED", "Device memory used (MiB).", "memory_used_bytes", 1.0 / (1 << 20)),
    ("DCGM_FI_DEV_FB_TOTAL", "Device memory total (MiB).", "memory_total_bytes", 1.0 / (1 << 20)),
    ("DCGM_FI_DEV_GPU_UTIL", "Utilization (%).", "utilization_pct", 1.0),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock (MHz).", "sm_clock_mhz", 1.0),
    ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Power management limit (W).", "power_limit_w", 1.0),
)

# (our name, help, telemetry attribute, scale): host CPUs, in base units
CPU_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("murakkab_cpu_power_watts", "Host CPU package power (W; RAPL where readable, else modeled from "
     "utilization and TDP).", "power_w", 1.0),
    ("murakkab_cpu_temperature_celsius", "Hottest host CPU sensor (C), where the platform reports one.",
     "temperature_c", 1.0),
    ("murakkab_cpu_utilization_ratio", "Host CPU busy fraction (0..1).", "utilization_pct", 0.01),
    ("murakkab_cpu_clock_hertz", "Average host CPU clock (Hz), where the platform reports it.", "sm_clock_mhz", 1e6),
    ("murakkab_cpu_memory_used_bytes", "Host memory in use (bytes).", "memory_used_bytes", 1.0),
    ("murakkab_cpu_memory_total_bytes", "Host memory (bytes).", "memory_total_bytes", 1.0),
)

GPU_LABELS = ["node", "gpu", "kind", "modelName", "UUID", "simulated"]
CPU_LABELS = ["node", "cpu", "model", "simulated"]

DeviceRows = Callable[[], Iterable[tuple[str, DeviceInfo, DeviceTelemetry]]]


class DeviceCollector(Collector):
    """Yields DCGM-named gauges for every GPU and ``murakkab_cpu_*`` families for every host CPU among the
    (node, device, latest sample) rows the callback returns."""

    def __init__(self, rows: DeviceRows) -> None:
        self.rows = rows

    def collect(self) -> Iterator[Metric]:
        gpu = [(GaugeMetricFamily(name, help_text, labels=GPU_LABELS), attr, scale)
               for name, help_text, attr, scale in DEVICE_GAUGES]
        cpu = [(GaugeMetricFamily(name, help_text, labels=CPU_LABELS), attr, scale)
               for name, help_text, attr, scale in CPU_GAUGES]
        cpu_energy = CounterMetricFamily("murakkab_cpu_energy_joules", "Host CPU energy since the agent "
                                         "started (J).", labels=CPU_LABELS)
        health = GaugeMetricFamily("murakkab_device_healthy", "1 when the device (GPU or host CPU) reports "
                                   "healthy.", labels=["node", "device", "kind", "simulated"])
        throttle = GaugeMetricFamily("murakkab_gpu_throttle_reason", "1 for each clocks-event (throttle) "
                                     "reason a GPU reports now, as NVML names it (e.g. sw_thermal_slowdown, "
                                     "sw_power_cap); no series while it reports none.",
                                     labels=["node", "gpu", "UUID", "simulated", "reason"])
        for node, info, sample in self.rows():
            simulated = str(info.simulated).lower()
            if info.kind == "cpu":
                values = [node, str(info.index), info.model, simulated]
                families = cpu
                energy_j = sample.energy_j
                if energy_j is not None:
                    cpu_energy.add_metric(values, float(energy_j))
            else:
                values = [node, str(info.index), info.kind, info.model, info.uuid, simulated]
                families = gpu
                for reason in sample.throttle_reasons:
                    throttle.add_metric([node, str(info.index), info.uuid, simulated, reason], 1.0)
            for family, attr, scale in families:
                value = getattr(sample, attr)
                if value is not None:
                    family.add_metric(values, float(value) * scale)
            health.add_metric([node, str(info.index), info.kind, simulated], 1.0 if sample.health == "ok" else 0.0)
        yield from (family for family, _, _ in gpu)
        yield from (family for family, _, _ in cpu)
        yield cpu_energy
        yield throttle
        yield health


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Start the exposition server and return its port (0 lets the OS pick one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])
