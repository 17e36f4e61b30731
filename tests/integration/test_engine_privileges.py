"""Engines and tools of a root agent run as the unprivileged engine account (issue 14).

Real agents and real child processes. The tool functions below run in those children: they
report who they are, where HOME is, and whether they could read a secret the agent keeps.
The state directory lives in a fresh directory under /tmp that the engine account may pass
through (pytest's own tmp_path sits under a 0700 directory it could not reach).
Most tests need root (the agent can only drop privileges it has) and skip without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.components import orphans
from agent.components.orphans import LinuxProc
from agent.components.privileges import (
    EngineIdentity, interpreter_problem, prepare_work_dir, resolve_engine_identity,
)
from agent.components.runtime import ComponentManager, ManagerConfig
from common.workflow.catalog import ExecutorSpec
from tests.integration.cluster import wait_until
from tests.integration.test_agent_components import agent_link, tool_executor

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the agent drops privileges only when it runs as root")
HERE = __name__


# --- tools: run in the engine's child processes --------------------------------------------


def whoami(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """Who runs this call, and what it may touch; ``question`` names a file the agent keeps secret."""
    try:
        Path(inputs["question"]).read_bytes()
        secret = "read"
    except PermissionError as exc:
        secret = f"PermissionError: {exc}"
    home = Path(os.environ["HOME"])
    (home / ".cache").mkdir(exist_ok=True)
    probe = home / ".cache" / "probe"
    probe.write_text("caches go here")
    umask = os.umask(0)
    os.umask(umask)
    return {"answer": json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                                  "egid": os.getegid(), "groups": sorted(os.getgroups()), "home": str(home),
                                  "cwd": os.getcwd(), "secret": secret, "umask": umask,
                                  "probe_mode": stat.S_IMODE(probe.stat().st_mode), "probe_uid": probe.stat().st_uid,
                                  "pid": os.getpid()})}


def hang(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    print(f"hanging in pid {os.getpid()}", flush=True)  # to the component log, which the agent owns
    time.sleep(60)
    return {"answer": "never"}


# --- helpers -------------------------------------------------------------------------------


def reachable_tempdir(mode: int = 0o711) -> Path:
    """A fresh directory under /tmp (or $MURAKKAB_PRIV_TMPDIR) the engine account may pass through."""
    path = Path(tempfile.mkdtemp(prefix="murakkab-priv-", dir=os.environ.get("MURAKKAB_PRIV_TMPDIR", "/tmp")))
    path.chmod(mode)
    return path


def engine_interpreter(directory: Path, identity: EngineIdentity) -> str:
    """An interpreter the engine account can run, with this environment's packages.

    The agent's own where it can run it; else (a development container whose interpreter lives
    under /root) a virtual environment of the system python of the same minor version whose
    site-packages point at the agent's (same ABI).
    """
    if interpreter_problem(identity, sys.executable) is None:
        return sys.executable
    base = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.path.exists(base) or interpreter_problem(identity, base) is not None:
        pytest.skip(f"{identity.user} can run neither {sys.executable} nor {base}")
    venv = directory / "engine-venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "agent-packages.pth").write_text("".join(f"{p}\n" for p in sys.path if p.endswith("site-packages")))
    for where, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = os.path.join(where, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o005 | (0o001 if name in dirs else 0))
    return str(venv / "bin" / "python")


@pytest.fixture(scope="session")
def identity() -> EngineIdentity:
    found = resolve_engine_identity() if ROOT else None
    if found is None:
        pytest.skip("the agent drops privileges only when it runs as root")
    return found


@pytest.fixture(scope="session")
def engine_python(identity: EngineIdentity) -> Iterator[str]:
    directory = reachable_tempdir(0o755)
    try:
        yield engine_interpreter(directory, identity)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory under /tmp the engine account may pass through (mode 0711)."""
    path = reachable_tempdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def proc_uids(pid: int) -> tuple[int, ...]:
    """Real, effective, saved and filesystem uid of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return tuple(int(v) for v in line.split()[1:])
    raise AssertionError(f"no Uid line for pid {pid}")


def gone(pid: int) -> bool:
    info = LinuxProc().stat(pid)
    return info is None or info.zombie


# --- tests ---------------------------------------------------------------------------------


@needs_root
def test_tools_of_a_root_agent_run_as_the_engine_user(reachable_dir: Path, engine_python: str) -> None:
    """Subprocess and thread isolation alike: not root, HOME in the work dir, no access to the agent's secrets."""
    secret = reachable_dir / "node-0" / "agent.key_secret"
    secret.parent.mkdir()
    secret.write_text("not for engines")
    secret.chmod(0o600)

    async def scenario() -> None:
        async with agent_link(reachable_dir, gpus=1, drop_privileges=True, engine_python=engine_python) as link:
            assert link.agent is not None
            identity = link.agent.components.config.engine_identity
            assert isinstance(identity, EngineIdentity) and identity.uid != 0 and identity.gid != 0
            await link.start("sub", tool_executor("who", f"{HERE}:whoami", isolation="subprocess"))
            await link.start("thr", tool_executor("who", f"{HERE}:whoami", isolation="thread"))
            for cid in ("sub", "thr"):
                await link.wait_state(cid, "ready", 30.0)
            pids = set()
            for cid in ("sub", "thr"):
                result = await link.invoke(cid, "chat", {"question": str(secret)}, timeout_s=30.0)
                assert result.ok, result.error
                seen = json.loads(result.outputs["answer"])
                work = reachable_dir / "node-0" / "components" / cid / "work"
                assert (seen["uid"], seen["euid"], seen["gid"], seen["egid"]) == (identity.uid,) * 2 + (identity.gid,) * 2
                assert set(identity.groups) <= set(seen["groups"]) and 0 not in seen["groups"]
                assert seen["home"] == seen["cwd"] == str(work)
                assert seen["secret"].startswith("PermissionError"), seen
                assert seen["umask"] == 0o077 and seen["probe_mode"] == 0o600
                assert seen["probe_uid"] == identity.uid
                st = work.stat()
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (identity.uid, 0o750)
                assert seen["pid"] != os.getpid()
                pids.add(seen["pid"])
            assert len(pids) == 2
            log = (reachable_dir / "node-0" / "components" / "thr" / "engine.log").read_text()
            assert "thread isolation: each call runs in a child process as user " + identity.user in log
            assert f"engine processes as user {identity.user}" in log
            assert stat.S_IMODE(os.stat(reachable_dir / "node-0" / "components" / "thr" / "engine.log").st_mode) == 0o640

    asyncio.run(scenario())


