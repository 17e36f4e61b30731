"""``murakkabctl cluster up|down|status``: a local cluster on loopback for development and demos.

A controller and N agents run as background processes, each in its own
session so ``down`` can end a daemon together with anything it started.
Engines (vLLM servers) run in sessions of their own, so ``down`` then also reaps
those recorded under each agent's state directory (``agent.components.orphans``):
an agent that was SIGKILLed, or did not finish stopping them, leaves nothing behind.
Everything lives in the state directory: configs, pids, logs, databases, and the CurveZMQ
keys (``keys/``: the controller's pair, the keyring, one key per agent and an ``admin``
user key). ``STATE_DIR/env`` holds the ``export`` lines a shell sources to reach it.
Unless ``--no-mqtt``, a Mosquitto broker runs on a loopback port beside them (``controller.cli.broker``:
per-client passwords and an ACL under ``STATE_DIR/mqtt/``, ``STATE_DIR/mqtt/facility.env`` for a facility
publisher); the controller and every agent get an ``[mqtt]`` table pointing at it. Simulated nodes sit in
racks of their own (label ``rack``: ``rack-a``, ``rack-b``, ...) so rack budgets and cooling have targets.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console

from agent.components.orphans import LinuxProc, Outcome, reap_components
from agent.components.ports import os_free_port
from agent.components.privileges import local_cluster_engine_user
from common.security.curve import KeyFileError, load_client_credentials, read_key_file
from controller.cli.broker import BrokerError, BrokerPlan, prepare_broker
from controller.cli.client import AdminClient, ClientError
from controller.security.keyring import Keyring, KeyringError, init_keys_dir

READY_TIMEOUT_S = 60.0
BROKER_START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def add_cluster_commands(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="run a local cluster on loopback")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    up = cluster_sub.add_parser("up", help="start a controller and simulated agents")
    up.add_argument("--state-dir", type=Path, required=True)
    up.add_argument("--sim-nodes", type=int, default=2, help="agents with simulated GPUs")
    up.add_argument("--gpus-per-node", type=int, default=4)
    up.add_argument("--gpu-model", default="h100", help="h100, a100 or l4")
    up.add_argument("--cpu-node", action="store_true", help="also start an agent for this host's CPU")
    up.add_argument("--sim-utilization", type=float, default=0.3, help="simulated GPU load, 0..1")
    up.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds")
    up.add_argument("--suspect-after", type=float, default=3.0, help="seconds without heartbeat")
    up.add_argument("--lost-after", type=float, default=10.0, help="seconds without heartbeat")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--planner", choices=("murakkab", "murakkab-epoch", "static", "first-fit"), default="murakkab",
                    help="the controller's autopilot preset (murakkab: forecast, MILP with power caps, reactive "
                         "scaling, heat and budget reactions; murakkab-epoch and static: the baselines) or "
                         "first-fit (no autopilot)")
    up.add_argument("--insecure", action="store_true",
                    help="plaintext sockets without keys (the daemons log a warning at every start)")
    up.add_argument("--no-mqtt", action="store_true",
                    help="start no MQTT broker (facility signals and node telemetry over MQTT are then off)")
    up.add_argument("--mqtt-port", type=int, default=0, help="the broker's loopback port (default: a free one)")
    up.add_argument("--model-dir", type=Path, default=None,
                    help="where agents find models ({model_dir} in catalogs); default STATE_DIR/models")
    up.set_defaults(handler=cluster_up)
    down = cluster_sub.add_parser("down", help="stop every process of a local cluster")
    down.add_argument("--state-dir", type=Path, required=True)
    down.set_defaults(handler=cluster_down)
    status = cluster_sub.add_parser("status", help="which processes of a local cluster are running")
    status.add_argument("--state-dir", type=Path, required=True)
    status.set_defaults(handler=cluster_status)


def _proc_start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot, or None if there is no such process (or a zombie)."""
    info = LinuxProc().stat(pid)
    return None if info is None or info.zombie else info.start_ticks


def _alive(pid: int) -> bool:
    return _proc_start_ticks(pid) is not None


def _pids(state_dir: Path) -> dict[str, int]:
    """Recorded pids that still belong to the process we started (pids get reused)."""
    pids = {}
    for path in sorted((state_dir / "pids").glob("*.pid")):
        try:
            pid_text, start_text = path.read_text().split()
            pid, start_ticks = int(pid_text), int(start_text)
        except ValueError:
            continue
        if _proc_start_ticks(pid) in (start_ticks, None):
            pids[path.stem] = pid
    return pids


