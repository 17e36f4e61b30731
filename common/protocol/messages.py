"""Every message the controller, the agents and the admin CLI exchange.

Field types use pydantic's strict scalars so a decoded message has exactly the
types declared (an int where a float is declared is accepted and widened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr

from common.protocol.codec import message

# --- shared shapes (not messages themselves) -------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is; sent at registration and unchanged while the agent runs."""

    index: StrictInt
    kind: StrictStr  # "gpu" | "cpu"
    model: StrictStr
    uuid: StrictStr
    backend: StrictStr  # "nvml" | "sim" | "cpu"
    simulated: StrictBool
    memory_total_bytes: StrictInt
    power_limit_min_w: StrictFloat | None = None
    power_limit_max_w: StrictFloat | None = None
    power_limit_default_w: StrictFloat | None = None


class DeviceTelemetry(NamedTuple):
    """One sample of one device. ``None`` means the backend cannot measure that field.

    A named tuple, not a dataclass: heartbeats carry one per device, on the wire as an
    array in field order (under half the bytes of a map), and validating named tuples
    costs a third of validating dataclasses, which matters at a thousand nodes.
    """

    index: StrictInt
    power_w: StrictFloat
    energy_j: StrictFloat
    temperature_c: StrictFloat | None
    memory_used_bytes: StrictInt
    memory_total_bytes: StrictInt
    utilization_pct: StrictFloat
    sm_clock_mhz: StrictInt | None
    power_limit_w: StrictFloat | None
    throttle_reasons: tuple[StrictStr, ...] = ()
    health: StrictStr = "ok"  # "ok" | "xid" | "lost"
    last_xid: StrictInt | None = None


@dataclass(frozen=True)
class HostInfo:
    cpu_count: StrictInt
    memory_total_bytes: StrictInt
    os: StrictStr
    python_version: StrictStr


@dataclass(frozen=True)
class HostTelemetry:
    cpu_utilization_pct: StrictFloat
    memory_used_bytes: StrictInt
    memory_total_bytes: StrictInt
    load_avg_1m: StrictFloat


@dataclass(frozen=True)
class NodeView:
    """The controller's view of one node, as the admin API returns it."""

    name: StrictStr
    hostname: StrictStr
    state: StrictStr
    liveness: StrictStr
    admin_state: StrictStr
    drain_reason: StrictStr | None
    generation: StrictInt
    labels: dict[StrictStr, StrictStr]
    registered_at_unix_s: StrictFloat | None
    last_seen_unix_s: StrictFloat | None
    state_since_unix_s: StrictFloat
    devices: tuple[DeviceInfo, ...]
    telemetry: tuple[DeviceTelemetry, ...]
    host: HostTelemetry | None


# --- agents -> controller --------------------------------------------------------------


@message("register", kind="request", served_by="controller.agents")
@dataclass(frozen=True)
class Register:
    node_name: StrictStr
    hostname: StrictStr
    generation: StrictInt
    agent_version: StrictStr
    devices: tuple[DeviceInfo, ...]
    host: HostInfo
    labels: dict[StrictStr, StrictStr] = field(default_factory=dict)


@message("register_accepted", kind="reply")
@dataclass(frozen=True)
class RegisterAccepted:
    controller_epoch: StrictInt
    heartbeat_interval_s: StrictFloat
    state: StrictStr


@message("heartbeat", kind="request", served_by="controller.agents")
@dataclass(frozen=True)
class Heartbeat:
    node_name: StrictStr
    generation: StrictInt
    seq: StrictInt
    sent_at_unix_s: StrictFloat
    devices: tuple[DeviceTelemetry, ...]
    host: HostTelemetry
    running_components: StrictInt = 0


@message("heartbeat_ack", kind="reply")
@dataclass(frozen=True)
class HeartbeatAck:
    controller_epoch: StrictInt
    state: StrictStr


@message("reregister", kind="reply")
@dataclass(frozen=True)
class ReregisterRequired:
    """Answer to a heartbeat the controller cannot place: the agent must register again."""

    reason: StrictStr
    controller_epoch: StrictInt


# --- controller -> agents --------------------------------------------------------------


@message("set_power_limit", kind="request", served_by="agent")
@dataclass(frozen=True)
class SetPowerLimit:
    command_id: StrictStr
    controller_epoch: StrictInt
    node_generation: StrictInt
    device_index: StrictInt
    power_limit_w: StrictFloat


@message("command_result", kind="reply")
@dataclass(frozen=True)
class CommandResult:
    command_id: StrictStr
    ok: StrictBool
    message: StrictStr
    applied_power_limit_w: StrictFloat | None = None


# --- admin CLI -> controller -----------------------------------------------------------


@message("list_nodes", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ListNodes:
    """One page of nodes in name order, starting after the node named ``after``."""

    after: StrictStr = ""
    limit: StrictInt = 100


@message("node_list", kind="reply")
@dataclass(frozen=True)
class NodeList:
    nodes: tuple[NodeView, ...]
    next_after: StrictStr | None = None  # pass as ``after`` for the next page; None on the last page


@message("get_node", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetNode:
    name: StrictStr


@message("drain_node", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class DrainNode:
    name: StrictStr
    reason: StrictStr


@message("undrain_node", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class UndrainNode:
    name: StrictStr


@message("label_node", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class LabelNode:
    """Set labels (value a string) or remove them (value None)."""

    name: StrictStr
    labels: dict[StrictStr, StrictStr | None]


@message("node_detail", kind="reply")
@dataclass(frozen=True)
class NodeDetail:
    node: NodeView


@message("set_node_power_limit", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class SetNodePowerLimit:
    name: StrictStr
    device_index: StrictInt
    power_limit_w: StrictFloat


@message("get_status", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetStatus:
    pass


@message("cluster_status", kind="reply")
@dataclass(frozen=True)
class ClusterStatus:
    controller_epoch: StrictInt
    version: StrictStr
    uptime_s: StrictFloat
    agent_endpoint: StrictStr
    admin_endpoint: StrictStr
    nodes_by_state: dict[StrictStr, StrictInt]
    devices_total: StrictInt
    power_w_total: StrictFloat
    frames_rejected_total: StrictInt


# --- either direction ------------------------------------------------------------------


@message("error", kind="reply")
@dataclass(frozen=True)
class ErrorReply:
    """An explicit refusal: ``code`` is machine-readable, ``message`` says what to do."""

    code: StrictStr
    message: StrictStr


__all__ = [
    "DeviceInfo",
    "DeviceTelemetry",
    "HostInfo",
    "HostTelemetry",
    "NodeView",
    "Register",
    "RegisterAccepted",
    "Heartbeat",
    "HeartbeatAck",
    "ReregisterRequired",
    "SetPowerLimit",
    "CommandResult",
    "ListNodes",
    "NodeList",
    "GetNode",
    "DrainNode",
    "UndrainNode",
    "LabelNode",
    "NodeDetail",
    "SetNodePowerLimit",
    "GetStatus",
    "ClusterStatus",
    "ErrorReply",
]
