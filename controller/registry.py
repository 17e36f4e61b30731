"""Node registry: a sans-I/O state machine of node liveness and admin state.

Events come in with their timestamp (the clock is the caller's); the registry
updates its records and returns actions for the daemon to perform (persist admin
state, log a transition, answer the agent). Nothing here touches sockets, files
or the wall clock, so the same code runs in the daemon, in tests with a fake
clock and in the cluster simulator in virtual time.

Liveness: joining -> ready -> suspect (no heartbeat for ``suspect_after_s``) ->
lost (no heartbeat for ``lost_after_s``); suspect -> ready when heartbeats resume;
a lost node must register again. Admin: active -> draining -> drained (when the
node runs no components) and back to active on undrain. The displayed ``state``
is the liveness when the node is unhealthy, otherwise the admin state when not
active, otherwise the liveness.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from common.protocol import DeviceInfo, DeviceTelemetry, HostInfo, HostTelemetry


class Liveness(str, Enum):
    JOINING = "joining"
    READY = "ready"
    SUSPECT = "suspect"
    LOST = "lost"


class AdminState(str, Enum):
    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"


@dataclass(frozen=True)
class RegistryConfig:
    suspect_after_s: float = 5.0
    lost_after_s: float = 30.0
    telemetry_history: int = 300

    def __post_init__(self) -> None:
        if not 0 < self.suspect_after_s < self.lost_after_s:
            raise ValueError("need 0 < suspect_after_s < lost_after_s")
        if self.telemetry_history < 1:
            raise ValueError("telemetry_history must be at least 1")


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRegistered:
    name: str
    hostname: str
    generation: int
    devices: tuple[DeviceInfo, ...]
    host: HostInfo
    labels: dict[str, str]
    now_s: float


@dataclass(frozen=True)
class HeartbeatReceived:
    name: str
    generation: int
    devices: tuple[DeviceTelemetry, ...]
    host: HostTelemetry
    running_components: int
    now_s: float


@dataclass(frozen=True)
class Tick:
    now_s: float


@dataclass(frozen=True)
class DrainRequested:
    name: str
    reason: str
    now_s: float


@dataclass(frozen=True)
class UndrainRequested:
    name: str
    now_s: float


@dataclass(frozen=True)
class LabelsChanged:
    name: str
    labels: dict[str, str | None]
    now_s: float


Event = NodeRegistered | HeartbeatReceived | Tick | DrainRequested | UndrainRequested | LabelsChanged


# --- actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StateChanged:
    name: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True)
class DurableNode:
    """What survives a controller restart about a node: identity and the operator's decisions."""

    name: str
    hostname: str
    generation: int
    admin_state: str
    drain_reason: str | None
    labels: dict[str, str]


@dataclass(frozen=True)
class PersistNode:
    """The node's durable facts changed: write them to the store."""

    node: DurableNode


@dataclass(frozen=True)
class Accepted:
    """Registration or heartbeat accepted; ``state`` is what the agent is told."""

    name: str
    state: str


@dataclass(frozen=True)
class Rejected:
    """An event refused; ``code`` is the wire error code, ``message`` says why."""

    name: str
    code: str
    message: str


Action = StateChanged | PersistNode | Accepted | Rejected


# --- records ---------------------------------------------------------------------------


@dataclass
class NodeRecord:
    name: str
    hostname: str
    generation: int
    liveness: Liveness
    admin_state: AdminState
    drain_reason: str | None
    labels: dict[str, str]
    state_since_s: float
    registered_at_s: float | None = None
    last_seen_s: float | None = None
    devices: tuple[DeviceInfo, ...] = ()
    host_info: HostInfo | None = None
    host: HostTelemetry | None = None
    running_components: int = 0
    history: dict[int, deque[tuple[float, DeviceTelemetry]]] = field(default_factory=dict)

    @property
    def state(self) -> str:
        if self.liveness in (Liveness.SUSPECT, Liveness.LOST):
            return self.liveness.value
        if self.admin_state is not AdminState.ACTIVE:
            return self.admin_state.value
        return self.liveness.value

    def latest_telemetry(self) -> tuple[DeviceTelemetry, ...]:
        return tuple(ring[-1][1] for _, ring in sorted(self.history.items()) if ring)

    def schedulable(self) -> bool:
        """Whether new work may be placed here."""
        return self.liveness is Liveness.READY and self.admin_state is AdminState.ACTIVE


