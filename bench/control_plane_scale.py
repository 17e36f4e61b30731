"""Control-plane scale: one controller, many simulated agents heartbeating at 1 Hz with telemetry.

The controller runs as the real daemon in its own process; the agents are the
real Agent class with simulated GPUs, many per worker process. The controller's
CPU is read from /proc over the measurement window; heartbeat latency is the
round trip each agent measures from send to acknowledgement (an upper bound on
the controller's handling time, which is also read from its Prometheus
histogram).

Both controller sockets use CurveZMQ, each agent with a key of its own, unless
``--security insecure`` (``insecure = true``); ``--security both`` measures the two one
after the other in one run and reports them side by side.

    .venv/bin/python bench/control_plane_scale.py --agents 1000 --seconds 60 --security both
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.protocol import GetStatus  # noqa: E402
from common.security.curve import ClientCredentials, load_client_credentials  # noqa: E402
from controller.cli.client import AdminClient, ClientError  # noqa: E402
from controller.security.keyring import Keyring, init_keys_dir  # noqa: E402


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- worker: many agents in one process ------------------------------------------------


async def run_worker(args: argparse.Namespace) -> None:
    import random

    import zmq

    from agent.config import AgentSettings
    from agent.daemon import Agent
    from agent.devices.sim import open_sim_devices
    from agent.host import HostSampler

    ctx = zmq.Context()
    host = HostSampler()
    samples: list[tuple[float, float]] = []
    agents = []
    for i in range(args.offset, args.offset + args.count):
        name = f"bench-{i:04d}"
        keys = ({"insecure": True} if not args.keys_dir else
                {"key_file": Path(args.keys_dir) / "issued" / f"{name}.key_secret",
                 "controller_key_file": Path(args.keys_dir) / "controller.key"})
        settings = AgentSettings(node_name=name, controller=args.controller, state_dir=Path(args.state_dir),
                                 heartbeat_interval_s=1.0, sample_interval_s=1.0, request_timeout_s=5.0,
                                 missed_acks_before_reregister=5, reconnect_cap_s=5.0,
                                 metrics_enabled=False, **keys)
        devices = open_sim_devices(node_name=name, model="h100", count=args.gpus, seed=i, utilization=0.5,
                                   ambient_c=25.0, start_s=time.monotonic())
        agent = Agent(settings, devices, ctx=ctx, generation=1, host_sampler=host, rng=random.Random(i))
        agent.heartbeat_rtt_observers.append(lambda rtt, s=samples: s.append((time.time(), rtt)))
        agents.append(agent)
    stop = asyncio.Event()
    tasks = []
    for k, agent in enumerate(agents):
        # Spread the agents over the heartbeat interval, as independent hosts would be.
        await asyncio.sleep(1.0 / len(agents))
        tasks.append(asyncio.create_task(agent.run(stop)))
    stop_file = Path(args.stop_file)
    while not stop_file.exists():
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    Path(args.out).write_text(json.dumps(samples))
    ctx.term()


def run_lean_worker(args: argparse.Namespace) -> None:
    """Protocol-level simulated agents: real sockets, real sim GPUs, real messages, no asyncio per agent.

    Each agent registers, then heartbeats once a second at its own phase with telemetry
    sampled from its simulated GPUs, and re-registers when told to. The point is a
    load generator light enough that the controller, not the generator, owns the CPU.
    """
    import zmq

    from agent.devices.sim import open_sim_devices
    from agent.host import HostSampler, host_info
    from common.protocol import Heartbeat, HeartbeatAck, Register, decode, encode
    from common.security.curve import apply_client, load_client_credentials
    from common.transport import configure_socket

    ctx = zmq.Context()
    host = HostSampler()
    info = host_info()
    names, socks, devices = [], [], []
    for i in range(args.offset, args.offset + args.count):
        name = f"bench-{i:04d}"
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, name.encode())
        configure_socket(sock, router=False)
        if args.keys_dir:
            apply_client(sock, load_client_credentials(Path(args.keys_dir) / "issued" / f"{name}.key_secret",
                                                       Path(args.keys_dir) / "controller.key"))
        sock.connect(args.controller)
        names.append(name)
        socks.append(sock)
        devices.append(open_sim_devices(node_name=name, model="h100", count=args.gpus, seed=i, utilization=0.5,
                                        start_s=time.monotonic()))
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    index_of = {sock: k for k, sock in enumerate(socks)}

    def register(k: int) -> None:
        msg = Register(node_name=names[k], hostname="bench", generation=1, agent_version="bench",
                       devices=tuple(d.info for d in devices[k]), host=info)
        socks[k].send(encode(msg, 0))

    for k in range(len(socks)):
        register(k)
    samples: list[tuple[float, float]] = []
    sent_at: dict[tuple[int, int], float] = {}
    seq = 0
    period_s = 1.0
    start = time.monotonic()
    due = [(start + period_s * k / len(socks), k) for k in range(len(socks))]  # a heap of (time, agent)
    stop_file = Path(args.stop_file)
    last_stop_check = start
    host_sample, host_sampled_at = host.sample(), start
    while True:
        now = time.monotonic()
        if now - last_stop_check > 0.5:
            last_stop_check = now
            if stop_file.exists():
                break
        if now - host_sampled_at >= 1.0:
            host_sample, host_sampled_at = host.sample(), now
        while due[0][0] <= now:
            at, k = heapq.heappop(due)
            seq += 1
            telemetry = tuple(d.sample(now) for d in devices[k])
            msg = Heartbeat(node_name=names[k], generation=1, seq=seq, sent_at_unix_s=time.time(),
                            devices=telemetry, host=host_sample)
            try:
                socks[k].send(encode(msg, seq), flags=zmq.NOBLOCK)
                sent_at[(k, seq)] = time.perf_counter()
            except zmq.Again:
                pass
            heapq.heappush(due, (at + period_s, k))
        wait_ms = max(0.0, (due[0][0] - time.monotonic()) * 1000)
        for sock, _ in poller.poll(min(wait_ms, 50)):
            k = index_of[sock]
            while True:
                try:
                    frame = decode(sock.recv(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
                started = sent_at.pop((k, frame.request_id), None)
                if isinstance(frame.message, HeartbeatAck) and started is not None:
                    samples.append((time.time(), time.perf_counter() - started))
                elif frame.message.op == "reregister":
                    register(k)
    Path(args.out).write_text(json.dumps(samples))
    for sock in socks:
        sock.close(0)
    ctx.term()


# --- driver ----------------------------------------------------------------------------


def histogram_quantiles(metrics_url: str) -> dict[str, float]:
    """Estimate p50/p99 of the controller's handling-time histogram (upper bucket bound)."""
    url = metrics_url + "?name[]=murakkab_heartbeat_handling_seconds_bucket"  # skip the fleet's device gauges
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("murakkab_heartbeat_handling_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1]
    result = {"count": total}
    for name, q in (("p50_le_s", 0.5), ("p99_le_s", 0.99)):
        result[name] = next(le for le, count in buckets if count >= q * total)
    return result


def make_bench_keys(keys_dir: Path, agents: int) -> ClientCredentials:
    """The controller's pair, one node key per simulated agent and an admin key; the keyring written once."""
    init_keys_dir(keys_dir)
    keyring = Keyring.load(keys_dir)
    for i in range(agents):
        keyring.issue(f"bench-{i:04d}", "node", "node", save=False)
    _, admin = keyring.issue("bench-admin", "user", "admin", save=False)
    keyring.save()
    return load_client_credentials(admin, keys_dir / "controller.key")


def drive(args: argparse.Namespace, secure: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="murakkab-bench-"))
    keys_dir = work / "keys"
    admin = make_bench_keys(keys_dir, args.agents) if secure else None
    (work / "controller.toml").write_text(
        "[controller]\nagent_bind = \"tcp://127.0.0.1:*\"\nadmin_bind = \"tcp://127.0.0.1:*\"\n"
        f"state_dir = \"{work / 'controller'}\"\nmetrics_port = 0\nsuspect_after_s = 5.0\nlost_after_s = 30.0\n"
        f"agent_receive_coalesce_s = {args.coalesce_s}\n"
        f"keys_dir = \"{keys_dir}\"\ninsecure = {'false' if secure else 'true'}\n"
        "log_level = \"WARNING\"\n")
    controller = subprocess.Popen([sys.executable, "-m", "controller.main", "--config", str(work / "controller.toml")],
                                  cwd=ROOT, stdout=open(work / "controller.log", "wb"), stderr=subprocess.STDOUT)
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        # In production the agents run on other hosts: give the controller a CPU of its own.
        os.sched_setaffinity(controller.pid, {cpus[0]})
    workers: list[subprocess.Popen] = []
    try:
        endpoints_file = work / "controller" / "endpoints.json"
        deadline = time.monotonic() + 30
        while not endpoints_file.exists():
            if time.monotonic() > deadline or controller.poll() is not None:
                raise SystemExit(f"controller did not start; see {work / 'controller.log'}")
            time.sleep(0.1)
        endpoints = json.loads(endpoints_file.read_text())
        per_worker = -(-args.agents // args.workers)
        stop_file = work / "stop"
        for w in range(args.workers):
            offset, count = w * per_worker, min(per_worker, args.agents - w * per_worker)
            if count <= 0:
                break
            workers.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--agent-impl", args.agent_impl,
                 "--controller", endpoints["agents"], "--offset", str(offset),
                 "--count", str(count), "--gpus", str(args.gpus), "--state-dir", str(work / "agents"),
                 "--stop-file", str(stop_file), "--out", str(work / f"worker-{w}.json"),
                 "--keys-dir", str(keys_dir) if secure else ""],
                cwd=ROOT, stdout=open(work / f"worker-{w}.log", "wb"), stderr=subprocess.STDOUT))
            if args.pin and len(cpus) >= 2:
                os.sched_setaffinity(workers[-1].pid, set(cpus[1:]))
        with AdminClient(endpoints["admin"], timeout_s=10, credentials=admin) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    ready = client.call(GetStatus()).nodes_by_state.get("ready", 0)
                except ClientError:
                    ready = 0
                if ready >= args.agents:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {ready}/{args.agents} agents ready after 180 s; see {work}")
                time.sleep(1)
        time.sleep(args.warmup)
        proc = psutil.Process(controller.pid)
        worker_procs = [psutil.Process(w.pid) for w in workers]
        wcpu0 = [p.cpu_times() for p in worker_procs]
        metrics_url = f"http://127.0.0.1:{endpoints['metrics_port']}/metrics"
        before = histogram_quantiles(metrics_url)
        cpu0, t0 = proc.cpu_times(), time.time()
        time.sleep(args.seconds)
        cpu1, t1 = proc.cpu_times(), time.time()
        wcpu1 = [p.cpu_times() for p in worker_procs]
        worker_cpu_s = sum((b.user - a.user) + (b.system - a.system) for a, b in zip(wcpu0, wcpu1))
        after = histogram_quantiles(metrics_url)
        rss_bytes = proc.memory_info().rss
        stop_file.touch()
        for worker in workers:
            worker.wait(timeout=60)
        rtts = []
        for w in range(len(workers)):
            rtts += [rtt for at, rtt in json.loads((work / f"worker-{w}.json").read_text()) if t0 <= at <= t1]
        cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return {
            "security": "curve" if secure else "insecure",
            "agents": args.agents, "gpus_per_agent": args.gpus, "window_s": round(t1 - t0, 1),
            "controller_cpu_share_of_one_core": round(cpu_s / (t1 - t0), 4),
            "controller_rss_mb": round(rss_bytes / 1e6, 1),
            "coalesce_s": args.coalesce_s, "agent_impl": args.agent_impl, "agent_processes": len(workers), "pinned": args.pin,
            "agent_processes_cpu_share_of_one_core": round(worker_cpu_s / (t1 - t0), 4),
            "heartbeats_in_window": len(rtts),
            "heartbeats_per_s": round(len(rtts) / (t1 - t0), 1),
            "rtt_p50_ms": round(quantile(rtts, 0.50) * 1000, 2),
            "rtt_p99_ms": round(quantile(rtts, 0.99) * 1000, 2),
            "rtt_max_ms": round(max(rtts) * 1000, 2) if rtts else None,
            "rtt_mean_ms": round(statistics.fmean(rtts) * 1000, 2) if rtts else None,
            "controller_handling_histogram": {"heartbeats": after["count"] - before["count"],
                                              "p50_le_s": after["p50_le_s"], "p99_le_s": after["p99_le_s"]},
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "state_dir": str(work),
        }
    finally:
        (work / "stop").touch()
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        controller.terminate()
        controller.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8, help="simulated GPUs per agent")
    parser.add_argument("--workers", type=int, default=4, help="agent processes")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/control_plane_scale-IMPL.json")
    parser.add_argument("--agent-impl", choices=("daemon", "lean"), default="daemon",
                        help="daemon: the real Agent class (asyncio); lean: protocol-level simulated agents")
    parser.add_argument("--coalesce-s", type=float, default=0.005, help="controller agent_receive_coalesce_s")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not give the controller a CPU of its own (agents on the others)")
    parser.add_argument("--security", choices=("curve", "insecure", "both"), default="curve",
                        help="CurveZMQ with a key per agent (the default deployment), insecure = true, or both "
                             "one after the other, reported side by side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keys-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--controller", help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    parser.add_argument("--stop-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.agent_impl == "lean":
            run_lean_worker(args)
        else:
            asyncio.run(run_worker(args))
        return
    modes = {"curve": [True], "insecure": [False], "both": [False, True]}[args.security]
    runs = [drive(args, secure) for secure in modes]
    targets = {"controller_cpu_share_of_one_core": "<= 0.30", "rtt_p99_ms": "<= 50"}
    if len(runs) == 1:
        result = {**runs[0], "targets": targets}
    else:
        plain, curve = runs
        result = {"runs": runs, "targets": targets, "targets_apply_to": "curve", "curve_cost": {
            "controller_cpu_share_of_one_core": round(curve["controller_cpu_share_of_one_core"]
                                                      - plain["controller_cpu_share_of_one_core"], 4),
            "rtt_p50_ms": round(curve["rtt_p50_ms"] - plain["rtt_p50_ms"], 2),
            "rtt_p99_ms": round(curve["rtt_p99_ms"] - plain["rtt_p99_ms"], 2),
            "controller_rss_mb": round(curve["controller_rss_mb"] - plain["controller_rss_mb"], 1)}}
    suffix = "" if args.security == "curve" else f"-{args.security}"
    out = args.out or ROOT / "bench" / "results" / (
        f"control_plane_scale-{args.agent_impl}-coalesce{args.coalesce_s:g}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
