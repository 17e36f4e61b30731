"""Durable profiles in SQLite: profile runs with their terminal state, and the samples they took.

Shares the controller's connection (autocommit, WAL). A sample is stored as its JSON (the
same form as tests/data/profiles/*.jsonl) next to indexed provenance columns, so predictors
are refit from the stored samples at start-up and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from controller.store import transaction
from policies.profiles import ProfileError, ProfileSample

TERMINAL_RUN_STATES = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS profile_runs (
    run_id TEXT PRIMARY KEY, executor TEXT NOT NULL, node TEXT NOT NULL, device_index INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('starting', 'running', 'stopping', 'succeeded', 'failed', 'cancelled')),
    done_points INTEGER NOT NULL, total_points INTEGER NOT NULL, message TEXT NOT NULL DEFAULT '',
    sweep_json TEXT NOT NULL, started_at_unix_s REAL NOT NULL, ended_at_unix_s REAL);
CREATE TABLE IF NOT EXISTS profile_samples (
    sample_id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, executor TEXT NOT NULL,
    hardware TEXT NOT NULL, device_model TEXT NOT NULL, backend TEXT NOT NULL, node TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('measured', 'modeled')), taken_at_unix_s REAL NOT NULL,
    sample_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS profile_samples_by_executor ON profile_samples (executor, hardware);
CREATE INDEX IF NOT EXISTS profile_samples_by_run ON profile_samples (run_id);
"""


@dataclass(frozen=True)
class StoredRun:
    run_id: str
    executor: str
    node: str
    device_index: int
    state: str
    done_points: int
    total_points: int
    message: str
    sweep: dict[str, Any]
    started_at_unix_s: float
    ended_at_unix_s: float | None


_RUN_COLUMNS = ("run_id, executor, node, device_index, state, done_points, total_points, message, sweep_json,"
                " started_at_unix_s, ended_at_unix_s")


class ProfileStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)

    # --- runs ------------------------------------------------------------------------------

    def insert_run(self, run: StoredRun) -> None:
        self.db.execute(f"INSERT INTO profile_runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (run.run_id, run.executor, run.node, run.device_index, run.state, run.done_points,
                         run.total_points, run.message, json.dumps(run.sweep, sort_keys=True), run.started_at_unix_s,
                         run.ended_at_unix_s))

    def update_run(self, run_id: str, *, state: str | None = None, done_points: int | None = None,
                   message: str | None = None, ended_at_unix_s: float | None = None) -> None:
        sets, values = [], []
        for column, value in (("state", state), ("done_points", done_points), ("message", message),
                              ("ended_at_unix_s", ended_at_unix_s)):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)
        if sets:
            self.db.execute(f"UPDATE profile_runs SET {', '.join(sets)} WHERE run_id = ?", (*values, run_id))

    def get_run(self, run_id: str) -> StoredRun | None:
        row = self.db.execute(f"SELECT {_RUN_COLUMNS} FROM profile_runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else _run(row)

    def unfinished_runs(self) -> list[StoredRun]:
        marks = ", ".join("?" * len(TERMINAL_RUN_STATES))
        rows = self.db.execute(f"SELECT {_RUN_COLUMNS} FROM profile_runs WHERE state NOT IN ({marks})"
                               " ORDER BY started_at_unix_s", TERMINAL_RUN_STATES).fetchall()
        return [_run(r) for r in rows]

    # --- samples ---------------------------------------------------------------------------

    def add_samples(self, samples: list[ProfileSample]) -> None:
        with transaction(self.db):
            self.db.executemany(
                "INSERT INTO profile_samples (run_id, executor, hardware, device_model, backend, node, source,"
                " taken_at_unix_s, sample_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(s.run_id, s.executor, s.hardware, s.device_model, s.backend, s.node, s.source, s.taken_at_unix_s,
                  s.to_json()) for s in samples])

    def samples(self, executor: str = "", hardware: str = "", run_id: str = "", source: str = "",
                limit: int | None = None) -> list[ProfileSample]:
        """Stored samples, oldest first, filtered by any of the given fields; unreadable rows are skipped."""
        where, values = [], []
        for column, value in (("executor", executor), ("hardware", hardware), ("run_id", run_id),
                              ("source", source)):
            if value:
                where.append(f"{column} = ?")
                values.append(value)
        sql = "SELECT sample_json FROM profile_samples"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY sample_id"
        if limit is not None:
            sql += " LIMIT ?"
            values.append(limit)
        out = []
        for (text,) in self.db.execute(sql, values).fetchall():
            try:
                out.append(ProfileSample.from_json(text))
            except ProfileError:
                continue  # a row written by a newer or broken version: never fatal for the controller
        return out

    def count_samples(self, executor: str = "", hardware: str = "", run_id: str = "") -> int:
        where, values = [], []
        for column, value in (("executor", executor), ("hardware", hardware), ("run_id", run_id)):
            if value:
                where.append(f"{column} = ?")
                values.append(value)
        sql = "SELECT COUNT(*) FROM profile_samples" + (" WHERE " + " AND ".join(where) if where else "")
        return int(self.db.execute(sql, values).fetchone()[0])


def _run(row: tuple[Any, ...]) -> StoredRun:
    return StoredRun(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], json.loads(row[8]), row[9],
                     row[10])
