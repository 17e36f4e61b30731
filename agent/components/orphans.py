"""Engine process records, and reaping the engines a dead agent left behind.

Engines run in their own session (``start_new_session``), so when the agent is SIGKILLed
or crashes they keep running, holding gigabytes of memory and their ports. The runtime
therefore writes ``<state_dir>/components/<id>/engine.pid`` when an engine process starts
(pid, its start time from ``/proc/<pid>/stat`` field 22, its process group, the boot id)
and removes it once the engine is stopped and reaped. A record that is still there when
an agent starts, or after ``murakkabctl cluster down``, names an engine nobody stops.

``decide`` (pure: records and a ``/proc`` reader in, verdicts out) says what to do with
each record. Pids are reused, so a process is signalled only when it still has the
recorded start time in the same boot; its process group only when it leads that group
and the group is not the reaper's own. ``reap`` carries the verdicts out: SIGTERM,
a few seconds, SIGKILL, then the record is deleted.

Only the standard library is imported: ``murakkabctl`` uses this module too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger("murakkab.agent.orphans")

RECORD_NAME = "engine.pid"
RECORD_VERSION = 1
TERM_WAIT_S = 5.0  # SIGTERM, then SIGKILL after this long (vLLM exits within a few seconds of SIGTERM)
KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the processes to disappear
POLL_INTERVAL_S = 0.05

Verdict = Literal["kill_group", "kill_process", "forget"]


@dataclass(frozen=True)
class EngineRecord:
    """One engine process as recorded when it started."""

    path: Path
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: clock ticks after boot
    pgid: int
    boot_id: str = ""  # /proc/sys/kernel/random/boot_id; "" when it could not be read
    component_id: str = ""


@dataclass(frozen=True)
class ProcStat:
    """What the reaper needs from /proc/<pid>/stat."""

    state: str  # field 3: R, S, D, Z, ...
    pgid: int  # field 5
    start_ticks: int  # field 22

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


class ProcReader(Protocol):
    def stat(self, pid: int) -> ProcStat | None:
        """The process's stat, or None when there is no such process."""

    def boot_id(self) -> str:
        """This boot's id, or "" when unknown."""

    def group_members(self, pgid: int) -> list[int]:
        """Pids in process group ``pgid`` that are not zombies."""


@dataclass(frozen=True)
class Decision:
    record: EngineRecord
    verdict: Verdict
    reason: str


@dataclass(frozen=True)
class Outcome:
    """What ``reap`` did with one record; ``ok`` is False when something may still run."""

    record: EngineRecord
    verdict: Verdict
    reason: str
    result: str
    ok: bool

    def describe(self) -> str:
        who = f"component {self.record.component_id}" if self.record.component_id else str(self.record.path)
        return f"{who}: engine pid {self.record.pid} (group {self.record.pgid}): {self.reason}; {self.result}"


