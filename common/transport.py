"""ZeroMQ transport: request/reply over ROUTER and DEALER sockets with ids, timeouts and strict decoding.

Both ends of a link can send requests and replies on one socket: the controller
asks agents to act, and agents send the controller heartbeats. Replies are
matched to pending requests by id; requests go to a dispatch table built from
the message registry. A frame that fails to decode is counted, answered with an
``error`` reply when its request id is readable, logged once per peer and
interval, and otherwise dropped: it never reaches a handler or ends the loop.

On a CURVE socket an endpoint has a *gate*: every decoded frame is checked against the
key ZeroMQ authenticated it with (the ``User-Id`` the ZAP handler set) before it is
matched or dispatched, and the caller the gate names is visible to the handler through
:data:`current_caller`.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from common.protocol import MAX_FRAME_BYTES, ErrorReply, Frame, ProtocolError, decode, encode

log = logging.getLogger(__name__)

# pyzmq's constants are enums; plain ints keep the per-message path free of enum arithmetic.
NOBLOCK = int(zmq.NOBLOCK)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)

Handler = Callable[[bytes, Any], Any]  # (peer identity, message) -> reply | awaitable reply | None

# Who sent the request being handled, as the endpoint's gate named it (None without a gate).
current_caller: contextvars.ContextVar[Any] = contextvars.ContextVar("murakkab_current_caller", default=None)


@dataclass(frozen=True)
class Refusal:
    """A gate's answer for a frame it does not let through: sent back as an ``error`` reply."""

    code: str
    message: str


class Gate(Protocol):
    def admit(self, peer: bytes, user_id: str, fd: int, op: str, is_request: bool) -> Any:
        """The caller (anything but a Refusal) when the frame may pass, else a Refusal."""


class RequestTimeout(Exception):
    pass


class PeerUnreachable(Exception):
    """ROUTER_MANDATORY refused the send: no connected peer has that identity."""


class RemoteError(Exception):
    """The peer answered with an explicit error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RateLimitedLog:
    """Logs a given (peer, kind) at most once per interval, counting what it held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self.logger, self.interval_s, self.clock, self.max_keys = logger, interval_s, clock, max_keys
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warning(self, peer: str, kind: str, text: str) -> bool:
        now = self.clock()
        key = (peer, kind)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if len(self._last) >= self.max_keys:  # a flood of distinct peers must not grow memory forever
            self._last.clear()
        suppressed = last[1] if last else 0
        more = f" ({suppressed} similar suppressed)" if suppressed else ""
        self.logger.warning("%s from %s: %s%s", kind, peer, text, more)
        self._last[key] = (now, 0)
        return True


def backoff_delays(base_s: float, cap_s: float, rng: random.Random | None = None) -> Iterator[float]:
    """Capped exponential backoff with full jitter, so restarted fleets do not reconnect in lockstep."""
    rng = rng or random.Random()
    for attempt in itertools.count():
        yield rng.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30))))


ZMTP_HEARTBEAT_IVL_MS = 5000
ZMTP_HEARTBEAT_TIMEOUT_MS = 15000


def configure_socket(sock: zmq.Socket, *, router: bool, handover: bool = True) -> None:
    """Common options; ``handover`` lets a new connection take over a connected peer's identity.

    Under CURVE the agent socket turns handover off, so one authenticated peer cannot steal
    another's identity; ZMTP heartbeats then drop a dead connection (a host that vanished
    without closing it) within ``ZMTP_HEARTBEAT_TIMEOUT_MS``, so its agent can come back.
    """
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES + 1024)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    if router:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1 if handover else 0)
        if not handover:
            sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)
    else:
        sock.setsockopt(zmq.IMMEDIATE, 1)  # do not queue for a peer that is not connected


