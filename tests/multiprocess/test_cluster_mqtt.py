"""``murakkabctl cluster up`` with its Mosquitto broker, as processes: credentials and ACL under STATE_DIR/mqtt,
node telemetry and status on the broker, a facility budget cut with mosquitto_pub (examples/facility_budget_cut.sh)
that the caps follow, and ``--no-mqtt`` starting no broker at all.

Skipped without mosquitto and mosquitto_pub unless MURAKKAB_REQUIRE_MQTT=1 (``make test``) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from controller.cli.broker import find_mosquitto, read_facility_env
from controller.cli.cluster import read_env
from tests.multiprocess.test_kill_and_restart import ROOT, ctl, pid_of

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]
PREFIX = "murakkab/v1"


@pytest.fixture(autouse=True)
def _mosquitto() -> None:
    if find_mosquitto() is None or shutil.which("mosquitto_pub") is None:
        reason = "mosquitto and mosquitto-clients are not installed (apt-get install mosquitto mosquitto-clients)"
        if os.environ.get("MURAKKAB_REQUIRE_MQTT") == "1":
            pytest.fail(reason + ", and MURAKKAB_REQUIRE_MQTT=1 requires them")
        pytest.skip(reason)


def subscribe(state_dir: Path, topic_filter: str, count: int, user: str = "controller") -> list[tuple[str, str]]:
    """``count`` messages on ``topic_filter`` (retained ones first) as ``user`` sees them, within 10 s."""
    facility = read_facility_env(state_dir)
    password = (state_dir / "mqtt" / "secrets" / f"{user}.password").read_text().strip()
    done = subprocess.run(["mosquitto_sub", "-h", facility["MQTT_HOST"], "-p", facility["MQTT_PORT"], "-u", user,
                           "-P", password, "-t", topic_filter, "-v", "-C", str(count), "-W", "10"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return [tuple(line.split(" ", 1)) for line in done.stdout.splitlines()]  # type: ignore[misc]


def test_cluster_up_starts_a_broker_that_carries_telemetry_and_a_facility_budget_cut(tmp_path: Path) -> None:
    state_dir = tmp_path / "cluster"
    up = ctl("cluster", "up", "--state-dir", str(state_dir), "--sim-nodes", "2", "--gpus-per-node", "2",
             "--sim-utilization", "0.6", "--heartbeat-interval", "0.5")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"facility publisher's credentials: {state_dir.resolve() / 'mqtt' / 'facility.env'}" in up.stdout
        mqtt_dir = state_dir / "mqtt"
        for name in ("facility.env", "passwd", "acl", "mosquitto.conf", "secrets/controller.password",
                     "secrets/facility.password", "secrets/sim-node-1.password"):
            assert stat.S_IMODE((mqtt_dir / name).stat().st_mode) == 0o600, name
        assert stat.S_IMODE((mqtt_dir / "secrets").stat().st_mode) == 0o700
        facility = read_facility_env(state_dir)
        assert set(facility) == {"MQTT_HOST", "MQTT_PORT", "MQTT_USER", "MQTT_PASSWORD"}
        assert facility["MQTT_HOST"] == "127.0.0.1" and facility["MQTT_USER"] == "facility"
        controller_config = tomllib.loads((state_dir / "controller.toml").read_text())
        assert controller_config["mqtt"]["enabled"] and controller_config["mqtt"]["username"] == "controller"
        assert Path(f"/proc/{pid_of(state_dir, 'mqtt')}").exists()

        # each agent's retained status and telemetry, as the controller's account reads them
        statuses = dict(subscribe(state_dir, f"{PREFIX}/nodes/+/status", 2))
        assert {json.loads(v)["state"] for v in statuses.values()} == {"online"}
        assert set(statuses) == {f"{PREFIX}/nodes/sim-node-{i}/status" for i in (1, 2)}
        topic, payload = subscribe(state_dir, f"{PREFIX}/nodes/sim-node-1/telemetry", 1)[0]
        gpus = [d for d in json.loads(payload)["devices"] if d["kind"] == "gpu"]
        assert len(gpus) == 2 and all(d["power_w"] > 300 for d in gpus)  # 60 % utilization on simulated H100s

        env = {**os.environ, **read_env(state_dir)}
        nodes = json.loads(subprocess.run([sys.executable, "-m", "controller.cli.main", "nodes", "-o", "json"],
                                          capture_output=True, text=True, timeout=30, cwd=ROOT, env=env).stdout)
        assert {n["name"]: n["labels"].get("rack") for n in nodes} == {"sim-node-1": "rack-a", "sim-node-2": "rack-b"}

        # a facility system cuts rack-a's feed: the script returns once the rack measures under the budget
        started = time.monotonic()
        cut = subprocess.run(["bash", "examples/facility_budget_cut.sh", "rack-a", "600"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT,
                             env={**env, "STATE_DIR": str(state_dir), "PYTHON": sys.executable, "TIMEOUT_S": "15",
                                  "MURAKKABCTL": str(Path(sys.executable).parent / "murakkabctl")})
        assert cut.returncode == 0, cut.stdout + cut.stderr
        assert time.monotonic() - started < 20
        view = json.loads(subprocess.run([sys.executable, "-m", "controller.cli.main", "power", "budget", "show",
                                          "-o", "json"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                                         env=env).stdout)
        (rack,) = [b for b in view["budgets"] if b.get("rack") == "rack-a"]
        assert rack["power_budget_w"] == 600 and rack["source"] == "facility (MQTT)"
        assert 400 <= rack["measured_power_w"] <= 600 and rack["caps_w"]  # two H100s at 60 % draw about 940 W uncapped
        assert not [b for b in view["budgets"] if b.get("rack") == "rack-b"]
    finally:
        down = ctl("cluster", "down", "--state-dir", str(state_dir))
        assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped 4 processes" in down.stdout  # the broker went down with the controller and both agents


def test_cluster_up_no_mqtt_starts_no_broker(tmp_path: Path) -> None:
    state_dir = tmp_path / "cluster"
    up = ctl("cluster", "up", "--state-dir", str(state_dir), "--sim-nodes", "1", "--gpus-per-node", "1", "--no-mqtt")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "MQTT" not in up.stdout
        assert not (state_dir / "mqtt").exists() and not (state_dir / "pids" / "mqtt.pid").exists()
        assert "mqtt" not in tomllib.loads((state_dir / "controller.toml").read_text())
        assert "mqtt" not in tomllib.loads((state_dir / "agents" / "sim-node-1" / "agent.toml").read_text())
    finally:
        assert ctl("cluster", "down", "--state-dir", str(state_dir)).returncode == 0
