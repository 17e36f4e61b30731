"""What placement knows about the fleet, and the limits and result of a placement: device and node
states (``DeviceState``, ``NodeState``; ``device_state`` builds one from a registration and telemetry,
``temperature_trend_c_per_s`` the slope it carries), ``PlacementLimits`` and ``PlacementResult``.

Plain data, kept apart from the placer (``policies.placement``, which applies the rules and
re-exports these names) so the planner, the simulator and the controller can build and read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from common.protocol import DeviceInfo, DeviceTelemetry
from policies.model import InstanceConfig
from policies.perf_model import hardware_key
from policies.plan import PlacedComponent

DeviceKey = tuple[str, int]


# --- what placement knows about the fleet --------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """One device with its latest telemetry; ``None`` where the backend cannot tell."""

    index: int
    kind: str  # "gpu" | "cpu"
    model: str
    hardware: str  # hardware type key: "h100", "a100", "l4", "cpu" (see ``hardware_key``)
    simulated: bool
    memory_total_bytes: int
    memory_used_bytes: int = 0
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None  # applied now
    power_limit_min_w: float | None = None
    power_limit_max_w: float | None = None
    temperature_trend_c_per_s: float | None = None  # recent slope of temperature_c (see temperature_trend_c_per_s)
    power_limit_default_w: float | None = None  # None: power_limit_max_w
    health: str = "ok"  # "ok" | "xid" | "lost" ("hot": the autopilot evacuates it)
    throttle_reasons: tuple[str, ...] = ()  # NVML clocks-event reasons in the latest sample


@dataclass(frozen=True)
class NodeState:
    """A node as placement sees it: its devices, host resources, labels (incl. the rack) and states."""

    name: str
    schedulable: bool
    devices: tuple[DeviceState, ...]
    cpu_cores: int
    memory_total_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    liveness: str = "ready"  # "joining" | "ready" | "suspect" | "lost"
    admin: str = "active"  # "active" | "draining" | "drained"


@dataclass(frozen=True)
class PlacementLimits:
    rack_power_budget_w: dict[str, float] = field(default_factory=dict)  # rack label value -> W
    rack_label: str = "rack"
    max_temperature_c: float | None = None  # None: the GPU's max operating temperature - margin
    temperature_margin_c: float = 5.0
    thermal_horizon_s: float | None = None  # None: the GPU's thermal time constant R*C
    ambient_c: float = 25.0  # inlet air or coolant temperature for the model-based prediction
    spread: bool = True  # replicas of a config over racks and nodes when possible
    sticky: bool = True  # keep current components where they still fit
    allow_sharing: bool = True  # several instances on one GPU when memory allows
    count_foreign_memory: bool = True  # subtract reported use on GPUs without current components
    avoid: dict[tuple[str, str], str] = field(default_factory=dict)  # (executor, node) -> why not there for now


@dataclass(frozen=True)
class PlacementResult:
    components: tuple[PlacedComponent, ...]
    power_limits: dict[DeviceKey, float]  # (node, device index) -> W, for GPUs hosting instances
    unplaced: dict[InstanceConfig, int]  # instances that found no place
    notes: tuple[str, ...]
    reasons: dict[InstanceConfig, str] = field(default_factory=dict)  # why each unplaced config found none
    device_power_w: dict[DeviceKey, float] = field(default_factory=dict)  # predicted, GPUs hosting instances
    device_temperature_c: dict[DeviceKey, float] = field(default_factory=dict)  # predicted steady, same GPUs
    rack_power_w: dict[str, float] = field(default_factory=dict)  # predicted draw per rack


def device_state(info: DeviceInfo, telemetry: DeviceTelemetry | None = None,
                 temperature_trend_c_per_s: float | None = None) -> DeviceState:
    """A DeviceState from a registration's ``DeviceInfo`` and the latest ``DeviceTelemetry``."""
    t = telemetry
    return DeviceState(
        index=info.index, kind=info.kind, model=info.model, hardware=hardware_key(info.model, info.kind),
        simulated=info.simulated, memory_total_bytes=info.memory_total_bytes,
        memory_used_bytes=t.memory_used_bytes if t is not None else 0,
        temperature_c=t.temperature_c if t is not None else None, power_w=t.power_w if t is not None else None,
        power_limit_w=t.power_limit_w if t is not None else None, power_limit_min_w=info.power_limit_min_w,
        power_limit_max_w=info.power_limit_max_w, temperature_trend_c_per_s=temperature_trend_c_per_s,
        power_limit_default_w=info.power_limit_default_w, health=t.health if t is not None else "ok",
        throttle_reasons=tuple(t.throttle_reasons) if t is not None else ())


def temperature_trend_c_per_s(samples: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (time_s, temperature_c) samples; None with fewer than two instants."""
    if len(samples) < 2:
        return None
    mean_t = sum(t for t, _ in samples) / len(samples)
    mean_c = sum(c for _, c in samples) / len(samples)
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread <= 0.0:
        return None
    return sum((t - mean_t) * (c - mean_c) for t, c in samples) / spread