@needs_root
def test_stopping_a_tool_that_runs_as_another_user_leaves_no_process(reachable_dir: Path, engine_python: str) -> None:
    async def scenario() -> None:
        async with agent_link(reachable_dir, gpus=1, drop_privileges=True, engine_python=engine_python) as link:
            assert link.agent is not None
            identity = link.agent.components.config.engine_identity
            assert identity is not None
            await link.start("hangs", tool_executor("hang", f"{HERE}:hang", isolation="subprocess"))
            await link.wait_state("hangs", "ready", 30.0)
            call = asyncio.ensure_future(link.invoke("hangs", "chat", {"question": "wait"}, timeout_s=30.0))
            log = reachable_dir / "node-0" / "components" / "hangs" / "engine.log"
            await wait_until(lambda: "hanging in pid " in log.read_text(), 20.0, "the hanging call started")
            pid = int(log.read_text().split("hanging in pid ")[1].split()[0])
            assert proc_uids(pid) == (identity.uid,) * 4
            await link.stop("hangs", drain_timeout_s=0.2)
            result = await call
            assert not result.ok and result.error_code == "engine_failed"
            await link.wait_state("hangs", "stopped", 20.0)
            await wait_until(lambda: gone(pid), 10.0, f"tool process {pid} gone")

    asyncio.run(scenario())


FAKE_VLLM = "#!/bin/sh\necho \"fake vllm as $(id -u)\"\nexec sleep 60\n"  # starts, never answers


