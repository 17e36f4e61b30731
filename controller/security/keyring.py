"""The keyring: which client public keys the controller accepts, as whom, and in which role.

A keys directory holds the controller's own certificate (``controller.key``,
``controller.key_secret``), the keyring ``clients.json`` (public keys only) and, under
``issued/``, the key pairs ``murakkabctl keys issue`` made for clients to pick up. Every
change is written atomically; the controller re-reads the keyring when its modification
time changes, so an issued key works and a revoked one stops working without a restart.

A node key is bound to its node name: the controller accepts it only on the agent socket
and only for messages of that node. A user key carries a role and is accepted only on the
admin socket. One name may hold several keys at once (rotation: issue the new one, deploy
it, revoke the old one by its public key).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from common.security.curve import KeyFileError, KeyPair, ServerCredentials, new_key_pair, read_key_file, write_key_files

Kind = Literal["node", "user"]
ROLES = ("admin", "operator", "submitter", "viewer")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
KEYRING_FILE = "clients.json"
SERVER_NAME = "controller"
KEYRING_VERSION = 1


class KeyringError(Exception):
    """A keyring operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class KeyEntry:
    name: str
    kind: Kind
    role: str  # "node" for node keys
    public_key: str  # Z85
    created_unix_s: float
    revoked_unix_s: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_unix_s is not None


def server_credentials(keys_dir: Path) -> ServerCredentials:
    """The controller's key pair; a missing one says how to make it."""
    path = keys_dir / f"{SERVER_NAME}.key_secret"
    try:
        return ServerCredentials(read_key_file(path, what="controller key", need_secret=True))
    except KeyFileError as exc:
        raise KeyringError(f"{exc}; create the keys with 'murakkabctl keys init {keys_dir}', "
                           "or set insecure = true to run without encryption") from None


