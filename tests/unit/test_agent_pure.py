"""Agent-side pure pieces: the command gate, generations, config validation, backoff, rate-limited logs."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_agent_config
from agent.daemon import CommandGate, next_generation
from common.config import ConfigError, validate_config
from common.protocol import CommandResult
from common.transport import RateLimitedLog, backoff_delays
from controller.config import ControllerConfig, load_controller_config


def test_gate_refuses_before_registration_and_on_stale_epoch_or_generation() -> None:
    gate = CommandGate(generation=4)
    assert gate.refusal("c", 1, 4).code == "not_registered"
    gate.epoch = 7
    assert gate.refusal("c", 7, 4) is None
    stale_epoch = gate.refusal("c", 6, 4)
    assert stale_epoch.code == "stale_command" and "epoch 6" in stale_epoch.message
    stale_gen = gate.refusal("c", 7, 3)
    assert stale_gen.code == "stale_command" and "generation 3" in stale_gen.message
    assert gate.refusal("c", 8, 4).code == "stale_command"  # a newer epoch is unknown to this agent too


def test_gate_replays_results_and_forgets_oldest() -> None:
    gate = CommandGate(generation=1, remembered=2)
    for i in range(3):
        gate.remember(CommandResult(f"c{i}", True, "ok", 100.0 + i))
    assert gate.previous_result("c0") is None
    assert gate.previous_result("c2").applied_power_limit_w == 102.0


def test_generation_increments_per_start_and_survives_garbage(tmp_path: Path) -> None:
    assert next_generation(tmp_path) == 1
    assert next_generation(tmp_path) == 2
    (tmp_path / "generation").write_text("not a number")
    assert next_generation(tmp_path) == 1


def test_backoff_is_jittered_capped_and_grows() -> None:
    delays = backoff_delays(0.1, 2.0, random.Random(1))
    values = [next(delays) for _ in range(200)]
    assert all(0 <= v <= 2.0 for v in values)
    assert max(values[:3]) <= 0.4  # early attempts are short
    assert max(values[50:]) > 1.0  # later ones reach towards the cap
    assert len(set(values)) > 150  # jitter: no lockstep


def test_rate_limited_log_once_per_peer_and_kind(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = RateLimitedLog(logging.getLogger("t"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        assert limiter.warning("p1", "malformed_frame", "x")
        assert not limiter.warning("p1", "malformed_frame", "x")
        assert limiter.warning("p2", "malformed_frame", "x")
        assert limiter.warning("p1", "unknown_op", "x")
        now[0] = 11.0
        assert limiter.warning("p1", "malformed_frame", "x")
    assert "1 similar suppressed" in caplog.records[-1].getMessage()


def test_agent_config_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nnode_name = "bad name!"\nheartbeat_interval_s = -1\n[devices]\nbackend = "tpu"\n')
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    text = str(err.value)
    assert str(path) in text and "agent.node_name" in text and "agent.heartbeat_interval_s" in text
    assert "devices.backend" in text
    path.write_text('[agent]\nnode_name = "n1"\n[devices]\nbackend = "sim"\n')
    with pytest.raises(ConfigError, match=r"\[devices.sim\]"):
        load_agent_config(path)
    path.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_agent_config(tmp_path / "missing.toml")


def test_controller_config_requires_ordered_timeouts(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text("[controller]\nsuspect_after_s = 40.0\nlost_after_s = 30.0\n")
    with pytest.raises(ConfigError, match="suspect_after_s"):
        load_controller_config(path)
    path.write_text("[controller]\nunknown_key = 1\n")
    with pytest.raises(ConfigError, match="unknown_key"):
        load_controller_config(path)
    assert validate_config({"controller": {}}, ControllerConfig, "x").controller.lost_after_s == 30.0
    assert validate_config({"agent": {"node_name": "n"}}, AgentConfig, "x").devices.backend == "auto"
