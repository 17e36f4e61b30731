"""Durable workload state in SQLite: catalog and workflow versions, jobs, invocations, stage outputs.

Everything a user submitted is written before it is acknowledged, and every job's
terminal state is written when it ends, so a controller restart loses nothing: jobs
that were queued or running are resumed from their stored stage outputs.
Values with bytes in them (inputs, outputs) are stored as msgpack, never pickle.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from controller.store import transaction

TERMINAL_STATES = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS executors (
    name TEXT NOT NULL, version INTEGER NOT NULL, spec_json TEXT NOT NULL, source TEXT NOT NULL,
    applied_at_unix_s REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS workflows (
    name TEXT NOT NULL, version INTEGER NOT NULL, yaml_text TEXT NOT NULL, spec_json TEXT NOT NULL,
    source TEXT NOT NULL, applied_at_unix_s REAL NOT NULL, deleted_at_unix_s REAL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, workflow TEXT NOT NULL,
    workflow_version INTEGER NOT NULL, spec_json TEXT NOT NULL, slo_json TEXT NOT NULL,
    choices_json TEXT NOT NULL, inputs BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    reason TEXT NOT NULL DEFAULT '', outputs BLOB, submitted_at_unix_s REAL NOT NULL,
    started_at_unix_s REAL, ended_at_unix_s REAL, owner TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_submitted ON jobs (submitted_at_unix_s);
CREATE TABLE IF NOT EXISTS stage_outputs (
    job_id TEXT NOT NULL, stage TEXT NOT NULL, outputs BLOB NOT NULL, PRIMARY KEY (job_id, stage));
CREATE TABLE IF NOT EXISTS invocations (
    invocation_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, stage TEXT NOT NULL, item INTEGER,
    attempt INTEGER NOT NULL, executor TEXT NOT NULL, knobs_json TEXT NOT NULL, node TEXT, component_id TEXT,
    devices_json TEXT NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL DEFAULT '',
    started_at_unix_s REAL, ended_at_unix_s REAL, latency_s REAL, energy_j REAL, simulated INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS invocations_by_job ON invocations (job_id);
"""


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(blob: bytes | None) -> Any:
    return None if blob is None else msgpack.unpackb(blob, raw=False, strict_map_key=False)


@dataclass(frozen=True)
class StoredWorkflow:
    name: str
    version: int
    yaml_text: str
    spec: dict[str, Any]
    source: str
    applied_at_unix_s: float


@dataclass(frozen=True)
class StoredJob:
    job_id: str
    workflow: str
    workflow_version: int
    spec: dict[str, Any]
    slo: dict[str, str]
    choices: dict[str, dict[str, Any]]
    inputs: dict[str, Any]
    state: str
    reason: str
    outputs: dict[str, Any] | None
    submitted_at_unix_s: float
    started_at_unix_s: float | None
    ended_at_unix_s: float | None
    owner: str = ""  # the user key that submitted it ('' without authentication)


@dataclass(frozen=True)
class InvocationRow:
    invocation_id: str
    job_id: str
    stage: str
    item: int | None
    attempt: int
    executor: str
    knobs: dict[str, Any]
    node: str | None
    component_id: str | None
    device_indexes: tuple[int, ...]
    state: str
    error: str
    started_at_unix_s: float | None
    ended_at_unix_s: float | None
    latency_s: float | None
    energy_j: float | None
    simulated: bool


_JOB_COLUMNS = ("job_id, workflow, workflow_version, spec_json, slo_json, choices_json, inputs, state, reason, outputs,"
                " submitted_at_unix_s, started_at_unix_s, ended_at_unix_s, owner")
_INVOCATION_COLUMNS = ("invocation_id, job_id, stage, item, attempt, executor, knobs_json, node, component_id,"
                       " devices_json, state, error, started_at_unix_s, ended_at_unix_s, latency_s, energy_j, simulated")


