"""What a socket's monitor says about CurveZMQ handshakes, in words an operator can act on.

Both ends use it: the controller counts and logs refused handshakes per reason, and
clients (murakkabctl, agents) explain why no reply came: the key was refused, the server
key does not match, or one side runs without CURVE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)


def failure_reason(event: int, value: int) -> str | None:
    """A short reason for a failed handshake event, or None for other events."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "key_refused"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "no_curve"  # one side speaks plaintext
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "bad_handshake"  # e.g. the client encrypted to another server key
        return "protocol_error"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return "bad_handshake"
    return None


@dataclass
class ClientHandshakes:
    """A client's view of its connection attempts, read from its socket monitor."""

    connected: int = 0
    succeeded: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def read(self, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            event = parse_monitor_message(monitor.recv_multipart())
            kind, value = int(event["event"]), int(event["value"])
            if kind == zmq.EVENT_CONNECTED:
                self.connected += 1
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded += 1
            else:
                reason = failure_reason(kind, value)
                if reason is not None:
                    self.failures[reason] = self.failures.get(reason, 0) + 1

    def explain(self, *, key_source: str, server_key_source: str, secure: bool) -> str | None:
        """Why the handshake failed, naming the key to check; None when nothing failed."""
        if "key_refused" in self.failures:
            return (f"the controller refused the client key {key_source}: it is not in the controller's keyring, "
                    "was revoked, or is a node key used on the admin socket")
        if "no_curve" in self.failures:
            return ("the controller does not use CURVE (insecure = true); connect with --insecure" if secure else
                    "the controller requires CURVE: pass --key FILE and --server-key FILE "
                    "(or set MURAKKAB_KEY and MURAKKAB_SERVER_KEY)")
        if self.failures:
            return (f"the CURVE handshake failed: {server_key_source} is not the public key of the controller "
                    "at this address")
        return None
