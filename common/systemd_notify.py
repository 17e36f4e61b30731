"""A dependency-free sd_notify(3) client: readiness, status, stopping and the watchdog for systemd.

Under a ``Type=notify`` unit systemd puts the address of its notification socket in ``NOTIFY_SOCKET``
(a path, or an abstract name written with a leading ``@``) and, with ``WatchdogSec=``, the interval in
``WATCHDOG_USEC`` (plus ``WATCHDOG_PID``, the process it is meant for). A notification is one datagram of
``KEY=value`` lines over an ``AF_UNIX``/``SOCK_DGRAM`` socket; that is all this module does, so the
daemons need neither python-systemd nor libsystemd.

``Notifier.from_environment()`` reads those variables once and then removes ``NOTIFY_SOCKET``,
``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``os.environ``, as ``sd_notify(unset_environment=1)`` and
``sd_watchdog_enabled(unset_environment=1)`` do: engines and tools the agent starts copy ``os.environ``,
and a child that inherited them could report readiness or feed the watchdog on the unit's behalf (the
units also say ``NotifyAccess=main``, so systemd would ignore it; this keeps the children's
environment clean as well).

Sending never raises into the daemon and never blocks its event loop: the socket is non-blocking, and a
failed send (the socket is gone, its queue is full) is logged once per run of failures and dropped.
Without ``NOTIFY_SOCKET`` (not started by systemd, tests) the notifier does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("murakkab.systemd")

ENVIRONMENT_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

__all__ = ["ENVIRONMENT_VARIABLES", "Notifier", "clean_child_environment", "watchdog_loop"]


def clean_child_environment(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` without the variables that would let a child notify for this unit (edited in place)."""
    for name in ENVIRONMENT_VARIABLES:
        env.pop(name, None)
    return env


def _socket_address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as an address for sendto: an absolute path, or an abstract name (``@`` -> NUL)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None  # vsock: and relative paths are not supported (systemd itself only hands out the two above)


def _watchdog_interval_s(env: MutableMapping[str, str], pid: int) -> float | None:
    """sd_watchdog_enabled(): the interval when WATCHDOG_USEC is a positive integer and WATCHDOG_PID, if
    set, is this process; None otherwise."""
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            watchdog_pid = int(pid_text)
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", pid_text)
            return None
        if watchdog_pid != pid:
            return None  # meant for another process (our parent, say): not ours to feed
    return usec / 1e6


class Notifier:
    """Sends notifications to systemd's socket; without one (``address`` None) every call does nothing."""

    def __init__(self, address: str | bytes | None = None, watchdog_interval_s: float | None = None) -> None:
        self.address = address
        self._watchdog_interval_s = watchdog_interval_s if address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None, *,
                         unset_environment: bool = True) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET`` and the watchdog settings, removing them from the environment
        (``os.environ`` unless another mapping is given) so that children do not inherit them."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(value) if value else None
        if value and address is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an abstract name", value)
        interval = _watchdog_interval_s(env, os.getpid()) if address is not None else None
        if unset_environment:
            clean_child_environment(env)
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """WatchdogSec= in seconds when the watchdog is on for this process, else None."""
        return self._watchdog_interval_s

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def stopping(self, status: str = "") -> None:
        self._send("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> None:
        self._send(f"STATUS={_one_line(text)}")

    def watchdog_ping(self) -> None:
        if self._watchdog_interval_s is not None:
            self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full queue drops the message instead of stalling the loop
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning("cannot notify systemd at %r (%s); dropping notifications until it works again",
                            self.address, exc)
            return
        if self._failing:
            self._failing = False
            log.info("notifying systemd works again")


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def watchdog_loop(notifier: Notifier) -> None:
    """Feed the watchdog every half interval from the event loop, so a loop that is blocked (or starved)
    stops feeding it and systemd restarts the daemon. Returns at once when the watchdog is off."""
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    while True:
        notifier.watchdog_ping()
        await asyncio.sleep(interval / 2)
