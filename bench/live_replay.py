"""Live replay: the same scenario on a real controller and real agents, and in the simulator, side by side.

A local cluster (``murakkabctl cluster up``: the controller and one agent process per node, simulated H100s
and simulated engines, all on loopback) replays a scenario in real time: jobs are submitted through the
admin socket at the scenario's Poisson arrival times and tiers (the simulator's own draw, same seed), and
its faults run as drills on the live cluster:

- ``node-failure``: the node's agent process is SIGKILLed (``node-recovery`` starts it again);
- ``cooling-failure``/``cooling-restored``: ``node fault NODE DEVICE cooling-failure|clear`` on the GPU that
  serves the most components at that moment (the scenario's device is used by the simulator; the live
  cluster's placement may differ, so the drill follows its load; the report names both);
- ``budget``: ``power budget set --cluster W`` (or clear).

While it runs, the bench samples every node's telemetry and the components once a second: GPU-hours are
the GPU-seconds held by components, energy is the integral of the simulated GPUs' power (allocated: GPUs
holding components; fleet: all), SLO attainment is the share of jobs that succeeded within the latency
target ``plan show`` gives their demand. Reaction times come from the samples and the autopilot's events:
a hot GPU relieved (its limit lowered), measured power back under a cut budget, a lost node's stages
serving elsewhere (a replacement component ready). Then the simulator runs the same scenario (murakkab).
Everything here is simulated hardware; the control plane, placement and reactions are the daemon's.

    .venv/bin/python bench/live_replay.py            # examples/scenarios/live-replay.yaml, about 12 minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.protocol import (  # noqa: E402
    ApplyCatalog, ApplyWorkflow, GetJob, GetPlan, InjectDeviceFault, ListComponents, ListEvents, ListNodes,
    SetPowerBudget, SubmitJob,
)
from controller.cli.client import AdminClient, ClientError  # noqa: E402
from controller.cli.cluster import use_cluster_env  # noqa: E402
from controller.cli.cluster import spawn  # noqa: E402
from controller.simulator.run import run_simulation  # noqa: E402
from controller.simulator.scenario import load_scenario, parse_scenario  # noqa: E402
from controller.simulator.trace import generate_arrivals  # noqa: E402

CTL = [sys.executable, "-m", "controller.cli.main"]
TERMINAL = ("succeeded", "failed", "cancelled")


class Client:
    """One admin connection per thread (ZeroMQ sockets are not thread-safe)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.local = threading.local()

    def call(self, msg: Any, timeout_s: float = 30.0) -> Any:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = AdminClient(self.address, timeout_s)
        return client.call(msg, timeout_s)


