"""What the daemon knows of its fleet, in the autopilot's terms: node states with telemetry and hardware types.

Pure: registry records in, ``policies.placement`` values out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from controller.registry import NodeRecord
from policies.model import HardwareType
from policies.perf_model import standard_hardware
from policies.placement import NodeState, device_state, hardware_key, temperature_trend_c_per_s


def fleet_hardware(nodes: Sequence[NodeRecord]) -> tuple[dict[str, HardwareType], dict[str, int]]:
    """The hardware types present on schedulable nodes and how many devices of each.

    Known GPU models take their published characteristics; every node's host CPU counts as one
    ``cpu`` device whose cores are the smallest CPU count among the nodes (conservative).
    """
    standard = standard_hardware()
    counts: dict[str, int] = defaultdict(int)
    cpu_cores: list[int] = []
    for node in nodes:
        if not node.schedulable():
            continue
        for device in node.devices:
            key = hardware_key(device.model, device.kind)
            if key in standard and key != "cpu":
                counts[key] += 1
        if node.host_info is not None:  # every host's CPUs run tools, with or without a cpu device
            counts["cpu"] += 1
            cpu_cores.append(node.host_info.cpu_count)
    hardware = {key: standard[key] for key in counts}
    if "cpu" in hardware and cpu_cores:
        cpu = hardware["cpu"]
        cores = min(cpu_cores)
        share = cores / max(1, cpu.cores)
        hardware["cpu"] = HardwareType(cpu.name, cpu.kind, cpu.memory_bytes, cpu.idle_power_w * share,
                                       cpu.max_power_w * share, None, cpu.price_per_hour_usd * share, cores=cores)
    return hardware, dict(counts)


def node_states(nodes: Sequence[NodeRecord]) -> list[NodeState]:
    states = []
    for node in nodes:
        latest = {t.index: t for t in node.latest_telemetry()}
        devices = []
        for info in node.devices:
            ring = node.history.get(info.index)
            trend = _trend(ring) if ring else None
            devices.append(device_state(info, latest.get(info.index), trend))
        host = node.host_info
        states.append(NodeState(node.name, node.schedulable(), tuple(devices), host.cpu_count if host else 0,
                                host.memory_total_bytes if host else 0, dict(node.labels), node.liveness.value,
                                node.admin_state.value))
    return states


def _trend(ring: Any) -> float | None:
    samples = [(t, s.temperature_c) for t, s in list(ring)[-30:] if s.temperature_c is not None]
    return temperature_trend_c_per_s(samples) if len(samples) >= 2 else None
