"""Agent configuration: the [agent] and [devices] tables of its TOML file."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.devices.select import CpuSettings, SimSettings
from common.config import load_toml_config
from common.mqtt.settings import MqttSettings


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=253,
                           pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    controller: str = "tcp://127.0.0.1:7500"
    key_file: Path = Field(Path("/etc/murakkab/keys/agent.key_secret"),
                           description="this node's CurveZMQ secret key ('murakkabctl keys issue --node NAME')")
    controller_key_file: Path = Field(Path("/etc/murakkab/keys/controller.key"),
                                      description="the controller's public key")
    insecure: bool = Field(False, description="plaintext to a controller with insecure = true (logged at start)")
    state_dir: Path = Path("/var/lib/murakkab/agent")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60)
    sample_interval_s: float = Field(1.0, gt=0, le=60)
    request_timeout_s: float = Field(2.0, gt=0, le=60)
    missed_acks_before_reregister: int = Field(3, ge=1, le=100)
    reconnect_base_s: float = Field(0.2, gt=0)
    reconnect_cap_s: float = Field(10.0, gt=0)
    metrics_host: str = "127.0.0.1"
    metrics_enabled: bool = True
    metrics_port: int = Field(9401, ge=0, le=65535, description="0 lets the OS pick a free port")
    log_level: str = "INFO"
    labels: dict[str, str] = Field(default_factory=dict)
    model_dir: Path | None = Field(None, description="expands {model_dir} in catalog model paths; "
                                                     "default <state_dir>/models")
    engine_python: str = Field("", description="interpreter for engine subprocesses (vLLM servers, subprocess "
                                               "tools); empty means the agent's own")
    component_log_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="a component's engine.log is "
                                     "rotated to engine.log.1 when it is past this size at a (re)start")
    shutdown_drain_s: float = Field(5.0, ge=0, le=600, description="on agent shutdown, how long components may "
                                    "finish in-flight invocations before their engines are stopped")
    engine_user: str = Field("", max_length=64, description="when the agent runs as root, the account its engines "
                             "and tools run as; empty means murakkab-engine if it exists, else nobody; 'root' keeps "
                             "them root (development containers and tests only). Ignored when the agent is not root "
                             "(engines run as the agent's user)")
    engine_group: str = Field("", max_length=64, description="the engines' primary group; empty means "
                              "engine_user's own")

    @model_validator(mode="after")
    def _default_model_dir(self) -> "AgentSettings":
        if self.model_dir is None:
            self.model_dir = self.state_dir / "models"
        return self


class DevicesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "nvml", "sim", "cpu"] = "auto"
    include_cpu: bool = True
    sim: SimSettings | None = None
    cpu: CpuSettings = Field(default_factory=CpuSettings)

    @model_validator(mode="after")
    def _sim_needs_settings(self) -> "DevicesSettings":
        if self.backend == "sim" and self.sim is None:
            raise ValueError("backend 'sim' needs a [devices.sim] table (model, count, ...)")
        return self


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: AgentSettings = Field(default_factory=AgentSettings)
    devices: DevicesSettings = Field(default_factory=DevicesSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)  # node telemetry and status on a broker; optional


def load_agent_config(path: Path) -> AgentConfig:
    return load_toml_config(path, "agent", AgentConfig)