# --- /proc ------------------------------------------------------------------------------


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat; the command name (field 2) may hold spaces and parentheses."""
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(state=fields[0], pgid=int(fields[2]), start_ticks=int(fields[19]))


class LinuxProc:
    """A ProcReader over the real /proc (or another root, for tests)."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root

    def stat(self, pid: int) -> ProcStat | None:
        try:
            return parse_stat((self.root / str(pid) / "stat").read_text())
        except (OSError, IndexError, ValueError):
            return None

    def boot_id(self) -> str:
        try:
            return (self.root / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        except OSError:
            return ""

    def group_members(self, pgid: int) -> list[int]:
        members = []
        try:
            entries = os.listdir(self.root)
        except OSError:
            return []
        for entry in entries:
            if entry.isdigit():
                info = self.stat(int(entry))
                if info is not None and info.pgid == pgid and not info.zombie:
                    members.append(int(entry))
        return members


# --- records ------------------------------------------------------------------------------


def record_path(component_dir: Path) -> Path:
    return Path(component_dir) / RECORD_NAME


def write_record(component_dir: Path, pid: int, proc: ProcReader | None = None) -> EngineRecord | None:
    """Record a just-started engine process atomically; None (nothing written) when it already exited."""
    proc = proc or LinuxProc()
    info = proc.stat(pid)
    if info is None:
        return None
    path = record_path(component_dir)
    record = EngineRecord(path=path, pid=pid, start_ticks=info.start_ticks, pgid=info.pgid,
                          boot_id=proc.boot_id(), component_id=Path(component_dir).name)
    body = json.dumps({"version": RECORD_VERSION, "pid": pid, "start_ticks": info.start_ticks, "pgid": info.pgid,
                       "boot_id": record.boot_id, "written_at_unix_s": round(time.time(), 3)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD_NAME}.{os.getpid()}.tmp")
    # No fsync: a record only means something within the boot that wrote it, where the page
    # cache is coherent; the rename alone keeps readers from seeing half a record.
    tmp.write_text(body + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


def remove_record(component_dir: Path, pid: int | None = None) -> bool:
    """Delete the record (only if it names ``pid``, when given); True if one was deleted."""
    path = record_path(component_dir)
    if pid is not None:
        current = read_record(path)
        if isinstance(current, EngineRecord) and current.pid != pid:
            return False  # a newer engine's record
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def read_record(path: Path) -> EngineRecord | str:
    """The record at ``path``, or why it cannot be used."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path} does not exist"
    except (OSError, ValueError) as exc:
        return f"{path} is unreadable: {exc}"
    try:
        pid, start_ticks, pgid = data["pid"], data["start_ticks"], data["pgid"]
        boot_id = data.get("boot_id", "")
    except (KeyError, TypeError):
        return f"{path} lacks pid, start_ticks or pgid"
    if not all(type(v) is int and v > 0 for v in (pid, start_ticks, pgid)) or not isinstance(boot_id, str):
        return f"{path} holds invalid values: pid {pid!r}, start_ticks {start_ticks!r}, pgid {pgid!r}"
    return EngineRecord(path=Path(path), pid=pid, start_ticks=start_ticks, pgid=pgid, boot_id=boot_id,
                        component_id=Path(path).parent.name)


def find_records(components_dirs: Iterable[Path]) -> tuple[list[EngineRecord], list[tuple[Path, str]]]:
    """Records under ``<dir>/*/engine.pid`` for each components directory; (records, unusable files)."""
    records: list[EngineRecord] = []
    bad: list[tuple[Path, str]] = []
    for components_dir in components_dirs:
        for path in sorted(Path(components_dir).glob(f"*/{RECORD_NAME}")):
            parsed = read_record(path)
            if isinstance(parsed, EngineRecord):
                records.append(parsed)
            else:
                bad.append((path, parsed))
    return records, bad


# --- the decision (pure) ------------------------------------------------------------------


def decide(records: Iterable[EngineRecord], proc: ProcReader, own_pgid: int) -> list[Decision]:
    """What to do with each record: kill its group, kill its process alone, or just forget it.

    Only a process with the recorded start time in this boot is the engine; anything else
    with that pid is someone else's. A zombie leader with the right start time still pins
    its group id, so its group (an engine core that outlived the server) is still ours.
    """
    boot_id = proc.boot_id()
    decisions = []
    for record in records:
        if record.boot_id and boot_id and record.boot_id != boot_id:
            decisions.append(Decision(record, "forget", "recorded in an earlier boot"))
            continue
        info = proc.stat(record.pid)
        if info is None:
            decisions.append(Decision(record, "forget", "process no longer exists"))
        elif info.start_ticks != record.start_ticks:
            decisions.append(Decision(record, "forget", f"pid reused by another process (start time "
                                                        f"{info.start_ticks}, recorded {record.start_ticks})"))
        elif info.zombie and not proc.group_members(record.pgid):
            decisions.append(Decision(record, "forget", "process exited (a zombie) and nothing is left in its group"))
        elif info.pgid == record.pid == record.pgid and info.pgid != own_pgid:
            decisions.append(Decision(record, "kill_group", "orphaned engine still running"
                                      + (" (its leader is a zombie)" if info.zombie else "")))
        elif info.zombie:
            decisions.append(Decision(record, "forget", "process exited (a zombie) and leads no group of its own"))
        else:
            decisions.append(Decision(record, "kill_process", f"orphaned engine still running in group {info.pgid}, "
                                      "which it does not lead (only the process is signalled)"))
    return decisions


# --- carrying it out ------------------------------------------------------------------------


def _same_process(record: EngineRecord, proc: ProcReader) -> bool:
    info = proc.stat(record.pid)
    return info is not None and info.start_ticks == record.start_ticks and not info.zombie


def _running(decision: Decision, proc: ProcReader) -> bool:
    if decision.verdict == "kill_group":
        return bool(proc.group_members(decision.record.pgid))
    return _same_process(decision.record, proc)


def _send(decision: Decision, sig: int, proc: ProcReader) -> str | None:
    """Signal the engine (its group, or itself); an error text when that was not allowed."""
    record = decision.record
    try:
        if decision.verdict == "kill_group":
            # A group id cannot be taken by a new group while any member lives, so members
            # alive now are the engine's; a group already empty is not signalled.
            if proc.group_members(record.pgid):
                os.killpg(record.pgid, sig)
        elif _same_process(record, proc):  # checked again: the pid may have been reused since
            os.kill(record.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        return f"not allowed to signal it ({exc})"
    return None


def _wait(pending: list[Decision], proc: ProcReader, timeout_s: float, clock: Callable[[], float],
          sleep: Callable[[float], None]) -> list[Decision]:
    deadline = clock() + timeout_s
    while True:
        pending = [d for d in pending if _running(d, proc)]
        if not pending or clock() >= deadline:
            return pending
        sleep(POLL_INTERVAL_S)


def reap(records: Iterable[EngineRecord], *, proc: ProcReader | None = None, own_pgid: int | None = None,
         term_wait_s: float = TERM_WAIT_S, kill_wait_s: float = KILL_WAIT_S,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> list[Outcome]:
    """Stop the engines the records name (all at once: SIGTERM, wait, SIGKILL) and delete their records.

    A record stays on disk only when its engine may still run (signalling was refused, or
    it survived SIGKILL), so a later reap can try again.
    """
    proc = proc or LinuxProc()
    decisions = decide(records, proc, os.getpgrp() if own_pgid is None else own_pgid)
    killing = [d for d in decisions if d.verdict != "forget"]
    refused: dict[Path, str] = {}
    for decision in killing:
        error = _send(decision, signal.SIGTERM, proc)
        if error:
            refused[decision.record.path] = error
    trying = [d for d in killing if d.record.path not in refused]
    stubborn = _wait(trying, proc, term_wait_s, clock, sleep)
    for decision in stubborn:
        error = _send(decision, signal.SIGKILL, proc)
        if error:
            refused[decision.record.path] = error
    survivors = {d.record.path for d in _wait(stubborn, proc, kill_wait_s, clock, sleep)}
    killed = {d.record.path for d in stubborn}
    outcomes = []
    for decision in decisions:
        path = decision.record.path
        if path in refused:
            result, ok = refused[path], False
        elif path in survivors:
            result, ok = f"still running {kill_wait_s:g} s after SIGKILL", False
        elif decision.verdict == "forget":
            result, ok = "record deleted", True
        elif path in killed:
            result, ok = f"ignored SIGTERM for {term_wait_s:g} s; killed with SIGKILL", True
        else:
            result, ok = "stopped by SIGTERM", True
        if ok:
            path.unlink(missing_ok=True)
        outcomes.append(Outcome(decision.record, decision.verdict, decision.reason, result, ok))
    return outcomes


def reap_component(component_dir: Path, *, term_wait_s: float = TERM_WAIT_S,
                   kill_wait_s: float = KILL_WAIT_S) -> list[Outcome]:
    """Reap the engine recorded for one component (a leftover about to be replaced), logging it."""
    path = record_path(component_dir)
    parsed = read_record(path)
    if isinstance(parsed, str):
        if path.exists():
            log.warning("deleting an unusable engine record: %s", parsed)
            path.unlink(missing_ok=True)
        return []
    return _logged(reap([parsed], term_wait_s=term_wait_s, kill_wait_s=kill_wait_s))


def reap_components(components_dirs: Iterable[Path], *, proc: ProcReader | None = None, own_pgid: int | None = None,
                    term_wait_s: float = TERM_WAIT_S, kill_wait_s: float = KILL_WAIT_S,
                    log_outcomes: bool = True) -> list[Outcome]:
    """Reap every engine recorded under the given components directories, logging each one
    (unless ``log_outcomes`` is False: a command line tool prints the outcomes itself).

    Unusable record files (which atomic writes should never leave) are deleted after a warning:
    nothing can be safely signalled on their account.
    """
    records, bad = find_records(components_dirs)
    for path, problem in bad:
        log.warning("deleting an unusable engine record: %s", problem)
        path.unlink(missing_ok=True)
    outcomes = reap(records, proc=proc, own_pgid=own_pgid, term_wait_s=term_wait_s, kill_wait_s=kill_wait_s)
    return _logged(outcomes) if log_outcomes else outcomes


def _logged(outcomes: list[Outcome]) -> list[Outcome]:
    for outcome in outcomes:
        if not outcome.ok:
            log.error("orphaned engine not reaped: %s", outcome.describe())
        elif outcome.verdict == "forget":
            log.info("stale engine record: %s", outcome.describe())
        else:
            log.warning("reaped an orphaned engine: %s", outcome.describe())
    return outcomes


def killpg_quietly(pgid: int, sig: int) -> None:
    """Signal a process group that may be gone already (or not ours to signal any more)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