class WorkloadStore:
    """Shares the controller's SQLite connection (autocommit, WAL); multi-row writes use transactions."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:  # a database from before job owners: its jobs belong to no one
            self.db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")

    def fail_running_invocations(self, reason: str) -> int:
        """After a restart nothing is running any more: close the rows that say otherwise."""
        cursor = self.db.execute("UPDATE invocations SET state = 'failed', error = ?, ended_at_unix_s = ?"
                                 " WHERE state = 'running'", (reason, time.time()))
        return cursor.rowcount

    # --- catalog -------------------------------------------------------------------------

    def save_executors(self, executors: list[tuple[str, dict[str, Any]]], source: str) -> int:
        """Store one catalog apply as a new version; returns the version number."""
        with transaction(self.db):
            row = self.db.execute("SELECT COALESCE(MAX(version), 0) FROM executors").fetchone()
            version = int(row[0]) + 1
            now = time.time()
            self.db.executemany(
                "INSERT INTO executors (name, version, spec_json, source, applied_at_unix_s) VALUES (?, ?, ?, ?, ?)",
                [(name, version, json.dumps(spec, sort_keys=True), source, now) for name, spec in executors])
        return version

    def load_executors(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """The newest version of every executor: name -> (version, spec as data)."""
        rows = self.db.execute(
            "SELECT e.name, e.version, e.spec_json FROM executors e JOIN (SELECT name, MAX(version) AS v"
            " FROM executors GROUP BY name) latest ON e.name = latest.name AND e.version = latest.v").fetchall()
        return {name: (version, json.loads(spec)) for name, version, spec in rows}

    # --- workflows -----------------------------------------------------------------------

    def latest_workflow(self, name: str, include_deleted: bool = False) -> StoredWorkflow | None:
        row = self.db.execute(
            "SELECT name, version, yaml_text, spec_json, source, applied_at_unix_s, deleted_at_unix_s FROM workflows"
            " WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        if row is None or (row[6] is not None and not include_deleted):
            return None
        return StoredWorkflow(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

    def save_workflow(self, name: str, yaml_text: str, spec: dict[str, Any], source: str) -> tuple[int, bool]:
        """Store a new version unless the spec is unchanged; returns (version, unchanged)."""
        with transaction(self.db):
            latest = self.latest_workflow(name, include_deleted=True)
            current = self.latest_workflow(name)
            if current is not None and current.spec == spec:
                return current.version, True
            version = (latest.version if latest else 0) + 1
            self.db.execute(
                "INSERT INTO workflows (name, version, yaml_text, spec_json, source, applied_at_unix_s)"
                " VALUES (?, ?, ?, ?, ?, ?)", (name, version, yaml_text, json.dumps(spec, sort_keys=True), source,
                                               time.time()))
        return version, False

    def delete_workflow(self, name: str) -> int:
        """Mark every version deleted; returns how many versions there were (0: no such workflow)."""
        with transaction(self.db):
            count = self.db.execute("SELECT COUNT(*) FROM workflows WHERE name = ? AND deleted_at_unix_s IS NULL",
                                    (name,)).fetchone()[0]
            self.db.execute("UPDATE workflows SET deleted_at_unix_s = ? WHERE name = ? AND deleted_at_unix_s IS NULL",
                            (time.time(), name))
        return int(count)

    def load_workflows(self) -> list[StoredWorkflow]:
        names = [r[0] for r in self.db.execute("SELECT DISTINCT name FROM workflows ORDER BY name")]
        return [w for w in (self.latest_workflow(n) for n in names) if w is not None]

    # --- jobs ----------------------------------------------------------------------------

    def job_for_key(self, idempotency_key: str) -> str | None:
        row = self.db.execute("SELECT job_id FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return row[0] if row else None

    def insert_job(self, job: StoredJob, idempotency_key: str) -> None:
        self.db.execute(
            f"INSERT INTO jobs ({_JOB_COLUMNS}, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.job_id, job.workflow, job.workflow_version, json.dumps(job.spec, sort_keys=True), json.dumps(job.slo),
             json.dumps(job.choices, sort_keys=True), pack(job.inputs), job.state, job.reason,
             None if job.outputs is None else pack(job.outputs), job.submitted_at_unix_s, job.started_at_unix_s,
             job.ended_at_unix_s, job.owner, idempotency_key or None))

    def mark_started(self, job_id: str, now_unix_s: float) -> None:
        self.db.execute("UPDATE jobs SET state = 'running', started_at_unix_s = COALESCE(started_at_unix_s, ?)"
                        " WHERE job_id = ? AND state IN ('queued', 'running')", (now_unix_s, job_id))

    def finish_job(self, job_id: str, state: str, reason: str, outputs: dict[str, Any] | None,
                   now_unix_s: float) -> None:
        assert state in TERMINAL_STATES, state
        with transaction(self.db):
            self.db.execute("UPDATE jobs SET state = ?, reason = ?, outputs = ?, ended_at_unix_s = ? WHERE job_id = ?",
                            (state, reason, None if outputs is None else pack(outputs), now_unix_s, job_id))
            self.db.execute("DELETE FROM stage_outputs WHERE job_id = ?", (job_id,))

    def get_job(self, job_id: str) -> StoredJob | None:
        row = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def unfinished_jobs(self) -> list[StoredJob]:
        rows = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'running')"
                               " ORDER BY submitted_at_unix_s").fetchall()
        return [_job(r) for r in rows]

    def list_jobs(self, limit: int, state: str = "", workflow: str = "",
                  owner: str | None = None) -> list[tuple[StoredJob, float | None]]:
        """Newest first, with the total energy of each job's invocations (None when none was measured)."""
        where, args = [], []
        if owner is not None:
            where.append("j.owner = ?")
            args.append(owner)
        if state:
            where.append("j.state = ?")
            args.append(state)
        if workflow:
            where.append("j.workflow = ?")
            args.append(workflow)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        columns = ", ".join(f"j.{c.strip()}" for c in _JOB_COLUMNS.split(","))
        rows = self.db.execute(
            f"SELECT {columns}, (SELECT SUM(energy_j) FROM invocations i WHERE i.job_id = j.job_id)"
            f" FROM jobs j {clause} ORDER BY j.submitted_at_unix_s DESC LIMIT ?", (*args, limit)).fetchall()
        return [(_job(r[:-1]), r[-1]) for r in rows]

    def save_stage_outputs(self, job_id: str, stage: str, outputs: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO stage_outputs (job_id, stage, outputs) VALUES (?, ?, ?)",
                        (job_id, stage, pack(outputs)))

    def stage_outputs(self, job_id: str) -> dict[str, dict[str, Any]]:
        rows = self.db.execute("SELECT stage, outputs FROM stage_outputs WHERE job_id = ?", (job_id,)).fetchall()
        return {stage: unpack(blob) for stage, blob in rows}

    # --- invocations ---------------------------------------------------------------------

    def save_invocation(self, row: InvocationRow) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO invocations ({_INVOCATION_COLUMNS}) VALUES"
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.invocation_id, row.job_id, row.stage, row.item, row.attempt, row.executor,
             json.dumps(row.knobs, sort_keys=True), row.node, row.component_id, json.dumps(list(row.device_indexes)),
             row.state, row.error, row.started_at_unix_s, row.ended_at_unix_s, row.latency_s, row.energy_j,
             int(row.simulated)))

    def invocations(self, job_id: str) -> list[InvocationRow]:
        rows = self.db.execute(f"SELECT {_INVOCATION_COLUMNS} FROM invocations WHERE job_id = ?"
                               " ORDER BY COALESCE(started_at_unix_s, 1e18), stage, item, attempt", (job_id,)).fetchall()
        return [InvocationRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8],
                              tuple(json.loads(r[9])), r[10], r[11], r[12], r[13], r[14], r[15], bool(r[16]))
                for r in rows]


def _job(row: tuple[Any, ...]) -> StoredJob:
    return StoredJob(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), json.loads(row[5]),
                     unpack(row[6]), row[7], row[8], unpack(row[9]), row[10], row[11], row[12], row[13])
