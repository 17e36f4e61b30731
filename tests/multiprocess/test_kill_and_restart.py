"""Real daemons as processes: SIGKILL agents and the controller, restart them, and watch the cluster heal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.protocol import DrainNode, ListNodes
from controller.cli.client import AdminClient, ClientError
from controller.cli.cluster import spawn

from tests.keys import cluster_environment

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
SUSPECT_AFTER_S = 1.5
LOST_AFTER_S = 4.0


def ctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def node_states(address: str) -> dict[str, tuple[str, int, str | None]]:
    with AdminClient(address, timeout_s=3) as client:
        return {n.name: (n.state, n.generation, n.drain_reason) for n in client.call(ListNodes()).nodes}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except ClientError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def pid_of(state_dir: Path, name: str) -> int:
    return int((state_dir / "pids" / f"{name}.pid").read_text().split()[0])


def respawn(state_dir: Path, name: str, module: str, config: Path) -> int:
    return spawn(state_dir, name, [sys.executable, "-m", module, "--config", str(config)])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    state_dir = tmp_path / "cluster"
    up = ctl("cluster", "up", "--state-dir", str(state_dir), "--sim-nodes", "2", "--gpus-per-node", "2",
             "--heartbeat-interval", "0.25", "--suspect-after", str(SUSPECT_AFTER_S), "--lost-after", str(LOST_AFTER_S))
    assert up.returncode == 0, up.stdout + up.stderr
    address = (state_dir / "controller.addr").read_text().strip()
    assert f"export MURAKKAB_CONTROLLER={address}" in up.stdout
    assert f"export MURAKKAB_KEY={state_dir.resolve() / 'keys' / 'issued' / 'admin.key_secret'}" in up.stdout
    try:
        with cluster_environment(state_dir):  # murakkabctl and AdminClient use the cluster's admin key
            yield state_dir, address
    finally:
        down = ctl("cluster", "down", "--state-dir", str(state_dir))
        assert down.returncode == 0, down.stdout + down.stderr
        for pid_file in (state_dir / "pids").glob("*.pid"):
            pid = int(pid_file.read_text().split()[0])
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def test_killed_agent_goes_suspect_then_lost_and_comes_back_under_its_name(cluster: tuple[Path, str]) -> None:
    state_dir, address = cluster
    before = node_states(address)
    assert {name: s[0] for name, s in before.items()} == {"sim-node-1": "ready", "sim-node-2": "ready"}
    os.kill(pid_of(state_dir, "sim-node-1"), signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: node_states(address)["sim-node-1"][0] == "suspect", SUSPECT_AFTER_S + 3, "suspect")
    suspect_after = time.monotonic() - killed_at
    wait_for(lambda: node_states(address)["sim-node-1"][0] == "lost", LOST_AFTER_S + 3, "lost")
    lost_after = time.monotonic() - killed_at
    assert SUSPECT_AFTER_S - 0.3 <= suspect_after <= SUSPECT_AFTER_S + 1.5, suspect_after
    assert LOST_AFTER_S - 0.3 <= lost_after <= LOST_AFTER_S + 1.5, lost_after
    assert node_states(address)["sim-node-2"][0] == "ready"

    respawn(state_dir, "sim-node-1", "agent.main", state_dir / "agents" / "sim-node-1" / "agent.toml")
    wait_for(lambda: node_states(address)["sim-node-1"][0] == "ready", 20, "ready again")
    states = node_states(address)
    assert len(states) == 2
    assert states["sim-node-1"][1] == before["sim-node-1"][1] + 1  # same name, next generation


def test_controller_restart_keeps_drain_and_agents_reregister_by_themselves(cluster: tuple[Path, str]) -> None:
    state_dir, address = cluster
    with AdminClient(address) as client:
        client.call(DrainNode("sim-node-2", "replace fan 3"))
    assert node_states(address)["sim-node-2"][0] == "drained"
    epoch_before = json.loads((state_dir / "controller" / "endpoints.json").read_text())["epoch"]

    os.kill(pid_of(state_dir, "controller"), signal.SIGKILL)
    time.sleep(1.0)
    respawn(state_dir, "controller", "controller.main", state_dir / "controller.toml")

    def healed() -> bool:
        states = node_states(address)
        return states.get("sim-node-1", ("",))[0] == "ready" and states.get("sim-node-2", ("",))[0] == "drained"

    wait_for(healed, 30, "agents to re-register with the restarted controller")
    states = node_states(address)
    assert states["sim-node-2"][2] == "replace fan 3"
    assert json.loads((state_dir / "controller" / "endpoints.json").read_text())["epoch"] == epoch_before + 1
    log = (state_dir / "logs" / "sim-node-1.log").read_text()
    assert "registering again" in log or "register again" in log


def test_cli_commands_against_a_local_cluster(cluster: tuple[Path, str]) -> None:
    state_dir, address = cluster
    base = ("--controller", address)
    nodes = json.loads(ctl(*base, "nodes", "-o", "json").stdout)
    assert [n["name"] for n in nodes] == ["sim-node-1", "sim-node-2"]
    device = nodes[0]["devices"][0]
    for key in ("index", "kind", "model", "power_w", "energy_j", "temperature_c", "memory_used_bytes",
                "memory_total_bytes", "utilization_pct", "sm_clock_mhz", "power_limit_w", "throttle_reasons"):
        assert key in device, key
    assert device["kind"] == "gpu" and device["simulated"] is True
    table = ctl(*base, "nodes")
    assert table.returncode == 0 and "sim-node-1" in table.stdout and "POWER W" in table.stdout
    capped = ctl(*base, "node", "set-power-limit", "sim-node-1", "1", "300")
    assert capped.returncode == 0 and "300 W" in capped.stdout
    refused = ctl(*base, "node", "set-power-limit", "sim-node-1", "1", "9000")
    assert refused.returncode == 1 and "out_of_range" in refused.stderr and "200-700 W" in refused.stderr
    drained = ctl(*base, "node", "drain", "sim-node-2", "--reason", "rack move")
    assert drained.returncode == 0 and "drained" in drained.stdout
    shown = json.loads(ctl(*base, "node", "show", "sim-node-2", "-o", "json").stdout)
    assert shown["state"] == "drained" and shown["drain_reason"] == "rack move"
    assert ctl(*base, "node", "undrain", "sim-node-2").returncode == 0
    unknown = ctl(*base, "node", "show", "nope")
    assert unknown.returncode == 1 and "unknown_node" in unknown.stderr
    status = json.loads(ctl(*base, "status", "-o", "json").stdout)
    assert status["nodes_by_state"] == {"ready": 2} and status["devices_total"] == 6  # 2 nodes x (2 sim GPUs + the host CPU)
    env_status = subprocess.run([sys.executable, "-m", "controller.cli.main", "status"], capture_output=True,
                                text=True, timeout=60, cwd=ROOT, env={**os.environ, "MURAKKAB_CONTROLLER": address})
    assert env_status.returncode == 0 and "epoch" in env_status.stdout
