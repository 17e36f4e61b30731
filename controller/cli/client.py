"""A blocking admin client for murakkabctl: one DEALER, one request at a time, bounded waits."""

from __future__ import annotations

import itertools
import time
from typing import Any

import zmq

from common.protocol import ErrorReply, ListNodes, ProtocolError, decode, encode
from common.transport import configure_socket


class ClientError(Exception):
    """Anything that should end murakkabctl with a one-line message and a non-zero exit."""


class ControllerUnreachable(ClientError):
    pass


class AdminClient:
    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        configure_socket(self.sock, router=False)
        try:
            self.sock.connect(address)
        except zmq.ZMQError as exc:
            self.close()
            raise ClientError(f"bad controller address {address!r}: {exc}") from None
        self._ids = itertools.count(1)

    def call(self, msg: Any, timeout_s: float | None = None) -> Any:
        """Send one request and return its reply; an error reply raises ClientError."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        request_id = next(self._ids)
        if not self.sock.poll(timeout_s * 1000, zmq.POLLOUT):
            raise ControllerUnreachable(self._unreachable(timeout_s))
        self.sock.send(encode(msg, request_id))
        while True:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms <= 0 or not self.sock.poll(remaining_ms, zmq.POLLIN):
                raise ControllerUnreachable(self._unreachable(timeout_s))
            try:
                frame = decode(self.sock.recv())
            except ProtocolError as exc:
                raise ClientError(f"controller at {self.address} sent a bad reply: {exc.message}") from None
            if frame.request_id != request_id:
                continue  # a late reply to an earlier request that timed out
            if isinstance(frame.message, ErrorReply):
                raise ClientError(f"{frame.message.code}: {frame.message.message}")
            return frame.message

    def list_nodes(self, page_size: int = 100) -> list[Any]:
        """Every node, fetched page by page (a thousand nodes do not fit in one frame)."""
        nodes: list[Any] = []
        after: str | None = ""
        while after is not None:
            page = self.call(ListNodes(after=after, limit=page_size))
            nodes += page.nodes
            after = page.next_after
        return nodes

    def _unreachable(self, timeout_s: float) -> str:
        return f"cannot reach the controller at {self.address}: no reply within {timeout_s:g}s"

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.destroy(linger=0)

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