def spawn(state_dir: Path, name: str, argv: list[str]) -> int:
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    (state_dir / "pids").mkdir(parents=True, exist_ok=True)
    with open(state_dir / "logs" / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=state_dir)
    (state_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid} {_proc_start_ticks(proc.pid) or 0}\n")
    return proc.pid


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    return os_free_port("127.0.0.1")


def _write_toml(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(document))
    return path


def _wait_for(predicate: Any, timeout_s: float, what: str, pid_to_watch: dict[str, int], state_dir: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        dead = [name for name, pid in pid_to_watch.items() if not _alive(pid)]
        if dead:
            raise ClientError(f"{', '.join(dead)} exited during start-up; see {state_dir / 'logs'}")
        time.sleep(0.1)
    raise ClientError(f"timed out after {timeout_s:g}s waiting for {what}; see {state_dir / 'logs'}")


def rack_label(index: int) -> str:
    """rack-a, rack-b, ..., rack-z, rack-aa, ...: the rack of the index-th simulated node (from 1)."""
    letters = ""
    while index > 0:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return f"rack-{letters}"


def start_broker(state_dir: Path, nodes: list[str], port: int, started: dict[str, int]) -> BrokerPlan:
    """Mosquitto for the local cluster, listening before this returns (or a ClientError that says why)."""
    try:
        plan = prepare_broker(state_dir, nodes, port or free_port())
    except BrokerError as exc:
        raise ClientError(str(exc)) from None
    started["mqtt"] = spawn(state_dir, "mqtt", plan.argv)

    def listening() -> bool:
        try:
            with socket.create_connection((plan.host, plan.port), timeout=0.2):
                return True
        except OSError:
            return False

    _wait_for(listening, BROKER_START_TIMEOUT_S, f"the MQTT broker on {plan.host}:{plan.port}", started, state_dir)
    return plan


def local_key(keyring: Keyring, name: str, kind: str, role: str) -> Path:
    """The secret key file of a live key named ``name`` that an earlier ``up`` issued, or a new one."""
    path = keyring.keys_dir / "issued" / f"{name}.key_secret"
    try:
        public = read_key_file(path, what="key", need_secret=True).public_z85.decode()
    except KeyFileError:
        public = ""
    entry = keyring.lookup(public)
    if entry is not None and not entry.revoked and entry.name == name and entry.kind == kind and entry.role == role:
        return path
    for stale in keyring.named(name):  # a revoked or lost key of the same name stays revoked
        if not stale.revoked:
            keyring.revoke(name, stale.public_key)
    _, secret = keyring.issue(name, kind, role)  # type: ignore[arg-type]
    if secret != path:  # the rotation name: keep the well-known one for configs
        secret.replace(path)
        secret.with_suffix(".key").replace(path.with_suffix(".key"))
    return path


def cluster_keys(state_dir: Path, agent_names: list[str]) -> tuple[Path, dict[str, Path], Path]:
    """Keys of a local cluster: the controller's public key, one key per agent, an admin user key."""
    keys_dir = state_dir / "keys"
    try:
        init_keys_dir(keys_dir)
        keyring = Keyring.load(keys_dir)
        agents = {name: local_key(keyring, name, "node", "node") for name in agent_names}
        admin = local_key(keyring, "admin", "user", "admin")
    except (KeyringError, OSError) as exc:
        raise ClientError(f"cannot prepare the cluster's keys in {keys_dir}: {exc}") from None
    return keys_dir / "controller.key", agents, admin


def write_env(state_dir: Path, admin_address: str, key: Path | None, server_key: Path | None) -> str:
    """STATE_DIR/env: the export lines that point murakkabctl at this cluster."""
    lines = [f"export MURAKKAB_CONTROLLER={admin_address}"]
    if key is not None and server_key is not None:
        lines += [f"export MURAKKAB_KEY={key}", f"export MURAKKAB_SERVER_KEY={server_key}",
                  "unset MURAKKAB_INSECURE"]
    else:
        lines += ["export MURAKKAB_INSECURE=1", "unset MURAKKAB_KEY MURAKKAB_SERVER_KEY"]
    text = "\n".join(lines) + "\n"
    path = state_dir / "env"
    path.write_text(text)
    os.chmod(path, 0o600)
    return text


def read_env(state_dir: Path) -> dict[str, str]:
    """The variables STATE_DIR/env exports; for programs that drive a local cluster as a sourced shell would."""
    variables: dict[str, str] = {}
    for line in (state_dir / "env").read_text().splitlines():
        words = line.split(maxsplit=1)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            variables[name] = value
    return variables


def use_cluster_env(state_dir: Path) -> dict[str, str]:
    """Point this process (and the murakkabctl it starts) at the local cluster in ``state_dir``."""
    variables = read_env(state_dir)
    for name in ("MURAKKAB_KEY", "MURAKKAB_SERVER_KEY", "MURAKKAB_INSECURE"):
        os.environ.pop(name, None)
    os.environ.update(variables)
    return variables


def cluster_up(args: argparse.Namespace, console: Console) -> int:
    state_dir: Path = args.state_dir.resolve()
    running = {n: p for n, p in _pids(state_dir).items() if _alive(p)}
    if running:
        raise ClientError(f"a cluster is already running in {state_dir} ({', '.join(running)}); "
                          f"run 'murakkabctl cluster down --state-dir {args.state_dir}' first")
    if args.sim_nodes < 0 or args.gpus_per_node < 1 or (args.sim_nodes == 0 and not args.cpu_node):
        raise ClientError("need --sim-nodes >= 1 (or --cpu-node) and --gpus-per-node >= 1")
    state_dir.mkdir(parents=True, exist_ok=True)
    endpoints_file = state_dir / "controller" / "endpoints.json"
    endpoints_file.unlink(missing_ok=True)
    agents: list[tuple[str, dict[str, Any]]] = []
    labels: dict[str, dict[str, str]] = {}
    for i in range(1, args.sim_nodes + 1):
        agents.append((f"sim-node-{i}", {"backend": "sim", "include_cpu": True, "sim": {
            "model": args.gpu_model, "count": args.gpus_per_node, "seed": args.seed * 1000 + i,
            "utilization": args.sim_utilization}}))
        labels[f"sim-node-{i}"] = {"rack": rack_label(i)}
    if args.cpu_node:
        agents.append(("cpu-node", {"backend": "cpu", "include_cpu": True}))
    insecure = bool(getattr(args, "insecure", False))
    server_key: Path | None = None
    admin_key: Path | None = None
    agent_keys: dict[str, Path] = {}
    if not insecure:
        server_key, agent_keys, admin_key = cluster_keys(state_dir, [name for name, _ in agents])
    started: dict[str, int] = {}
    broker = None if args.no_mqtt else start_broker(state_dir, [name for name, _ in agents], args.mqtt_port, started)
    mqtt = (lambda user: {"mqtt": broker.mqtt_table(user)}) if broker is not None else (lambda user: {})
    controller_cfg = _write_toml(state_dir / "controller.toml", {"controller": {
        # Fixed ports (not "*") so a restarted controller comes back where its agents look for it.
        "agent_bind": f"tcp://127.0.0.1:{free_port()}", "admin_bind": f"tcp://127.0.0.1:{free_port()}",
        "state_dir": str(state_dir / "controller"), "metrics_host": "127.0.0.1", "metrics_port": 0,
        "heartbeat_interval_s": args.heartbeat_interval, "suspect_after_s": args.suspect_after,
        "lost_after_s": args.lost_after, "planner": args.planner,
        "keys_dir": str(state_dir / "keys"), "insecure": insecure,
    }, **mqtt("controller")})
    started["controller"] = spawn(state_dir, "controller",
                                  [sys.executable, "-m", "controller.main", "--config", str(controller_cfg)])
    endpoints = _wait_for(lambda: endpoints_file.exists() and json.loads(endpoints_file.read_text()),
                          30.0, "the controller to bind", started, state_dir)
    model_dir = (args.model_dir or state_dir / "models").resolve()
    engine_user, why = local_cluster_engine_user()
    if why:
        console.print(f"[yellow]{why}[/]")
    for name, devices in agents:
        config = _write_toml(state_dir / "agents" / name / "agent.toml", {
            "agent": {"node_name": name, "controller": endpoints["agents"], "state_dir": str(state_dir / "agents" / name),
                      "heartbeat_interval_s": args.heartbeat_interval,
                      "labels": {"cluster": "local", **labels.get(name, {})},
                      "metrics_host": "127.0.0.1", "metrics_port": 0, "model_dir": str(model_dir),
                      "insecure": insecure, **({"engine_user": engine_user} if engine_user else {}),
                      **({} if insecure else {"key_file": str(agent_keys[name]), "controller_key_file": str(server_key)})},
            "devices": devices, **mqtt(name)})
        started[name] = spawn(state_dir, name, [sys.executable, "-m", "agent.main", "--config", str(config)])
    (state_dir / "controller.addr").write_text(endpoints["admin"] + "\n")
    env_text = write_env(state_dir, endpoints["admin"], admin_key, server_key)
    credentials = None if insecure else load_client_credentials(admin_key, server_key)  # type: ignore[arg-type]
    wanted = {name for name, _ in agents}

    def all_ready() -> bool:
        try:
            with AdminClient(endpoints["admin"], timeout_s=2.0, credentials=credentials) as client:
                nodes = client.list_nodes()
        except ClientError:
            return False
        return wanted <= {n.name for n in nodes if n.state in ("ready", "draining", "drained")}

    _wait_for(all_ready, READY_TIMEOUT_S, f"{len(wanted)} nodes to be ready", started, state_dir)
    console.print(f"local cluster up in {state_dir}: controller and {len(wanted)} agents "
                  f"({', '.join(sorted(wanted))})", highlight=False)
    if broker is not None:
        console.print(f"MQTT broker on {broker.host}:{broker.port}; a facility publisher's credentials: "
                      f"{broker.directory / 'facility.env'}", highlight=False)
    console.print(f"to use it: . {state_dir / 'env'}", highlight=False)
    print(env_text, end="")
    return 0


def cluster_down(args: argparse.Namespace, console: Console) -> int:
    state_dir: Path = args.state_dir.resolve()
    pids = _pids(state_dir)
    forced: list[str] = []
    left: list[str] = []
    if pids:
        forced = _signal_and_wait(pids, list(pids), signal.SIGTERM)
        left = _signal_and_wait(pids, forced, signal.SIGKILL)
        for name in pids:
            if name not in left:
                (state_dir / "pids" / f"{name}.pid").unlink(missing_ok=True)
    # After the daemons: a live agent would still be stopping its engines itself.
    engines = _reap_engines(state_dir)  # records of engines already gone are just deleted
    reaped = [o for o in engines if o.ok and o.verdict != "forget"]
    problems = [f"{name} (pid {pids[name]})" for name in left] + [o.describe() for o in engines if not o.ok]
    if not pids and not reaped and not problems:
        console.print(f"no cluster processes recorded in {state_dir}")
        return 0
    if pids:
        note = f" ({len(forced)} needed SIGKILL: {', '.join(forced)})" if forced else ""
        console.print(f"stopped {len(pids)} processes in {state_dir}{note}", highlight=False)
    if reaped:
        console.print(f"reaped {len(reaped)} orphaned engine(s): "
                      + "; ".join(o.describe() for o in reaped), highlight=False)
    if problems:
        raise ClientError(f"still running after SIGKILL or not allowed to stop: {'; '.join(problems)}")
    return 0


def _reap_engines(state_dir: Path) -> list[Outcome]:
    """Stop the engines recorded under every agent's state dir (``cluster up`` puts them in agents/NAME)."""
    return reap_components(sorted((state_dir / "agents").glob("*/components")), log_outcomes=False)


def _signal_and_wait(pids: dict[str, int], names: list[str], sig: int) -> list[str]:
    """Signal the named daemons' process groups; return those still running after STOP_TIMEOUT_S."""
    for name in names:
        _signal_group(pids[name], sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(_alive(pids[n]) for n in names):
        time.sleep(0.05)
    return [name for name in names if _alive(pids[name])]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each daemon leads its own session (start_new_session)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def cluster_status(args: argparse.Namespace, console: Console) -> int:
    state_dir: Path = args.state_dir.resolve()
    pids = _pids(state_dir)
    if not pids:
        console.print(f"no cluster in {state_dir}")
        return 1
    for name, pid in pids.items():
        console.print(f"{name:20} pid {pid:7}  {'running' if _alive(pid) else 'exited'}", highlight=False)
    env = state_dir / "env"
    if env.exists():
        print(env.read_text(), end="")
    return 0 if all(_alive(p) for p in pids.values()) else 1
