"""The unit files: Type=notify with a watchdog, start timeouts that fit the daemons, and `systemd-analyze verify`
passes (where systemd-analyze is installed; ExecStart= is pointed at this environment's console scripts, since
verify refuses a command that does not exist)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon import READY_WITHOUT_CONTROLLER_S

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("murakkab-controller", "murakkab-agent")


def settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / f"{unit}.service").read_text().splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if match:
            out.setdefault(match[1], []).append(match[2])
    return out


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


@pytest.mark.parametrize("unit", UNITS)
def test_notify_units_with_a_watchdog(unit: str) -> None:
    s = settings(unit)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    watchdog_s = seconds(s["WatchdogSec"][0])
    assert 10 <= watchdog_s <= 120
    assert seconds(s["TimeoutStartSec"][0]) >= 30
    assert "PYTHONFAULTHANDLER=1" in s["Environment"]


def test_agent_start_timeout_leaves_room_for_ready_without_a_controller() -> None:
    # The agent reports READY=1 at the latest READY_WITHOUT_CONTROLLER_S after its loop starts; the unit must
    # not time the start out before that (with a margin for imports and NVML initialisation).
    assert seconds(settings("murakkab-agent")["TimeoutStartSec"][0]) >= READY_WITHOUT_CONTROLLER_S + 20


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / unit).exists():
        pytest.skip(f"console script {unit} is not installed next to {sys.executable}")
    text = (ROOT / "systemd" / f"{unit}.service").read_text().replace("/opt/murakkab/venv/bin", str(bin_dir))
    path = tmp_path / f"{unit}.service"
    path.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr
