"""Controller configuration (the [controller] table of its TOML file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.config import load_toml_config
from common.mqtt.settings import MqttSettings


class ControllerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_bind: str = "tcp://127.0.0.1:7500"
    admin_bind: str = "tcp://127.0.0.1:7501"
    state_dir: Path = Path("/var/lib/murakkab/controller")
    keys_dir: Path = Field(Path("/etc/murakkab/keys"), description="the controller's CurveZMQ key pair and the "
                                                                   "keyring clients.json ('murakkabctl keys init')")
    insecure: bool = Field(False, description="plaintext sockets and no authentication: anyone who reaches the "
                                              "ports can register nodes and run admin commands (logged at start)")
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
    planner: Literal["murakkab", "murakkab-epoch", "static", "first-fit"] = Field(
        "murakkab", description="the autopilot's preset (murakkab: forecast, MILP over executors, knobs, hardware "
                                "and power caps every planning_epoch_s, reactive scaling, cap lifting, heat and "
                                "budget reactions, make-before-break moves; murakkab-epoch: the paper's hourly "
                                "MILP without caps; static: provisioned once for the peaks seen) or first-fit: "
                                "cheapest executor per tier, first-fit placement, no autopilot")
    planning_epoch_s: float = Field(300.0, gt=0, le=86400)
    planning_queueing_slack: float = Field(
        0.2, ge=0, lt=1, description="murakkab planner: share of every latency target kept free for queueing")
    planning_wait_quantile: float | None = Field(
        0.99, gt=0, lt=1, description="murakkab planner: grow pools until this share of requests is predicted to "
                                      "meet its target with waits (M/M/c); unset: size on service times only")
    planning_window_s: float = Field(
        10.0, gt=0, le=3600, description="autopilot: load is measured over windows this long; reactive scaling "
                                         "and cap lifting act once per window")
    switch_timeout_s: float = Field(
        120.0, gt=0, le=86400, description="autopilot: a replacement component not ready by then is abandoned "
                                           "and the old one keeps serving")
    heat_margin_c: float = Field(5.0, ge=0, le=50, description="a GPU this close to its slowdown temperature is hot")
    heat_migrate_after_s: float = Field(15.0, ge=0, le=3600,
                                        description="a GPU still hot this long after its cap came down is evacuated")
    cluster_power_budget_w: float | None = Field(None, gt=0, le=1e9, description="measured GPU power bound")
    rack_power_budget_w: dict[str, float] = Field(default_factory=dict, description="rack label -> W")
    grid_price_objective: bool = Field(False, description="autopilot: the facility's grid price (and carbon, at "
                                                          "carbon_price_usd_per_tonne) weighs energy in the plan")
    carbon_price_usd_per_tonne: float = Field(0.0, ge=0, le=100_000)
    start_failure_limit: int = Field(
        3, ge=1, le=100, description="a component reported failed this many times in a row (never ready in between) "
                                     "makes its executor avoid that node for avoid_node_s")
    avoid_node_s: float = Field(600.0, gt=0, le=86400)
    log_level: str = "INFO"

    @field_validator("rack_power_budget_w")
    @classmethod
    def _positive_budgets(cls, budgets: dict[str, float]) -> dict[str, float]:
        for rack, watts in budgets.items():
            if not rack or not 0 < watts <= 1e9:
                raise ValueError(f"rack {rack!r}: a power budget is a positive number of watts up to 1e9, got {watts}")
        return budgets

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> "ControllerSettings":
        if not self.heartbeat_interval_s < self.suspect_after_s < self.lost_after_s:
            raise ValueError("need heartbeat_interval_s < suspect_after_s < lost_after_s")
        return self


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    controller: ControllerSettings = ControllerSettings()
    mqtt: MqttSettings = MqttSettings()  # facility signals in, autopilot events out; disabled by default


def load_controller_config(path: Path) -> ControllerConfig:
    return load_toml_config(path, "controller", ControllerConfig)
