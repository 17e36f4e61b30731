"""The component runtime: the asyncio shell that runs components through their lifecycle.

``ComponentManager`` keeps the components of one agent by id. It feeds each one's pure
``ComponentLifecycle`` with commands, engine events and clock ticks and performs the
actions that come back: launch an engine, probe it (every 0.5 s while starting, every
5 s when ready), stop it, fail the invocations it was serving. Every 0.2 s it reads each
engine's exit status, so a crashed engine is reported failed within a second.

Invocations are validated against the task (inputs present and typed, knobs allowed),
bounded per component by the executor's ``max_concurrency`` (beyond it they queue, and a
full queue is refused), made idempotent by invocation id (a repeat joins the running
call, or gets the remembered result), charged the energy their devices' counters moved
by while they ran (``EnergyLedger``), and checked on the way out (outputs typed as the
task declares, encoded size under the frame limit).

Each component has a directory ``<state_dir>/components/<component_id>/`` with its log
``engine.log`` (rotated once to ``engine.log.1`` at a (re)start past the size limit) and a
``work`` directory for the engine. While an engine process runs, ``engine.pid`` there
records it (``agent.components.orphans``), so engines a killed agent left running can be
reaped by the next agent start or by ``murakkabctl cluster down``. When the agent runs as
root, engine processes run as ``engine_identity`` (``agent.components.privileges``): ``work``
becomes theirs and their HOME, the rest of the directory stays the agent's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgpack

from agent.components import orphans
from agent.components.energy import EnergyLedger
from agent.components.engines.base import Engine, EngineContext, EngineError
from agent.components.lifecycle import (
    ACTIVE_STATES, STOP_GRACE_S, Action, ComponentLifecycle, EngineExited, EngineStarted, EngineStartFailed, Event,
    FailInflight, InvocationEnded, InvocationStarted, LaunchEngine, ProbeEngine, ProbeResult, StartRequested,
    StopEngine, StopRequested, Tick, Transition,
)
from agent.components.ports import PortAllocator
from agent.components.privileges import EngineIdentity, interpreter_problem, prepare_work_dir
from agent.devices.base import Device
from common.protocol import ComponentReport, Invoke, InvocationResult
from common.workflow.catalog import ExecutorSpec
from common.workflow.tasks import TASKS
from common.workflow.types import check_value

log = logging.getLogger("murakkab.agent.components")

WATCH_INTERVAL_S = 0.2
PROBE_TIMEOUT_S = 5.0
SIM_STARTUP_MARGIN_S = 10.0
TOOL_STARTUP_TIMEOUT_S = 90.0  # importing heavy modules in a fresh interpreter on a loaded host
ENGINE_RETURN_SLACK_S = 2.0  # engines enforce the timeout themselves; this backstop catches one that does not
STOP_WAIT_SLACK_S = 15.0
MAX_OUTPUT_BYTES = 900 * 1024  # the reply frame is 1 MiB; leave room for the envelope
MAX_TIMEOUT_S = 24 * 3600.0
COMPONENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

EngineFactory = Callable[..., Engine]


def make_engine(ctx: EngineContext, *, clock: Callable[[], float] = time.monotonic) -> Engine:
    """The engine for an executor; vLLM is imported only when a vllm component starts."""
    engine = ctx.executor.engine
    if engine == "tool":
        from agent.components.engines.tool import ToolEngine
        return ToolEngine(ctx)
    if engine == "sim":
        from agent.components.engines.sim import SimEngine
        return SimEngine(ctx, clock=clock)
    if engine == "vllm":
        try:
            from agent.components.engines.vllm import VllmEngine
        except ImportError as exc:
            raise EngineError("engine_failed", f"the vllm engine cannot be loaded on this host: {exc}",
                              retryable=False) from None
        return VllmEngine(ctx)
    raise EngineError("engine_failed", f"unknown engine {engine!r}", retryable=False)


def startup_timeout_s(executor: ExecutorSpec) -> float:
    if executor.vllm is not None:
        return executor.vllm.startup_timeout_s
    if executor.sim is not None:
        return executor.sim.startup_s + SIM_STARTUP_MARGIN_S
    return TOOL_STARTUP_TIMEOUT_S


@dataclass
class ManagerConfig:
    state_dir: Path
    model_dir: Path
    engine_python: str = ""
    log_bytes: int = 64 * 1024 * 1024
    queue_per_slot: int = 8  # invocations that may wait per concurrency slot before the queue refuses
    remembered_results: int = 4096
    forget_stopped_after_s: float = 600.0
    max_output_bytes: int = MAX_OUTPUT_BYTES
    # Who engines run as when the agent is root (``privileges.resolve_engine_identity``); None: the agent's user.
    engine_identity: EngineIdentity | None = None


@dataclass
class _Component:
    component_id: str
    executor: ExecutorSpec
    device_indexes: tuple[int, ...]
    lifecycle: ComponentLifecycle
    directory: Path
    slots: asyncio.Semaphore
    max_waiting: int
    engine: Engine | None = None
    engine_attempt: int = 0
    port: int | None = None
    waiting: int = 0
    running: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    fail_reasons: dict[str, str] = field(default_factory=dict)
    launch_task: asyncio.Task[Any] | None = None
    stop_task: asyncio.Task[Any] | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def log_path(self) -> Path:
        return self.directory / "engine.log"


class ComponentManager:
    """Runs the components of one agent; ``run`` is its watch loop, ``shutdown`` stops everything."""

    def __init__(self, config: ManagerConfig, devices: dict[int, Device], *,
                 read_energy: Callable[[int], float | None], clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, engine_factory: EngineFactory = make_engine,
                 ports: PortAllocator | None = None) -> None:
        self.config = config
        self.devices = devices
        self.read_energy = read_energy
        self.clock = clock
        self.wall_clock = wall_clock
        self.engine_factory = engine_factory
        self.ports = ports or PortAllocator()
        self.ledger = EnergyLedger()
        self.components: dict[str, _Component] = {}
        self.closing = False
        self._running: dict[str, asyncio.Task[InvocationResult]] = {}
        self._results: OrderedDict[str, InvocationResult] = OrderedDict()
        self._cancelled: dict[str, str] = {}  # invocation id -> why the controller cancelled it, while it runs
        self.transition_observers: list[Callable[[Transition], None]] = []
        identity = config.engine_identity
        problem = interpreter_problem(identity, config.engine_python or sys.executable) if identity else None
        if problem:  # said once here; each vllm or tool component start then fails with the same reason
            log.warning("%s; vllm and tool components cannot start until engine_python names one it can run",
                        problem)

    # --- commands ----------------------------------------------------------------------

    def start(self, component_id: str, executor: ExecutorSpec, device_indexes: tuple[int, ...]) -> tuple[bool, str]:
        """Start (or restart, or leave running) a component; (accepted, message)."""
        if self.closing:
            return False, "agent is shutting down"
        if not COMPONENT_ID.match(component_id):
            return False, (f"component id {component_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
        if executor.task not in TASKS:
            return False, f"executor {executor.name} names unknown task {executor.task!r}"
        missing = [i for i in device_indexes if i not in self.devices]
        if missing:
            return False, f"no device(s) {missing} on this node (devices: {sorted(self.devices)})"
        if len(set(device_indexes)) != len(device_indexes):
            return False, f"device indexes {list(device_indexes)} repeat a device"
        comp = self.components.get(component_id)
        if comp is not None and (comp.executor != executor or comp.device_indexes != tuple(device_indexes)):
            if comp.lifecycle.state in ACTIVE_STATES:
                return False, (f"component {component_id} already runs executor {comp.executor.name} on devices "
                               f"{list(comp.device_indexes)}; stop it before starting it with another spec")
            comp.executor, comp.device_indexes = executor, tuple(device_indexes)
            comp.lifecycle.startup_timeout_s = startup_timeout_s(executor)
            comp.slots = asyncio.Semaphore(executor.max_concurrency)
            comp.max_waiting = executor.max_concurrency * self.config.queue_per_slot
        if comp is None:
            directory = Path(self.config.state_dir) / "components" / component_id
            comp = _Component(
                component_id, executor, tuple(device_indexes),
                ComponentLifecycle(component_id, startup_timeout_s(executor), str(directory / "engine.log"),
                                   state_since_s=self.clock()),
                directory, asyncio.Semaphore(executor.max_concurrency),
                executor.max_concurrency * self.config.queue_per_slot)
            self.components[component_id] = comp
        before = comp.lifecycle.state
        self._feed(comp, StartRequested(self.clock()))
        state = comp.lifecycle.state
        if state == before:
            return True, f"component {component_id} is already {state}"
        return True, f"component {component_id} {state} (executor {executor.name}, devices {list(device_indexes)})"

    def stop(self, component_id: str, drain_timeout_s: float) -> tuple[bool, str]:
        comp = self.components.get(component_id)
        if comp is None:
            return True, f"component {component_id} is not on this node (nothing to stop)"
        self._feed(comp, StopRequested(self.clock(), drain_timeout_s))
        return True, f"component {component_id} {comp.lifecycle.state}"

    def reports(self) -> list[ComponentReport]:
        out = []
        for comp in self.components.values():
            lc = comp.lifecycle
            active = lc.state in ACTIVE_STATES and comp.engine is not None
            out.append(ComponentReport(
                component_id=comp.component_id, executor=comp.executor.name, state=lc.state,
                device_indexes=comp.device_indexes, inflight=len(lc.inflight), restarts=lc.restarts,
                reason=lc.reason, simulated=comp.executor.engine == "sim", port=comp.port if active else None,
                pid=comp.engine.pid if active and comp.engine is not None else None))
        return out

    def running_count(self) -> int:
        return sum(1 for c in self.components.values() if c.lifecycle.state in ACTIVE_STATES)

    def observe_sample(self, device_index: int, energy_j: float | None) -> None:
        """A periodic device sample: splits energy among the invocations running on it."""
        self.ledger.observe(device_index, energy_j)

    # --- the lifecycle's actions -------------------------------------------------------

    def _feed(self, comp: _Component, event: Event) -> None:
        for action in comp.lifecycle.handle(event):
            self._apply(comp, action)

    def _spawn(self, comp: _Component, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        comp.tasks.add(task)
        task.add_done_callback(comp.tasks.discard)
        return task

    def _apply(self, comp: _Component, action: Action) -> None:
        match action:
            case Transition():
                level = logging.WARNING if action.new == "failed" else logging.INFO
                log.log(level, "component %s: %s -> %s (%s)", comp.component_id, action.old, action.new,
                        action.reason)
                self._log_line(comp, f"{action.old} -> {action.new}: {action.reason}")
                for observe in self.transition_observers:
                    observe(action)
            case LaunchEngine():
                comp.launch_task = self._spawn(comp, self._launch(comp, action.attempt, comp.stop_task))
            case ProbeEngine():
                self._spawn(comp, self._probe(comp, action.attempt))
            case StopEngine():
                comp.stop_task = self._spawn(comp, self._stop_engine(comp, action.attempt, action.grace_s))
            case FailInflight():
                for invocation_id in action.invocation_ids:
                    task = comp.running.get(invocation_id)
                    if task is not None and not task.done():
                        comp.fail_reasons[invocation_id] = action.reason
                        task.cancel()

    def _log_line(self, comp: _Component, text: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        try:
            comp.directory.mkdir(parents=True, exist_ok=True)
            with open(comp.log_path, "a", encoding="utf-8") as out:
                out.write(f"{stamp} agent: {text}\n")
        except OSError as exc:
            log.warning("component %s: cannot write its log %s: %s", comp.component_id, comp.log_path, exc)

    def _rotate_log(self, comp: _Component) -> None:
        try:
            if comp.log_path.stat().st_size > self.config.log_bytes:
                comp.log_path.replace(comp.log_path.with_name("engine.log.1"))
        except FileNotFoundError:
            pass

    async def _launch(self, comp: _Component, attempt: int, previous_stop: asyncio.Task[Any] | None) -> None:
        if previous_stop is not None:
            await asyncio.gather(previous_stop, return_exceptions=True)  # the old engine is gone before a new one
        if orphans.record_path(comp.directory).exists():  # an engine whose stop failed: its record would be lost
            await asyncio.to_thread(orphans.reap_component, comp.directory)
        try:
            work_dir = comp.directory / "work"
            # A sim engine is the agent's own code, in its process: nothing to drop privileges for.
            identity = self.config.engine_identity if comp.executor.engine != "sim" else None
            self._rotate_log(comp)
            self._log_line(comp, f"launching attempt {attempt}: executor {comp.executor.name} "
                                 f"({comp.executor.engine}) on devices {list(comp.device_indexes)}"
                                 + (f", engine processes as {identity.describe()}" if identity else ""))
            if identity is None:
                work_dir.mkdir(parents=True, exist_ok=True)
            else:
                os.chmod(comp.log_path, 0o640)  # the agent's file (the engine writes to it through a descriptor)
                for note in await asyncio.to_thread(prepare_work_dir, work_dir, identity, Path(self.config.state_dir)):
                    self._log_line(comp, note)
            if comp.executor.engine == "vllm":
                comp.port = self.ports.allocate(comp.component_id)
            ctx = EngineContext(
                component_id=comp.component_id, executor=comp.executor,
                devices=[self.devices[i] for i in comp.device_indexes], log_path=comp.log_path, work_dir=work_dir,
                port=comp.port, model_dir=Path(self.config.model_dir), python=self.config.engine_python,
                identity=identity)
            engine = self.engine_factory(ctx, clock=self.clock)
            comp.engine, comp.engine_attempt = engine, attempt
            await engine.start()
            self._record_engine(comp, engine)
        except asyncio.CancelledError:
            raise
        except EngineError as exc:
            self._feed(comp, EngineStartFailed(self.clock(), attempt, exc.message))
        except Exception as exc:  # a broken engine must fail its component, not the agent
            log.exception("component %s: engine start raised", comp.component_id)
            self._feed(comp, EngineStartFailed(self.clock(), attempt, f"{type(exc).__name__}: {exc}"))
        else:
            self._feed(comp, EngineStarted(self.clock(), attempt))

    async def _probe(self, comp: _Component, attempt: int) -> None:
        engine = comp.engine
        ok = False
        if engine is not None and comp.engine_attempt == attempt:
            try:
                ok = bool(await asyncio.wait_for(engine.probe(), PROBE_TIMEOUT_S))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("component %s: probe raised %s", comp.component_id, exc)
        self._feed(comp, ProbeResult(self.clock(), attempt, ok))

    async def _stop_engine(self, comp: _Component, attempt: int, grace_s: float) -> None:
        launch = comp.launch_task
        if launch is not None and not launch.done():
            launch.cancel()
            await asyncio.gather(launch, return_exceptions=True)
        engine = comp.engine if comp.engine_attempt == attempt else None
        if engine is not None:
            try:
                await asyncio.wait_for(engine.stop(grace_s), grace_s + STOP_WAIT_SLACK_S)
            except Exception as exc:
                log.warning("component %s: stopping its engine failed: %s", comp.component_id, exc)
                self._log_line(comp, f"stopping the engine failed: {type(exc).__name__}: {exc}")
            if engine.pid is not None and engine.exit_code() is not None:  # reaped: nothing left to find
                try:
                    orphans.remove_record(comp.directory, engine.pid)
                except OSError as exc:
                    log.warning("component %s: cannot remove its engine record: %s", comp.component_id, exc)
        self.ports.release(comp.port)
        comp.port = None

    def _record_engine(self, comp: _Component, engine: Engine) -> None:
        """Write the engine.pid record of a freshly started engine process (engines without one have none)."""
        pid = engine.pid
        if pid is None:
            return
        try:
            orphans.write_record(comp.directory, pid)
        except OSError as exc:  # the engine runs regardless; only a crash of the agent would orphan it
            log.warning("component %s: cannot record engine pid %d: %s", comp.component_id, pid, exc)
            self._log_line(comp, f"cannot record engine pid {pid} in {orphans.record_path(comp.directory)}: {exc}")

    def reap_orphans(self) -> list[orphans.Outcome]:
        """Stop engines that an earlier agent on this state directory left running (it was killed)
        and delete their records; blocks for up to a few seconds, so run it in a thread."""
        return orphans.reap_components([Path(self.config.state_dir) / "components"])

    # --- watch loop --------------------------------------------------------------------

    def check_all(self) -> None:
        """One watch step: exit statuses, then clock ticks (timeouts, drains, due probes)."""
        now_s = self.clock()
        for comp in list(self.components.values()):
            lc = comp.lifecycle
            engine = comp.engine
            if engine is not None and comp.engine_attempt == lc.attempt and lc.state in ("starting", "ready",
                                                                                          "draining"):
                try:
                    code = engine.exit_code()
                except Exception as exc:
                    log.warning("component %s: exit_code raised %s", comp.component_id, exc)
                    code = None
                if code is not None:
                    self._feed(comp, EngineExited(now_s, lc.attempt, code))
            self._feed(comp, Tick(now_s))
            if lc.state == "stopped" and not comp.tasks and not comp.running \
                    and now_s - lc.state_since_s > self.config.forget_stopped_after_s:
                del self.components[comp.component_id]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            self.check_all()

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Drain (bounded) and stop every component; returns once their engines have stopped."""
        self.closing = True
        for comp in list(self.components.values()):
            self._feed(comp, StopRequested(self.clock(), drain_timeout_s))
        deadline = self.clock() + drain_timeout_s + WATCH_INTERVAL_S
        while any(c.lifecycle.state == "draining" for c in self.components.values()) and self.clock() < deadline:
            await asyncio.sleep(WATCH_INTERVAL_S / 4)
            self.check_all()
        self.check_all()
        stops = [c.stop_task for c in self.components.values() if c.stop_task is not None]
        if stops:
            await asyncio.wait(stops, timeout=STOP_GRACE_S + STOP_WAIT_SLACK_S)
        for comp in self.components.values():
            for task in list(comp.tasks):
                task.cancel()
            await asyncio.gather(*comp.tasks, return_exceptions=True)

    # --- invocations -------------------------------------------------------------------

    async def invoke(self, msg: Invoke) -> InvocationResult:
        """Run (or join, or replay) one invocation; never raises."""
        remembered = self._results.get(msg.invocation_id)
        if remembered is not None:
            self._results.move_to_end(msg.invocation_id)
            return remembered
        running = self._running.get(msg.invocation_id)
        if running is None:
            running = asyncio.ensure_future(self._execute(msg, self.clock(), self.wall_clock()))
            self._running[msg.invocation_id] = running
            running.add_done_callback(lambda task: self._finished(msg.invocation_id, task))
        return await asyncio.shield(running)

    def cancel(self, invocation_id: str, reason: str) -> tuple[bool, str]:
        """Stop a running (or slot-waiting) invocation; it answers with error ``cancelled``. (done, message)."""
        task = self._running.get(invocation_id)
        if task is None or task.done():
            return True, f"invocation {invocation_id} is not running here (finished, or never received)"
        self._cancelled[invocation_id] = reason
        for comp in self.components.values():
            call = comp.running.get(invocation_id)
            if call is not None:
                call.cancel()
                return True, f"invocation {invocation_id} stopped on {comp.component_id}"
        task.cancel()  # still waiting for a slot (or about to start): the task turns it into a result
        return True, f"invocation {invocation_id} cancelled before it started"

    def _finished(self, invocation_id: str, task: asyncio.Task[InvocationResult]) -> None:
        self._running.pop(invocation_id, None)
        self._cancelled.pop(invocation_id, None)
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        if result.ok or not result.retryable:  # a retryable failure should really be tried again
            self._results[invocation_id] = result
            while len(self._results) > self.config.remembered_results:
                self._results.popitem(last=False)

    def _error(self, msg: Invoke, code: str, error: str, *, retryable: bool, received_s: float, received_unix: float,
               comp: _Component | None = None, energy_j: float | None = None) -> InvocationResult:
        latency_s = max(0.0, self.clock() - received_s)
        return InvocationResult(
            invocation_id=msg.invocation_id, ok=False, outputs={}, error_code=code, error=error, retryable=retryable,
            started_at_unix_s=received_unix, ended_at_unix_s=received_unix + latency_s, latency_s=latency_s,
            energy_j=energy_j, device_indexes=comp.device_indexes if comp else (),
            simulated=bool(comp and comp.executor.engine == "sim"))

    async def _execute(self, msg: Invoke, received_s: float, received_unix: float) -> InvocationResult:
        comp = self.components.get(msg.component_id)

        def fail(code: str, error: str, retryable: bool, energy_j: float | None = None) -> InvocationResult:
            return self._error(msg, code, error, retryable=retryable, received_s=received_s,
                               received_unix=received_unix, comp=comp, energy_j=energy_j)

        if comp is None:
            return fail("component_unavailable", f"no component {msg.component_id} on this node", True)
        problem = validate_invocation(comp.executor, msg)
        if problem is not None:
            return fail("invalid_input", problem, False)
        knobs = {**comp.executor.knob_defaults(), **msg.knobs}
        if not comp.lifecycle.accepting:
            return fail("component_unavailable", f"component {comp.component_id} is {comp.lifecycle.state} "
                        f"({comp.lifecycle.reason})", True)
        deadline_s = received_s + msg.timeout_s
        slots = comp.slots
        if not slots.locked():
            await slots.acquire()  # a free slot: taken without suspending
        else:
            if comp.waiting >= comp.max_waiting:
                return fail("component_unavailable", f"component {comp.component_id} is at capacity: "
                            f"{comp.executor.max_concurrency} running and {comp.waiting} waiting", True)
            comp.waiting += 1
            try:
                await asyncio.wait_for(slots.acquire(), max(0.0, deadline_s - self.clock()))
            except asyncio.TimeoutError:
                return fail("timeout", f"waited {msg.timeout_s:g} s for a free slot on {comp.component_id} "
                            f"(max_concurrency {comp.executor.max_concurrency})", False)
            except asyncio.CancelledError:
                reason = self._cancelled.get(msg.invocation_id)
                if reason is None:
                    raise  # not ours to swallow (the agent is shutting down)
                return fail("cancelled", f"cancelled by the controller while waiting for a slot: {reason}", False)
            finally:
                comp.waiting -= 1
        try:
            return await self._run_engine(comp, msg, knobs, deadline_s, fail)
        finally:
            slots.release()

    def _readings(self, device_indexes: tuple[int, ...]) -> dict[int, float | None]:
        readings: dict[int, float | None] = {}
        for index in device_indexes:
            try:
                readings[index] = self.read_energy(index)
            except Exception as exc:  # a device read must not lose the invocation's result
                log.warning("device %d: energy read failed: %s", index, exc)
                readings[index] = None
        return readings

    async def _run_engine(self, comp: _Component, msg: Invoke, knobs: dict[str, Any], deadline_s: float,
                          fail: Callable[..., InvocationResult]) -> InvocationResult:
        engine = comp.engine
        if not comp.lifecycle.accepting or engine is None:
            return fail("component_unavailable", f"component {comp.component_id} is {comp.lifecycle.state} "
                        f"({comp.lifecycle.reason})", True)
        invocation_id = msg.invocation_id
        self._feed(comp, InvocationStarted(self.clock(), invocation_id))
        started_s, started_unix = self.clock(), self.wall_clock()
        self.ledger.begin(invocation_id, self._readings(comp.device_indexes))
        remaining_s = max(0.001, deadline_s - started_s)
        call = asyncio.ensure_future(engine.invoke(msg.task, dict(msg.inputs), knobs, remaining_s))
        comp.running[invocation_id] = call
        outputs: Any = None
        error: tuple[str, str, bool] | None = None
        try:
            done, _ = await asyncio.wait([call], timeout=remaining_s + ENGINE_RETURN_SLACK_S)
            if not done:
                call.cancel()
                error = ("timeout", f"engine did not answer within {msg.timeout_s:g} s", False)
            elif call.cancelled() and invocation_id in self._cancelled:
                error = ("cancelled", f"cancelled by the controller: {self._cancelled[invocation_id]}", False)
            elif call.cancelled():
                reason = comp.fail_reasons.pop(invocation_id, "invocation cancelled")
                error = ("engine_failed", reason, True)
            elif call.exception() is not None:
                exc = call.exception()
                if isinstance(exc, EngineError):
                    error = (exc.code, exc.message, exc.retryable)
                else:
                    log.error("component %s: engine raised %s: %s", comp.component_id, type(exc).__name__, exc)
                    error = ("engine_failed", f"{type(exc).__name__}: {exc}", True)
            else:
                outputs = call.result()
        finally:
            if not call.done():
                call.cancel()
            comp.running.pop(invocation_id, None)
            comp.fail_reasons.pop(invocation_id, None)
            ended_s, ended_unix = self.clock(), self.wall_clock()
            energy_j = self.ledger.finish(invocation_id, self._readings(comp.device_indexes))
            energy_j = None if energy_j is None else round(energy_j, 3)  # counters are read to the millijoule
            self._feed(comp, InvocationEnded(ended_s, invocation_id))
        if error is None:
            problem = check_outputs(msg.task, outputs, self.config.max_output_bytes)
            if problem is not None:
                error = problem
        if error is not None:
            return fail(*error, energy_j=energy_j)
        return InvocationResult(
            invocation_id=invocation_id, ok=True, outputs=outputs, error_code="", error="", retryable=False,
            started_at_unix_s=started_unix, ended_at_unix_s=ended_unix, latency_s=ended_s - started_s,
            energy_j=energy_j, device_indexes=comp.device_indexes, simulated=engine.simulated)


