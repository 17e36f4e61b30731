"""Agent footprint: one murakkab-agent process with 8 simulated GPUs sampled at 10 Hz.

The agent and a controller run as real daemons; the agent's RSS and CPU time
are read from /proc over the measurement window.

    .venv/bin/python bench/agent_footprint.py --seconds 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.protocol import GetNode  # noqa: E402
from common.security.curve import load_client_credentials  # noqa: E402
from controller.cli.client import AdminClient, ClientError  # noqa: E402
from controller.security.keyring import Keyring, init_keys_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--sample-hz", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "agent_footprint.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="murakkab-footprint-"))
    keys_dir = work / "keys"  # CurveZMQ, as deployed
    init_keys_dir(keys_dir)
    keyring = Keyring.load(keys_dir)
    _, agent_key = keyring.issue("footprint", "node", "node")
    _, admin_key = keyring.issue("bench-admin", "user", "admin")
    (work / "controller.toml").write_text(
        "[controller]\nagent_bind = \"tcp://127.0.0.1:*\"\nadmin_bind = \"tcp://127.0.0.1:*\"\n"
        f"state_dir = \"{work / 'controller'}\"\nkeys_dir = \"{keys_dir}\"\n"
        "metrics_enabled = false\nlog_level = \"WARNING\"\n")
    controller = subprocess.Popen([sys.executable, "-m", "controller.main", "--config", str(work / "controller.toml")],
                                  cwd=ROOT, stdout=open(work / "controller.log", "wb"), stderr=subprocess.STDOUT)
    agent = None
    try:
        endpoints_file = work / "controller" / "endpoints.json"
        deadline = time.monotonic() + 30
        while not endpoints_file.exists():
            if time.monotonic() > deadline:
                raise SystemExit("controller did not start")
            time.sleep(0.1)
        endpoints = json.loads(endpoints_file.read_text())
        (work / "agent.toml").write_text(
            f"[agent]\nnode_name = \"footprint\"\ncontroller = \"{endpoints['agents']}\"\n"
            f"state_dir = \"{work / 'agent'}\"\nheartbeat_interval_s = 1.0\nsample_interval_s = {1 / args.sample_hz}\n"
            "metrics_enabled = true\nmetrics_port = 0\nlog_level = \"WARNING\"\n"
            f"key_file = \"{agent_key}\"\ncontroller_key_file = \"{keys_dir / 'controller.key'}\"\n"
            f"[devices]\nbackend = \"sim\"\ninclude_cpu = true\n"
            f"[devices.sim]\nmodel = \"h100\"\ncount = {args.gpus}\nseed = 1\nutilization = 0.7\n")
        agent = subprocess.Popen([sys.executable, "-m", "agent.main", "--config", str(work / "agent.toml")],
                                 cwd=ROOT, stdout=open(work / "agent.log", "wb"), stderr=subprocess.STDOUT)
        admin = load_client_credentials(admin_key, keys_dir / "controller.key")
        with AdminClient(endpoints["admin"], timeout_s=5, credentials=admin) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.call(GetNode("footprint")).node.state == "ready":
                        break
                except ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"agent never became ready; see {work / 'agent.log'}")
                time.sleep(0.2)
        time.sleep(5)  # settle: imports done, first samples taken
        proc = psutil.Process(agent.pid)
        rss = []
        threads0 = {t.id: t.user_time + t.system_time for t in proc.threads()}
        cpu0, t0 = proc.cpu_times(), time.time()
        end = t0 + args.seconds
        while time.time() < end:
            rss.append(proc.memory_info().rss)
            time.sleep(1.0)
        cpu1, t1 = proc.cpu_times(), time.time()
        threads1 = {t.id: t.user_time + t.system_time for t in proc.threads()}
        cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        result = {
            "gpus": args.gpus, "sample_hz": args.sample_hz, "window_s": round(t1 - t0, 1),
            "agent_cpu_share_of_one_core": round(cpu_s / (t1 - t0), 4),
            "agent_rss_mb_max": round(max(rss) / 1e6, 1), "agent_rss_mb_median": round(sorted(rss)[len(rss) // 2] / 1e6, 1),
            "agent_uss_mb": round(proc.memory_full_info().uss / 1e6, 1),
            "cpu_share_by_thread": sorted((round((threads1[k] - threads0.get(k, 0.0)) / (t1 - t0), 4)
                                           for k in threads1), reverse=True),
            "targets": {"agent_rss_mb_max": "<= 80", "agent_cpu_share_of_one_core": "<= 0.02"},
        }
    finally:
        for p in (agent, controller):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
