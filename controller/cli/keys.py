"""``murakkabctl keys``: the controller's key pair and the client keyring (local files, no controller needed).

``init DIR`` makes the controller's key pair and an empty keyring; ``issue`` makes a client
key pair (``--node NAME`` for an agent, ``--user NAME --role ROLE`` for a person or an
application), records its public key and writes the pair for the client; ``list`` shows
the keyring; ``revoke NAME`` (or ``--key PUBLIC`` for one key of a rotation) ends a key.
A running controller re-reads the keyring within a second: issued keys work and revoked
ones are refused and disconnected without a restart.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from controller.cli.client import ClientError
from controller.security.keyring import ROLES, Keyring, KeyringError, init_keys_dir

DEFAULT_KEYS_DIR = "/etc/murakkab/keys"


def add_keys_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="CurveZMQ keys: the controller's pair and the client keyring")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    default_dir = os.environ.get("MURAKKAB_KEYS_DIR", DEFAULT_KEYS_DIR)

    init = keys_sub.add_parser("init", help="make the controller's key pair and an empty keyring in DIR")
    init.add_argument("dir", type=Path)
    init.set_defaults(handler=keys_init)

    issue = keys_sub.add_parser("issue", help="make a client key pair and add its public key to the keyring")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--node", help="an agent's key, bound to this node name")
    who.add_argument("--user", help="a person's or an application's key, with --role")
    issue.add_argument("--role", choices=ROLES, help="what a user key may do on the admin socket")
    issue.add_argument("--dir", type=Path, default=Path(default_dir), help="keys directory (default: "
                       "$MURAKKAB_KEYS_DIR or %(default)s)")
    issue.add_argument("--out", type=Path, default=None, help="where to write the key pair (default: DIR/issued)")
    issue.add_argument("-o", "--output", choices=("text", "json"), default="text")
    issue.set_defaults(handler=keys_issue)

    listing = keys_sub.add_parser("list", help="the keyring: names, kinds, roles, public keys, revocations")
    listing.add_argument("--dir", type=Path, default=Path(default_dir))
    listing.add_argument("-o", "--output", choices=("table", "json"), default="table")
    listing.set_defaults(handler=keys_list)

    revoke = keys_sub.add_parser("revoke", help="revoke every key of NAME (or one, with --key)")
    revoke.add_argument("name")
    revoke.add_argument("--key", default=None, help="only this public key (Z85), e.g. the old one after a rotation")
    revoke.add_argument("--dir", type=Path, default=Path(default_dir))
    revoke.set_defaults(handler=keys_revoke)


def _keyring(directory: Path) -> Keyring:
    try:
        return Keyring.load(directory)
    except KeyringError as exc:
        raise ClientError(str(exc)) from None


def keys_init(args: argparse.Namespace, console: Console) -> int:
    try:
        pair, created = init_keys_dir(args.dir)
    except (KeyringError, OSError) as exc:
        raise ClientError(f"keys init {args.dir}: {exc}") from None
    verb = "created" if created else "kept the existing"
    console.print(f"{verb} controller key pair in {args.dir} (public key {pair.public_z85.decode()}); "
                  f"clients need {args.dir / 'controller.key'}", highlight=False)
    return 0


def keys_issue(args: argparse.Namespace, console: Console) -> int:
    if args.user and not args.role:
        raise ClientError("--user needs --role (one of " + ", ".join(ROLES) + ")")
    if args.node and args.role:
        raise ClientError("--role is for user keys; a node key is bound to its node name")
    keyring = _keyring(args.dir)
    try:
        entry, secret_path = keyring.issue(args.node or args.user, "node" if args.node else "user",
                                           args.role or "node", out_dir=args.out)
    except (KeyringError, OSError) as exc:
        raise ClientError(str(exc)) from None
    if args.output == "json":
        print(json.dumps({"name": entry.name, "kind": entry.kind, "role": entry.role,
                          "public_key": entry.public_key, "secret_key_file": str(secret_path)}, indent=2))
    else:
        console.print(f"issued a {entry.kind} key for {entry.name} (role {entry.role}): {secret_path} "
                      f"(secret, mode 0600; hand it to the client), public key {entry.public_key}", highlight=False)
    return 0


def keys_list(args: argparse.Namespace, console: Console) -> int:
    keyring = _keyring(args.dir)
    if args.output == "json":
        print(json.dumps([{**e.__dict__, "revoked": e.revoked} for e in keyring.entries], indent=2))
        return 0
    table = Table(header_style="bold")
    for column in ("NAME", "KIND", "ROLE", "PUBLIC KEY", "ISSUED", "REVOKED"):
        table.add_column(column)
    for e in keyring.entries:
        table.add_row(e.name, e.kind, e.role, e.public_key, _when(e.created_unix_s),
                      _when(e.revoked_unix_s) if e.revoked_unix_s else "-")
    console.print(table)
    return 0


def keys_revoke(args: argparse.Namespace, console: Console) -> int:
    keyring = _keyring(args.dir)
    try:
        revoked = keyring.revoke(args.name, args.key)
    except (KeyringError, OSError) as exc:
        raise ClientError(str(exc)) from None
    console.print(f"revoked {len(revoked)} key(s) of {args.name}: "
                  + ", ".join(e.public_key for e in revoked)
                  + "; a running controller refuses and disconnects them within a second", highlight=False)
    return 0


def _when(unix_s: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s)) if unix_s else "-"