# --- validation (pure) -------------------------------------------------------------------


def _knob_allowed(value: Any, allowed: list[Any]) -> bool:
    numeric = (int, float)
    return any(v == value and (type(v) is type(value) or (type(v) in numeric and type(value) in numeric))
               for v in allowed)


def validate_invocation(executor: ExecutorSpec, msg: Invoke) -> str | None:
    """None when ``msg`` fits the executor's task and knobs, else what is wrong."""
    if msg.task != executor.task:
        return f"component runs executor {executor.name} for task {executor.task!r}, not {msg.task!r}"
    task = TASKS.get(msg.task)
    if task is None:
        return f"unknown task {msg.task!r}"
    if not 0 < msg.timeout_s <= MAX_TIMEOUT_S:
        return f"timeout_s must be within (0, {MAX_TIMEOUT_S:g}], got {msg.timeout_s:g}"
    unknown = sorted(set(msg.inputs) - set(task.inputs))
    if unknown:
        return f"task {msg.task} has no input(s) {unknown} (inputs: {sorted(task.inputs)})"
    for name, spec in task.inputs.items():
        value = msg.inputs.get(name)
        if value is None:
            if spec.required:
                return f"task {msg.task} needs input {name!r} ({spec.type})"
            continue
        problem = check_value(spec.type, value, f"inputs.{name}")
        if problem:
            return problem
    for name, value in msg.knobs.items():
        knob = executor.knobs.get(name)
        if knob is None:
            return f"executor {executor.name} has no knob {name!r} (knobs: {sorted(executor.knobs) or 'none'})"
        if not _knob_allowed(value, knob.values):
            return f"knob {name}={value!r} is not one of {knob.values}"
    return None


