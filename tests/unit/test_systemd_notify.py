"""common.systemd_notify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.systemd_notify import Notifier, clean_child_environment, watchdog_loop


class FakeSystemd:
    """A bound datagram socket that records (monotonic time, message) for each notification."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.0)

    def drain(self, timeout_s: float = 0.0) -> list[tuple[float, str]]:
        """Everything queued now; waits up to timeout_s for the first datagram when none is queued."""
        out: list[tuple[float, str]] = []
        self.sock.settimeout(timeout_s if timeout_s > 0 else 0.0)
        try:
            while True:
                data = self.sock.recv(4096)
                out.append((time.monotonic(), data.decode()))
                self.sock.settimeout(0.0)
        except (BlockingIOError, TimeoutError, socket.timeout):
            pass
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, FakeSystemd]]:
    path = str(tmp_path / "notify")
    fake = FakeSystemd(path)
    yield path, fake
    fake.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, FakeSystemd]]:
    name = f"murakkab-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    yield "@" + name, fake
    fake.close()


def test_ready_status_stopping_arrive_as_datagrams(path_socket: tuple[str, FakeSystemd]) -> None:
    path, fake = path_socket
    env = {"NOTIFY_SOCKET": path, "PATH": "/usr/bin"}
    notifier = Notifier.from_environment(env)
    assert notifier.enabled
    notifier.ready("bound on tcp://127.0.0.1:1\nsecond line")
    notifier.status("serving 3 nodes")
    notifier.stopping()
    messages = [m for _, m in fake.drain(1.0)]
    assert messages == ["READY=1\nSTATUS=bound on tcp://127.0.0.1:1 second line", "STATUS=serving 3 nodes",
                        "STOPPING=1"]
    notifier.close()


def test_abstract_socket_name(abstract_socket: tuple[str, FakeSystemd]) -> None:
    name, fake = abstract_socket
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": name})
    notifier.ready()
    assert [m for _, m in fake.drain(1.0)] == ["READY=1"]
    notifier.close()


def test_from_environment_removes_the_variables_children_must_not_inherit(
        path_socket: tuple[str, FakeSystemd], monkeypatch: pytest.MonkeyPatch) -> None:
    path, fake = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environment()
    assert notifier.watchdog_interval_s == 2.0
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ
    assert Notifier.from_environment().enabled is False  # read once: a second reader finds nothing
    kept = Notifier.from_environment({"NOTIFY_SOCKET": path}, unset_environment=False)
    assert kept.enabled
    assert clean_child_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1", "HOME": "/x"}) == {"HOME": "/x"}


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),  # no WATCHDOG_PID: ours
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "{pid}"}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "{other}"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "nope"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_as_sd_watchdog_enabled(path_socket: tuple[str, FakeSystemd], env: dict[str, str],
                                                  interval: float | None) -> None:
    path, fake = path_socket
    pid = os.getpid()
    env = {k: v.format(pid=pid, other=pid + 1) for k, v in env.items()} | {"NOTIFY_SOCKET": path}
    notifier = Notifier.from_environment(env)
    assert notifier.watchdog_interval_s == interval
    notifier.watchdog_ping()
    assert [m for _, m in fake.drain(0.2)] == ([] if interval is None else ["WATCHDOG=1"])


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None  # no socket to ping
    notifier.ready("x")
    notifier.status("y")
    notifier.watchdog_ping()
    notifier.stopping()
    asyncio.run(asyncio.wait_for(watchdog_loop(notifier), 1.0))  # returns at once
    assert not Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"}).enabled


def test_a_vanished_socket_is_logged_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "notify")
    fake = FakeSystemd(path)
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    notifier.ready()
    fake.close()
    os.unlink(path)
    with caplog.at_level("WARNING", logger="murakkab.systemd"):
        for _ in range(5):
            notifier.watchdog_ping()
            notifier.status("still here")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1
    fake = FakeSystemd(path)  # systemd back (re-exec): notifications flow again
    notifier.status("back")
    assert [m for _, m in fake.drain(1.0)] == ["STATUS=back"]
    fake.close()
    notifier.close()


def test_a_blocked_event_loop_stops_feeding_the_watchdog(path_socket: tuple[str, FakeSystemd]) -> None:
    path, fake = path_socket
    interval_s = 0.2
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(int(interval_s * 1e6))})
    block_s = 5 * interval_s

    async def scenario() -> tuple[float, float]:
        task = asyncio.create_task(watchdog_loop(notifier))
        await asyncio.sleep(4 * interval_s)  # pings every interval / 2
        blocked_from = time.monotonic()
        time.sleep(block_s)  # a wedged loop: no ping can be sent
        blocked_to = time.monotonic()
        await asyncio.sleep(4 * interval_s)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return blocked_from, blocked_to

    # Received times are taken when drained, so drain from a thread while the loop runs.
    received: list[tuple[float, str]] = []

    async def main() -> tuple[float, float]:
        stop = asyncio.Event()

        def reader() -> None:
            while not stop.is_set():
                received.extend(fake.drain(0.02))

        thread = asyncio.get_running_loop().run_in_executor(None, reader)
        try:
            return await scenario()
        finally:
            stop.set()
            await thread

    blocked_from, blocked_to = asyncio.run(main())
    pings = [t for t, m in received if m == "WATCHDOG=1"]
    assert all(m == "WATCHDOG=1" for _, m in received)
    assert len([t for t in pings if t < blocked_from]) >= 5  # fed about every interval / 2 before the block
    assert len([t for t in pings if t > blocked_to]) >= 5  # and again after it
    # None during the block: the widest gap between pings spans it and exceeds the watchdog interval.
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) >= block_s - 0.15 > interval_s
    # (a ping sent just before the block may be read a little late; none is read inside it otherwise)
    assert not [t for t in pings if blocked_from + 0.15 < t < blocked_to]
    assert sorted(gaps)[len(gaps) // 2] < interval_s  # the usual gap is half the interval, well under it
