"""Throughput: many concurrent jobs of a multi-stage workflow on simulated GPU nodes.

A local cluster (controller + simulated-GPU nodes, no real engines) runs ``video-qa``:
OpenCV tools (scene detection, frame extraction) on a small generated video, then
simulated speech-to-text, object detection and chat executors. All jobs are submitted
at once; the benchmark reports jobs/s from the first submission to the last terminal
state, job latency percentiles, and the controller's CPU use over that interval (from
/proc, user + system time). The GPU stages are simulated and their latencies come from
the sim catalog; what is measured is the orchestration around them.

    .venv/bin/python bench/workflow_throughput.py --jobs 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.tools.testdata import file_blob, make_test_video  # noqa: E402
from common.protocol import GetJob, SubmitJob  # noqa: E402
from controller.cli.client import AdminClient  # noqa: E402
from controller.cli.cluster import use_cluster_env  # noqa: E402

CTL = [sys.executable, "-m", "controller.cli.main"]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--sim-nodes", type=int, default=2)
    parser.add_argument("--state-dir", type=Path, default=REPO / ".state/bench-throughput")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/workflow_throughput.json")
    args = parser.parse_args()

    subprocess.run([*CTL, "cluster", "down", "--state-dir", str(args.state_dir)], cwd=REPO, capture_output=True)
    shutil.rmtree(args.state_dir, ignore_errors=True)  # a fresh controller database every run
    subprocess.run([*CTL, "cluster", "up", "--state-dir", str(args.state_dir), "--sim-nodes", str(args.sim_nodes),
                    "--gpus-per-node", "4", "--sim-utilization", "0"], cwd=REPO, check=True)
    use_cluster_env(args.state_dir)  # its admin key, for murakkabctl and AdminClient
    address = (args.state_dir / "controller.addr").read_text().strip()
    controller_pid = int((args.state_dir / "pids" / "controller.pid").read_text().split()[0])
    video = file_blob(make_test_video(args.state_dir / "bench.avi",
                                      scene_colors=[(200, 30, 30), (30, 200, 30), (30, 30, 200)]))
    try:
        # The sim GPU executors and the CPU tools; the vLLM executors of cpu.yaml are left out (this
        # benchmark measures orchestration around simulated engines, and the sim nodes hold no models).
        catalog = args.state_dir / "catalog.yaml"
        executors = yaml.safe_load((REPO / "examples/catalog/sim.yaml").read_text())["spec"]["executors"]
        executors += [e for e in yaml.safe_load((REPO / "examples/catalog/cpu.yaml").read_text())["spec"]["executors"]
                      if e["engine"] == "tool"]
        catalog.write_text(yaml.safe_dump({"apiVersion": "murakkab.dev/v1", "kind": "ExecutorCatalog",
                                           "metadata": {"name": "bench"}, "spec": {"executors": executors}}))
        for kind, path in (("catalog", str(catalog)), ("workflow", "examples/workflows/video-qa.yaml")):
            subprocess.run([*CTL, "--controller", address, kind, "apply", path], cwd=REPO, check=True)
        inputs = {"video": video, "question": "What is in the video?"}
        with AdminClient(address, timeout_s=30.0) as client:
            warm = client.call(SubmitJob("video-qa", inputs))  # waits for the sim components to start
            deadline = time.monotonic() + 300
            while (job := client.call(GetJob(warm.job_id, wait_s=30.0), timeout_s=40.0).job).state in ("queued",
                                                                                                     "running"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"warm-up job {warm.job_id} still {job.state} after 300 s")
            if job.state != "succeeded":
                raise SystemExit(f"warm-up job failed: {job.reason}")
            cpu_before = cpu_seconds(controller_pid)
            started = time.perf_counter()
            job_ids = [client.call(SubmitJob("video-qa", inputs)).job_id for _ in range(args.jobs)]
            submitted_s = time.perf_counter() - started
            jobs = []
            deadline = time.monotonic() + 900
            for job_id in job_ids:
                while time.monotonic() < deadline:
                    job = client.call(GetJob(job_id, wait_s=30.0, include_outputs=False), timeout_s=40.0).job
                    if job.state not in ("queued", "running"):
                        jobs.append(job)
                        break
            wall_s = time.perf_counter() - started
            cpu_s = cpu_seconds(controller_pid) - cpu_before
    finally:
        subprocess.run([*CTL, "cluster", "down", "--state-dir", str(args.state_dir)], cwd=REPO, capture_output=True)
    latencies = [j.ended_at_unix_s - j.submitted_at_unix_s for j in jobs if j.ended_at_unix_s]
    states: dict[str, int] = {}
    for job in jobs:
        states[job.state] = states.get(job.state, 0) + 1
    invocations = sum(len(j.invocations) for j in jobs)
    result = {
        "jobs": args.jobs, "states": states, "workflow": "video-qa (OpenCV tools + simulated GPU executors)",
        "sim_nodes": args.sim_nodes, "invocations": invocations,
        "submit_s": round(submitted_s, 3), "wall_s": round(wall_s, 3), "jobs_per_s": round(args.jobs / wall_s, 2),
        "invocations_per_s": round(invocations / wall_s, 1),
        "job_latency_s": {"p50": round(percentile(latencies, 50), 3), "p99": round(percentile(latencies, 99), 3)},
        "controller_cpu_s": round(cpu_s, 3), "controller_cpu_fraction_of_core": round(cpu_s / wall_s, 3),
        "controller_cpu_ms_per_job": round(cpu_s / args.jobs * 1e3, 2),
        "command": f"python bench/workflow_throughput.py --jobs {args.jobs}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if states.get("succeeded") == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
