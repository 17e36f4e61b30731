"""Jobs survive daemons dying: real controller and agent processes from `murakkabctl cluster up`.

SIGKILL the controller while jobs of a sim workflow are queued and running, start it again with
the same config: every job accepted before the kill must end in a stored terminal state. SIGKILL
an agent that hosts a component a job is using: the job must retry elsewhere or fail with a
reason, within a bounded time. Sim stages run inside the agents (simulated GPUs), the
scene-detection and frame-extraction stages run OpenCV for real.
"""

from __future__ import annotations

import copy
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.tools.testdata import file_blob, make_test_video
from common.protocol import ApplyCatalog, ApplyWorkflow, GetJob, ListComponents, SubmitJob
from controller.cli.client import AdminClient, ClientError
from controller.cli.cluster import spawn

from tests.keys import cluster_environment

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TERMINAL = ("succeeded", "failed", "cancelled")
SUSPECT_AFTER_S = 1.5
LOST_AFTER_S = 4.0


def ctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli.main", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def pid_of(state_dir: Path, name: str) -> int:
    return int((state_dir / "pids" / f"{name}.pid").read_text().split()[0])


def call(address: str, msg: Any, timeout_s: float = 5.0) -> Any:
    with AdminClient(address, timeout_s) as client:
        return client.call(msg)


def catalog_yaml(startup_scale: float, latency_scale: float, startup_s: dict[str, float] | None = None) -> str:
    """sim.yaml with start-up and latency rescaled, plus the tool executors of cpu.yaml (no vLLM).

    ``startup_s`` sets the start-up of named executors instead of scaling theirs.
    """
    executors = []
    for spec in yaml.safe_load((EXAMPLES / "catalog" / "sim.yaml").read_text())["spec"]["executors"]:
        spec = copy.deepcopy(spec)
        scaled_s = round(spec["sim"]["startup_s"] * startup_scale, 6)
        spec["sim"]["startup_s"] = (startup_s or {}).get(spec["name"], scaled_s)
        spec["sim"]["latency_s"] = round(spec["sim"]["latency_s"] * latency_scale, 6)
        if "latency_per_item_s" in spec["sim"]:
            spec["sim"]["latency_per_item_s"] = round(spec["sim"]["latency_per_item_s"] * latency_scale, 6)
        executors.append(spec)
    executors += [spec for spec in yaml.safe_load((EXAMPLES / "catalog" / "cpu.yaml").read_text())["spec"]["executors"]
                  if spec["engine"] == "tool"]
    return yaml.safe_dump({"apiVersion": "murakkab.dev/v1", "kind": "ExecutorCatalog", "metadata": {"name": "test"},
                           "spec": {"executors": executors}}, sort_keys=False)


def job(address: str, job_id: str) -> Any:
    return call(address, GetJob(job_id, include_outputs=False)).job


def wait_terminal(address: str, job_ids: list[str], timeout_s: float) -> dict[str, Any]:
    """Every job once terminal; fails naming the stuck ones if that takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    done: dict[str, Any] = {}
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id in done:
                continue
            try:
                view = call(address, GetJob(job_id, wait_s=0.5, include_outputs=False), timeout_s=5.0).job
            except ClientError as exc:  # the controller may be starting
                last_error = exc
                time.sleep(0.2)
                continue
            if view.state in TERMINAL:
                done[job_id] = view
        if len(done) == len(job_ids):
            return done
    stuck = {j: (job(address, j).state if last_error is None else "?") for j in job_ids if j not in done}
    raise AssertionError(f"jobs not terminal after {timeout_s:g}s: {stuck} (last error: {last_error})")


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except ClientError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}; last: {last}")


def stored_states(state_dir: Path) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) as the controller's database holds them."""
    db = sqlite3.connect(f"file:{state_dir / 'controller' / 'controller.sqlite3'}?mode=ro", uri=True)
    try:
        return {r[0]: (r[1], r[2]) for r in db.execute("SELECT job_id, state, reason FROM jobs")}
    finally:
        db.close()


