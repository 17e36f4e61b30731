"""The lifecycle of one component as a pure state machine: events in, actions out.

States: pending -> starting -> ready -> draining -> stopped | failed. The asyncio shell
(``runtime.ComponentManager``) feeds events (a start or stop command, the engine having
spawned, a probe's answer, an exit status, invocations beginning and ending, clock ticks)
and performs the actions returned (launch, probe or stop the engine, fail invocations in
flight). The clock arrives inside events, so tests drive it with plain numbers and the
same machine would run in virtual time.

Engine instances are numbered (``attempt``): every launch gets a new number, and events
about an older instance (a probe that answers after a restart, the exit of an engine
that was replaced) are ignored rather than applied to its successor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

ACTIVE_STATES = frozenset({"pending", "starting", "ready", "draining"})  # holding (or about to hold) resources

PROBE_INTERVAL_STARTING_S = 0.5
PROBE_INTERVAL_READY_S = 5.0
FAILED_PROBES_BEFORE_FAILURE = 3  # while ready: one slow probe is noise, three in a row is a sick engine
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
CRASH_CLEANUP_GRACE_S = 1.0  # the engine already died (or never came up): do not wait long for the rest


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRequested:
    now_s: float


@dataclass(frozen=True)
class EngineStarted:
    """The engine's start() returned: its process (if any) runs; readiness comes from probes."""

    now_s: float
    attempt: int


@dataclass(frozen=True)
class EngineStartFailed:
    """The engine could not even begin (bad entry point, wrong device kind, vLLM not installed)."""

    now_s: float
    attempt: int
    reason: str


@dataclass(frozen=True)
class ProbeResult:
    now_s: float
    attempt: int
    ok: bool


@dataclass(frozen=True)
class EngineExited:
    now_s: float
    attempt: int
    code: int


@dataclass(frozen=True)
class StopRequested:
    now_s: float
    drain_timeout_s: float


@dataclass(frozen=True)
class InvocationStarted:
    now_s: float
    invocation_id: str


@dataclass(frozen=True)
class InvocationEnded:
    now_s: float
    invocation_id: str


@dataclass(frozen=True)
class Tick:
    now_s: float


Event = Union[StartRequested, EngineStarted, EngineStartFailed, ProbeResult, EngineExited, StopRequested,
              InvocationStarted, InvocationEnded, Tick]


# --- actions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEngine:
    attempt: int


@dataclass(frozen=True)
class ProbeEngine:
    attempt: int


@dataclass(frozen=True)
class StopEngine:
    attempt: int
    grace_s: float


@dataclass(frozen=True)
class FailInflight:
    """End every invocation still running on this component with ``reason`` (retryable elsewhere)."""

    invocation_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class RefuseInvocation:
    invocation_id: str
    reason: str


@dataclass(frozen=True)
class Transition:
    component_id: str
    old: str
    new: str
    reason: str
    at_s: float


Action = Union[LaunchEngine, ProbeEngine, StopEngine, FailInflight, RefuseInvocation, Transition]


# --- the machine -------------------------------------------------------------------------


