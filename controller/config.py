"""Controller configuration (the [controller] table of its TOML file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.config import load_toml_config


class ControllerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_bind: str = "tcp://127.0.0.1:7500"
    admin_bind: str = "tcp://127.0.0.1:7501"
    state_dir: Path = Path("/var/lib/murakkab/controller")
    metrics_host: str = "127.0.0.1"
    metrics_enabled: bool = True
    metrics_port: int = Field(9400, ge=0, le=65535, description="0 lets the OS pick a free port")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60)
    suspect_after_s: float = Field(5.0, gt=0)
    lost_after_s: float = Field(30.0, gt=0)
    tick_interval_s: float = Field(0.25, gt=0, le=10)
    telemetry_history: int = Field(120, ge=1, le=100_000)  # samples per device: 2 minutes at 1 Hz
    command_timeout_s: float = Field(5.0, gt=0, le=300)
    # Handle agent messages in batches this far apart: fewer wake-ups at fleet scale, for at most
    # this much added latency per heartbeat. 0 handles each message as it arrives.
    agent_receive_coalesce_s: float = Field(0.005, ge=0, le=0.1)
    invocation_timeout_s: float = Field(300.0, gt=0, le=86400, description="one stage invocation, before a retry")
    invocation_max_attempts: int = Field(3, ge=1, le=20)
    job_queue_timeout_s: float = Field(900.0, gt=0, description="waiting for a ready component before failing")
    job_timeout_s: float = Field(3600.0, gt=0)
    planner: Literal["first-fit", "murakkab"] = Field(
        "first-fit", description="first-fit: cheapest executor per tier, first-fit placement; murakkab: forecast, "
                                 "MILP over executors, knobs, hardware and power caps, and power/thermal-aware placement")
    planning_epoch_s: float = Field(300.0, gt=0, le=86400)
    planning_queueing_slack: float = Field(
        0.2, ge=0, lt=1, description="murakkab planner: share of every latency target kept free for queueing")
    planning_wait_quantile: float | None = Field(
        0.99, gt=0, lt=1, description="murakkab planner: grow pools until this share of requests is predicted to "
                                      "meet its target with waits (M/M/c); unset: size on service times only")
    start_failure_limit: int = Field(
        3, ge=1, le=100, description="a component reported failed this many times in a row (never ready in between) "
                                     "makes its executor avoid that node for avoid_node_s")
    avoid_node_s: float = Field(600.0, gt=0, le=86400)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> "ControllerSettings":
        if not self.heartbeat_interval_s < self.suspect_after_s < self.lost_after_s:
            raise ValueError("need heartbeat_interval_s < suspect_after_s < lost_after_s")
        return self


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    controller: ControllerSettings = ControllerSettings()


def load_controller_config(path: Path) -> ControllerConfig:
    return load_toml_config(path, "controller", ControllerConfig)
