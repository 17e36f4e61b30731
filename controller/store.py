"""Durable controller state in SQLite: the controller epoch and each node's admin state.

Only facts an operator would be upset to lose live here (drains with their
reasons, labels, last known generation); live telemetry stays in memory.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from controller.registry import DurableNode

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    generation INTEGER NOT NULL,
    admin_state TEXT NOT NULL CHECK (admin_state IN ('active', 'draining', 'drained')),
    drain_reason TEXT,
    labels_json TEXT NOT NULL,
    updated_at_unix_s REAL NOT NULL
);
"""


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """An explicit transaction: the controller's connection is in autocommit mode, where ``with db:`` begins none."""
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def next_epoch(self) -> int:
        """Bump and return the controller epoch; commands from older epochs are then stale."""
        with self.db:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            epoch = int(row[0]) + 1 if row else 1
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (str(epoch),))
        return epoch

    def save_node(self, node: DurableNode) -> None:
        self.db.execute(
            "INSERT INTO nodes (name, hostname, generation, admin_state, drain_reason, labels_json, updated_at_unix_s)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET hostname = excluded.hostname,"
            " generation = excluded.generation, admin_state = excluded.admin_state,"
            " drain_reason = excluded.drain_reason, labels_json = excluded.labels_json,"
            " updated_at_unix_s = excluded.updated_at_unix_s",
            (node.name, node.hostname, node.generation, node.admin_state, node.drain_reason,
             json.dumps(node.labels, sort_keys=True), time.time()),
        )

    def load_nodes(self) -> list[DurableNode]:
        rows = self.db.execute(
            "SELECT name, hostname, generation, admin_state, drain_reason, labels_json FROM nodes ORDER BY name"
        ).fetchall()
        return [DurableNode(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def close(self) -> None:
        self.db.close()
