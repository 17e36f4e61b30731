"""Prometheus exposition shared by the controller and the agent.

Device gauges use the DCGM exporter's metric names (operators already graph
them) with ``node`` and ``gpu`` labels, plus ``simulated`` so modeled numbers are
never mistaken for measured ones. They are produced at scrape time from the
latest telemetry, so a heartbeat costs no metric updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.protocol import DeviceInfo, DeviceTelemetry

# (DCGM name or our own, help, telemetry attribute, scale)
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

DeviceRows = Callable[[], Iterable[tuple[str, DeviceInfo, DeviceTelemetry]]]


class DeviceCollector(Collector):
    """Yields DCGM-named gauges for every (node, device, latest sample) the callback returns."""

    def __init__(self, rows: DeviceRows) -> None:
        self.rows = rows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["node", "gpu", "kind", "modelName", "UUID", "simulated"]
        families = [(GaugeMetricFamily(name, help_text, labels=labels), attr, scale)
                    for name, help_text, attr, scale in DEVICE_GAUGES]
        health = GaugeMetricFamily("murakkab_device_healthy", "1 when the device reports healthy.", labels=labels)
        for node, info, sample in self.rows():
            values = [node, str(info.index), info.kind, info.model, info.uuid, str(info.simulated).lower()]
            for family, attr, scale in families:
                value = getattr(sample, attr)
                if value is not None:
                    family.add_metric(values, float(value) * scale)
            health.add_metric(values, 1.0 if sample.health == "ok" else 0.0)
        yield from (family for family, _, _ in families)
        yield health


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Start the exposition server and return its port (0 lets the OS pick one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])
