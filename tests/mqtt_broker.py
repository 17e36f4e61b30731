"""A real Mosquitto for tests: ``running_broker(tmp_path, users, acl_text)``.

It writes a password file (Mosquitto's ``$7$`` PBKDF2 hashes) and the given ACL under ``tmp_path/mqtt``, starts
``mosquitto`` on a free loopback port with anonymous clients refused, and stops it at the end. ``Broker.stop()``
and ``Broker.start()`` restart it on the same port (the "broker restarted mid-run" tests).

Without a mosquitto binary the test is skipped, with the reason; with ``MURAKKAB_REQUIRE_MQTT=1`` (``make test``)
it fails instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.components.ports import os_free_port
from controller.cli.broker import find_mosquitto, mosquitto_conf, password_file_text

START_TIMEOUT_S = 10.0


def require_mosquitto() -> str:
    """The mosquitto binary, or skip (fail under MURAKKAB_REQUIRE_MQTT=1)."""
    binary = find_mosquitto()
    if binary is None:
        reason = "mosquitto is not installed (Debian: apt-get install mosquitto)"
        if os.environ.get("MURAKKAB_REQUIRE_MQTT") == "1":
            pytest.fail(reason + ", and MURAKKAB_REQUIRE_MQTT=1 requires it")
        pytest.skip(reason)
    return binary


@dataclass
class Broker:
    host: str
    port: int
    password_files: dict[str, Path]
    conf: Path
    binary: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port}: {self.log()[-2000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def settings(self, user: str | None, **overrides: object):  # -> MqttSettings
        """MqttSettings logging in as ``user`` (None: anonymous)."""
        from common.mqtt.settings import MqttSettings

        values: dict[str, object] = {"enabled": True, "host": self.host, "port": self.port,
                                     "reconnect_base_s": 0.1, "reconnect_cap_s": 0.5}
        if user is not None:
            values.update(username=user, password_file=self.password_files[user])
        values.update(overrides)
        return MqttSettings(**values)


@contextlib.contextmanager
def running_broker(tmp_path: Path, users: dict[str, str], acl_text: str) -> Iterator[Broker]:
    """Mosquitto on a free loopback port with ``users`` ({name: password}) and ``acl_text``."""
    binary = require_mosquitto()
    directory = tmp_path / "mqtt"
    (directory / "secrets").mkdir(parents=True, exist_ok=True)
    passwd = directory / "passwd"
    passwd.write_text(password_file_text(users))
    acl = directory / "acl"
    acl.write_text(acl_text)
    password_files = {}
    for user, password in users.items():
        path = directory / "secrets" / f"{user}.password"
        path.write_text(password + "\n")
        path.chmod(0o600)
        password_files[user] = path
    port = os_free_port("127.0.0.1")
    conf = directory / "mosquitto.conf"
    conf.write_text(mosquitto_conf(port, passwd, acl))
    broker = Broker("127.0.0.1", port, password_files, conf, binary, directory / "mosquitto.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