class Sampler(threading.Thread):
    """Once a second: telemetry of every device and which GPUs components hold."""

    def __init__(self, client: Client, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client, self.stop = client, stop
        self.samples: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.samples.append(self.sample())
            except ClientError:
                pass
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def sample(self) -> dict[str, Any]:
        nodes = self.client.call(ListNodes(limit=200)).nodes
        components = self.client.call(ListComponents()).components
        devices = {}
        for node in nodes:
            for t in node.telemetry:
                info = next((d for d in node.devices if d.index == t.index), None)
                if info is None or info.kind != "gpu":
                    continue
                devices[f"{node.name}/{t.index}"] = {
                    "state": node.state, "power_w": t.power_w, "energy_j": t.energy_j,
                    "temperature_c": t.temperature_c, "power_limit_w": t.power_limit_w,
                    "throttle_reasons": list(t.throttle_reasons)}
        held: dict[str, list[str]] = {}
        for view in components:
            report = view.report
            if report is None or report.state not in ("starting", "ready", "draining"):
                continue
            for index in view.device_indexes:
                held.setdefault(f"{view.node}/{index}", []).append(f"{view.executor}:{report.state}")
        return {"t": time.monotonic(), "devices": devices, "held": held}


def node_map(scenario: Any) -> dict[str, str]:
    """Scenario node names (group-NNNN) -> the local cluster's (sim-node-N), in order."""
    names = [f"{g.name}-{n:04d}" for g in scenario.spec.cluster.node_groups for n in range(g.count)]
    return {name: f"sim-node-{i + 1}" for i, name in enumerate(names)}


def busiest_gpu(sampler: Sampler, avoid_node: str | None = None) -> tuple[str, int] | None:
    if not sampler.samples:
        return None
    last = sampler.samples[-1]
    held = sorted(((len(v), k) for k, v in last["held"].items() if not k.startswith(f"{avoid_node}/")), reverse=True)
    if not held:
        return None
    node, index = held[0][1].rsplit("/", 1)
    return node, int(index)


def drill(fault: Any, client: Client, names: dict[str, str], state_dir: Path, sampler: Sampler,
          log: list[dict[str, Any]], t0: float, cooling: dict[str, Any]) -> None:
    entry: dict[str, Any] = {"kind": fault.kind, "scenario_at_s": fault.at_s, "at_s": round(time.monotonic() - t0, 2)}
    if fault.kind in ("node-failure", "node-recovery"):
        node = names[fault.node]
        entry["node"] = node
        if fault.kind == "node-failure":
            pid = int((state_dir / "pids" / f"{node}.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            entry["pid"] = pid
        else:
            config = state_dir / "agents" / node / "agent.toml"
            entry["pid"] = spawn(state_dir, node, [sys.executable, "-m", "agent.main", "--config", str(config)])
    elif fault.kind == "cooling-failure":
        target = busiest_gpu(sampler) or (names[fault.node], fault.device)
        cooling["target"] = target
        entry["node"], entry["device"] = target
        entry["scenario_device"] = f"{names[fault.node]}/{fault.device}"
        entry["reply"] = client.call(InjectDeviceFault(target[0], target[1], "cooling-failure", None)).message
    elif fault.kind == "cooling-restored":
        target = cooling.get("target") or (names[fault.node], fault.device)
        entry["node"], entry["device"] = target
        entry["reply"] = client.call(InjectDeviceFault(target[0], target[1], "clear", None)).message
    else:
        client.call(SetPowerBudget(fault.rack, fault.power_budget_w))
        entry["power_budget_w"] = fault.power_budget_w
    log.append(entry)
    print(f"[{entry['at_s']:7.1f} s] drill {fault.kind}: {json.dumps({k: v for k, v in entry.items() if k != 'kind'})}",
          flush=True)


def submit_all(client: Client, arrivals: Any, t0: float, duration_s: float, accepted: list[dict[str, Any]],
               refused: list[str]) -> None:
    """Every arrival at its time within its step (evenly spread), with its tier."""
    schedule = []
    for k in range(arrivals.steps):
        for j, demand in enumerate(arrivals.demands):
            n = int(arrivals.counts[k][j])
            for i in range(n):
                schedule.append((k * arrivals.step_s + (i + 0.5) * arrivals.step_s / n, demand))
    schedule.sort(key=lambda item: item[0])
    for n, (at_s, demand) in enumerate(schedule):
        if at_s >= duration_s:
            break
        delay = t0 + at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        slo = dict(demand.slo)
        for attempt in range(20):  # 'unavailable' (e.g. right after a restart) is retried, as a client would
            try:
                reply = client.call(SubmitJob(demand.workflow, {"question": f"q{n}?"}, slo))
                accepted.append({"job_id": reply.job_id, "slo": slo, "at_s": at_s})
                break
            except ClientError as exc:
                if not str(exc).startswith("unavailable") or attempt == 19:
                    refused.append(str(exc))
                    break
                time.sleep(0.25)


def integrate(samples: list[dict[str, Any]]) -> dict[str, float]:
    gpu_s = alloc_j = fleet_j = 0.0
    for a, b in zip(samples, samples[1:]):
        dt = b["t"] - a["t"]
        for key, dev in a["devices"].items():
            later = b["devices"].get(key)
            if dev["state"] != "ready" or later is None or later["state"] != "ready":
                continue
            joules = max(0.0, later["energy_j"] - dev["energy_j"])
            fleet_j += joules
            if key in a["held"]:
                alloc_j += joules
                gpu_s += dt
    return {"gpu_hours": gpu_s / 3600.0, "energy_kwh": alloc_j / 3.6e6, "fleet_energy_kwh": fleet_j / 3.6e6}


def reactions(drills: list[dict[str, Any]], samples: list[dict[str, Any]], events: list[dict[str, Any]],
              t0: float, t0_unix: float, hot_c: float) -> list[dict[str, Any]]:
    out = []
    for d in drills:
        after = [s for s in samples if s["t"] - t0 >= d["at_s"]]
        entry = dict(d)
        if d["kind"] == "cooling-failure":
            key = f"{d['node']}/{d['device']}"
            hot = next((s for s in after if (s["devices"].get(key, {}).get("temperature_c") or 0) >= hot_c
                        or {"sw_thermal_slowdown", "hw_thermal_slowdown"}
                        & set(s["devices"].get(key, {}).get("throttle_reasons", ()))), None)
            if hot is not None:
                limit0 = hot["devices"][key]["power_limit_w"]
                relieved = next((s for s in after if s["t"] >= hot["t"]
                                 and (s["devices"].get(key, {}).get("power_limit_w") or 1e9) < limit0 - 1), None)
                entry["hot_after_s"] = round(hot["t"] - t0 - d["at_s"], 1)
                entry["relieved_after_hot_s"] = None if relieved is None else round(relieved["t"] - hot["t"], 1)
                moved = next((s for s in after if s["t"] >= hot["t"] and not s["held"].get(key)), None)
                entry["load_gone_after_hot_s"] = None if moved is None else round(moved["t"] - hot["t"], 1)
        elif d["kind"] == "budget" and d.get("power_budget_w"):
            budget = d["power_budget_w"]
            under = next((s for s in after if sum(v["power_w"] for v in s["devices"].values()
                                                   if v["state"] == "ready") <= budget), None)
            entry["under_budget_after_s"] = None if under is None else round(under["t"] - t0 - d["at_s"], 1)
        elif d["kind"] == "node-failure":
            node = d["node"]
            lost = next((s for s in after if any(v["state"] == "lost" for k, v in s["devices"].items()
                                                 if k.startswith(node + "/"))), None)
            entry["lost_after_s"] = None if lost is None else round(lost["t"] - t0 - d["at_s"], 1)
            replaced = next((e for e in events if e["kind"] == "replace" and node in e["reason"]
                             and e["at_unix_s"] - t0_unix >= d["at_s"]), None)
            entry["replaced_after_s"] = (None if replaced is None
                                         else round(replaced["at_unix_s"] - t0_unix - d["at_s"], 1))
            before = {k for k in (after[0]["held"] if after else {}) if k.startswith(node + "/")}
            entry["held_on_node_before"] = sorted(before)
        out.append(entry)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", type=Path, default=REPO / "examples/scenarios/live-replay.yaml")
    parser.add_argument("--state-dir", type=Path, default=REPO / ".state/bench-live-replay")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/live_replay.json")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    spec = scenario.spec
    names = node_map(scenario)
    groups = {g.hardware for g in spec.cluster.node_groups}
    if len(groups) != 1 or "cpu" in groups:
        raise SystemExit("live replay supports one GPU node group (cluster up starts one GPU model)")
    group = spec.cluster.node_groups[0]

    subprocess.run([*CTL, "cluster", "down", "--state-dir", str(args.state_dir)], cwd=REPO, capture_output=True)
    shutil.rmtree(args.state_dir, ignore_errors=True)
    subprocess.run([*CTL, "cluster", "up", "--state-dir", str(args.state_dir), "--sim-nodes", str(group.count),
                    "--gpus-per-node", str(group.devices_per_node), "--gpu-model", group.hardware,
                    "--sim-utilization", "0"], cwd=REPO, check=True)
    use_cluster_env(args.state_dir)  # its admin key, for murakkabctl and AdminClient
    client = Client((args.state_dir / "controller.addr").read_text().strip())
    stop = threading.Event()
    sampler = Sampler(client, stop)
    drills: list[dict[str, Any]] = []
    accepted: list[dict[str, Any]] = []
    refused: list[str] = []
    try:
        for ref in ("catalog/sim.yaml",):
            client.call(ApplyCatalog(ref, (REPO / "examples" / ref).read_text()))
        for name in scenario.workflows:
            path = REPO / "examples/workflows" / f"{name}.yaml"
            client.call(ApplyWorkflow(path.name, path.read_text()))
        arrivals = generate_arrivals(spec.trace, spec.duration_s, spec.step_s, spec.seed, base_dir=scenario.base_dir)
        sampler.start()
        t0, t0_unix = time.monotonic(), time.time()
        submitter = threading.Thread(target=submit_all, daemon=True,
                                     args=(client, arrivals, t0, spec.duration_s, accepted, refused))
        submitter.start()
        cooling: dict[str, Any] = {}
        for fault in sorted(spec.faults, key=lambda f: f.at_s):
            delay = t0 + fault.at_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            drill(fault, client, names, args.state_dir, sampler, drills, t0, cooling)
        time.sleep(max(0.0, t0 + spec.duration_s - time.monotonic()))
        submitter.join(timeout=60)
        jobs = []
        deadline = time.monotonic() + 300
        for job in accepted:
            while True:
                view = client.call(GetJob(job["job_id"], wait_s=10.0), timeout_s=20.0).job
                if view.state in TERMINAL or time.monotonic() > deadline:
                    break
            jobs.append((job, view))
        stop.set()
        sampler.join(timeout=5)
        plan = client.call(GetPlan()).explanation
        events = list(client.call(ListEvents(1000)).events)
    finally:
        stop.set()
        subprocess.run([*CTL, "cluster", "down", "--state-dir", str(args.state_dir)], cwd=REPO, capture_output=True)

    samples = [s for s in sampler.samples if s["t"] - t0 <= spec.duration_s]
    targets = {tuple(sorted(d["slo"].items())): d["predicted"]["latency_target_s"]
               for d in plan["demands"] if d.get("predicted")}
    tiers: dict[str, list[int]] = {}
    states: dict[str, int] = {}
    failures: dict[str, int] = {}
    for job, view in jobs:
        states[view.state] = states.get(view.state, 0) + 1
        if view.state == "failed":
            failures[view.reason[:120]] = failures.get(view.reason[:120], 0) + 1
        target = targets.get(tuple(sorted(job["slo"].items())))
        latency = (view.ended_at_unix_s - view.submitted_at_unix_s) if view.ended_at_unix_s else None
        met = view.state == "succeeded" and target is not None and latency is not None and latency <= target
        for dim, tier in job["slo"].items():
            tiers.setdefault(f"{dim}:{tier}", [0, 0])
            tiers[f"{dim}:{tier}"][0] += 1
            tiers[f"{dim}:{tier}"][1] += int(met)
    met_total = sum(1 for job, view in jobs if view.state == "succeeded" and targets.get(
        tuple(sorted(job["slo"].items()))) is not None and view.ended_at_unix_s
        and view.ended_at_unix_s - view.submitted_at_unix_s <= targets[tuple(sorted(job["slo"].items()))])
    latency_by_tier: dict[str, list[float]] = {}
    for job, view in jobs:
        if view.state == "succeeded" and view.ended_at_unix_s:
            for dim, tier in job["slo"].items():
                latency_by_tier.setdefault(f"{dim}:{tier}", []).append(
                    view.ended_at_unix_s - view.submitted_at_unix_s)
    latency = {}
    for label, values in sorted(latency_by_tier.items()):
        values.sort()
        slo = dict([label.split(":")])
        latency[label] = {"p50_s": round(values[len(values) // 2], 3),
                          "p95_s": round(values[int(0.95 * (len(values) - 1))], 3),
                          "target_s": targets.get(tuple(sorted(slo.items())))}
    live = {**integrate(samples), "jobs": len(accepted), "refused": len(refused), "states": states,
            "latency_per_tier": latency,
            "failures": failures, "slo_attainment": met_total / len(jobs) if jobs else None,
            "slo_attainment_per_tier": {k: m / n for k, (n, m) in sorted(tiers.items()) if n},
            "moves": sum(1 for e in events if e["kind"] in ("rollout-switched", "replace")),
            "events": {k: sum(1 for e in events if e["kind"] == k) for k in sorted({e["kind"] for e in events})}}
    hot_c = 89.0 - 5.0  # the H100's slowdown temperature less the autopilot's margin
    live["reactions"] = reactions(drills, samples, events, t0, t0_unix, hot_c)

    sim_doc = yaml.safe_load(args.scenario.read_text())
    sim_scenario = parse_scenario(copy.deepcopy(sim_doc), str(args.scenario), args.scenario.parent)
    report, _ = run_simulation(sim_scenario, "murakkab", plots=False)
    simulated = {"gpu_hours": report["gpu_hours"], "energy_kwh": report["energy_mwh"] * 1000.0,
                 "fleet_energy_kwh": report["fleet_energy_mwh"] * 1000.0,
                 "slo_attainment": report["slo_attainment"]["overall"],
                 "slo_attainment_per_tier": {k: v for k, v in report["slo_attainment"].items() if k != "overall"},
                 "moves": report["plan_switches"], "requests": report["requests"],
                 "reactions": report.get("fault_reactions", [])}

    def ratio(key: str) -> float | None:
        return live[key] / simulated[key] if simulated.get(key) else None

    result = {"scenario": scenario.name, "duration_s": spec.duration_s, "simulated_hardware": True,
              "live": live, "simulator": simulated, "drills": drills,
              "comparison": {"gpu_hours_live_over_sim": ratio("gpu_hours"), "energy_live_over_sim": ratio("energy_kwh"),
                             "fleet_energy_live_over_sim": ratio("fleet_energy_kwh"),
                             "slo_points_live_minus_sim": None if live["slo_attainment"] is None else
                             100.0 * (live["slo_attainment"] - simulated["slo_attainment"])}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result["comparison"], indent=2))
    for r in live["reactions"]:
        print("live reaction:", json.dumps(r))
    shown = ("gpu_hours", "energy_kwh", "fleet_energy_kwh", "slo_attainment")
    print("live:", json.dumps({k: live[k] for k in (*shown, "jobs", "states", "failures")}, default=str))
    print("simulator:", json.dumps({k: simulated[k] for k in shown}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