class Keyring:
    """The entries of ``clients.json``, indexed by public key."""

    def __init__(self, keys_dir: Path, entries: list[KeyEntry] | None = None) -> None:
        self.keys_dir = keys_dir
        self.entries: list[KeyEntry] = list(entries or [])
        self.by_public_key = {e.public_key: e for e in self.entries}

    @property
    def path(self) -> Path:
        return self.keys_dir / KEYRING_FILE

    # --- reading -----------------------------------------------------------------------

    @classmethod
    def load(cls, keys_dir: Path) -> "Keyring":
        path = keys_dir / KEYRING_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyringError(f"no keyring at {path}: create it with 'murakkabctl keys init {keys_dir}'") from None
        except (OSError, ValueError) as exc:
            raise KeyringError(f"keyring {path} cannot be read: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != KEYRING_VERSION or not isinstance(data.get("keys"), list):
            raise KeyringError(f"keyring {path}: expected {{\"version\": {KEYRING_VERSION}, \"keys\": [...]}}")
        entries = []
        for i, item in enumerate(data["keys"]):
            try:
                entry = KeyEntry(**item)
            except TypeError as exc:
                raise KeyringError(f"keyring {path}: entry {i}: {exc}") from None
            if entry.kind not in ("node", "user") or (entry.kind == "user" and entry.role not in ROLES):
                raise KeyringError(f"keyring {path}: entry {i} ({entry.name}): bad kind or role")
            entries.append(entry)
        return cls(keys_dir, entries)

    @staticmethod
    def stamp(keys_dir: Path) -> tuple[int, int] | None:
        """What changes when the keyring file is rewritten (it is replaced, so the inode changes too)."""
        try:
            st = os.stat(keys_dir / KEYRING_FILE)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def lookup(self, public_key_z85: str) -> KeyEntry | None:
        return self.by_public_key.get(public_key_z85)

    def named(self, name: str) -> list[KeyEntry]:
        return [e for e in self.entries if e.name == name]

    # --- changing ----------------------------------------------------------------------

    def save(self) -> None:
        tmp = self.path.with_name(f".{KEYRING_FILE}.tmp")
        text = json.dumps({"version": KEYRING_VERSION, "keys": [asdict(e) for e in self.entries]}, indent=2)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, text.encode("utf-8") + b"\n")
            os.fsync(fd)
            _keep_owner(fd, self.path)
        finally:
            os.close(fd)
        tmp.replace(self.path)
        self.by_public_key = {e.public_key: e for e in self.entries}

    @contextlib.contextmanager
    def _changing(self, save: bool) -> Iterator[None]:
        """Hold the keyring's lock and start from what is on disk, so concurrent issuers (Ansible
        enrolling many agents at once) do not lose each other's keys; save at the end."""
        if not save:
            yield
            return
        with open(self.keys_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.entries = Keyring.load(self.keys_dir).entries
                self.by_public_key = {e.public_key: e for e in self.entries}
            yield
            self.save()

    def issue(self, name: str, kind: Kind, role: str, *, out_dir: Path | None = None,
              save: bool = True) -> tuple[KeyEntry, Path]:
        """Make a key pair for a client, record its public key, and write it for the client to take.

        ``save=False`` leaves writing the keyring to the caller (one ``save()`` after many keys).
        """
        with self._changing(save):
            return self._issue(name, kind, role, out_dir)

    def _issue(self, name: str, kind: Kind, role: str, out_dir: Path | None) -> tuple[KeyEntry, Path]:
        if not NAME_PATTERN.match(name):
            raise KeyringError(f"name {name!r}: use letters, digits, '.', '_' and '-' (a node's name for node keys)")
        if kind == "user" and role not in ROLES:
            raise KeyringError(f"role {role!r}: choose one of {', '.join(ROLES)}")
        other = [e for e in self.named(name) if e.kind != kind and not e.revoked]
        if other:
            raise KeyringError(f"{name!r} already names a {other[0].kind}; names are unique across nodes and users")
        pair = new_key_pair()
        entry = KeyEntry(name, kind, role if kind == "user" else "node", pair.public_z85.decode(), time.time())
        target = out_dir or self.keys_dir / "issued"
        base = f"{name}-{entry.public_key[:8]}" if self.named(name) else name  # a rotation keeps the old files
        _, secret_path = write_key_files(target, _file_safe(base), pair, {"name": name, "kind": kind, "role": entry.role})
        self.entries.append(entry)
        self.by_public_key[entry.public_key] = entry
        return entry, secret_path

    def revoke(self, name: str, public_key: str | None = None) -> list[KeyEntry]:
        """Revoke every live key of ``name`` (or only ``public_key``); return the entries revoked."""
        with self._changing(True):
            return self._revoke(name, public_key)

    def _revoke(self, name: str, public_key: str | None) -> list[KeyEntry]:
        now = time.time()
        revoked: list[KeyEntry] = []
        for i, entry in enumerate(self.entries):
            if entry.name == name and not entry.revoked and public_key in (None, entry.public_key):
                self.entries[i] = replace(entry, revoked_unix_s=now)
                revoked.append(self.entries[i])
        if not revoked:
            which = f" with public key {public_key}" if public_key else ""
            raise KeyringError(f"no live key named {name!r}{which} in {self.path}")
        return revoked


def _keep_owner(fd: int, path: Path) -> None:
    """Give the new keyring the owner of the one it replaces: root running ``keys issue`` must not
    leave the controller's service account unable to read it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if os.geteuid() == 0:
        os.fchown(fd, st.st_uid, st.st_gid)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def init_keys_dir(keys_dir: Path) -> tuple[KeyPair, bool]:
    """Create the controller's key pair and an empty keyring; keep both when they exist.

    Returns the controller's keys and whether they were made now. The directory is 0700: it
    holds the controller's secret key.
    """
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    secret = keys_dir / f"{SERVER_NAME}.key_secret"
    created = not secret.exists()
    if created:
        write_key_files(keys_dir, SERVER_NAME, new_key_pair(), {"name": SERVER_NAME, "kind": "server"})
    if not (keys_dir / KEYRING_FILE).exists():
        Keyring(keys_dir).save()
    return read_key_file(secret, what="controller key", need_secret=True), created
