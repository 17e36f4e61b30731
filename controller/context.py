"""What the controller's services (admin API, workloads, profiler) see of the daemon, as a protocol.

They are handed the ``Controller`` itself, but type it as ``ControllerContext`` so none of them imports
``controller.daemon``, and the daemon imports them without an import circle.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from common.transport import RpcEndpoint
from controller.config import ControllerSettings
from controller.registry import NodeRecord, NodeRegistry
from controller.store import Store


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames_rejected = Counter("murakkab_frames_rejected", "Frames refused by strict decoding.",
                                       ["endpoint", "code"], registry=registry)
        self.heartbeats = Counter("murakkab_heartbeats", "Heartbeats received.", ["result"], registry=registry)
        self.heartbeat_handling = Histogram(
            "murakkab_heartbeat_handling_seconds", "Time from a heartbeat's arrival to its reply.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry)
        self.transitions = Counter("murakkab_node_transitions", "Node state transitions.", ["to"], registry=registry)
        self.commands = Counter("murakkab_commands", "Commands sent to agents.", ["op", "result"], registry=registry)
        self.jobs = Counter("murakkab_jobs", "Jobs accepted and ended, by outcome.", ["result"], registry=registry)
        self.auth_refused = Counter("murakkab_auth_refused", "Handshakes and messages refused by authentication "
                                    "or roles.", ["endpoint", "reason"], registry=registry)
        self.facility_messages = Counter("murakkab_facility_messages", "Facility MQTT messages (rack budgets, "
                                         "cooling, grid) by what became of them: applied, held (no node of the "
                                         "rack yet) or why they were ignored.", ["topic_kind", "result"],
                                         registry=registry)


class ControllerContext(Protocol):
    settings: ControllerSettings
    epoch: int
    started_s: float
    registry: NodeRegistry
    store: Store
    metrics: ControllerMetrics
    metrics_registry: CollectorRegistry
    agents: RpcEndpoint | None
    admin: RpcEndpoint | None
    agent_endpoint: str
    admin_endpoint: str
    workloads: Any  # controller.jobs.service.WorkloadService
    profiler: Any  # controller.profiler.ProfilerService

    def clock(self) -> float: ...

    def to_unix(self, monotonic_s: float | None) -> float | None: ...

    def apply(self, actions: list[Any]) -> Any: ...

    async def set_power_limit(self, node: NodeRecord, device_index: int, power_limit_w: float) -> Any: ...
