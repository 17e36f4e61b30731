"""Choosing and opening the device backend named in the agent's config."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.devices.base import Device, DeviceError
from agent.devices.cpu import CpuDevice, RaplCounter
from agent.devices.gpu_specs import GPU_SPECS
from agent.devices.sim import SimFault, SimFaultSchedule, SimGpu, open_sim_devices

log = logging.getLogger(__name__)


class SimFaultSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at_s: float = Field(ge=0, description="seconds after the agent starts")
    device: int = Field(ge=0)
    kind: Literal["cooling_failure", "xid", "fall_off_bus"]
    xid: int = Field(79, ge=0)


class SimSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "h100"
    count: int = Field(8, ge=0, le=64)
    seed: int = 0
    utilization: float = Field(0.0, ge=0.0, le=1.0, description="constant simulated load")
    memory_used_fraction: float = Field(0.0, ge=0.0, le=1.0)
    ambient_c: float = Field(25.0, ge=-20.0, le=60.0)
    faults: list[SimFaultSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_model(self) -> "SimSettings":
        if self.model.lower() not in GPU_SPECS:
            raise ValueError(f"unknown GPU model {self.model!r}; known: {', '.join(sorted(GPU_SPECS))}")
        for fault in self.faults:
            if fault.device >= self.count:
                raise ValueError(f"fault names device {fault.device}, but there are {self.count} simulated GPUs")
        return self


class CpuSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tdp_w: float = Field(65.0, gt=0, description="package power at full load, for the power model")
    idle_w: float = Field(10.0, ge=0)

    @model_validator(mode="after")
    def _idle_below_tdp(self) -> "CpuSettings":
        if self.idle_w >= self.tdp_w:
            raise ValueError("idle_w must be below tdp_w")
        return self


def open_devices(backend: str, *, node_name: str, sim: SimSettings | None, cpu: CpuSettings | None,
                 include_cpu: bool, start_s: float) -> list[Device]:
    """GPUs of the chosen backend first, then (if asked) the CPU with the next index."""
    devices: list[Device] = []
    if backend == "sim":
        if sim is None:
            raise DeviceError("backend 'sim' needs sim settings")
        devices += open_sim_devices(node_name=node_name, model=sim.model, count=sim.count, seed=sim.seed,
                                    utilization=sim.utilization, ambient_c=sim.ambient_c, start_s=start_s,
                                    memory_used_fraction=sim.memory_used_fraction)
    elif backend in ("nvml", "auto"):
        from agent.devices.nvml import open_nvml_devices  # imported here: loads libnvidia-ml lazily

        try:
            devices += open_nvml_devices()
        except DeviceError as exc:
            if backend == "nvml":
                raise
            log.info("no NVIDIA GPUs (%s); using the CPU only", exc)
            include_cpu = True
    elif backend != "cpu":
        raise DeviceError(f"unknown device backend {backend!r}; use auto, nvml, sim or cpu")
    if backend == "cpu" or include_cpu:
        cpu = cpu or CpuSettings()
        devices.append(CpuDevice(len(devices), tdp_w=cpu.tdp_w, idle_w=cpu.idle_w, start_s=start_s,
                                 rapl=RaplCounter.open()))
    return devices


def fault_hook(sim: SimSettings | None, devices: list[Device], start_s: float) -> Callable[[float], object] | None:
    """A tick hook that fires the configured simulated faults, or None when there are none."""
    if sim is None or not sim.faults:
        return None
    gpus = [d for d in devices if isinstance(d, SimGpu)]
    faults = [SimFault(f.at_s, f.device, f.kind, f.xid) for f in sim.faults]
    return SimFaultSchedule(faults, gpus, start_s)