BIG_CHAT = """\
apiVersion: murakkab.dev/v1
kind: Workflow
metadata:
  name: big-chat
spec:
  inputs:
    question: {type: text}
  stages:
    - name: answer
      task: chat
      constraints: {executor: sim-llama-70b-chat}
      inputs: {question: inputs.question}
  outputs:
    answer: answer.answer
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    state_dir = tmp_path / "cluster"
    up = ctl("cluster", "up", "--state-dir", str(state_dir), "--sim-nodes", "2", "--gpus-per-node", "2",
             "--sim-utilization", "0", "--heartbeat-interval", "0.25", "--suspect-after", str(SUSPECT_AFTER_S),
             "--lost-after", str(LOST_AFTER_S))
    assert up.returncode == 0, up.stdout + up.stderr
    address = (state_dir / "controller.addr").read_text().strip()
    try:
        with cluster_environment(state_dir):  # murakkabctl and AdminClient use the cluster's admin key
            yield state_dir, address
    finally:
        down = ctl("cluster", "down", "--state-dir", str(state_dir))
        logs = state_dir / "logs"
        for log in sorted(logs.glob("*.log")) if logs.exists() else ():  # a trace for failed runs (-rA shows it)
            print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture
def video(tmp_path: Path) -> dict[str, Any]:
    colors = ((200, 30, 30), (30, 170, 60), (40, 60, 210))
    return file_blob(make_test_video(tmp_path / "clip.mp4", colors, seconds_per_scene=0.5))


def setup(address: str, startup_scale: float, latency_scale: float, startup_s: dict[str, float] | None = None) -> None:
    call(address, ApplyCatalog("test-catalog.yaml", catalog_yaml(startup_scale, latency_scale, startup_s)))
    call(address, ApplyWorkflow("video-qa.yaml", (EXAMPLES / "workflows" / "video-qa.yaml").read_text()))


@pytest.mark.timeout(240)
def test_sigkilled_controller_resumes_every_accepted_job(cluster: tuple[Path, str], video: dict[str, Any]) -> None:
    state_dir, address = cluster
    # sim.yaml's start-up times scaled to 1.2-3.2 s, the 70B chat model's set to 6 s: it is still starting
    # (big-chat jobs wait queued, video-qa accuracy:best jobs wait for their answer stage) while the
    # accuracy:basic jobs already run their sim stages.
    setup(address, startup_scale=0.4, latency_scale=0.5, startup_s={"sim-llama-70b-chat": 6.0})
    call(address, ApplyWorkflow("big-chat.yaml", BIG_CHAT))
    accepted: list[str] = []
    for i in range(6):
        slo = {"accuracy": "best"} if i % 3 == 2 else {"accuracy": "basic"}
        accepted.append(call(address, SubmitJob("video-qa", {"video": video, "question": f"Q{i}?"}, slo=slo)).job_id)
    accepted += [call(address, SubmitJob("big-chat", {"question": f"B{i}?"})).job_id for i in range(2)]
    assert not any(job(address, j).state in TERMINAL for j in accepted)

    def sim_stage_running() -> bool:
        return any(i.state == "running" and i.simulated for j in accepted for i in job(address, j).invocations)

    wait_for(sim_stage_running, 30, "a sim stage to be running")
    before = {j: job(address, j).state for j in accepted}
    assert "running" in before.values() and "queued" in before.values(), before
    os.kill(pid_of(state_dir, "controller"), signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(0.5)
    spawn(state_dir, "controller", [sys.executable, "-m", "controller.main", "--config",
                                    str(state_dir / "controller.toml")])
    done = wait_terminal(address, accepted, timeout_s=90)
    elapsed_s = time.monotonic() - killed_at
    stored = stored_states(state_dir)
    assert set(accepted) <= set(stored), "a job accepted before the kill is missing from the database"
    for job_id, view in done.items():
        assert stored[job_id] == (view.state, view.reason), (job_id, stored[job_id], view.state)
        assert view.state == "succeeded", (job_id, view.reason, view.invocations)
        stages = {i.stage for i in view.invocations if i.state == "succeeded"}
        want = {"answer"} if view.workflow == "big-chat" else {"scenes", "frames", "objects", "transcript", "answer"}
        assert stages == want, (job_id, view.invocations)
        assert not any(i.state == "running" for i in view.invocations), view.invocations
    log = (state_dir / "logs" / "controller.log").read_text()
    assert "resuming job" in log
    print(f"jobs {before} at the kill; all terminal {elapsed_s:.1f}s after the controller was killed")


@pytest.mark.timeout(240)
def test_sigkilled_agent_mid_job_retries_elsewhere_or_fails_with_a_reason(cluster: tuple[Path, str],
                                                                          video: dict[str, Any]) -> None:
    state_dir, address = cluster
    setup(address, startup_scale=0.2, latency_scale=1.0)  # chat takes 2 s: long enough to be caught in flight
    accepted = [call(address, SubmitJob("video-qa", {"video": video, "question": f"Q{i}?"},
                                        slo={"accuracy": "basic"})).job_id for i in range(4)]

    def chat_in_flight() -> tuple[str, str] | None:
        for job_id in accepted:
            for inv in job(address, job_id).invocations:
                if inv.stage == "answer" and inv.state == "running":
                    return job_id, inv.node
        return None

    caught_job, victim = wait_for(chat_in_flight, 60, "a chat invocation in flight")
    os.kill(pid_of(state_dir, victim), signal.SIGKILL)
    killed_at = time.monotonic()
    # Bounded: the node goes suspect after SUSPECT_AFTER_S, its components leave the ready set, in-flight
    # invocations are retried on components placed on the surviving node (or the job fails, saying why).
    done = wait_terminal(address, accepted, timeout_s=60)
    elapsed_s = time.monotonic() - killed_at
    stored = stored_states(state_dir)
    for job_id, view in done.items():
        assert stored[job_id] == (view.state, view.reason)
        if view.state == "succeeded":
            answers = [i for i in view.invocations if i.stage == "answer" and i.state == "succeeded"]
            assert len(answers) == 1, view.invocations
        else:
            assert view.state == "failed" and view.reason, (job_id, view)
    caught = done[caught_job]
    if caught.state == "succeeded":
        answer = next(i for i in caught.invocations if i.stage == "answer" and i.state == "succeeded")
        assert answer.node != victim and answer.attempt >= 2, caught.invocations
        lost = [i for i in caught.invocations if i.stage == "answer" and i.node == victim]
        assert lost and all(i.state == "failed" and i.error for i in lost), caught.invocations
    survivor = next(n for n in ("sim-node-1", "sim-node-2") if n != victim)
    views = call(address, ListComponents()).components
    assert any(v.desired and v.node == survivor and v.executor == "sim-llama-8b-chat" for v in views), views
    assert not any(v.desired and v.node == victim for v in views), views
    print(f"{len(accepted)} jobs terminal {elapsed_s:.1f}s after {victim} was killed: "
          f"{sorted(v.state for v in done.values())}")