def check_outputs(task_name: str, outputs: Any, max_bytes: int) -> tuple[str, str, bool] | None:
    """None when ``outputs`` are the task's outputs, typed and small enough; else (code, message, retryable)."""
    task = TASKS[task_name]
    if not isinstance(outputs, dict):
        return "engine_failed", f"engine returned {type(outputs).__name__}, not a map of outputs", False
    missing = sorted(set(task.outputs) - set(outputs))
    extra = sorted(set(outputs) - set(task.outputs))
    if missing or extra:
        return ("engine_failed", f"engine outputs do not match task {task_name}: missing {missing}, "
                                 f"unexpected {extra}", False)
    for name, type_expr in task.outputs.items():
        problem = check_value(type_expr, outputs[name], f"outputs.{name}")
        if problem:
            return "engine_failed", f"engine returned a wrong output: {problem}", False
    try:
        packed = msgpack.packb(outputs, use_bin_type=True)
        msgpack.unpackb(packed, raw=False, strict_map_key=True)  # what the controller's strict decoder will do
    except Exception as exc:
        return "engine_failed", f"engine outputs cannot be sent: {type(exc).__name__}: {exc}", False
    if len(packed) > max_bytes:
        return ("output_too_large", f"outputs encode to {len(packed)} bytes, more than the {max_bytes}-byte "
                                    "limit of one reply", False)
    return None
