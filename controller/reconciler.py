"""Reconciler: drives the agents toward the planned components. Sans-I/O and level-triggered.

The planner says which components should run where (``DesiredChanged``); every heartbeat says
what a node actually runs (``NodeReport``). After each event the reconciler compares the two
and returns the commands that close the gap; the daemon sends them and reports back with
``CommandDone``. Time comes in with the events (``now_s``), so tests drive it with a fake clock
and the cluster simulator in virtual time; ``Tick`` lets timeouts and backoffs expire.

Rules, per (node, component id):

- A desired component that its (ready) node does not report, or reports stopped or failed, is
  started. A component reported failed is restarted after a backoff of 1 s, doubling up to
  60 s; the backoff resets once the component has stayed ready for 60 s.
- A component a ready node reports but the plan does not want there (not desired, desired on
  another node, or running another executor or other devices under a desired id) is stopped
  once; a failed one too, so the agent lets go of it. Draining and stopped ones are left alone.
- At most one command is in flight per component on a node. A command not answered within
  ``command_timeout_s`` counts as failed; failed commands are retried with the same backoff.
- Nothing is sent to a node that is not ready (suspect, lost, unknown): its pending commands
  time out and everything is re-derived from its reports when it is ready again.

Commands are idempotent on the agent (starting a ready component does nothing, stopping a
stopped one does nothing), so repeating the comparison is always safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.protocol.messages import ComponentReport, ComponentView
from policies.plan import PlacedComponent

RUNNING_STATES = frozenset({"pending", "starting", "ready"})
STOPPABLE_STATES = RUNNING_STATES | {"failed"}
RESTARTABLE_STATES = frozenset({"stopped", "failed"})


@dataclass(frozen=True)
class ReconcilerConfig:
    command_timeout_s: float = 30.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_reset_after_ready_s: float = 60.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.command_timeout_s <= 0 or self.drain_timeout_s <= 0:
            raise ValueError("command_timeout_s and drain_timeout_s must be positive")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if self.backoff_reset_after_ready_s < 0:
            raise ValueError("backoff_reset_after_ready_s must not be negative")


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredChanged:
    """The plan's components, all of them (not a delta)."""

    components: tuple[PlacedComponent, ...]
    now_s: float


@dataclass(frozen=True)
class NodeReport:
    """What a node runs, from its heartbeat; ``ready`` is false for suspect, lost or unknown nodes."""

    node: str
    ready: bool
    reports: tuple[ComponentReport, ...]
    now_s: float


@dataclass(frozen=True)
class CommandDone:
    """The agent's answer to a command (``ok`` false: refused or failed, ``message`` says why)."""

    command_id: str
    ok: bool
    message: str
    now_s: float


@dataclass(frozen=True)
class Tick:
    now_s: float


Event = DesiredChanged | NodeReport | CommandDone | Tick


# --- actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SendStart:
    """Send StartComponent for ``executor`` (a catalog name) on these devices."""

    command_id: str
    node: str
    component_id: str
    executor: str
    device_indexes: tuple[int, ...]


@dataclass(frozen=True)
class SendStop:
    command_id: str
    node: str
    component_id: str
    drain_timeout_s: float


Action = SendStart | SendStop


# --- status ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentStatus:
    """One component on one node as ``murakkabctl components`` shows it.

    ``actual_state`` is the reported state, ``absent`` when the ready node does not report it,
    or ``unknown`` when the node is not ready. ``restarts`` counts restarts the controller
    ordered after the component failed or stopped; ``failures_since_ready`` counts the times it was
    reported failed since it was last reported ready (refused or lost commands are the control
    plane's trouble, not the component's, and do not count).
    """

    component_id: str
    executor: str
    node: str
    desired: bool
    device_indexes: tuple[int, ...]
    actual_state: str
    report: ComponentReport | None
    restarts: int
    last_error: str
    pending_command: str | None  # "start" | "stop" while one is in flight
    next_attempt_s: float | None  # when a backed-off start or stop may go out again
    failures_since_ready: int = 0

    def view(self) -> ComponentView:
        return ComponentView(node=self.node, desired=self.desired, report=self.report,
                             component_id=self.component_id, executor=self.executor,
                             device_indexes=self.device_indexes, last_error=self.last_error)


