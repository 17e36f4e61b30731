"""Loopback ports for engines that listen (vLLM servers), handed out without collisions.

A port is handed out only if nothing on the host is bound to it now (a bind check) and
this agent has not already handed it to another component; it returns to the pool when
that component's engine has stopped. Between the check and the engine's own bind another
process could take the port; the engine then fails to start and the component is
reported failed with its log, which says so.
"""

from __future__ import annotations

import socket
from collections.abc import Callable


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def os_free_port(host: str) -> int:
    """A port the OS considers free right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PortAllocator:
    """Free ports from ``[low, high)`` or, without a range, from the OS's ephemeral range."""

    def __init__(self, host: str = "127.0.0.1", low: int | None = None, high: int | None = None, *,
                 is_free: Callable[[str, int], bool] = port_is_free,
                 os_pick: Callable[[str], int] = os_free_port) -> None:
        if (low is None) != (high is None):
            raise ValueError("give both ends of the port range, or neither")
        if low is not None and high is not None and not 1024 <= low < high <= 65536:
            raise ValueError(f"port range must satisfy 1024 <= low < high <= 65536, got {low}..{high}")
        self.host, self.low, self.high = host, low, high
        self.is_free, self.os_pick = is_free, os_pick
        self.owners: dict[int, str] = {}
        self._next = low

    def allocate(self, owner: str) -> int:
        """A port for ``owner``; raises RuntimeError when none is free."""
        if self.low is None or self.high is None:
            for _ in range(64):
                port = self.os_pick(self.host)
                if port not in self.owners:
                    self.owners[port] = owner
                    return port
            raise RuntimeError("the OS kept offering ports this agent has already handed out")
        span = self.high - self.low
        assert self._next is not None
        for step in range(span):
            port = self.low + (self._next - self.low + step) % span
            if port not in self.owners and self.is_free(self.host, port):
                self.owners[port] = owner
                self._next = self.low + (port - self.low + 1) % span
                return port
        raise RuntimeError(f"no free port in {self.low}..{self.high - 1} "
                           f"({len(self.owners)} held by components of this agent)")

    def release(self, port: int | None) -> None:
        if port is not None:
            self.owners.pop(port, None)
