"""The node agent: registers with the controller, samples its devices, heartbeats, obeys commands.

A thin asyncio shell. The decisions that matter (is this command stale? which
result did a repeated command get?) live in CommandGate, a pure class; components
(engines, their lifecycles, invocations and their energy) live in
``agent.components.runtime.ComponentManager``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import ValidationError

from agent.components.privileges import resolve_engine_identity
from agent.components.runtime import ComponentManager, ManagerConfig
from agent.config import AgentSettings
from agent.devices.base import Device, DeviceError
from agent.devices.sim import COOLING_FAILURE_RESISTANCE_FACTOR, SimGpu
from agent.host import HostSampler, host_info
from common import __version__
from common.metrics import DeviceCollector, serve_metrics
from common.protocol import (
    DEFAULT_DRILL_XID, FAULT_DRILL_KINDS, MAX_XID, CancelInvocation, CommandResult, DeviceFaultDrill,
    DeviceTelemetry, ErrorReply, Heartbeat, HeartbeatAck, InvocationResult, Invoke, Register, RegisterAccepted,
    ReregisterRequired, SetPowerLimit, StartComponent, StopComponent, build_dispatch,
)
from common.security.curve import ClientCredentials, apply_client, load_client_credentials
from common.security.handshakes import HANDSHAKE_EVENTS, ClientHandshakes
from common.systemd_notify import Notifier, watchdog_loop
from common.transport import RemoteError, RequestTimeout, RpcEndpoint, backoff_delays, configure_socket
from common.workflow.catalog import ExecutorSpec

log = logging.getLogger("murakkab.agent")

# Under systemd (Type=notify) the agent reports READY=1 once the controller accepts its registration, or after
# this long without one (with a STATUS saying it is still trying): a controller outage at boot must not fail
# every agent unit's start. systemd/murakkab-agent.service's TimeoutStartSec= is this plus a margin.
READY_WITHOUT_CONTROLLER_S = 60.0
RECONNECT_AFTER_TIMEOUTS = 3  # registration attempts without an answer before the agent makes a new connection


def next_generation(state_dir: Path) -> int:
    """Bump the generation stored on disk: every agent start is a new generation of the node."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "generation"
    try:
        previous = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        previous = 0
    generation = previous + 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{generation}\n")
    tmp.replace(path)
    return generation