@dataclass
class ComponentLifecycle:
    """One component's state; ``handle`` is the only way it changes."""

    component_id: str
    startup_timeout_s: float
    log_path: str = ""
    state: str = "pending"
    reason: str = "created"
    state_since_s: float = 0.0
    restarts: int = 0
    attempt: int = 0
    inflight: set[str] = field(default_factory=set)
    start_requested_s: float = 0.0
    engine_started: bool = False  # the current attempt's start() has returned
    probing: bool = False
    next_probe_s: float = 0.0
    failed_probes: int = 0
    drain_deadline_s: float | None = None
    history: list[Transition] = field(default_factory=list)
    history_limit: int = 32

    @property
    def accepting(self) -> bool:
        return self.state == "ready"

    def handle(self, event: Event) -> list[Action]:
        match event:
            case StartRequested():
                return self._on_start(event)
            case EngineStarted():
                return self._on_engine_started(event)
            case EngineStartFailed():
                if event.attempt != self.attempt or self.state != "starting":
                    return []
                return self._fail(event.now_s, f"engine failed to start: {event.reason}")
            case ProbeResult():
                return self._on_probe(event)
            case EngineExited():
                return self._on_exit(event)
            case StopRequested():
                return self._on_stop(event)
            case InvocationStarted():
                if self.state != "ready":
                    return [RefuseInvocation(event.invocation_id, f"component {self.component_id} is {self.state}"
                                             + (f" ({self.reason})" if self.reason else ""))]
                self.inflight.add(event.invocation_id)
                return []
            case InvocationEnded():
                self.inflight.discard(event.invocation_id)
                if self.state == "draining" and not self.inflight:
                    return self._stop_now(event.now_s, "drained: no invocations left in flight")
                return []
            case Tick():
                return self._on_tick(event.now_s)
        raise TypeError(f"unknown lifecycle event {event!r}")

    # --- handlers ----------------------------------------------------------------------

    def _on_start(self, ev: StartRequested) -> list[Action]:
        if self.state in ("starting", "ready"):
            return []  # idempotent: the command was repeated or the controller re-sent its plan
        if self.state == "draining":
            self.drain_deadline_s = None
            return [self._move(ev.now_s, "ready", "start requested while draining: serving again")]
        reason = "start requested"
        if self.state in ("failed", "stopped"):
            self.restarts += 1
            reason = f"restart {self.restarts} requested (was {self.state}: {self.reason})"
        self.attempt += 1
        self.start_requested_s = ev.now_s
        self.engine_started = False
        self.probing = False
        self.failed_probes = 0
        self.drain_deadline_s = None
        self.inflight.clear()
        return [self._move(ev.now_s, "starting", reason), LaunchEngine(self.attempt)]

    def _on_engine_started(self, ev: EngineStarted) -> list[Action]:
        if ev.attempt != self.attempt or self.state != "starting":
            return []
        self.engine_started = True
        self.probing = True
        self.next_probe_s = ev.now_s + PROBE_INTERVAL_STARTING_S
        return [ProbeEngine(self.attempt)]

    def _on_probe(self, ev: ProbeResult) -> list[Action]:
        if ev.attempt != self.attempt:
            return []
        self.probing = False
        if self.state == "starting":
            if ev.ok:
                self.failed_probes = 0
                self.next_probe_s = ev.now_s + PROBE_INTERVAL_READY_S
                took_s = ev.now_s - self.start_requested_s
                return [self._move(ev.now_s, "ready", f"engine ready after {took_s:.1f} s")]
            self.next_probe_s = ev.now_s + PROBE_INTERVAL_STARTING_S
            return []
        if self.state in ("ready", "draining"):
            self.next_probe_s = ev.now_s + PROBE_INTERVAL_READY_S
            if ev.ok:
                self.failed_probes = 0
                return []
            self.failed_probes += 1
            if self.failed_probes >= FAILED_PROBES_BEFORE_FAILURE:
                return self._fail(ev.now_s, f"health probe failed {self.failed_probes} times in a row"
                                  + self._log_hint())
        return []

    def _on_exit(self, ev: EngineExited) -> list[Action]:
        if ev.attempt != self.attempt or self.state not in ("starting", "ready", "draining"):
            return []  # an engine we stopped on purpose, or one already replaced
        return self._fail(ev.now_s, f"engine exited with code {ev.code}{self._log_hint()}")

    def _on_stop(self, ev: StopRequested) -> list[Action]:
        if self.state == "pending":
            return [self._move(ev.now_s, "stopped", "stop requested before start")]
        if self.state == "starting":
            return self._stop_now(ev.now_s, "stop requested while starting")
        if self.state == "ready":
            if not self.inflight:
                return self._stop_now(ev.now_s, "stop requested; nothing in flight")
            self.drain_deadline_s = ev.now_s + max(0.0, ev.drain_timeout_s)
            return [self._move(ev.now_s, "draining",
                               f"stop requested; draining {len(self.inflight)} invocation(s) for up to "
                               f"{ev.drain_timeout_s:g} s")]
        if self.state == "draining":
            deadline = ev.now_s + max(0.0, ev.drain_timeout_s)
            if self.drain_deadline_s is None or deadline < self.drain_deadline_s:
                self.drain_deadline_s = deadline  # a repeated stop may shorten the drain, never extend it
            return self._on_tick(ev.now_s)
        if self.state == "failed":
            return [self._move(ev.now_s, "stopped", f"stop requested (had failed: {self.reason})")]
        return []  # stopped: idempotent

    def _on_tick(self, now_s: float) -> list[Action]:
        if self.state == "starting" and now_s - self.start_requested_s > self.startup_timeout_s:
            return self._fail(now_s, f"did not become ready within {self.startup_timeout_s:g} s{self._log_hint()}")
        if self.state == "draining" and self.drain_deadline_s is not None and now_s >= self.drain_deadline_s:
            return self._stop_now(now_s, f"drain timeout passed with {len(self.inflight)} invocation(s) in flight")
        if self.state in ("starting", "ready") and self.engine_started and not self.probing \
                and now_s >= self.next_probe_s:
            self.probing = True
            return [ProbeEngine(self.attempt)]
        return []

    # --- helpers -----------------------------------------------------------------------

    def _log_hint(self) -> str:
        return f" (see log {self.log_path})" if self.log_path else ""

    def _move(self, now_s: float, new: str, reason: str) -> Transition:
        transition = Transition(self.component_id, self.state, new, reason, now_s)
        self.state, self.reason, self.state_since_s = new, reason, now_s
        self.history.append(transition)
        del self.history[:-self.history_limit]
        return transition

    def _drop_inflight(self, reason: str) -> list[Action]:
        if not self.inflight:
            return []
        ids = tuple(sorted(self.inflight))
        self.inflight.clear()
        return [FailInflight(ids, reason)]

    def _stop_now(self, now_s: float, reason: str) -> list[Action]:
        actions: list[Action] = [self._move(now_s, "stopped", reason)]
        actions += self._drop_inflight(f"component {self.component_id} stopped: {reason}")
        actions.append(StopEngine(self.attempt, STOP_GRACE_S))
        self.probing = False
        self.drain_deadline_s = None
        return actions

    def _fail(self, now_s: float, reason: str) -> list[Action]:
        actions: list[Action] = [self._move(now_s, "failed", reason)]
        actions += self._drop_inflight(f"component {self.component_id} failed: {reason}")
        actions.append(StopEngine(self.attempt, CRASH_CLEANUP_GRACE_S))
        self.probing = False
        self.drain_deadline_s = None
        return actions
