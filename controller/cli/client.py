"""A blocking admin client for murakkabctl: one DEALER, one request at a time, bounded waits.

With credentials the socket is a CurveZMQ client of the controller; when no reply comes, the
socket monitor tells whether the key was refused, the server key is wrong, or one side runs
without CURVE, and the error says which.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path
from typing import Any, Literal

import zmq

from common.protocol import ErrorReply, ListNodes, ProtocolError, decode, encode
from common.security.curve import ClientCredentials, KeyFileError, apply_client, load_client_credentials
from common.security.handshakes import HANDSHAKE_EVENTS, ClientHandshakes
from common.transport import configure_socket


class ClientError(Exception):
    """Anything that should end murakkabctl with a one-line message and a non-zero exit."""


class ControllerUnreachable(ClientError):
    pass


class AdminClient:
    """``credentials`` None means plaintext, for a controller with ``insecure = true``; the default
    reads the key files ``$MURAKKAB_KEY`` and ``$MURAKKAB_SERVER_KEY`` name, as murakkabctl does
    (plaintext when neither is set).

    ``key_source`` and ``server_key_source`` name where the keys came from, for error messages.
    """

    def __init__(self, address: str, timeout_s: float = 5.0,
                 credentials: ClientCredentials | None | Literal["environment"] = "environment", *,
                 key_source: str = "(the client key)", server_key_source: str = "(the server key)") -> None:
        if credentials == "environment":
            credentials, key_source, server_key_source = credentials_from_environment()
        self.address = address
        self.timeout_s = timeout_s
        self.credentials = credentials
        self.key_source, self.server_key_source = key_source, server_key_source
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        configure_socket(self.sock, router=False)
        if credentials is not None:
            apply_client(self.sock, credentials)
        self.monitor = self.sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self.handshakes = ClientHandshakes()
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
        self.handshakes.read(self.monitor)
        why = self.handshakes.explain(key_source=self.key_source, server_key_source=self.server_key_source,
                                      secure=self.credentials is not None)
        if why is not None:
            return f"no reply from the controller at {self.address} within {timeout_s:g}s: {why}"
        return f"cannot reach the controller at {self.address}: no reply within {timeout_s:g}s"

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.destroy(linger=0)

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", type=Path, default=os.environ.get("MURAKKAB_KEY") or None,
                        help="this user's CurveZMQ secret key file (default: $MURAKKAB_KEY)")
    parser.add_argument("--server-key", type=Path, default=os.environ.get("MURAKKAB_SERVER_KEY") or None,
                        help="the controller's public key file (default: $MURAKKAB_SERVER_KEY)")
    parser.add_argument("--insecure", action="store_true", default=os.environ.get("MURAKKAB_INSECURE") == "1",
                        help="plaintext, for a controller with insecure = true (default: $MURAKKAB_INSECURE=1)")


def _source(flag: str, env: str, value: Path | None) -> str:
    """Where a key file came from: the environment variable or the option."""
    return env if value is not None and os.environ.get(env) == str(value) else flag


def credentials_from_args(args: argparse.Namespace) -> tuple[ClientCredentials | None, str, str]:
    """The client's credentials from --key/--server-key or the environment, and where each came from.

    No key and no --insecure is an error at once (rather than a plaintext attempt that would
    send the request unencrypted and time out).
    """
    key_what = _source("--key", "MURAKKAB_KEY", args.key)
    server_what = _source("--server-key", "MURAKKAB_SERVER_KEY", args.server_key)
    key_source, server_source = f"{key_what} {args.key}", f"{server_what} {args.server_key}"
    if args.insecure:
        return None, key_source, server_source
    missing = [name for name, value in (("--key FILE (or $MURAKKAB_KEY)", args.key),
                                        ("--server-key FILE (or $MURAKKAB_SERVER_KEY)", args.server_key)) if not value]
    if missing:
        raise ClientError(f"no {' and no '.join(missing)}: the controller's sockets use CURVE "
                          "(source STATE_DIR/env of a local cluster, or pass --insecure for insecure = true)")
    try:
        creds = load_client_credentials(args.key, args.server_key, key_what=key_what, server_what=server_what)
    except KeyFileError as exc:
        raise ClientError(str(exc)) from None
    return creds, key_source, server_source


def credentials_from_environment() -> tuple[ClientCredentials | None, str, str]:
    key, server = os.environ.get("MURAKKAB_KEY"), os.environ.get("MURAKKAB_SERVER_KEY")
    if not key and not server:
        return None, "MURAKKAB_KEY (unset)", "MURAKKAB_SERVER_KEY (unset)"
    args = argparse.Namespace(key=Path(key) if key else None, server_key=Path(server) if server else None,
                              insecure=False)
    return credentials_from_args(args)


def client_from_args(args: argparse.Namespace, timeout_s: float | None = None) -> AdminClient:
    credentials, key_source, server_source = credentials_from_args(args)
    return AdminClient(args.controller, args.timeout if timeout_s is None else timeout_s, credentials,
                       key_source=key_source, server_key_source=server_source)