class CommandGate:
    """Refuses commands from another controller epoch or node generation; replays repeated ids."""

    def __init__(self, generation: int, remembered: int = 1024) -> None:
        self.generation = generation
        self.epoch: int | None = None
        self.remembered = remembered
        self._results: OrderedDict[str, CommandResult] = OrderedDict()

    def refusal(self, command_id: str, epoch: int, generation: int) -> ErrorReply | None:
        if self.epoch is None:
            return ErrorReply("not_registered", "agent has not registered with a controller yet")
        if epoch != self.epoch:
            return ErrorReply("stale_command", f"command {command_id} carries controller epoch {epoch}, "
                                               f"agent is registered with epoch {self.epoch}")
        if generation != self.generation:
            return ErrorReply("stale_command", f"command {command_id} is for node generation {generation}, "
                                               f"this agent is generation {self.generation}")
        return None

    def previous_result(self, command_id: str) -> CommandResult | None:
        return self._results.get(command_id)

    def remember(self, result: CommandResult) -> None:
        self._results[result.command_id] = result
        while len(self._results) > self.remembered:
            self._results.popitem(last=False)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.heartbeats = Counter("murakkab_agent_heartbeats", "Heartbeats sent, by outcome.", ["result"],
                                  registry=registry)
        self.registrations = Counter("murakkab_agent_registrations", "Registration attempts, by outcome.",
                                     ["result"], registry=registry)
        self.frames_rejected = Counter("murakkab_frames_rejected", "Frames refused by strict decoding.",
                                       ["endpoint", "code"], registry=registry)
        self.commands = Counter("murakkab_agent_commands", "Commands received, by outcome.", ["op", "result"],
                                registry=registry)
        self.invocations = Counter("murakkab_agent_invocations", "Invocations answered, by error code (ok: none).",
                                   ["result"], registry=registry)
        self.component_transitions = Counter("murakkab_agent_component_transitions",
                                             "Component lifecycle transitions, by new state.", ["to"],
                                             registry=registry)
        self.heartbeat_rtt = Histogram(
            "murakkab_agent_heartbeat_rtt_seconds", "Heartbeat send to acknowledgement.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=registry)


class Agent:
    def __init__(self, settings: AgentSettings, devices: list[Device], *, ctx: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic, generation: int | None = None,
                 host_sampler: HostSampler | None = None,
                 rng: random.Random | None = None, notifier: Notifier | None = None,
                 ready_without_controller_s: float = READY_WITHOUT_CONTROLLER_S, mqtt: Any = None) -> None:
        self.settings = settings
        # CurveZMQ to the controller unless insecure = true; a missing or malformed key file raises KeyFileError
        self.credentials: ClientCredentials | None = None if settings.insecure else load_client_credentials(
            settings.key_file, settings.controller_key_file, key_what="key_file", server_what="controller_key_file")
        self.handshakes = ClientHandshakes()
        self._explained: str | None = None
        # systemd readiness and watchdog (a no-op when not started by a Type=notify unit); reading the
        # environment removes NOTIFY_SOCKET and WATCHDOG_*, so the engines started later do not inherit them
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self.ready_without_controller_s = ready_without_controller_s
        self._ready_sent = False
        self.devices = {d.info.index: d for d in devices}
        self.clock = clock
        self.ctx = ctx or zmq.Context.instance()
        self.generation = generation if generation is not None else next_generation(Path(settings.state_dir))
        self.gate = CommandGate(self.generation)
        self.host_sampler = host_sampler or HostSampler()
        self.host = host_info()
        self.rng = rng or random.Random()
        self.latest: dict[int, DeviceTelemetry] = {}
        self.state = "unregistered"
        self.seq = 0
        self.metrics_registry = CollectorRegistry()
        self.metrics = AgentMetrics(self.metrics_registry)
        self.metrics_registry.register(DeviceCollector(self._device_rows))
        self.metrics_port = (serve_metrics(self.metrics_registry, settings.metrics_host, settings.metrics_port)
                             if settings.metrics_enabled else None)
        self.endpoint: RpcEndpoint | None = None
        self.tick_hooks: list[Callable[[float], None]] = []  # e.g. a sim fault schedule
        self.heartbeat_rtt_observers: list[Callable[[float], None]] = [self.metrics.heartbeat_rtt.observe]
        self.components = ComponentManager(
            ManagerConfig(state_dir=Path(settings.state_dir), model_dir=Path(settings.model_dir),
                          engine_python=settings.engine_python, log_bytes=settings.component_log_bytes,
                          engine_identity=resolve_engine_identity(settings.engine_user, settings.engine_group)),
            self.devices, read_energy=self._read_energy, clock=clock)
        self.components.transition_observers.append(
            lambda t: self.metrics.component_transitions.labels(t.new).inc())
        self.sample_devices()
        self.facility: Any = None  # agent.facility_publisher.FacilityPublisher with [mqtt] enabled
        if mqtt is not None and mqtt.enabled:  # imported only then: MQTT is optional
            from agent.facility_publisher import FacilityPublisher
            self.facility = FacilityPublisher(mqtt, settings.node_name, interval_s=settings.heartbeat_interval_s,
                                              devices=lambda: self.devices, samples=lambda: self.latest)

    # --- devices -----------------------------------------------------------------------

    def sample_devices(self) -> None:
        now = self.clock()
        for hook in self.tick_hooks:
            hook(now)
        for index, device in self.devices.items():
            try:
                self.latest[index] = sample = device.sample(now)
            except DeviceError as exc:
                log.warning("device %d: sampling failed: %s", index, exc)
            else:
                self.components.observe_sample(index, sample.energy_j)

    def _read_energy(self, index: int) -> float | None:
        """Sample one device now (an invocation starts or ends on it); its energy counter, or None."""
        try:
            sample = self.devices[index].sample(self.clock())
        except DeviceError as exc:
            log.warning("device %d: sampling failed: %s", index, exc)
            return None
        self.latest[index] = sample
        return sample.energy_j

    async def _sample_loop(self) -> None:
        interval = self.settings.sample_interval_s
        deadline = self.clock()
        while True:
            deadline += interval
            await asyncio.sleep(max(0.0, deadline - self.clock()))
            self.sample_devices()

    # --- controller link ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self.notifier.status(f"starting; will register with {self.settings.controller}")
        ready_fallback = asyncio.get_running_loop().call_later(
            self.ready_without_controller_s, self._ready_without_controller)
        # Before registering: engines an earlier agent on this state dir left running (it was
        # SIGKILLed or crashed) hold memory and ports the controller is about to hand out again.
        try:
            await asyncio.to_thread(self.components.reap_orphans)
        except Exception:  # the agent must come up anyway; what could not be reaped is logged
            log.exception("reaping orphaned engines failed")
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.settings.node_name.encode())
        configure_socket(sock, router=False)
        if self.credentials is not None:
            apply_client(sock, self.credentials)
        else:
            log.warning("insecure = true: talking to %s in plaintext, without authentication",
                        self.settings.controller)
        self._monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        sock.connect(self.settings.controller)
        self.endpoint = RpcEndpoint(
            sock, router=False, name=f"agent {self.settings.node_name}",
            dispatch=build_dispatch("agent", {
                SetPowerLimit: self.on_set_power_limit, StartComponent: self.on_start_component,
                StopComponent: self.on_stop_component, Invoke: self.on_invoke,
                CancelInvocation: self.on_cancel_invocation, DeviceFaultDrill: self.on_device_fault_drill}),
            on_rejected=lambda code: self.metrics.frames_rejected.labels("controller", code).inc())
        tasks = [asyncio.create_task(self.endpoint.serve()), asyncio.create_task(self._sample_loop()),
                 asyncio.create_task(self._link_loop()), asyncio.create_task(self.components.run())]
        if self.notifier.watchdog_interval_s is not None:  # it never returns, so it cannot end the agent
            tasks.append(asyncio.create_task(watchdog_loop(self.notifier)))
        if self.facility is not None:  # never ends on broker errors, so it cannot end the agent
            tasks.append(asyncio.create_task(self.facility.run()))
        if stop is not None:
            tasks.append(asyncio.create_task(stop.wait()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            ready_fallback.cancel()
            self.notifier.stopping(f"stopping: draining components (up to {self.settings.shutdown_drain_s:g} s)")
            try:  # components first, while the endpoint still answers the invocations they finish
                await self.components.shutdown(self.settings.shutdown_drain_s)
            except Exception:
                log.exception("stopping components failed")
            if self.facility is not None:
                await self.facility.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sock.disable_monitor()
            self._monitor.close(linger=0)
            self.endpoint.close()
            for device in self.devices.values():
                device.close()
            self.notifier.close()

    async def _link_loop(self) -> None:
        while True:
            await self._register()
            await self._heartbeat_until_lost()

    async def _register(self) -> None:
        assert self.endpoint is not None
        delays = backoff_delays(self.settings.reconnect_base_s, self.settings.reconnect_cap_s, self.rng)
        message = Register(
            node_name=self.settings.node_name, hostname=socket.gethostname(), generation=self.generation,
            agent_version=__version__, devices=tuple(d.info for d in self.devices.values()), host=self.host,
            labels=dict(self.settings.labels))
        timeouts = 0
        while True:
            try:
                reply = await self.endpoint.request(message, timeout_s=self.settings.request_timeout_s)
            except RequestTimeout:
                self.metrics.registrations.labels("timeout").inc()
                timeouts += 1
                log.info("registration with %s timed out; retrying%s", self.settings.controller, self._why_no_reply())
                if timeouts % RECONNECT_AFTER_TIMEOUTS == 0:
                    self._reconnect()
                self.notifier.status(f"registering with {self.settings.controller}: no answer yet; retrying")
            except RemoteError as exc:
                self.metrics.registrations.labels(exc.code).inc()
                log.error("controller refused registration: %s", exc)
            else:
                if isinstance(reply, RegisterAccepted):
                    self.gate.epoch = reply.controller_epoch
                    self.state = reply.state
                    self.metrics.registrations.labels("accepted").inc()
                    log.info("registered as %s generation %d with controller epoch %d (%s); metrics on port %s",
                             self.settings.node_name, self.generation, reply.controller_epoch, reply.state,
                             self.metrics_port)
                    self._registered(reply.controller_epoch)
                    return
                log.error("unexpected reply to register: %s", reply.op)
            await asyncio.sleep(next(delays))

    def _why_no_reply(self) -> str:
        """What the socket monitor saw, said once per distinct reason (a refused key, a wrong server key)."""
        self.handshakes.read(self._monitor)
        why = self.handshakes.explain(key_source=f"key_file {self.settings.key_file}",
                                      server_key_source=f"controller_key_file {self.settings.controller_key_file}",
                                      secure=self.credentials is not None)
        if why is None or why == self._explained:
            return ""
        self._explained = why
        return f" ({why})"

    def _reconnect(self) -> None:
        """Drop the connection and make a new one.

        Under CURVE the controller does not let a new connection take over a connected node's
        identity, so if it still holds this node's previous connection (a half-open one after a
        network fault) this one is never heard; a fresh connection is, once that one is gone.
        """
        assert self.endpoint is not None
        try:
            self.endpoint.sock.disconnect(self.settings.controller)
        except zmq.ZMQError:
            pass
        self.endpoint.sock.connect(self.settings.controller)

    def _registered(self, epoch: int) -> None:
        text = f"registered as {self.settings.node_name} generation {self.generation} with controller epoch {epoch}"
        if self._ready_sent:
            self.notifier.status(text)
        else:
            self._ready_sent = True
            self.notifier.ready(text)

    def _ready_without_controller(self) -> None:
        if self._ready_sent:
            return
        self._ready_sent = True
        log.warning("not registered with %s after %g s; reporting the unit started and still trying",
                    self.settings.controller, self.ready_without_controller_s)
        self.notifier.ready(f"not registered yet: no answer from {self.settings.controller} after "
                            f"{self.ready_without_controller_s:g} s; still trying")

    async def _heartbeat_until_lost(self) -> None:
        assert self.endpoint is not None
        interval = self.settings.heartbeat_interval_s
        missed = 0
        deadline = self.clock()
        while True:
            self.seq += 1
            message = Heartbeat(
                node_name=self.settings.node_name, generation=self.generation, seq=self.seq,
                sent_at_unix_s=time.time(), devices=tuple(self.latest[i] for i in sorted(self.latest)),
                host=self.host_sampler.sample(), running_components=self.components.running_count(),
                components=tuple(self.components.reports()))
            sent = time.perf_counter()
            try:
                reply = await self.endpoint.request(message, timeout_s=self.settings.request_timeout_s)
            except RequestTimeout:
                missed += 1
                self.metrics.heartbeats.labels("timeout").inc()
                if missed >= self.settings.missed_acks_before_reregister:
                    log.warning("%d heartbeats unanswered; registering again", missed)
                    return
            except RemoteError as exc:
                self.metrics.heartbeats.labels(exc.code).inc()
                log.error("controller refused heartbeat: %s", exc)
                return
            else:
                if isinstance(reply, ReregisterRequired):
                    self.metrics.heartbeats.labels("reregister").inc()
                    log.info("controller asks to register again: %s", reply.reason)
                    return
                if isinstance(reply, HeartbeatAck):
                    rtt_s = time.perf_counter() - sent
                    for observe in self.heartbeat_rtt_observers:
                        observe(rtt_s)
                    missed = 0
                    self.metrics.heartbeats.labels("ok").inc()
                    if reply.controller_epoch != self.gate.epoch:
                        log.info("controller epoch changed to %d; registering again", reply.controller_epoch)
                        return
                    self.state = reply.state
            deadline = max(deadline + interval, self.clock())
            await asyncio.sleep(max(0.0, deadline - self.clock()))

    # --- commands ----------------------------------------------------------------------

    def on_set_power_limit(self, peer: bytes, msg: SetPowerLimit) -> Any:
        refusal = self.gate.refusal(msg.command_id, msg.controller_epoch, msg.node_generation)
        if refusal is not None:
            self.metrics.commands.labels("set_power_limit", refusal.code).inc()
            log.warning("refused command: %s", refusal.message)
            return refusal
        previous = self.gate.previous_result(msg.command_id)
        if previous is not None:
            return previous
        device = self.devices.get(msg.device_index)
        if device is None:
            result = CommandResult(msg.command_id, False, f"no device {msg.device_index} on this node")
        else:
            try:
                applied = device.set_power_limit(msg.power_limit_w)
            except DeviceError as exc:
                result = CommandResult(msg.command_id, False, str(exc))
            else:
                result = CommandResult(msg.command_id, True, f"device {msg.device_index} power limit set to "
                                                             f"{applied:g} W", applied)
                log.info("device %d power limit set to %g W", msg.device_index, applied)
        self.metrics.commands.labels("set_power_limit", "ok" if result.ok else "failed").inc()
        self.gate.remember(result)
        self.sample_devices()
        return result

    def _admit(self, op: str, command_id: str, epoch: int, generation: int) -> ErrorReply | CommandResult | None:
        """A refusal or the remembered result of a repeated command; None when the command should run."""
        refusal = self.gate.refusal(command_id, epoch, generation)
        if refusal is not None:
            self.metrics.commands.labels(op, refusal.code).inc()
            log.warning("refused command: %s", refusal.message)
            return refusal
        return self.gate.previous_result(command_id)

    def _done(self, op: str, result: CommandResult) -> CommandResult:
        self.metrics.commands.labels(op, "ok" if result.ok else "failed").inc()
        if not result.ok:
            log.warning("%s %s refused: %s", op, result.command_id, result.message)
        self.gate.remember(result)
        return result

    def on_start_component(self, peer: bytes, msg: StartComponent) -> Any:
        answer = self._admit("start_component", msg.command_id, msg.controller_epoch, msg.node_generation)
        if answer is not None:
            return answer
        try:
            executor = ExecutorSpec.model_validate(msg.executor)
        except ValidationError as exc:
            return self._done("start_component", CommandResult(
                msg.command_id, False, f"component {msg.component_id}: invalid executor spec: "
                                       f"{validation_summary(exc)}"))
        ok, text = self.components.start(msg.component_id, executor, tuple(msg.device_indexes))
        return self._done("start_component", CommandResult(msg.command_id, ok, text))

    def on_stop_component(self, peer: bytes, msg: StopComponent) -> Any:
        answer = self._admit("stop_component", msg.command_id, msg.controller_epoch, msg.node_generation)
        if answer is not None:
            return answer
        if not msg.drain_timeout_s >= 0:
            return self._done("stop_component", CommandResult(
                msg.command_id, False, f"drain_timeout_s must be >= 0, got {msg.drain_timeout_s:g}"))
        ok, text = self.components.stop(msg.component_id, msg.drain_timeout_s)
        return self._done("stop_component", CommandResult(msg.command_id, ok, text))

    def on_cancel_invocation(self, peer: bytes, msg: CancelInvocation) -> Any:
        answer = self._admit("cancel_invocation", msg.command_id, msg.controller_epoch, msg.node_generation)
        if answer is not None:
            return answer
        ok, text = self.components.cancel(msg.invocation_id, msg.reason)
        return self._done("cancel_invocation", CommandResult(msg.command_id, ok, text))

    def on_device_fault_drill(self, peer: bytes, msg: DeviceFaultDrill) -> Any:
        """Drive a simulated GPU into a fault (or out of a cooling failure) so operators can rehearse; a real
        device is never touched: there is no safe way to fake a fault on hardware that is serving."""
        answer = self._admit("device_fault_drill", msg.command_id, msg.controller_epoch, msg.node_generation)
        if answer is not None:
            return answer
        node = self.settings.node_name
        device = self.devices.get(msg.device_index)
        if device is None:
            indexes = ", ".join(map(str, sorted(self.devices))) or "none"
            return self._drill_refused(ErrorReply(
                "unknown_device", f"node {node} has no device {msg.device_index} (devices: {indexes})"))
        if msg.fault not in FAULT_DRILL_KINDS:
            return self._drill_refused(ErrorReply(
                "invalid_argument", f"unknown fault {msg.fault!r}; use one of {', '.join(FAULT_DRILL_KINDS)}"))
        xid = DEFAULT_DRILL_XID if msg.xid is None else msg.xid
        if not 0 <= xid <= MAX_XID:
            return self._drill_refused(ErrorReply("invalid_argument", f"xid must be 0-{MAX_XID}, got {xid}"))
        if not isinstance(device, SimGpu):
            what = "real hardware" if device.info.kind == "gpu" else f"the host {device.info.kind.upper()}"
            return self._drill_refused(ErrorReply(
                "unsupported", f"device {msg.device_index} on {node} is {device.info.model} ({what}); "
                               "fault drills drive simulated GPUs only"))
        if msg.fault == "xid" and device.lost:
            return self._drill_refused(ErrorReply(
                "device_lost", f"device {msg.device_index} on {node} has fallen off the bus; a lost GPU reports no "
                               "Xid (restart the agent to bring it back)"))
        device.advance(max(device.now_s, self.clock()))  # the fault lands now, not back at the last sample
        text = apply_fault_drill(device, msg.fault, xid)
        log.warning("fault drill on device %d (%s): %s", msg.device_index, device.info.model, text)
        result = self._done("device_fault_drill", CommandResult(msg.command_id, True,
                                                                f"device {msg.device_index} on {node}: {text}"))
        self.sample_devices()
        return result

    def _drill_refused(self, refusal: ErrorReply) -> ErrorReply:
        self.metrics.commands.labels("device_fault_drill", refusal.code).inc()
        log.warning("fault drill refused: %s", refusal.message)
        return refusal

    async def on_invoke(self, peer: bytes, msg: Invoke) -> InvocationResult:
        if msg.controller_epoch != self.gate.epoch:
            now_unix = time.time()
            self.metrics.invocations.labels("stale_command").inc()
            registered = "no controller" if self.gate.epoch is None else f"controller epoch {self.gate.epoch}"
            return InvocationResult(
                invocation_id=msg.invocation_id, ok=False, outputs={}, error_code="stale_command",
                error=f"invocation {msg.invocation_id} carries controller epoch {msg.controller_epoch}; this agent "
                      f"is registered with {registered}", retryable=True, started_at_unix_s=now_unix,
                ended_at_unix_s=now_unix, latency_s=0.0, energy_j=None, device_indexes=(), simulated=False)
        result = await self.components.invoke(msg)
        self.metrics.invocations.labels(result.error_code or "ok").inc()
        return result

    def _device_rows(self):  # type: ignore[no-untyped-def]
        for index, sample in list(self.latest.items()):
            yield self.settings.node_name, self.devices[index].info, sample


def validation_summary(exc: ValidationError, limit: int = 5) -> str:
    """Pydantic's errors as one line: ``where: what`` for the first few."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def apply_fault_drill(gpu: SimGpu, fault: str, xid: int) -> str:
    """Apply one drill to a simulated GPU and say what changed, including what a ``clear`` cannot undo."""
    if fault == "cooling-failure":
        already = gpu.thermal_resistance_k_per_w > gpu.spec.thermal_resistance_k_per_w
        gpu.inject_cooling_failure()
        return ("cooling failure already active" if already else
                f"cooling failure injected (thermal resistance x{COOLING_FAILURE_RESISTANCE_FACTOR:g}); "
                "it heats up and throttles under load until cleared")
    if fault == "xid":  # the caller refuses an Xid on a GPU that is off the bus
        gpu.inject_xid(xid)
        return f"Xid {xid} injected; health is xid (the GPU keeps working) until the agent restarts"
    if fault == "fall-off-bus":
        if gpu.lost:
            return "already off the bus"
        gpu.fall_off_bus()
        return "fell off the bus (Xid 79): health lost, no telemetry, every command fails until the agent restarts"
    had_failure = gpu.thermal_resistance_k_per_w > gpu.spec.thermal_resistance_k_per_w
    gpu.clear_cooling_failure()
    text = "cooling restored" if had_failure else "no cooling failure was active"
    if gpu.lost:
        text += "; the GPU stays fallen off the bus (a drill cannot put it back; restart the agent)"
    elif gpu.health == "xid":
        text += f"; health stays xid (Xid {gpu.last_xid}) until the agent restarts"
    return text
