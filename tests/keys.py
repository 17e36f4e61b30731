"""CurveZMQ keys for tests: a keys directory with node and user keys, and a cluster's env file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.security.curve import ClientCredentials, load_client_credentials
from controller.security.keyring import Keyring, init_keys_dir


@dataclass
class ClusterKeys:
    keys_dir: Path
    server_public: Path
    nodes: dict[str, Path] = field(default_factory=dict)  # node -> secret key file
    users: dict[str, Path] = field(default_factory=dict)  # user -> secret key file

    def user(self, name: str) -> ClientCredentials:
        return load_client_credentials(self.users[name], self.server_public)

    def node(self, name: str) -> ClientCredentials:
        return load_client_credentials(self.nodes[name], self.server_public)

    def add_node(self, name: str) -> Path:
        _, secret = Keyring.load(self.keys_dir).issue(name, "node", "node")
        self.nodes[name] = secret
        return secret

    def add_user(self, name: str, role: str) -> Path:
        _, secret = Keyring.load(self.keys_dir).issue(name, "user", role)
        self.users[name] = secret
        return secret

    def env(self, user: str = "admin") -> dict[str, str]:
        return {"MURAKKAB_KEY": str(self.users[user]), "MURAKKAB_SERVER_KEY": str(self.server_public)}


def make_keys(keys_dir: Path, nodes: list[str] = (), users: dict[str, str] | None = None) -> ClusterKeys:  # type: ignore[assignment]
    """A keys directory as ``murakkabctl keys init`` and ``issue`` make it; users maps name -> role."""
    init_keys_dir(keys_dir)
    keys = ClusterKeys(keys_dir, keys_dir / "controller.key")
    for name in nodes:
        keys.add_node(name)
    for name, role in (users if users is not None else {"admin": "admin"}).items():
        keys.add_user(name, role)
    return keys


def env_file(state_dir: Path) -> dict[str, str]:
    """The variables STATE_DIR/env exports (``murakkabctl cluster up`` writes it)."""
    from controller.cli.cluster import read_env

    return read_env(state_dir)


def curve_dealer(ctx, endpoint: str, identity: bytes | None, credentials: ClientCredentials | None):  # type: ignore[no-untyped-def]
    """A raw DEALER (sync or asyncio context) connected with ``credentials``, or plaintext when None."""
    import zmq

    from common.security.curve import apply_client

    sock = ctx.socket(zmq.DEALER)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    if credentials is not None:
        apply_client(sock, credentials)
    sock.connect(endpoint)
    return sock


@contextlib.contextmanager
def cluster_environment(state_dir: Path) -> Iterator[dict[str, str]]:
    """os.environ with what STATE_DIR/env exports (and unsets), as a shell that sourced it; restored after."""
    wanted = env_file(state_dir)
    names = set(wanted) | {"MURAKKAB_KEY", "MURAKKAB_SERVER_KEY", "MURAKKAB_INSECURE"}
    saved = {name: os.environ.get(name) for name in names}
    for name in names - set(wanted):
        os.environ.pop(name, None)
    os.environ.update(wanted)
    try:
        yield wanted
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
