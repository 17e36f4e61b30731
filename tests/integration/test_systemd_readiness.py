"""systemd readiness in process, with the real notify client and a real datagram socket: what the subprocess
test (tests/multiprocess/test_systemd_readiness.py) cannot reach cheaply.

- A controller outage at boot must not fail the agent's unit: the agent reports READY=1 after a bounded wait
  without a registration, with a STATUS saying it is still trying, and READY=1 only once.
- The controller reports READY=1 from start(), once its endpoints are bound, and STOPPING=1 from close().
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path

import zmq

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.devices.sim import open_sim_devices
from common.systemd_notify import Notifier
from controller.cli.cluster import free_port
from controller.config import ControllerSettings
from controller.daemon import Controller


class NotifySocket:
    def __init__(self) -> None:
        self.name = f"@murakkab-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


def is_ready(message: str) -> bool:
    return "READY=1" in message.splitlines()


def test_agent_reports_ready_after_a_bound_when_the_controller_is_unreachable(tmp_path: Path) -> None:
    notify = NotifySocket()
    settings = AgentSettings(node_name="lonely", controller=f"tcp://127.0.0.1:{free_port()}",
                             state_dir=tmp_path / "agent", metrics_enabled=False, request_timeout_s=0.3,
                             reconnect_base_s=0.05, reconnect_cap_s=0.1, shutdown_drain_s=0.0, insecure=True)
    seen: list[str] = []

    async def run() -> None:
        ctx = zmq.Context()
        devices = open_sim_devices(node_name="lonely", model="h100", count=1, seed=1, start_s=time.monotonic())
        agent = Agent(settings, devices, ctx=ctx, notifier=Notifier.from_environment({"NOTIFY_SOCKET": notify.name}),
                      ready_without_controller_s=1.0)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.sleep(0.7)
        seen.extend(notify.drain())
        assert not any(is_ready(m) for m in seen), seen  # not yet: still inside the bound
        await asyncio.sleep(1.0)
        stop.set()
        await task
        ctx.destroy(linger=0)

    try:
        asyncio.run(run())
        seen.extend(notify.drain())
        ready = [m for m in seen if is_ready(m)]
        assert len(ready) == 1 and "still trying" in ready[0] and "not registered yet" in ready[0], seen
        assert any("no answer yet" in m for m in seen[:seen.index(ready[0])])  # STATUS lines said why
        assert "STOPPING=1" in seen[-1].splitlines()
    finally:
        notify.close()


def test_controller_ready_after_bind_and_stopping_on_close(tmp_path: Path) -> None:
    notify = NotifySocket()
    settings = ControllerSettings(agent_bind="tcp://127.0.0.1:*", admin_bind="tcp://127.0.0.1:*",
                                  state_dir=tmp_path / "controller", metrics_enabled=False, insecure=True)

    async def run() -> None:
        controller = Controller(settings, notifier=Notifier.from_environment({"NOTIFY_SOCKET": notify.name}))
        assert notify.drain() == []
        await controller.start()
        ready = [m for m in notify.drain() if is_ready(m)]
        assert len(ready) == 1 and controller.admin_endpoint in ready[0] and controller.agent_endpoint in ready[0]
        assert (tmp_path / "controller" / "endpoints.json").exists()
        await controller.close()
        assert [m.splitlines()[0] for m in notify.drain()] == ["STOPPING=1"]

    try:
        asyncio.run(run())
    finally:
        notify.close()
