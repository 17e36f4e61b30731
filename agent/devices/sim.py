"""Simulated GPUs with a physical model: DVFS under a power cap, first-order thermals, an energy counter.

Model, per sub-step of at most ``MAX_STEP_S``:
- Clock: the highest SM clock f in [f_min, f_max] whose power fits under the cap,
  with dynamic power P_dyn = (TDP - P_idle) * u * (f / f_max)^3 (dynamic power goes
  as f*V^2 and V tracks f in the DVFS range). Above the max operating temperature
  the driver lowers clocks further (software thermal slowdown); above the slowdown
  temperature the hardware halves them.
- Power: P = P_idle + P_dyn(f), never above the cap once the clock is chosen.
- Temperature: C dT/dt = P - (T - T_ambient) / R, integrated exactly for the
  step's constant power, so any sampling interval is stable.
- Energy: the exact integral of P over time.
Reported power carries small seeded noise; everything is deterministic for a seed.
Every device says ``simulated`` in its inventory and its model name.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from agent.devices.base import Device, DeviceError, PowerLimitOutOfRange
from agent.devices.gpu_specs import GpuSpec, gpu_spec
from common.protocol import DeviceInfo, DeviceTelemetry

MAX_STEP_S = 0.25
POWER_NOISE_FRACTION = 0.005
COOLING_FAILURE_RESISTANCE_FACTOR = 8.0  # fans stopped / coolant flow lost


class SimGpu(Device):
    def __init__(self, index: int, spec: GpuSpec, *, seed: int, node_name: str, ambient_c: float = 25.0,
                 utilization: float = 0.0, memory_used_bytes: int = 0, start_s: float = 0.0) -> None:
        self.spec = spec
        self.info = DeviceInfo(
            index=index, kind="gpu", model=f"{spec.name} (simulated)", uuid=f"SIM-GPU-{node_name}-{index}",
            backend="sim", simulated=True, memory_total_bytes=spec.memory_total_bytes,
            power_limit_min_w=spec.power_limit_min_w, power_limit_max_w=spec.tdp_w, power_limit_default_w=spec.tdp_w)
        self.rng = random.Random(seed)
        self.ambient_c = ambient_c
        self.utilization = 0.0
        self.set_utilization(utilization)
        self.memory_used_bytes = 0
        self.set_memory_used(memory_used_bytes)
        self.power_limit_w = spec.tdp_w
        self.thermal_resistance_k_per_w = spec.thermal_resistance_k_per_w
        self.temperature_c = ambient_c
        self.energy_j = 0.0
        self.now_s = start_s
        self.health = "ok"
        self.last_xid: int | None = None
        self.sm_clock_mhz, self.power_w, self.reasons = self._operating_point()
        # Start in thermal equilibrium with the initial load, as a GPU that has been running it a while.
        self.temperature_c = ambient_c + self.power_w * self.thermal_resistance_k_per_w

    # --- load and faults ---------------------------------------------------------------

    def set_utilization(self, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"utilization must be within 0..1, got {fraction}")
        self.utilization = fraction

    def set_memory_used(self, memory_bytes: int) -> None:
        if not 0 <= memory_bytes <= self.info.memory_total_bytes:
            raise ValueError(f"memory used must be within 0..{self.info.memory_total_bytes} bytes")
        self.memory_used_bytes = memory_bytes

    def inject_cooling_failure(self) -> None:
        self.thermal_resistance_k_per_w = self.spec.thermal_resistance_k_per_w * COOLING_FAILURE_RESISTANCE_FACTOR

    def clear_cooling_failure(self) -> None:
        self.thermal_resistance_k_per_w = self.spec.thermal_resistance_k_per_w

    def inject_xid(self, code: int) -> None:
        self.health, self.last_xid = "xid", code

    def fall_off_bus(self) -> None:
        self.health = "lost"

    # --- physics -----------------------------------------------------------------------

    def _dynamic_power_w(self, clock_mhz: float) -> float:
        span = self.spec.tdp_w - self.spec.idle_power_w
        return span * self.utilization * (clock_mhz / self.spec.max_sm_clock_mhz) ** 3

    def _operating_point(self) -> tuple[int, float, tuple[str, ...]]:
        """Clock, power and throttle reasons for the present load, cap and temperature."""
        spec = self.spec
        if self.utilization < 0.01:
            return spec.idle_sm_clock_mhz, spec.idle_power_w + self._dynamic_power_w(spec.idle_sm_clock_mhz), \
                ("gpu_idle",)
        reasons: list[str] = []
        clock = float(spec.max_sm_clock_mhz)
        headroom_w = self.power_limit_w - spec.idle_power_w
        if self._dynamic_power_w(clock) > headroom_w:
            full = self._dynamic_power_w(spec.max_sm_clock_mhz)
            clock = spec.max_sm_clock_mhz * (max(headroom_w, 0.0) / full) ** (1 / 3)
            reasons.append("sw_power_cap")
        if self.temperature_c >= spec.max_operating_temperature_c:
            over = self.temperature_c - spec.max_operating_temperature_c
            clock *= max(0.5, 1.0 - 0.1 * over)
            reasons.append("sw_thermal_slowdown")
        if self.temperature_c >= spec.slowdown_temperature_c:
            clock *= 0.5
            reasons.append("hw_thermal_slowdown")
        clock = min(max(clock, spec.min_sm_clock_mhz), spec.max_sm_clock_mhz)
        power = spec.idle_power_w + self._dynamic_power_w(clock)
        power = min(power, max(self.power_limit_w, spec.idle_power_w))  # the floor clock may not fit a tiny cap
        return int(round(clock)), power, tuple(reasons)

    def _advance(self, now_s: float) -> None:
        if now_s < self.now_s:
            raise DeviceError(f"time went backwards for {self.info.uuid}: {now_s} < {self.now_s}")
        while self.now_s < now_s:
            dt = min(MAX_STEP_S, now_s - self.now_s)
            self.sm_clock_mhz, self.power_w, self.reasons = self._operating_point()
            resistance = self.thermal_resistance_k_per_w
            steady_c = self.ambient_c + self.power_w * resistance
            tau_s = resistance * self.spec.heat_capacity_j_per_k
            self.temperature_c = steady_c + (self.temperature_c - steady_c) * math.exp(-dt / tau_s)
            self.energy_j += self.power_w * dt
            self.now_s += dt
        self.sm_clock_mhz, self.power_w, self.reasons = self._operating_point()

    def sample(self, now_s: float) -> DeviceTelemetry:
        self._advance(now_s)
        if self.health == "lost":
            return DeviceTelemetry(
                index=self.info.index, power_w=0.0, energy_j=self.energy_j, temperature_c=None, memory_used_bytes=0,
                memory_total_bytes=self.info.memory_total_bytes, utilization_pct=0.0, sm_clock_mhz=None,
                power_limit_w=None, throttle_reasons=(), health="lost", last_xid=self.last_xid)
        noise = self.rng.gauss(0.0, POWER_NOISE_FRACTION * self.power_w)
        reported_w = min(round(max(self.power_w + noise, 0.0), 3), self.power_limit_w)
        return DeviceTelemetry(
            index=self.info.index, power_w=reported_w, energy_j=round(self.energy_j, 3),
            temperature_c=round(self.temperature_c, 2), memory_used_bytes=self.memory_used_bytes,
            memory_total_bytes=self.info.memory_total_bytes, utilization_pct=round(self.utilization * 100.0, 2),
            sm_clock_mhz=self.sm_clock_mhz, power_limit_w=self.power_limit_w, throttle_reasons=self.reasons,
            health=self.health, last_xid=self.last_xid)

    def set_power_limit(self, power_limit_w: float) -> float:
        if self.health == "lost":
            raise DeviceError(f"{self.info.uuid} has fallen off the bus")
        low, high = self.spec.power_limit_min_w, self.spec.tdp_w
        if not low <= power_limit_w <= high:
            raise PowerLimitOutOfRange(f"{power_limit_w:g} W is outside {self.spec.name}'s power-limit range "
                                       f"{low:g}-{high:g} W")
        self._advance(self.now_s)
        self.power_limit_w = float(power_limit_w)
        self.sm_clock_mhz, self.power_w, self.reasons = self._operating_point()
        return self.power_limit_w


def open_sim_devices(*, node_name: str, model: str, count: int, seed: int, utilization: float = 0.0,
                     ambient_c: float = 25.0, start_s: float = 0.0, memory_used_fraction: float = 0.0) -> list[SimGpu]:
    """``count`` simulated GPUs, each seeded from (seed, index) so runs repeat exactly."""
    spec = gpu_spec(model)
    return [SimGpu(i, spec, seed=seed * 1_000_003 + i, node_name=node_name, ambient_c=ambient_c,
                   utilization=utilization, memory_used_bytes=int(spec.memory_total_bytes * memory_used_fraction),
                   start_s=start_s) for i in range(count)]


FaultKind = Literal["cooling_failure", "xid", "fall_off_bus"]


@dataclass(frozen=True)
class SimFault:
    at_s: float  # seconds after the agent started
    device: int
    kind: FaultKind
    xid: int = 79  # XID 79: GPU has fallen off the bus; 48: double-bit ECC; 13: graphics engine exception


class SimFaultSchedule:
    """Applies each scheduled fault once, when its time has come (pure: the caller supplies the time)."""

    def __init__(self, faults: list[SimFault], devices: list[SimGpu], start_s: float) -> None:
        by_index = {d.info.index: d for d in devices}
        for fault in faults:
            if fault.device not in by_index:
                raise ValueError(f"fault for device {fault.device}, but devices are {sorted(by_index)}")
        self.pending = sorted(faults, key=lambda f: f.at_s)
        self.devices = by_index
        self.start_s = start_s

    def __call__(self, now_s: float) -> list[SimFault]:
        fired = []
        while self.pending and self.pending[0].at_s <= now_s - self.start_s:
            fault = self.pending.pop(0)
            device = self.devices[fault.device]
            if fault.kind == "cooling_failure":
                device.inject_cooling_failure()
            elif fault.kind == "xid":
                device.inject_xid(fault.xid)
            else:
                device.fall_off_bus()
            fired.append(fault)
        return fired