# --- records ---------------------------------------------------------------------------


@dataclass
class _Track:
    """The reconciler's memory of one component id on one node."""

    backoff_s: float
    start_not_before_s: float = -math.inf
    stop_not_before_s: float = -math.inf
    pending: str | None = None  # command id in flight
    restarts: int = 0
    failures_since_ready: int = 0
    last_error: str = ""
    failure_counted: bool = False  # the failed state now reported was already backed off
    ready_since_s: float | None = None
    stop_sent: bool = False  # a stop is in flight or acknowledged for the instance there now
    awaiting_report: bool = False  # a start was acknowledged; the reports held predate it


@dataclass(frozen=True)
class _Pending:
    command_id: str
    kind: str  # "start" | "stop"
    node: str
    component_id: str
    sent_s: float


class Reconciler:
    """Desired components vs. reported ones, and the commands between them.

    A heartbeat or a command answer re-examines only its node, a plan change or a tick all
    nodes, so the cost of a heartbeat does not grow with the cluster.
    """

    def __init__(self, config: ReconcilerConfig | None = None, command_prefix: str = "cmd-") -> None:
        self.config = config or ReconcilerConfig()
        self.command_prefix = command_prefix  # make ids unique across controller runs (e.g. the epoch)
        self.desired: dict[str, PlacedComponent] = {}
        self.reports: dict[str, dict[str, ComponentReport]] = {}
        self.node_ready: dict[str, bool] = {}
        self.now_s = -math.inf  # the time of the latest event
        self._desired_on: dict[str, dict[str, PlacedComponent]] = {}  # node -> component id -> component
        self._tracks: dict[str, dict[str, _Track]] = {}  # node -> component id -> track
        self._pending: dict[str, _Pending] = {}
        self._sequence = 0

    def handle(self, event: Event) -> list[Action]:
        self.now_s = max(self.now_s, event.now_s)
        nodes: set[str] | None = None  # the nodes to re-examine; None: all
        match event:
            case DesiredChanged():
                self._set_desired(event.components)
            case NodeReport():
                self._observe(event)
                nodes = {event.node}
            case CommandDone():
                pending = self._pending.pop(event.command_id, None)
                if pending is not None:  # a late answer to a timed-out command is ignored
                    self._finish(pending, event.ok, event.message, event.now_s)
                nodes = {pending.node} if pending is not None else set()
            case Tick():
                pass
            case _:
                raise TypeError(f"unknown event {event!r}")
        expired = self._expire(event.now_s)
        if nodes is not None:
            nodes |= expired
        actions: list[Action] = []
        for node in sorted(self._known_nodes() if nodes is None else nodes):
            actions += self._reconcile_node(node, event.now_s)
            self._forget_settled(node)
        return actions

    # --- views -----------------------------------------------------------------------------

    def status(self, component_id: str) -> ComponentStatus | None:
        """The component where the plan wants it, else where it is reported (first node by name)."""
        desired = self.desired.get(component_id)
        if desired is not None:
            return self._status(desired.node, component_id)
        for node in sorted(self.reports):
            if component_id in self.reports[node]:
                return self._status(node, component_id)
        return None

    def statuses(self) -> list[ComponentStatus]:
        """Every desired component and every reported one, once per node, by id then node."""
        keys = {(c.node, c.component_id) for c in self.desired.values()}
        keys |= {(node, cid) for node, reports in self.reports.items() for cid in reports}
        return [self._status(node, cid) for node, cid in sorted(keys, key=lambda k: (k[1], k[0]))]

    def failing(self) -> list[ComponentStatus]:
        """Components reported failed at least once since they were last ready, desired or reported; a cheap
        scan (no status for the others), for callers that look every tick."""
        return [self._status(node, cid) for node, tracks in self._tracks.items() for cid, track in tracks.items()
                if track.failures_since_ready > 0
                and (cid in self._desired_on.get(node, {}) or cid in self.reports.get(node, {}))]

    def pending_commands(self) -> int:
        return len(self._pending)

    def _status(self, node: str, component_id: str) -> ComponentStatus:
        placed = self._desired_on.get(node, {}).get(component_id)
        report = self.reports.get(node, {}).get(component_id)
        track = self._tracks.get(node, {}).get(component_id)
        if not self.node_ready.get(node, False):
            actual = "unknown"
        else:
            actual = report.state if report is not None else "absent"
        pending = self._pending.get(track.pending) if track is not None and track.pending else None
        next_attempt = None
        if track is not None:
            waits = [t for t in (track.start_not_before_s, track.stop_not_before_s) if t > self.now_s]
            next_attempt = max(waits) if waits else None
        if placed is not None:
            executor, devices = placed.executor, tuple(placed.device_indexes)
        elif report is not None:
            executor, devices = report.executor, tuple(report.device_indexes)
        else:
            raise KeyError(f"component {component_id!r} is neither desired nor reported on node {node!r}")
        last_error = track.last_error if track is not None else ""
        if not last_error and report is not None and report.state == "failed":
            last_error = report.reason
        return ComponentStatus(
            component_id=component_id, executor=executor, node=node, desired=placed is not None,
            device_indexes=devices, actual_state=actual, report=report,
            restarts=track.restarts if track is not None else 0, last_error=last_error,
            pending_command=pending.kind if pending is not None else None, next_attempt_s=next_attempt,
            failures_since_ready=track.failures_since_ready if track is not None else 0,
        )

    # --- events ----------------------------------------------------------------------------

    def _set_desired(self, components: tuple[PlacedComponent, ...]) -> None:
        desired: dict[str, PlacedComponent] = {}
        by_node: dict[str, dict[str, PlacedComponent]] = {}
        for comp in components:
            if comp.component_id in desired:
                raise ValueError(f"component id {comp.component_id!r} appears twice in the desired plan")
            desired[comp.component_id] = comp
            by_node.setdefault(comp.node, {})[comp.component_id] = comp
        self.desired, self._desired_on = desired, by_node

    def _known_nodes(self) -> set[str]:
        return set(self._desired_on) | set(self.reports) | set(self._tracks)

    def _track(self, node: str, component_id: str) -> _Track:
        tracks = self._tracks.setdefault(node, {})
        track = tracks.get(component_id)
        if track is None:
            track = tracks[component_id] = _Track(backoff_s=self.config.backoff_initial_s)
        return track

    def _backoff(self, track: _Track) -> float:
        """The wait before the next attempt; doubles the one after."""
        wait_s = track.backoff_s
        track.backoff_s = min(track.backoff_s * 2, self.config.backoff_max_s)
        return wait_s

    def _observe(self, event: NodeReport) -> None:
        self.node_ready[event.node] = event.ready
        self.reports[event.node] = {r.component_id: r for r in event.reports}
        if not event.ready:
            return
        for track in self._tracks.get(event.node, {}).values():
            track.awaiting_report = False
        for report in event.reports:
            track = self._track(event.node, report.component_id)
            if report.state == "ready":
                track.failures_since_ready = 0
                if track.ready_since_s is None:
                    track.ready_since_s = event.now_s
                elif event.now_s - track.ready_since_s >= self.config.backoff_reset_after_ready_s:
                    track.backoff_s = self.config.backoff_initial_s
            else:
                track.ready_since_s = None
            if report.state == "failed":
                # Counted once per failure; ignored while our start is in flight (the report may predate it).
                if not track.failure_counted and track.pending is None:
                    track.failure_counted = True
                    track.failures_since_ready += 1
                    track.last_error = report.reason or "failed (no reason reported)"
                    track.start_not_before_s = event.now_s + self._backoff(track)
            else:
                track.failure_counted = False

    def _finish(self, pending: _Pending, ok: bool, message: str, now_s: float) -> None:
        track = self._track(pending.node, pending.component_id)
        if track.pending == pending.command_id:
            track.pending = None
        if ok:
            track.awaiting_report = pending.kind == "start"
            return
        track.last_error = f"{pending.kind} command failed: {message}" if message else f"{pending.kind} command failed"
        wait_s = self._backoff(track)
        if pending.kind == "start":
            track.start_not_before_s = now_s + wait_s
        else:
            track.stop_sent = False
            track.stop_not_before_s = now_s + wait_s

    def _expire(self, now_s: float) -> set[str]:
        """Time out unanswered commands; returns their nodes."""
        timeout_s = self.config.command_timeout_s
        expired = [p for p in self._pending.values() if now_s - p.sent_s >= timeout_s]
        for pending in expired:
            del self._pending[pending.command_id]
            self._finish(pending, False, f"no reply within {timeout_s:g}s", now_s)
        return {p.node for p in expired}

    # --- the comparison --------------------------------------------------------------------

    def _send(self, kind: str, node: str, component_id: str, now_s: float) -> str:
        self._sequence += 1
        command_id = f"{self.command_prefix}{self._sequence}"
        self._pending[command_id] = _Pending(command_id, kind, node, component_id, now_s)
        self._track(node, component_id).pending = command_id
        return command_id

    def _stop(self, node: str, component_id: str, now_s: float) -> SendStop | None:
        track = self._track(node, component_id)
        if track.pending is not None or track.stop_sent or now_s < track.stop_not_before_s:
            return None
        track.stop_sent = True
        return SendStop(self._send("stop", node, component_id, now_s), node, component_id,
                        self.config.drain_timeout_s)

    def _reconcile_node(self, node: str, now_s: float) -> list[Action]:
        if not self.node_ready.get(node, False):
            return []
        actions: list[Action] = []
        reports = self.reports.get(node, {})
        for component_id, comp in sorted(self._desired_on.get(node, {}).items()):
            track = self._track(node, component_id)
            if track.pending is not None or track.awaiting_report:
                continue
            report = reports.get(component_id)
            if report is not None and (report.executor != comp.executor
                                       or tuple(report.device_indexes) != tuple(comp.device_indexes)):
                # Another instance under this id: stop it, start the planned one once it has stopped.
                if report.state in STOPPABLE_STATES:
                    stop = self._stop(node, component_id, now_s)
                    if stop is not None:
                        actions.append(stop)
                    continue
                if report.state != "stopped":
                    continue
            elif report is not None and report.state not in RESTARTABLE_STATES:
                continue
            if now_s < track.start_not_before_s:
                continue
            if report is not None:
                track.restarts += 1
            track.failure_counted = False
            track.stop_sent = False
            command_id = self._send("start", node, component_id, now_s)
            actions.append(SendStart(command_id, node, component_id, comp.executor, tuple(comp.device_indexes)))
        wanted = self._desired_on.get(node, {})
        for component_id, report in sorted(reports.items()):
            if component_id in wanted:
                continue  # desired here; a mismatched instance is handled above
            if report.state in STOPPABLE_STATES:
                stop = self._stop(node, component_id, now_s)
                if stop is not None:
                    actions.append(stop)
        return actions

    def _forget_settled(self, node: str) -> None:
        """Drop the memory of components neither desired nor reported on a node, nothing in flight."""
        tracks = self._tracks.get(node)
        if not tracks:
            self._tracks.pop(node, None)
            return
        wanted, reported = self._desired_on.get(node, {}), self.reports.get(node, {})
        for component_id in [cid for cid, t in tracks.items()
                             if t.pending is None and cid not in wanted and cid not in reported]:
            del tracks[component_id]
        if not tracks:
            del self._tracks[node]
