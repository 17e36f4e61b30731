"""Choosing and opening the device backend named in the agent's config.

Backends: "nvml" (real GPUs, or an error), "sim" (simulated GPUs of a named model),
"cpu" (the host CPU only) and "auto" (NVML where it initializes and sees a GPU,
otherwise the CPU only). GPUs come first; the CPU, when included, takes the next index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.devices.base import Device, DeviceError
from agent.devices.cpu import CpuDevice, RaplCounter
from common.devices.gpu_specs import GPU_SPECS
from agent.devices.sim import SimFault, SimFaultSchedule, SimGpu, open_sim_devices

log = logging.getLogger(__name__)

class SimFaultSettings(BaseModel):
    """One scheduled fault, as written in the agent's TOML ([[devices.sim.faults]])."""

    model_config = ConfigDict(extra="forbid")

    at_s: float = Field(ge=0, allow_inf_nan=False, description="seconds after the agent starts")
    device: int = Field(ge=0, le=63)
    kind: Literal["cooling_failure", "xid", "fall_off_bus"]
    xid: int = Field(79, ge=0, le=1023, description="Xid code for kind 'xid'")


class SimSettings(BaseModel):
    """Simulated GPUs: which model, how many, their constant load and environment, scheduled faults."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("h100", description=f"one of: {', '.join(sorted(GPU_SPECS))}")
    count: int = Field(8, ge=0, le=64)
    seed: int = Field(0, description="runs with the same seed repeat exactly")
    utilization: float = Field(0.0, ge=0.0, le=1.0, description="constant simulated load until engines drive it")
    memory_used_fraction: float = Field(0.0, ge=0.0, le=1.0)
    ambient_c: float = Field(25.0, ge=-20.0, le=60.0, description="inlet air or coolant temperature")
    faults: list[SimFaultSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_model_and_devices(self) -> SimSettings:
        if self.model.lower() not in GPU_SPECS:
            raise ValueError(f"unknown GPU model {self.model!r}; known: {', '.join(sorted(GPU_SPECS))}")
        for fault in self.faults:
            if fault.device >= self.count:
                raise ValueError(f"fault names device {fault.device}, but there are {self.count} simulated GPUs")
        return self


class CpuSettings(BaseModel):
    """Constants for the CPU power model, used where RAPL is unavailable."""

    model_config = ConfigDict(extra="forbid")

    tdp_w: float = Field(65.0, gt=0, le=2000, allow_inf_nan=False, description="package power at full load")
    idle_w: float = Field(10.0, ge=0, allow_inf_nan=False, description="package power with nothing running")

    @model_validator(mode="after")
    def _idle_below_tdp(self) -> CpuSettings:
        if self.idle_w >= self.tdp_w:
            raise ValueError(f"idle_w ({self.idle_w:g}) must be below tdp_w ({self.tdp_w:g})")
        return self


def open_devices(backend: str, *, node_name: str, sim: SimSettings | None, cpu: CpuSettings | None,
                 include_cpu: bool, start_s: float) -> list[Device]:
    """GPUs of the chosen backend first, then (if asked, or as auto's fallback) the CPU with the next index."""
    devices: list[Device] = []
    if backend == "sim":
        if sim is None:
            raise DeviceError("backend 'sim' needs sim settings (a [devices.sim] table: model, count, ...)")
        devices += open_sim_devices(node_name=node_name, model=sim.model, count=sim.count, seed=sim.seed,
                                    utilization=sim.utilization, ambient_c=sim.ambient_c, start_s=start_s,
                                    memory_used_fraction=sim.memory_used_fraction)
    elif backend in ("nvml", "auto"):
        from agent.devices import nvml  # imported here: loads libnvidia-ml lazily

        try:
            gpus = nvml.open_nvml_devices()
        except DeviceError as exc:
            if backend == "nvml":
                raise
            log.info("no NVIDIA GPUs (%s); using the CPU only", exc)
            gpus = []
        if not gpus:
            if backend == "nvml":
                raise DeviceError("NVML initialized but found no GPUs; use backend 'cpu' or 'auto' on this host")
            include_cpu = True
        devices += gpus
    elif backend != "cpu":
        raise DeviceError(f"unknown device backend {backend!r}; use auto, nvml, sim or cpu")
    if backend == "cpu" or include_cpu:
        cpu = cpu or CpuSettings()
        devices.append(CpuDevice(len(devices), tdp_w=cpu.tdp_w, idle_w=cpu.idle_w, start_s=start_s,
                                 rapl=RaplCounter.open(), node_name=node_name))
    return devices


def fault_hook(sim: SimSettings | None, devices: list[Device], start_s: float) -> Callable[[float], object] | None:
    """A tick hook that fires the configured simulated faults, or None when there are none."""
    if sim is None or not sim.faults:
        return None
    gpus = [d for d in devices if isinstance(d, SimGpu)]
    faults = [SimFault(f.at_s, f.device, f.kind, f.xid) for f in sim.faults]
    return SimFaultSchedule(faults, gpus, start_s)