class RpcEndpoint:
    """One socket that sends requests, serves requests and matches replies by id.

    The socket is a plain (not zmq.asyncio) socket: the endpoint watches ZeroMQ's
    edge-triggered notification descriptor with the event loop's reader and drains
    every queued message per wake-up, which costs a fraction of a future per message.
    """

    POLL_FALLBACK_S = 0.1  # re-check for messages even without a wake-up (edge-trigger races)
    SEND_RETRY_S = 0.01
    BATCH = 256

    def __init__(self, sock: zmq.Socket, *, router: bool, name: str,
                 dispatch: Mapping[str, Handler] | None = None,
                 on_rejected: Callable[[str], None] | None = None,
                 log_interval_s: float = 60.0, coalesce_s: float = 0.0, gate: Gate | None = None) -> None:
        self.sock, self.router, self.name = sock, router, name
        self.gate = gate
        self.coalesce_s = coalesce_s
        self._fd = -1
        self.dispatch = dict(dispatch or {})
        self.on_rejected = on_rejected or (lambda code: None)
        self.rate_log = RateLimitedLog(log, log_interval_s)
        self._ids = itertools.count(1)
        self._pending: dict[tuple[bytes, int], asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reading = False
        self._fallback: asyncio.TimerHandle | None = None
        self.rejected_total = 0

    # --- sending -----------------------------------------------------------------------

    def _send_now(self, peer: bytes, payload: bytes) -> bool:
        """Send without blocking; False when ZeroMQ cannot take it yet (no peer connected, queue full)."""
        try:
            if self.router:
                self.sock.send_multipart([peer, payload], flags=NOBLOCK)
            else:
                self.sock.send(payload, flags=NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerUnreachable(f"no connected peer {_peer_name(peer)!r}") from None
            raise
        finally:
            self._notice_incoming()  # a send can swallow the edge that announced incoming messages
        return True

    async def request(self, msg: Any, *, peer: bytes = b"", timeout_s: float = 5.0) -> Any:
        """Send a request and await its reply; an ``error`` reply raises RemoteError."""
        request_id = next(self._ids)
        key = (peer, request_id)
        payload = encode(msg, request_id)  # before registering: a message that cannot be sent leaves nothing behind
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[key] = future
        # A timer rather than asyncio.wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races with its timeout, and a daemon asked to stop would then keep running.
        expired = RequestTimeout(f"no reply to {msg.op} within {timeout_s:g}s")
        timer = loop.call_at(deadline, lambda: future.done() or future.set_exception(expired))
        try:
            while not self._send_now(peer, payload):  # e.g. the DEALER has no connection yet (IMMEDIATE)
                if future.done():
                    break
                await asyncio.sleep(self.SEND_RETRY_S)
            reply = await future
        finally:
            timer.cancel()
            self._pending.pop(key, None)
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        return reply

    def _reply(self, peer: bytes, request_id: int, msg: Any) -> None:
        try:
            payload = encode(msg, request_id)
        except ProtocolError as exc:  # e.g. a reply larger than a frame may be: say so instead
            log.error("%s: cannot encode %s reply: %s", self.name, msg.op, exc.message)
            payload = encode(ErrorReply("internal", f"reply could not be sent: {exc.message}"), request_id)
        try:
            sent = self._send_now(peer, payload)
        except (PeerUnreachable, zmq.ZMQError) as exc:
            sent, why = False, str(exc)
        else:
            why = "send queue full"
        if not sent:
            self.rate_log.warning(_peer_name(peer), "reply_undeliverable", f"{msg.op}: {why}")

    # --- receiving ---------------------------------------------------------------------

    def _notice_incoming(self) -> None:
        if self._reading and self.sock.getsockopt(EVENTS) & POLLIN:
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        """Handle every queued message; runs as the loop's reader callback, so no task wakes per message."""
        if not self._reading:
            return
        gated = self.gate is not None
        for _ in range(self.BATCH):
            try:
                if gated:  # frames, to read the key ZeroMQ authenticated and the descriptor it came on
                    frames = self.sock.recv_multipart(flags=NOBLOCK, copy=False)
                else:
                    parts = self.sock.recv_multipart(flags=NOBLOCK)
            except zmq.Again:
                return
            if gated:
                last = frames[-1]
                self.handle_parts([f.bytes for f in frames], last.get("User-Id"), last.get(zmq.SRCFD))
            else:
                self.handle_parts(parts)
        asyncio.get_running_loop().call_soon(self._drain)  # a full batch: let others run, then go on

    def _fallback_poll(self) -> None:
        """ZeroMQ's descriptor is edge-triggered; a periodic look closes any window a race left open."""
        if self._reading:
            self._drain()
            self._fallback = asyncio.get_running_loop().call_later(self.POLL_FALLBACK_S, self._fallback_poll)

    def _on_readable(self) -> None:
        """With coalescing, stop watching for ``coalesce_s`` and then handle everything that arrived.

        Not while a request of ours awaits its reply: coalescing is for the heartbeat flood, and
        would otherwise add its delay to every stage invocation.

        Each wake-up costs the controller far more than decoding one heartbeat; at a thousand
        heartbeats a second, a couple of milliseconds of coalescing turns many wake-ups into one.
        """
        if self._pending:  # someone awaits a reply (an invocation, a command): do not delay it
            self._drain()
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._fd)
        loop.call_later(self.coalesce_s, self._coalesced_drain)

    def _coalesced_drain(self) -> None:
        if not self._reading:
            return
        self._drain()
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        self._notice_incoming()

    async def serve(self) -> None:
        """Receive until cancelled; every frame is handled or rejected, none ends the loop."""
        loop = asyncio.get_running_loop()
        self._fd = self.sock.getsockopt(zmq.FD)
        self._reading = True
        loop.add_reader(self._fd, self._on_readable if self.coalesce_s > 0 else self._drain)
        self._fallback = loop.call_later(self.POLL_FALLBACK_S, self._fallback_poll)
        self._drain()
        try:
            await loop.create_future()  # runs until cancelled
        finally:
            self._reading = False
            self._fallback.cancel()
            loop.remove_reader(self._fd)

    def handle_parts(self, parts: list[bytes], user_id: str = "", fd: int = -1) -> None:
        if self.router:
            if len(parts) != 2:
                peer = parts[0] if parts else b""
                self._reject(peer, ProtocolError("malformed_frame", f"expected 1 payload frame, got {max(0, len(parts) - 1)}"))
                return
            peer, payload = parts
        else:
            if len(parts) != 1:
                self._reject(b"", ProtocolError("malformed_frame", f"expected 1 frame, got {len(parts)}"))
                return
            peer, payload = b"", parts[0]
        try:
            frame = decode(payload)
        except ProtocolError as exc:
            self._reject(peer, exc)
            return
        caller = None
        if self.gate is not None:
            caller = self.gate.admit(peer, user_id, fd, frame.spec.op, frame.spec.kind == "request")
            if isinstance(caller, Refusal):
                self.on_rejected(caller.code)
                if frame.spec.kind == "request":
                    self._reply(peer, frame.request_id, ErrorReply(caller.code, caller.message))
                return
        if frame.spec.kind == "reply":
            future = self._pending.get((peer, frame.request_id))
            if future is not None and not future.done():
                future.set_result(frame.message)
            else:  # late (the request timed out) or never asked for: harmless, but worth counting
                self._reject(peer, ProtocolError("unexpected_reply", f"{frame.spec.op} matches no pending request"))
            return
        self._dispatch(peer, frame, caller)

    def _dispatch(self, peer: bytes, frame: Frame, caller: Any = None) -> None:
        handler = self.dispatch.get(frame.spec.op)
        if handler is None:
            self._reject(peer, ProtocolError("unsupported_op", f"{self.name} does not serve {frame.spec.op!r}",
                                             frame.request_id))
            return
        token = current_caller.set(caller) if caller is not None else None
        try:
            try:
                result = handler(peer, frame.message)
            except Exception as exc:  # a handler bug must answer the peer, not kill the daemon
                log.exception("%s: handler for %s failed", self.name, frame.spec.op)
                result = ErrorReply("internal", f"{frame.spec.op} failed: {type(exc).__name__}: {exc}")
            if inspect.isawaitable(result):  # the task copies the context, caller included
                task = asyncio.ensure_future(self._finish(peer, frame, result))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif result is not None:
                self._reply(peer, frame.request_id, result)
        finally:
            if token is not None:
                current_caller.reset(token)

    async def _finish(self, peer: bytes, frame: Frame, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except Exception as exc:
            log.exception("%s: handler for %s failed", self.name, frame.spec.op)
            result = ErrorReply("internal", f"{frame.spec.op} failed: {type(exc).__name__}: {exc}")
        if result is not None:
            self._reply(peer, frame.request_id, result)

    def _reject(self, peer: bytes, exc: ProtocolError) -> None:
        self.rejected_total += 1
        self.on_rejected(exc.code)
        self.rate_log.warning(_peer_name(peer), exc.code, exc.message)
        if exc.request_id is not None:
            self._reply(peer, exc.request_id, ErrorReply(exc.code, exc.message))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self.sock.close(linger=0)


def _peer_name(peer: bytes) -> str:
    text = peer.decode("utf-8", errors="replace")
    return (text[:64] if text.isprintable() else peer[:32].hex()) or "peer"