class NodeRegistry:
    """Every node the controller knows, and the rules by which their states change."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.nodes: dict[str, NodeRecord] = {}

    # Restoring durable state after a controller restart: the node waits in JOINING
    # for its agent to register again, and becomes LOST if it never does.
    def restore(self, name: str, hostname: str, generation: int, admin_state: str,
                drain_reason: str | None, labels: dict[str, str], now_s: float) -> None:
        self.nodes[name] = NodeRecord(
            name=name, hostname=hostname, generation=generation, liveness=Liveness.JOINING,
            admin_state=AdminState(admin_state), drain_reason=drain_reason, labels=dict(labels),
            state_since_s=now_s,
        )

    def handle(self, event: Event) -> list[Action]:
        match event:
            case NodeRegistered():
                return self._register(event)
            case HeartbeatReceived():
                return self._heartbeat(event)
            case Tick():
                return self._tick(event.now_s)
            case DrainRequested():
                return self._drain(event)
            case UndrainRequested():
                return self._undrain(event)
            case LabelsChanged():
                return self._relabel(event)
        raise TypeError(f"unknown event {event!r}")

    # --- transitions -------------------------------------------------------------------

    def _set(self, node: NodeRecord, now_s: float, reason: str, liveness: Liveness | None = None,
             admin: AdminState | None = None) -> list[Action]:
        old = node.state
        if liveness is not None:
            node.liveness = liveness
        if admin is not None:
            node.admin_state = admin
        if node.state == old:
            return []
        node.state_since_s = now_s
        return [StateChanged(node.name, old, node.state, reason)]

    @staticmethod
    def _persist(node: NodeRecord) -> PersistNode:
        return PersistNode(DurableNode(node.name, node.hostname, node.generation, node.admin_state.value,
                                       node.drain_reason, dict(node.labels)))

    def _register(self, ev: NodeRegistered) -> list[Action]:
        node = self.nodes.get(ev.name)
        if node is not None and ev.generation < node.generation:
            return [Rejected(ev.name, "stale_generation",
                             f"node {ev.name} registered with generation {ev.generation}, "
                             f"but generation {node.generation} is already known; a newer agent runs under this name")]
        actions: list[Action] = []
        if node is None:
            node = NodeRecord(name=ev.name, hostname=ev.hostname, generation=ev.generation,
                              liveness=Liveness.JOINING, admin_state=AdminState.ACTIVE,
                              drain_reason=None, labels={}, state_since_s=ev.now_s)
            self.nodes[ev.name] = node
            actions.append(StateChanged(ev.name, "new", node.state, "registered"))
        else:
            actions += self._set(node, ev.now_s, f"registered (generation {ev.generation})",
                                 liveness=Liveness.JOINING)
        # Labels from the agent's own config are merged under the operator's stored labels.
        labels = {**ev.labels, **node.labels}
        node.hostname, node.generation, node.labels = ev.hostname, ev.generation, labels
        node.devices, node.host_info = ev.devices, ev.host
        node.registered_at_s = node.last_seen_s = ev.now_s
        known = {d.index for d in ev.devices}
        node.history = {i: ring for i, ring in node.history.items() if i in known}
        actions.append(self._persist(node))
        actions.append(Accepted(ev.name, node.state))
        return actions

    def _heartbeat(self, ev: HeartbeatReceived) -> list[Action]:
        node = self.nodes.get(ev.name)
        if node is None or node.registered_at_s is None:
            return [Rejected(ev.name, "reregister", f"node {ev.name} is not registered with this controller")]
        if node.liveness is Liveness.LOST:
            return [Rejected(ev.name, "reregister", f"node {ev.name} was declared lost; register again")]
        if ev.generation != node.generation:
            code = "stale_generation" if ev.generation < node.generation else "reregister"
            return [Rejected(ev.name, code, f"heartbeat from generation {ev.generation}, "
                                            f"registered generation is {node.generation}")]
        node.last_seen_s = ev.now_s
        node.host = ev.host
        node.running_components = ev.running_components
        for sample in ev.devices:
            ring = node.history.get(sample.index)
            if ring is None:
                ring = node.history[sample.index] = deque(maxlen=self.config.telemetry_history)
            ring.append((ev.now_s, sample))
        actions: list[Action] = []
        if node.liveness is not Liveness.READY:
            reason = "first heartbeat" if node.liveness is Liveness.JOINING else "heartbeats resumed"
            actions += self._set(node, ev.now_s, reason, liveness=Liveness.READY)
        actions += self._maybe_drained(node, ev.now_s)
        actions.append(Accepted(ev.name, node.state))
        return actions

    def _maybe_drained(self, node: NodeRecord, now_s: float) -> list[Action]:
        if node.admin_state is AdminState.DRAINING and node.running_components == 0:
            return [*self._set(node, now_s, "no components left", admin=AdminState.DRAINED), self._persist(node)]
        return []

    def _tick(self, now_s: float) -> list[Action]:
        actions: list[Action] = []
        for node in self.nodes.values():
            reference_s = node.last_seen_s if node.last_seen_s is not None else node.state_since_s
            silent_s = now_s - reference_s
            if node.liveness is not Liveness.LOST and silent_s >= self.config.lost_after_s:
                actions += self._set(node, now_s, f"no heartbeat for {silent_s:.1f}s", liveness=Liveness.LOST)
            elif node.liveness is Liveness.READY and silent_s >= self.config.suspect_after_s:
                actions += self._set(node, now_s, f"no heartbeat for {silent_s:.1f}s", liveness=Liveness.SUSPECT)
        return actions

    def _drain(self, ev: DrainRequested) -> list[Action]:
        node = self.nodes.get(ev.name)
        if node is None:
            return [self._unknown(ev.name)]
        if not ev.reason.strip():
            return [Rejected(ev.name, "invalid_argument", "a drain needs a reason")]
        node.drain_reason = ev.reason
        actions: list[Action] = []
        if node.admin_state is AdminState.ACTIVE:
            actions += self._set(node, ev.now_s, f"drain requested: {ev.reason}", admin=AdminState.DRAINING)
        actions.append(self._persist(node))
        actions += self._maybe_drained(node, ev.now_s)
        actions.append(Accepted(ev.name, node.state))
        return actions

    def _undrain(self, ev: UndrainRequested) -> list[Action]:
        node = self.nodes.get(ev.name)
        if node is None:
            return [self._unknown(ev.name)]
        node.drain_reason = None
        actions = self._set(node, ev.now_s, "undrain requested", admin=AdminState.ACTIVE)
        return [*actions, self._persist(node), Accepted(ev.name, node.state)]

    def _relabel(self, ev: LabelsChanged) -> list[Action]:
        node = self.nodes.get(ev.name)
        if node is None:
            return [self._unknown(ev.name)]
        for key, value in ev.labels.items():
            if value is None:
                node.labels.pop(key, None)
            else:
                node.labels[key] = value
        return [self._persist(node), Accepted(ev.name, node.state)]

    def _unknown(self, name: str) -> Rejected:
        known = ", ".join(sorted(self.nodes)[:10]) or "none"
        return Rejected(name, "unknown_node", f"no node named {name!r} (known: {known})")
