"""Engine records and the orphan reaper: the pure decision over a fake /proc, the reaper's
signalling over a fake /proc and fake signals, and real processes (a ``sleep`` in its own
session; an engine started by the component runtime and left behind by a "killed" agent)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from agent.components import orphans
from agent.components.orphans import EngineRecord, LinuxProc, ProcStat, decide, parse_stat, reap
from agent.components.runtime import ComponentManager, ManagerConfig
from common.workflow.catalog import ExecutorSpec

BOOT = "boot-a"
OWN_PGID = 4242


class FakeProc:
    """A /proc with chosen processes; signals sent through ``deliver`` change it as the kernel would."""

    def __init__(self, procs: dict[int, ProcStat], boot_id: str = BOOT) -> None:
        self.procs = dict(procs)
        self.boot = boot_id
        self.ignores_term: set[int] = set()
        self.survives_kill: set[int] = set()

    def stat(self, pid: int) -> ProcStat | None:
        return self.procs.get(pid)

    def boot_id(self) -> str:
        return self.boot

    def group_members(self, pgid: int) -> list[int]:
        return sorted(p for p, s in self.procs.items() if s.pgid == pgid and not s.zombie)

    def deliver(self, pids: list[int], sig: int) -> None:
        for pid in pids:
            if sig == signal.SIGTERM and pid in self.ignores_term:
                continue
            if sig == signal.SIGKILL and pid in self.survives_kill:
                continue
            self.procs.pop(pid, None)


def running(pgid: int, start_ticks: int, state: str = "S") -> ProcStat:
    return ProcStat(state=state, pgid=pgid, start_ticks=start_ticks)


def record(tmp_path: Path, pid: int, start_ticks: int, pgid: int | None = None, boot_id: str = BOOT,
           name: str | None = None) -> EngineRecord:
    directory = tmp_path / "components" / (name or f"c-{pid}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / orphans.RECORD_NAME
    path.write_text(json.dumps({"version": 1, "pid": pid, "start_ticks": start_ticks,
                                "pgid": pid if pgid is None else pgid, "boot_id": boot_id}))
    parsed = orphans.read_record(path)
    assert isinstance(parsed, EngineRecord)
    return parsed


# --- the decision (pure) ------------------------------------------------------------------


def test_matching_start_time_kills_the_group(tmp_path: Path) -> None:
    proc = FakeProc({100: running(100, 5000), 101: running(100, 5003)})
    [d] = decide([record(tmp_path, 100, 5000)], proc, OWN_PGID)
    assert d.verdict == "kill_group" and "still running" in d.reason


def test_reused_pid_is_left_alone(tmp_path: Path) -> None:
    proc = FakeProc({100: running(100, 9999)})  # same pid, even leading a group, but started later
    [d] = decide([record(tmp_path, 100, 5000)], proc, OWN_PGID)
    assert d.verdict == "forget" and "reused" in d.reason


def test_missing_process_only_deletes_the_record(tmp_path: Path) -> None:
    [d] = decide([record(tmp_path, 100, 5000)], FakeProc({}), OWN_PGID)
    assert d.verdict == "forget" and "no longer exists" in d.reason


def test_record_from_an_earlier_boot_is_forgotten_even_if_pid_and_start_match(tmp_path: Path) -> None:
    proc = FakeProc({100: running(100, 5000)}, boot_id="boot-b")
    [d] = decide([record(tmp_path, 100, 5000, boot_id=BOOT)], proc, OWN_PGID)
    assert d.verdict == "forget" and "earlier boot" in d.reason


def test_zombie_leader_with_matching_start_still_pins_its_group(tmp_path: Path) -> None:
    proc = FakeProc({100: running(100, 5000, "Z"), 101: running(100, 5010)})
    [d] = decide([record(tmp_path, 100, 5000)], proc, OWN_PGID)
    assert d.verdict == "kill_group" and "zombie" in d.reason


def test_a_process_that_leads_no_group_or_shares_ours_is_signalled_alone(tmp_path: Path) -> None:
    proc = FakeProc({100: running(77, 5000), 200: running(OWN_PGID, 6000)})
    decisions = decide([record(tmp_path, 100, 5000, pgid=77), record(tmp_path, 200, 6000, pgid=OWN_PGID)],
                       proc, own_pgid=OWN_PGID)
    assert [d.verdict for d in decisions] == ["kill_process", "kill_process"]
    [d] = decide([record(tmp_path, 300, 7000)], FakeProc({300: running(300, 7000, "Z")}), OWN_PGID)
    assert d.verdict == "forget" and "zombie" in d.reason  # a zombie leader alone: nothing to signal


# --- carrying it out, with fake signals --------------------------------------------------


class Signals:
    """Replaces os.kill/os.killpg in the orphans module; delivers to the FakeProc."""

    def __init__(self, proc: FakeProc, refuse: frozenset[int] = frozenset()) -> None:
        self.proc = proc
        self.sent: list[tuple[str, int, int]] = []
        self.refuse = refuse

    def kill(self, pid: int, sig: int) -> None:
        self._check(pid)
        self.sent.append(("kill", pid, sig))
        self.proc.deliver([pid], sig)

    def killpg(self, pgid: int, sig: int) -> None:
        self._check(pgid)
        self.sent.append(("killpg", pgid, sig))
        self.proc.deliver(self.proc.group_members(pgid), sig)

    def _check(self, target: int) -> None:
        if target in self.refuse:
            raise PermissionError(1, "Operation not permitted")


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def fake_reap(monkeypatch: pytest.MonkeyPatch, records: list[EngineRecord], proc: FakeProc,
              refuse: frozenset[int] = frozenset()) -> tuple[list[orphans.Outcome], Signals, FakeClock]:
    signals, clock = Signals(proc, refuse), FakeClock()
    monkeypatch.setattr(orphans.os, "kill", signals.kill)
    monkeypatch.setattr(orphans.os, "killpg", signals.killpg)
    outcomes = reap(records, proc=proc, own_pgid=OWN_PGID, term_wait_s=3.0, kill_wait_s=2.0, clock=clock,
                    sleep=clock.sleep)
    return outcomes, signals, clock


def test_reap_terms_then_kills_stubborn_groups_and_never_touches_reused_pids(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = FakeProc({100: running(100, 5000), 101: running(100, 5001),  # polite engine and its worker
                     200: running(200, 6000), 201: running(200, 6002),  # its worker ignores SIGTERM
                     300: running(300, 9999)})  # pid 300 was reused
    proc.ignores_term.add(201)
    records = [record(tmp_path, 100, 5000), record(tmp_path, 200, 6000), record(tmp_path, 300, 7000),
               record(tmp_path, 400, 8000)]
    outcomes, signals, clock = fake_reap(monkeypatch, records, proc)
    assert signals.sent == [("killpg", 100, signal.SIGTERM), ("killpg", 200, signal.SIGTERM),
                            ("killpg", 200, signal.SIGKILL)]
    assert 3.0 <= clock.now_s < 3.5  # waited out the SIGTERM grace once, for all engines together
    assert set(proc.procs) == {300}  # the stranger lives on
    by_pid = {o.record.pid: o for o in outcomes}
    assert by_pid[100].result == "stopped by SIGTERM"
    assert "SIGKILL" in by_pid[200].result
    assert by_pid[300].verdict == "forget" and by_pid[400].verdict == "forget"
    assert all(o.ok for o in outcomes)
    assert not list((tmp_path / "components").glob("*/engine.pid"))


def test_reap_keeps_the_record_when_the_engine_may_still_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = FakeProc({100: running(100, 5000), 200: running(200, 6000)})
    proc.ignores_term.add(200)
    proc.survives_kill.add(200)  # e.g. stuck in uninterruptible sleep
    records = [record(tmp_path, 100, 5000), record(tmp_path, 200, 6000)]
    outcomes, _, _ = fake_reap(monkeypatch, records, proc, refuse=frozenset({100}))
    by_pid = {o.record.pid: o for o in outcomes}
    assert not by_pid[100].ok and "not allowed" in by_pid[100].result
    assert not by_pid[200].ok and "after SIGKILL" in by_pid[200].result
    assert records[0].path.exists() and records[1].path.exists()  # a later reap tries again


# --- records and /proc parsing --------------------------------------------------------------


def test_parse_stat_survives_odd_command_names() -> None:
    fields = ["S", "1", "321", "321"] + ["0"] * 15 + ["987654"] + ["0"] * 30
    parsed = parse_stat(f"321 (a ) (b c) {' '.join(fields)}")
    assert parsed == ProcStat(state="S", pgid=321, start_ticks=987654)


def test_records_round_trip_atomically_and_unusable_ones_are_reported(tmp_path: Path) -> None:
    directory = tmp_path / "components" / "comp-1"
    written = orphans.write_record(directory, os.getpid())
    assert written is not None and written.pid == os.getpid() and written.component_id == "comp-1"
    me = LinuxProc().stat(os.getpid())
    assert me is not None and written.start_ticks == me.start_ticks and written.pgid == os.getpgrp()
    assert sorted(p.name for p in directory.iterdir()) == ["engine.pid"]  # no temporary file left
    assert orphans.read_record(directory / "engine.pid") == written
    assert not orphans.remove_record(directory, pid=os.getpid() + 1)  # another engine's record stays
    assert orphans.remove_record(directory, pid=os.getpid())
    (tmp_path / "components" / "comp-2").mkdir()
    (tmp_path / "components" / "comp-2" / "engine.pid").write_text('{"pid": "x"}')
    records, bad = orphans.find_records([tmp_path / "components", tmp_path / "nowhere"])
    assert records == [] and len(bad) == 1 and "pid" in bad[0][1]
    assert orphans.write_record(directory, 2 ** 22 + 12345) is None  # no such process: nothing recorded


# --- real processes ---------------------------------------------------------------------------


def spawn_sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], start_new_session=True, stdin=subprocess.DEVNULL)


def test_real_orphan_in_its_own_session_is_reaped(tmp_path: Path) -> None:
    child = spawn_sleeper()
    stranger = spawn_sleeper()
    try:
        orphans.write_record(tmp_path / "components" / "engine-a", child.pid)
        ticks = LinuxProc().stat(stranger.pid).start_ticks  # type: ignore[union-attr]
        record(tmp_path, stranger.pid, ticks + 1, boot_id=LinuxProc().boot_id(),
               name="engine-b")  # a reused pid: must not be signalled
        started = time.monotonic()
        outcomes = orphans.reap_components([tmp_path / "components"], term_wait_s=5.0, kill_wait_s=2.0)
        assert time.monotonic() - started < 4.0  # sleep dies on SIGTERM: no waiting out the grace
        assert child.wait(timeout=2.0) == -signal.SIGTERM
        assert stranger.poll() is None
        verdicts = {o.record.component_id: (o.verdict, o.reason) for o in outcomes}
        assert verdicts["engine-a"][0] == "kill_group"
        assert verdicts["engine-b"][0] == "forget" and "reused" in verdicts["engine-b"][1]
        assert not list((tmp_path / "components").glob("*/engine.pid"))
    finally:
        for proc in (child, stranger):
            proc.kill()
            proc.wait()


FAKE_VLLM = "#!/bin/sh\nexec sleep 60\n"  # "python -m vllm... ARGS": a process that starts and never answers


def vllm_manager(tmp_path: Path) -> ComponentManager:
    (tmp_path / "models" / "tiny").mkdir(parents=True, exist_ok=True)
    python = tmp_path / "fake-python"
    python.write_text(FAKE_VLLM)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    config = ManagerConfig(state_dir=tmp_path / "state", model_dir=tmp_path / "models", engine_python=str(python))
    return ComponentManager(config, {}, read_energy=lambda index: None)


VLLM_EXECUTOR = ExecutorSpec.model_validate(
    {"name": "tiny-chat", "task": "chat", "engine": "vllm", "vllm": {"model": "{model_dir}/tiny"}})


async def started_engine_pid(manager: ComponentManager, component_id: str) -> int:
    ok, message = manager.start(component_id, VLLM_EXECUTOR, ())
    assert ok, message
    path = manager.config.state_dir / "components" / component_id / "engine.pid"
    deadline = time.monotonic() + 10.0
    while not path.exists():
        assert time.monotonic() < deadline, f"no engine record; log: {manager.reports()}"
        await asyncio.sleep(0.02)
    parsed = orphans.read_record(path)
    assert isinstance(parsed, EngineRecord)
    engine = manager.components[component_id].engine
    assert engine is not None and parsed.pid == engine.pid == parsed.pgid
    return parsed.pid


def test_runtime_records_engines_and_shutdown_removes_the_records(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager = vllm_manager(tmp_path)
        pid = await started_engine_pid(manager, "chat-1")
        started = time.monotonic()
        await manager.shutdown(drain_timeout_s=1.0)
        assert time.monotonic() - started < 5.0  # the engine honours SIGTERM: far inside the stop timeout
        assert LinuxProc().stat(pid) is None or LinuxProc().stat(pid).zombie  # type: ignore[union-attr]
        assert not (manager.config.state_dir / "components" / "chat-1" / "engine.pid").exists()

    asyncio.run(scenario())


def test_next_agent_reaps_the_engine_a_killed_agent_left_running(tmp_path: Path) -> None:
    async def scenario() -> None:
        killed = vllm_manager(tmp_path)
        pid = await started_engine_pid(killed, "chat-1")
        for comp in killed.components.values():  # the agent "dies": its tasks stop, its engine runs on
            for task in list(comp.tasks):
                task.cancel()
        assert LinuxProc().group_members(pid) == [pid]
        outcomes = await asyncio.to_thread(vllm_manager(tmp_path).reap_orphans)
        assert [(o.record.pid, o.verdict, o.ok) for o in outcomes] == [(pid, "kill_group", True)]
        assert LinuxProc().group_members(pid) == []
        assert not (tmp_path / "state" / "components" / "chat-1" / "engine.pid").exists()
        engine = killed.components["chat-1"].engine
        assert engine is not None
        await engine.stop(0.1)  # reaps the zombie (this process is its parent) and closes the HTTP session
        assert engine.exit_code() == -signal.SIGTERM

    asyncio.run(scenario())


def test_cluster_down_reaps_engines_recorded_under_agent_state_dirs(tmp_path: Path) -> None:
    import argparse

    from rich.console import Console

    from controller.cli.cluster import cluster_down

    child = spawn_sleeper()
    try:  # the agent that started it is gone (SIGKILLed): no daemon pids are recorded any more
        orphans.write_record(tmp_path / "agents" / "cpu-node" / "components" / "chat-1", child.pid)
        console = Console(record=True, width=200)
        assert cluster_down(argparse.Namespace(state_dir=tmp_path), console) == 0
        assert child.wait(timeout=2.0) == -signal.SIGTERM
        text = console.export_text()
        assert "reaped 1 orphaned engine" in text and "chat-1" in text
        assert not (tmp_path / "agents" / "cpu-node" / "components" / "chat-1" / "engine.pid").exists()
        assert cluster_down(argparse.Namespace(state_dir=tmp_path), console) == 0  # nothing left: a no-op
        assert "no cluster processes recorded" in console.export_text()
    finally:
        child.kill()
        child.wait()


def test_agent_reaps_orphans_before_it_registers(tmp_path: Path) -> None:
    from agent.config import AgentSettings
    from agent.daemon import Agent

    child = spawn_sleeper()
    try:
        orphans.write_record(tmp_path / "components" / "chat-1", child.pid)
        settings = AgentSettings(node_name="n1", controller="tcp://127.0.0.1:9", state_dir=tmp_path,
                                 metrics_enabled=False, insecure=True)
        agent = Agent(settings, [])

        async def scenario() -> None:
            stop = asyncio.Event()
            stop.set()  # run reaps, then stops at once (before a controller could answer)
            await agent.run(stop)

        asyncio.run(scenario())
        assert child.wait(timeout=2.0) == -signal.SIGTERM
        assert not (tmp_path / "components" / "chat-1" / "engine.pid").exists()
    finally:
        child.kill()
        child.wait()
