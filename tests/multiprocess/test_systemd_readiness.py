"""systemd readiness and watchdog of the real daemons: each runs as a process with NOTIFY_SOCKET pointing at a
datagram socket this test binds (as systemd would for a Type=notify unit with WatchdogSec=).

The controller must say READY=1 only once its agent and admin endpoints accept connections; the agent only
once the controller has accepted its registration (it is started before the controller, so it waits); both
keep sending WATCHDOG=1 from their event loops and say STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w

from controller.cli.client import AdminClient
from controller.cli.cluster import free_port

pytestmark = pytest.mark.multiprocess

WATCHDOG_USEC = 1_000_000  # 1 s: the daemons feed it every 0.5 s


class NotifySocket:
    """An abstract-namespace datagram socket standing in for systemd's notification socket."""

    def __init__(self) -> None:
        self.name = f"@murakkab-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.received: list[tuple[float, str]] = []

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float, proc: subprocess.Popen[bytes],
                 log: Path) -> float:
        """Receive until a message matches; the monotonic time it arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                if proc.poll() is not None:
                    raise AssertionError(f"daemon exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
                continue
            at = time.monotonic()
            self.received.append((at, data.decode()))
            if predicate(data.decode()):
                return at
        raise AssertionError(f"no matching notification in {timeout_s:g} s; got {self.messages()}\n"
                             f"{log.read_text()[-4000:]}")

    def messages(self) -> list[str]:
        return [m for _, m in self.received]

    def close(self) -> None:
        self.sock.close()


def start(module: str, config: Path, notify: NotifySocket, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, NOTIFY_SOCKET=notify.name, WATCHDOG_USEC=str(WATCHDOG_USEC))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module, "--config", str(config)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=config.parent)


def accepts_tcp(endpoint: str) -> bool:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return False
    return True


def is_ready(message: str) -> bool:
    return "READY=1" in message.splitlines()


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_controller_and_agent_report_ready_feed_the_watchdog_and_say_stopping(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    agent_port, admin_port = free_port(), free_port()
    controller_dir = tmp_path / "controller"
    controller_dir.mkdir()
    controller_cfg = controller_dir / "controller.toml"
    controller_cfg.write_text(tomli_w.dumps({"controller": {
        "agent_bind": f"tcp://127.0.0.1:{agent_port}", "admin_bind": f"tcp://127.0.0.1:{admin_port}",
        "state_dir": str(controller_dir / "state"), "metrics_enabled": False, "heartbeat_interval_s": 0.25,
        "insecure": True}}))  # plaintext: this test is about readiness, not CurveZMQ
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    agent_cfg = agent_dir / "agent.toml"
    agent_cfg.write_text(tomli_w.dumps({
        "agent": {"node_name": "notify-node", "controller": f"tcp://127.0.0.1:{agent_port}",
                  "state_dir": str(agent_dir / "state"), "heartbeat_interval_s": 0.25, "metrics_enabled": False,
                  "request_timeout_s": 0.5, "reconnect_base_s": 0.1, "reconnect_cap_s": 0.3, "insecure": True},
        "devices": {"backend": "sim", "include_cpu": False, "sim": {"model": "h100", "count": 1}}}))
    agent_notify, controller_notify = NotifySocket(), NotifySocket()
    try:
        # The agent first: no controller to register with, so it must not report ready.
        agent = start("agent.main", agent_cfg, agent_notify, agent_dir / "agent.log")
        processes.append(agent)
        agent_notify.wait_for(lambda m: "no answer yet" in m, 30.0, agent, agent_dir / "agent.log")
        agent_notify.wait_for(lambda m: m == "WATCHDOG=1", 5.0, agent, agent_dir / "agent.log")
        assert not any(is_ready(m) for m in agent_notify.messages())

        controller = start("controller.main", controller_cfg, controller_notify, controller_dir / "controller.log")
        processes.append(controller)
        controller_notify.wait_for(is_ready, 60.0, controller, controller_dir / "controller.log")
        # At READY=1 endpoints.json is written (read at once: it is written just before READY) and both
        # endpoints accept connections.
        endpoints = json.loads((controller_dir / "state" / "endpoints.json").read_text())
        assert accepts_tcp(f"tcp://127.0.0.1:{agent_port}") and accepts_tcp(f"tcp://127.0.0.1:{admin_port}")
        assert endpoints["admin"] == f"tcp://127.0.0.1:{admin_port}"
        ready = next(m for m in controller_notify.messages() if is_ready(m))
        assert f"admin on tcp://127.0.0.1:{admin_port}" in ready
        with AdminClient(endpoints["admin"], timeout_s=5.0) as client:
            client.list_nodes()  # the admin endpoint answers

        # The agent registers now and only then reports ready; the controller knows the node by then.
        agent_notify.wait_for(is_ready, 30.0, agent, agent_dir / "agent.log")
        agent_ready = next(m for m in agent_notify.messages() if is_ready(m))
        assert "registered as notify-node" in agent_ready
        with AdminClient(endpoints["admin"], timeout_s=5.0) as client:
            assert "notify-node" in {n.name for n in client.list_nodes()}

        # Both keep feeding the watchdog, about every WATCHDOG_USEC / 2.
        for notify, proc, log in ((controller_notify, controller, controller_dir / "controller.log"),
                                  (agent_notify, agent, agent_dir / "agent.log")):
            since = len(notify.received)
            first = notify.wait_for(lambda m: m == "WATCHDOG=1", 5.0, proc, log)
            for _ in range(3):
                notify.wait_for(lambda m: m == "WATCHDOG=1", 5.0, proc, log)
            pings = [t for t, m in notify.received[since:] if m == "WATCHDOG=1"]
            assert pings[0] == first and len(pings) >= 4
            assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < WATCHDOG_USEC / 1e6

        # SIGTERM: STOPPING=1 first, then a clean exit.
        for notify, proc, log in ((agent_notify, agent, agent_dir / "agent.log"),
                                  (controller_notify, controller, controller_dir / "controller.log")):
            proc.send_signal(signal.SIGTERM)
            notify.wait_for(lambda m: "STOPPING=1" in m.splitlines(), 30.0, proc, log)
            assert stop(proc) == 0
    finally:
        agent_notify.close()
        controller_notify.close()