@needs_root
def test_engine_processes_of_another_user_are_stopped_and_reaped(reachable_dir: Path,
                                                                  identity: EngineIdentity) -> None:
    """A vLLM-like engine process (engine.pid recorded) runs as the engine user; a stop ends its
    process group, and after the agent "dies" the next one reaps it across the uid boundary."""
    (reachable_dir / "models" / "tiny").mkdir(parents=True)
    (reachable_dir / "models").chmod(0o755)
    (reachable_dir / "models" / "tiny").chmod(0o755)
    python = reachable_dir / "fake-python"
    python.write_text(FAKE_VLLM)
    python.chmod(0o755)
    executor = ExecutorSpec.model_validate(
        {"name": "tiny-chat", "task": "chat", "engine": "vllm", "vllm": {"model": "{model_dir}/tiny"}})

    def manager() -> ComponentManager:
        config = ManagerConfig(state_dir=reachable_dir / "state", model_dir=reachable_dir / "models",
                               engine_python=str(python), engine_identity=identity)
        return ComponentManager(config, {}, read_energy=lambda index: None)

    async def started(mgr: ComponentManager, cid: str) -> int:
        ok, message = mgr.start(cid, executor, ())
        assert ok, message
        record = reachable_dir / "state" / "components" / cid / orphans.RECORD_NAME
        await wait_until(record.exists, 10.0, f"{cid} engine record")
        parsed = orphans.read_record(record)
        assert isinstance(parsed, orphans.EngineRecord)
        log = reachable_dir / "state" / "components" / cid / "engine.log"
        await wait_until(lambda: f"fake vllm as {identity.uid}" in log.read_text(), 10.0, "the engine's own line")
        assert proc_uids(parsed.pid) == (identity.uid,) * 4
        assert (reachable_dir / "state" / "components" / cid / orphans.RECORD_NAME).stat().st_uid == os.geteuid()
        return parsed.pid

    async def scenario() -> None:
        mgr = manager()
        pid = await started(mgr, "chat-1")
        mgr.stop("chat-1", 0.0)
        stopping = mgr.components["chat-1"].stop_task  # "stopped" at once; the engine's stop runs on
        assert stopping is not None
        await asyncio.wait_for(stopping, 30.0)
        assert gone(pid) and not (reachable_dir / "state" / "components" / "chat-1" / orphans.RECORD_NAME).exists()
        assert LinuxProc().group_members(pid) == []

        killed = manager()
        pid = await started(killed, "chat-2")
        for comp in killed.components.values():  # the agent "dies": its tasks stop, its engine runs on
            for task in list(comp.tasks):
                task.cancel()
        outcomes = await asyncio.to_thread(manager().reap_orphans)
        assert [(o.record.pid, o.verdict, o.ok) for o in outcomes] == [(pid, "kill_group", True)], outcomes
        assert LinuxProc().group_members(pid) == []
        engine = killed.components["chat-2"].engine
        assert engine is not None
        await engine.stop(0.1)  # reaps the zombie (this process is its parent)
        await mgr.shutdown(0.0)

    asyncio.run(scenario())


@needs_root
def test_a_missing_engine_account_is_a_config_error_at_start(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nnode_name = "n1"\nstate_dir = "{tmp_path / "state"}"\nmetrics_enabled = false\n'
                      'engine_user = "no-such-murakkab-user"\n\n[devices]\nbackend = "cpu"\n')
    done = subprocess.run([sys.executable, "-m", "agent.main", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "engine_user 'no-such-murakkab-user': no such account on this host" in done.stderr
    assert "Traceback" not in done.stderr


@needs_root
def test_work_dir_of_an_earlier_owner_is_moved_aside(reachable_dir: Path, identity: EngineIdentity) -> None:
    """Engines ran as root before: their work dir is not chowned file by file, it is replaced."""
    work = reachable_dir / "state" / "components" / "c1" / "work"
    work.mkdir(parents=True)
    (work / "old-cache").write_text("root's")
    notes = prepare_work_dir(work, identity, reachable_dir / "state")
    assert work.stat().st_uid == identity.uid and not (work / "old-cache").exists()
    assert (work.parent / "work.previous" / "old-cache").read_text() == "root's"
    assert any("moved aside" in n for n in notes)
    assert prepare_work_dir(work, identity, reachable_dir / "state") == []  # idempotent: nothing to do


UNIT = Path(__file__).resolve().parents[2] / "systemd" / "murakkab-agent.service"


def unit_capabilities() -> list[str]:
    """The allow-list of CapabilityBoundingSet= in the agent's systemd unit, lower case without CAP_."""
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith("CapabilityBoundingSet=")]
    assert len(lines) == 1 and not lines[0].split("=", 1)[1].startswith("~"), lines
    return [cap.lower().removeprefix("cap_") for cap in lines[0].split("=", 1)[1].split()]


@needs_root
@pytest.mark.skipif(os.environ.get("MURAKKAB_PRIV_TMPDIR") is not None, reason="already inside the capability check")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_the_units_capabilities_are_enough_for_all_of_the_above() -> None:
    """Run the tests above as root with only the unit's bounding set, as systemd would start the agent:
    dropping to the engine account, chown, signalling and reaping its processes all still work."""
    caps = unit_capabilities()
    assert set(caps) >= {"setuid", "setgid", "chown", "kill", "sys_admin"}
    scratch = reachable_tempdir(0o711)
    try:
        done = subprocess.run(
            ["setpriv", "--bounding-set", "-all," + ",".join(f"+{cap}" for cap in caps), "--",
             sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not capabilities"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "MURAKKAB_PRIV_TMPDIR": str(scratch)},
            cwd=UNIT.parents[1])
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # with every capability: engine-owned files too
