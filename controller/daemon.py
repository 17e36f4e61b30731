"""The controller daemon: a thin asyncio shell around the node registry and the store.

It binds one ROUTER for agents and one for the admin CLI, feeds registrations,
heartbeats and clock ticks to the registry, and performs the actions it returns
(answer agents, persist admin state, log transitions).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from common.metrics import DeviceCollector, serve_metrics
from common.protocol import (
    ErrorReply, Heartbeat, HeartbeatAck, Register, RegisterAccepted, ReregisterRequired, SetPowerLimit,
    build_dispatch,
)
from common.security.curve import apply_server
from common.systemd_notify import Notifier, watchdog_loop
from common.transport import PeerUnreachable, RemoteError, RequestTimeout, RpcEndpoint, configure_socket
from controller.admin import AdminApi
from controller.autopilot_shell import AutopilotSettings
from controller.config import ControllerSettings
from controller.context import ControllerMetrics, ControllerStateCollector
from controller.jobs.service import WorkloadConfig, WorkloadService
from controller.profiler import ProfilerService
from controller.registry import (
    Accepted, Action, HeartbeatReceived, NodeRecord, NodeRegistered, NodeRegistry, PersistNode, RegistryConfig,
    Rejected, StateChanged, Tick,
)
from controller.security.auth import ADMIN, AGENTS, ControlPlaneAuth
from controller.security.keyring import server_credentials
from controller.store import Store

log = logging.getLogger("murakkab.controller")


class Controller:
    def __init__(self, settings: ControllerSettings, *, clock: Any = time.monotonic,
                 notifier: Notifier | None = None, mqtt: Any = None) -> None:
        self.settings = settings
        self.mqtt_settings = mqtt  # common.mqtt.settings.MqttSettings (the [mqtt] table), or None
        # CurveZMQ on both sockets unless the config says insecure = true; a missing key or keyring raises
        # KeyringError here, before anything is opened or bound, with the command that creates them.
        self.auth: ControlPlaneAuth | None = None
        if not settings.insecure:
            self.server_credentials = server_credentials(Path(settings.keys_dir))
            self.auth = ControlPlaneAuth(Path(settings.keys_dir),
                                         lambda endpoint, reason: self.metrics.auth_refused.labels(endpoint, reason).inc())
        # systemd readiness and watchdog (a no-op when not started by a Type=notify unit)
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self.clock = clock
        self.started_s = clock()
        self.unix_offset_s = time.time() - self.started_s
        self.store = Store(Path(settings.state_dir) / "controller.sqlite3")
        self.epoch = self.store.next_epoch()
        self.registry = NodeRegistry(RegistryConfig(
            settings.suspect_after_s, settings.lost_after_s, settings.telemetry_history))
        for node in self.store.load_nodes():
            self.registry.restore(node.name, node.hostname, node.generation, node.admin_state,
                                  node.drain_reason, node.labels, self.started_s)
        self.metrics_registry = CollectorRegistry()
        self.metrics = ControllerMetrics(self.metrics_registry)
        self._heartbeats_ok = self.metrics.heartbeats.labels("ok")  # bound once: the hot path skips the lookup
        self.metrics_registry.register(DeviceCollector(self._device_rows))
        self.metrics_registry.register(ControllerStateCollector(self))  # nodes by state, power budgets
        self.ctx = zmq.Context()
        self.agents: RpcEndpoint | None = None
        self.admin: RpcEndpoint | None = None
        self.agent_endpoint = self.admin_endpoint = ""
        self.metrics_port: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.workloads = WorkloadService(self, WorkloadConfig(
            invocation_timeout_s=settings.invocation_timeout_s, max_attempts=settings.invocation_max_attempts,
            queue_timeout_s=settings.job_queue_timeout_s, job_timeout_s=settings.job_timeout_s,
            command_timeout_s=settings.command_timeout_s, restart_grace_s=settings.lost_after_s,
            planner=settings.planner, autopilot=AutopilotSettings(
                epoch_s=settings.planning_epoch_s, window_s=settings.planning_window_s,
                queueing_slack=settings.planning_queueing_slack, wait_quantile=settings.planning_wait_quantile,
                switch_timeout_s=settings.switch_timeout_s, heat_margin_c=settings.heat_margin_c,
                heat_migrate_after_s=settings.heat_migrate_after_s,
                cluster_power_budget_w=settings.cluster_power_budget_w,
                rack_power_budget_w=dict(settings.rack_power_budget_w),
                grid_objective=settings.grid_price_objective,
                carbon_price_usd_per_tonne=settings.carbon_price_usd_per_tonne,
                fleet_interval_s=settings.heartbeat_interval_s),
            start_failure_limit=settings.start_failure_limit, avoid_node_s=settings.avoid_node_s))
        self.profiler = ProfilerService(self)
        # Facility signals in, autopilot events and status out, over MQTT; never on the ZeroMQ control path.
        self.facility: Any = None
        if mqtt is not None and mqtt.enabled:
            from controller.facility import FacilityShell  # imported only where MQTT is on

            self.facility = FacilityShell(self, mqtt)

    def to_unix(self, monotonic_s: float | None) -> float | None:
        return None if monotonic_s is None else monotonic_s + self.unix_offset_s

    # --- lifecycle ---------------------------------------------------------------------

    def _bind(self, endpoint: str, address: str) -> zmq.Socket:
        """A ROUTER for ``endpoint`` (agents or admin): CURVE server with ZAP unless insecure."""
        sock = self.ctx.socket(zmq.ROUTER)
        secure = self.auth is not None
        configure_socket(sock, router=True, handover=not (secure and endpoint == AGENTS))
        if self.auth is not None:
            apply_server(sock, self.server_credentials, endpoint)
            self.auth.watch_handshakes(sock, endpoint)
        sock.bind(address)
        return sock

    async def start(self) -> None:
        if self.auth is not None:
            self.auth.start(self.ctx)
        else:
            log.warning("insecure = true: the agent and admin sockets are plaintext and unauthenticated; anyone who "
                        "can reach %s or %s can register nodes, read workflow inputs and run admin commands",
                        self.settings.agent_bind, self.settings.admin_bind)
        agent_sock = self._bind(AGENTS, self.settings.agent_bind)
        self.agent_endpoint = agent_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        admin_sock = self._bind(ADMIN, self.settings.admin_bind)
        self.admin_endpoint = admin_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        api = AdminApi(self)
        self.agents = RpcEndpoint(
            agent_sock, router=True, name="controller.agents",
            dispatch=build_dispatch("controller.agents", {Register: self.on_register, Heartbeat: self.on_heartbeat}),
            on_rejected=lambda code: self.metrics.frames_rejected.labels("agents", code).inc(),
            coalesce_s=self.settings.agent_receive_coalesce_s,
            gate=self.auth.gates[AGENTS] if self.auth else None)
        self.admin = RpcEndpoint(
            admin_sock, router=True, name="controller.admin", dispatch=api.dispatch,
            on_rejected=lambda code: self.metrics.frames_rejected.labels("admin", code).inc(),
            gate=self.auth.gates[ADMIN] if self.auth else None)
        self.metrics_port = (serve_metrics(self.metrics_registry, self.settings.metrics_host, self.settings.metrics_port)
                             if self.settings.metrics_enabled else None)
        self.workloads.load()
        self.profiler.load()
        self._tasks = [asyncio.create_task(self.agents.serve()), asyncio.create_task(self.admin.serve()),
                       asyncio.create_task(self._tick_loop())]
        if self.auth is not None:
            self._tasks.append(asyncio.create_task(self.auth.run()))
        if self.facility is not None:  # never ends by itself: broker errors are the link's to retry
            self._tasks.append(asyncio.create_task(self.facility.run()))
        if self.notifier.watchdog_interval_s is not None:  # the loop never returns, so it cannot end run_forever
            self._tasks.append(asyncio.create_task(watchdog_loop(self.notifier)))
        self._write_endpoints()
        log.info("controller epoch %d serving agents on %s, admin on %s, metrics on %s",
                 self.epoch, self.agent_endpoint, self.admin_endpoint, self.metrics_port)
        # Both sockets are bound and endpoints.json is written: agents and murakkabctl can connect now.
        self.notifier.ready(f"epoch {self.epoch}: agents on {self.agent_endpoint}, admin on {self.admin_endpoint}")

    def _write_endpoints(self) -> None:
        """Publish bound addresses (ports may have been chosen by the OS) for tools to find."""
        path = Path(self.settings.state_dir) / "endpoints.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"agents": self.agent_endpoint, "admin": self.admin_endpoint,
                                   "metrics_port": self.metrics_port, "epoch": self.epoch}))
        tmp.replace(path)

    async def run_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            await self.close()

    async def close(self) -> None:
        self.notifier.stopping(f"epoch {self.epoch}: shutting down")
        if self.facility is not None:
            await self.facility.close()  # 'offline' on the status topic: a clean disconnect sends no last will
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.profiler.close()
        await self.workloads.close()
        if self.auth is not None:
            self.auth.close()
        for endpoint in (self.agents, self.admin):
            if endpoint is not None:
                endpoint.close()
        self.ctx.destroy(linger=0)  # closes any socket left open, so shutdown cannot block
        self.store.close()
        self.notifier.close()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_interval_s)
            now = self.clock()
            self.apply(self.registry.handle(Tick(now)))
            try:
                self.workloads.tick(now)
            except Exception:  # a bug in one tick must not stop the clock for every job
                log.exception("workload tick failed")

    # --- registry actions --------------------------------------------------------------

    def apply(self, actions: list[Action]) -> Accepted | Rejected | None:
        """Perform side effects and return the answer for the agent, if any."""
        answer: Accepted | Rejected | None = None
        for action in actions:
            match action:
                case StateChanged(name, old, new, reason):
                    self.metrics.transitions.labels(new).inc()
                    level = logging.WARNING if new in ("suspect", "lost") else logging.INFO
                    log.log(level, "node %s: %s -> %s (%s)", name, old, new, reason)
                case PersistNode():
                    self.store.save_node(action.node)
                case Accepted() | Rejected():
                    answer = action
        return answer

    # --- agent endpoint ----------------------------------------------------------------

    def on_register(self, peer: bytes, msg: Register) -> Any:
        if peer != msg.node_name.encode():
            return ErrorReply("identity_mismatch", f"socket identity {peer!r} does not match node {msg.node_name!r}")
        answer = self.apply(self.registry.handle(NodeRegistered(
            msg.node_name, msg.hostname, msg.generation, msg.devices, msg.host, dict(msg.labels), self.clock())))
        if isinstance(answer, Rejected):
            return ErrorReply(answer.code, answer.message)
        assert answer is not None
        self.profiler.note_register(msg.node_name, msg.agent_version)
        return RegisterAccepted(self.epoch, self.settings.heartbeat_interval_s, answer.state)

    def on_heartbeat(self, peer: bytes, msg: Heartbeat) -> Any:
        started = time.perf_counter()
        if peer != msg.node_name.encode():
            self.metrics.heartbeats.labels("identity_mismatch").inc()
            return ErrorReply("identity_mismatch", f"socket identity {peer!r} does not match node {msg.node_name!r}")
        answer = self.apply(self.registry.handle(HeartbeatReceived(
            msg.node_name, msg.generation, msg.devices, msg.host, msg.running_components, self.clock())))
        if isinstance(answer, Rejected):
            self.metrics.heartbeats.labels(answer.code).inc()
            reply: Any = (ReregisterRequired(answer.message, self.epoch) if answer.code == "reregister"
                          else ErrorReply(answer.code, answer.message))
        else:
            self._heartbeats_ok.inc()
            reply = HeartbeatAck(self.epoch, answer.state if answer else "unknown")
            components = self.profiler.claim(msg.node_name, msg.components)  # a profile run's own component
            self.workloads.on_heartbeat(msg.node_name, components, self.clock())
        self.metrics.heartbeat_handling.observe(time.perf_counter() - started)
        return reply

    # --- commands to agents ------------------------------------------------------------

    async def set_power_limit(self, node: NodeRecord, device_index: int, power_limit_w: float) -> Any:
        command = SetPowerLimit(uuid.uuid4().hex, self.epoch, node.generation, device_index, power_limit_w)
        assert self.agents is not None
        try:
            result = await self.agents.request(command, peer=node.name.encode(),
                                               timeout_s=self.settings.command_timeout_s)
        except (RequestTimeout, PeerUnreachable, RemoteError) as exc:
            code = exc.code if isinstance(exc, RemoteError) else type(exc).__name__
            self.metrics.commands.labels("set_power_limit", code).inc()
            return ErrorReply("command_failed", f"set_power_limit on {node.name}: {exc}")
        self.metrics.commands.labels("set_power_limit", "ok" if result.ok else "refused").inc()
        return result

    # --- metrics -----------------------------------------------------------------------

    def _device_rows(self):  # type: ignore[no-untyped-def]
        for node in list(self.registry.nodes.values()):
            infos = {d.index: d for d in node.devices}
            for sample in node.latest_telemetry():
                info = infos.get(sample.index)
                if info is not None:
                    yield node.name, info, sample
