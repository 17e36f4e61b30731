"""Who may talk to the controller: the ZAP handler, per-message checks and revocation.

CurveZMQ encrypts both controller sockets; the ZAP handler (pyzmq's ``zmq.auth``
authenticator driven from the event loop, one per context) accepts a handshake only from a
key in the keyring that is live and of the right kind for the socket (node keys on the agent
socket, user keys on the admin socket). ZeroMQ then stamps every message with the key (``User-Id``), and the
socket's :class:`EndpointGate` checks each one: a node key speaks only as its own node, a
user key only within its role. The agent socket runs without ``ROUTER_HANDOVER`` under
CURVE, so a connection cannot take over the identity of a node that is connected.

Revocation: the keyring file is re-read when it changes; messages under a revoked key are
refused at once, and every connection that used it is shut down (the descriptor ZeroMQ
read the message from is remembered per key), so the peer must handshake again and is
refused. Every refusal is counted in ``murakkab_auth_refused_total{endpoint,reason}`` and
logged once per peer and reason per interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.base import Authenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from common.security.handshakes import failure_reason
from common.transport import RateLimitedLog, Refusal
from controller.security.keyring import KeyEntry, Keyring, KeyringError
from controller.security.roles import refusal as role_refusal

log = logging.getLogger("murakkab.controller.auth")

AGENTS, ADMIN = "agents", "admin"
KIND_FOR_ENDPOINT = {AGENTS: "node", ADMIN: "user"}
MONITOR_POLL_S = 0.25
DISCONNECT_DELAY_S = 0.2  # a refused peer gets its error reply before its connection is cut
ZAP_VERSION = b"1.0"


@dataclass(frozen=True)
class Caller:
    """Who sent the request a handler is serving (``insecure`` callers may do everything)."""

    name: str
    role: str
    kind: str = "user"

    @property
    def sees_all_jobs(self) -> bool:
        return self.role in ("admin", "operator", "viewer")


INSECURE_CALLER = Caller("", "admin", "insecure")


class ControlPlaneAuth:
    """The keyring, the ZAP handler and the gates of both controller sockets."""

    def __init__(self, keys_dir: Path, on_refused: Callable[[str, str], None],
                 log_interval_s: float = 60.0) -> None:
        self.keys_dir = keys_dir
        self.keyring = Keyring.load(keys_dir)
        self._stamp = Keyring.stamp(keys_dir)
        self.on_refused = on_refused
        self.rate_log = RateLimitedLog(log, log_interval_s)
        self._connections: dict[int, tuple[str, Any]] = {}  # descriptor -> (public key, peer address)
        self._authenticator: _ZapHandler | None = None
        self._monitors: list[tuple[zmq.Socket, zmq.Socket, str]] = []
        self.gates = {AGENTS: EndpointGate(self, AGENTS), ADMIN: EndpointGate(self, ADMIN)}

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, ctx: zmq.Context) -> None:
        self._authenticator = _ZapHandler(ctx, self)
        self._authenticator.start()

    def watch_handshakes(self, sock: zmq.Socket, endpoint: str) -> None:
        """Count handshakes that fail before ZAP is asked (plaintext clients, wrong server keys)."""
        events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        self._monitors.append((sock, sock.get_monitor_socket(events), endpoint))

    async def run(self) -> None:
        """Read the monitors and notice keyring changes until cancelled."""
        while True:
            await asyncio.sleep(MONITOR_POLL_S)
            self.read_monitors()
            self.reload_if_changed()
            if self._authenticator is not None:  # a reply sent can swallow the edge of the next request
                self._authenticator.drain()

    def read_monitors(self) -> None:
        for _, monitor, endpoint in self._monitors:
            while monitor.poll(0):
                event = parse_monitor_message(monitor.recv_multipart())
                reason = failure_reason(int(event["event"]), int(event["value"]))
                if reason is not None:
                    self.refused(endpoint, reason, endpoint, "handshake failed (a client without CURVE, or one "
                                                            "that encrypts to another server key)")

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        for sock, monitor, _ in self._monitors:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)
        self._monitors.clear()

    # --- keyring -----------------------------------------------------------------------

    def reload_if_changed(self) -> bool:
        stamp = Keyring.stamp(self.keys_dir)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keyring = Keyring.load(self.keys_dir)
        except KeyringError as exc:  # keep the last good keyring rather than lock everyone out
            log.error("keyring not reloaded, keeping the previous one: %s", exc)
            return False
        gone = {k for k, e in self.keyring.by_public_key.items() if not e.revoked} - {
            k for k, e in keyring.by_public_key.items() if not e.revoked}
        self.keyring = keyring
        log.info("keyring reloaded: %d live keys (%d revoked or removed now)",
                 sum(not e.revoked for e in keyring.entries), len(gone))
        for public_key in gone:
            self.disconnect(public_key)
        return True

    def live_entry(self, public_key: str) -> tuple[KeyEntry | None, str]:
        entry = self.keyring.lookup(public_key)
        if entry is None:
            return None, "unknown_key"
        if entry.revoked:
            return None, "revoked"
        return entry, ""

    # --- connections -------------------------------------------------------------------

    def note_connection(self, fd: int, public_key: str) -> None:
        known = self._connections.get(fd)
        if known is None or known[0] != public_key:
            self._connections[fd] = (public_key, _peer_address(fd))

    def disconnect(self, public_key: str) -> int:
        """Shut down every connection that carried ``public_key`` (a revoked key); return how many."""
        closed = 0
        for fd, (key, address) in list(self._connections.items()):
            if key == public_key:
                del self._connections[fd]
                closed += _shutdown(fd, address)
        if closed:
            log.warning("disconnected %d connection(s) of key %s", closed, public_key[:8])
        return closed

    def disconnect_later(self, fd: int) -> None:
        """Shut down one connection shortly, after the error reply that says why has gone out."""
        address = _peer_address(fd)
        self._connections.pop(fd, None)
        if address is not None:
            asyncio.get_running_loop().call_later(DISCONNECT_DELAY_S, _shutdown, fd, address)

    def refused(self, endpoint: str, reason: str, peer: str, text: str) -> None:
        self.on_refused(endpoint, reason)
        self.rate_log.warning(peer, f"auth refused on {endpoint} ({reason})", text)


class EndpointGate:
    """The per-message check on one controller socket (see :class:`common.transport.RpcEndpoint`)."""

    def __init__(self, auth: ControlPlaneAuth, endpoint: str) -> None:
        self.auth, self.endpoint = auth, endpoint
        self.kind = KIND_FOR_ENDPOINT[endpoint]

    def admit(self, peer: bytes, user_id: str, fd: int, op: str, is_request: bool) -> Caller | Refusal:
        auth = self.auth
        entry, reason = auth.live_entry(user_id)
        who = f"key {user_id[:8]}"
        if entry is None:  # revoked (or removed) while connected
            auth.disconnect_later(fd)
            auth.refused(self.endpoint, reason, who, f"{op} under a {reason.replace('_', ' ')}")
            return Refusal("unauthenticated", f"this key is {reason.replace('_', ' ')}")
        auth.note_connection(fd, user_id)
        if entry.kind != self.kind:  # ZAP already refuses these; a keyring edit may have changed the kind
            auth.refused(self.endpoint, "wrong_kind", who, f"a {entry.kind} key on the {self.endpoint} socket")
            return Refusal("forbidden", f"a {entry.kind} key cannot use the {self.endpoint} socket")
        if self.kind == "node":
            if peer != entry.name.encode():
                auth.refused(self.endpoint, "identity_mismatch", who,
                             f"key of node {entry.name!r} used socket identity {peer[:64]!r}")
                auth.disconnect_later(fd)
                return Refusal("identity_mismatch", f"this key belongs to node {entry.name!r}")
            return Caller(entry.name, "node", "node")
        if is_request:
            problem = role_refusal(entry.role, op)
            if problem is not None:
                auth.refused(self.endpoint, "forbidden", f"user {entry.name}", problem)
                return Refusal("forbidden", problem)
        return Caller(entry.name, entry.role)


class _ZapHandler(Authenticator):
    """Answers ZAP requests from the keyring: a live key of the kind the socket's domain expects.

    pyzmq's authenticator binds the ZAP socket; the requests are read from the event loop's
    reader callback (as the RPC endpoints read theirs), and the reader is removed before the
    socket closes, so a controller restarted in the same process finds no stale watcher.
    """

    def __init__(self, ctx: zmq.Context, auth: ControlPlaneAuth) -> None:
        super().__init__(ctx, log=logging.getLogger("murakkab.controller.zap"))
        self.auth = auth
        self._fd = -1

    def start(self) -> None:
        super().start()
        self._fd = self.zap_socket.getsockopt(zmq.FD)
        asyncio.get_running_loop().add_reader(self._fd, self.drain)

    def stop(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = -1
        super().stop()

    def drain(self) -> None:
        """Answer every queued request (the descriptor is edge-triggered: read until none is left)."""
        while self.zap_socket is not None:
            try:
                msg = self.zap_socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.answer(msg)

    def answer(self, msg: list[bytes]) -> None:
        if len(msg) < 6 or msg[0] != ZAP_VERSION:
            if len(msg) >= 2:
                self._send_zap_reply(msg[1], b"400", b"malformed ZAP request")
            return
        _, request_id, domain_b, address_b, _, mechanism = msg[:6]
        domain, address = domain_b.decode(errors="replace"), address_b.decode(errors="replace")
        if mechanism != b"CURVE" or len(msg) != 7 or domain not in KIND_FOR_ENDPOINT:
            self.auth.refused(domain or "?", "no_curve", address, f"mechanism {mechanism!r} on domain {domain!r}")
            self._send_zap_reply(request_id, b"400", b"CURVE required")
            return
        public_key = z85.encode(msg[6]).decode()
        entry, reason = self.auth.live_entry(public_key)
        if entry is not None and entry.kind != KIND_FOR_ENDPOINT[domain]:
            entry, reason = None, "wrong_kind"
        if entry is None:
            self.auth.refused(domain, reason, f"{address} key {public_key[:8]}",
                              f"handshake refused: {reason.replace('_', ' ')}")
            self._send_zap_reply(request_id, b"400", reason.encode())
            return
        self._send_zap_reply(request_id, b"200", b"OK", public_key)


def _peer_address(fd: int) -> Any:
    """The remote address of a TCP descriptor ZeroMQ holds, or None (closed, not a socket)."""
    if fd < 0:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as conn:
            return conn.getpeername()
    except OSError:
        return None


def _shutdown(fd: int, address: Any) -> int:
    """Shut down the TCP connection on ``fd`` if it still goes to ``address`` (descriptors are reused).

    ZeroMQ owns the descriptor; shutting the connection down (not closing the descriptor) makes
    its I/O thread see the peer gone and clean up as for any disconnect.
    """
    if address is None or _peer_address(fd) != address:
        return 0
    try:
        with socket.socket(fileno=os.dup(fd)) as conn:
            conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        return 0
    return 1
