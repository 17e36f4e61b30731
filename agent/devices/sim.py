"""Simulated GPUs with a physical model: DVFS under a power cap, first-order thermals, an energy counter.

The simulator stands in for NVML on machines without GPUs (tests, demos, the cluster
simulator), so it behaves like a GPU where the control plane can see it: power follows
load and cap, clocks drop under a cap or when hot, temperature lags power, energy only
grows. Everything it reports is labeled simulated.

Model (constants from ``gpu_specs``; u is utilization 0..1, f the SM clock, m the share of
the work that is bandwidth-bound):

- Power under load: P(f) = P_ctx + P_dyn(f), with P_ctx the idle power with a CUDA context
  and P_dyn the SM part (~ f^k, k fitted on an H100: 1.42) plus the memory part that the SM
  clock does not scale (``GpuSpec.dynamic_power_w``). Idle: P_idle without a context (no
  device memory in use), P_ctx with one.
- Power cap (the driver's "SW power cap"): the highest f with P(f) <= cap, no lower than
  f_min; bandwidth-bound work at f_min can still draw more than a deep cap, as a real GPU does.
- Slowdown of the work against f_max: (1 - m) * f_max / f + m * max(1, f_knee / f)
  (``OperatingPoint.slowdown``; latency in the sim engines and the planner stretches by it).
- Thermal slowdown: above the max operating temperature the driver caps the clock at
  f_max * (1 - 0.2 * (T - T_maxop)) ("SW thermal slowdown"); at or above the slowdown
  temperature the hardware halves it ("HW slowdown" + "HW thermal slowdown"). At the
  shutdown temperature the GPU powers off and falls off the bus, as a real one does.
- Clock is clamped to [f_min, f_max]; power is P = P_ctx + P_dyn(f) at that clock.
- Temperature: C dT/dt = P - (T - T_ambient) / R, integrated exactly for piecewise
  constant power: T <- T_ss + (T - T_ss) * exp(-dt / (R C)) with T_ss = T_ambient + P R.
  While no thermal limit can engage before the interval ends the whole interval is one
  exact step; otherwise sub-steps of at most ``MAX_STEP_S`` let the throttle react.
- Energy: the exact integral of the model's power over time.
- Reported power carries seeded Gaussian noise (0.5 % of power, truncated at 3 sigma),
  as NVML's readings scatter around the controller's set point. Energy is noise-free.

Not modeled: temperature-dependent leakage, memory clocks and HBM temperature, fan
curves, part-to-part variation. Deterministic for a seed: the seed only drives the noise.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, get_args

from agent.devices.base import Device, DeviceError, PowerLimitOutOfRange
from common.devices.gpu_specs import GpuSpec, gpu_spec
from common.devices.physics import OperatingPoint, operating_point
from common.protocol import DeviceInfo, DeviceTelemetry

MAX_STEP_S = 0.25  # sub-step while a thermal limit may engage; far below the ~40 s thermal time constants
POWER_NOISE_FRACTION = 0.005  # one sigma of the reported-power noise, as a share of power
POWER_NOISE_MAX_SIGMAS = 3.0  # noise is truncated here, so reported power <= cap * (1 + 0.015)
COOLING_FAILURE_RESISTANCE_FACTOR = 6.0  # estimate: airflow or coolant flow mostly lost; an H100 at full load then
# throttles to its lowest clock (171 W with a context) and holds below shutdown, a passive L4 does not
XID_FALLEN_OFF_BUS = 79  # the kernel log's "GPU has fallen off the bus"


class SimGpu(Device):
    """One simulated GPU; advance it by sampling at non-decreasing times."""

    def __init__(self, index: int, spec: GpuSpec, *, seed: int, node_name: str, ambient_c: float = 25.0,
                 utilization: float = 0.0, memory_used_bytes: int = 0, start_s: float = 0.0) -> None:
        self.spec = spec
        self.info = DeviceInfo(
            index=index, kind="gpu", model=f"{spec.name} (simulated)", uuid=f"SIM-GPU-{node_name}-{index}",
            backend="sim", simulated=True, memory_total_bytes=spec.memory_total_bytes,
            power_limit_min_w=spec.power_limit_min_w, power_limit_max_w=spec.tdp_w,
            power_limit_default_w=spec.power_limit_default_w)
        self.rng = random.Random(seed)
        self.ambient_c = float(ambient_c)
        self.utilization = 0.0
        self.memory_bound_share = 0.0
        self.set_utilization(utilization)
        self.memory_used_bytes = 0
        self.set_memory_used(memory_used_bytes)
        self.power_limit_w = spec.power_limit_default_w
        self.thermal_resistance_k_per_w = spec.thermal_resistance_k_per_w
        self.now_s = float(start_s)
        self.energy_j = 0.0
        self.health = "ok"
        self.last_xid: int | None = None
        # Start in thermal equilibrium with the initial load, like a GPU that has run it for a while
        # (no hotter than the max operating temperature, where the driver would have held it).
        self.temperature_c = self.ambient_c
        steady_c = self.ambient_c + self._point().power_w * self.thermal_resistance_k_per_w
        self.temperature_c = min(steady_c, spec.max_operating_temperature_c)

    # --- load, environment and faults --------------------------------------------------

    def set_utilization(self, fraction: float, memory_bound_share: float | None = None) -> None:
        """Set the activity the simulated engines drive (and, if given, the bandwidth-bound share of it);
        it applies from the last sampled instant."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"utilization must be within 0..1, got {fraction}")
        if memory_bound_share is not None:
            if not 0.0 <= memory_bound_share <= 1.0:
                raise ValueError(f"memory_bound_share must be within 0..1, got {memory_bound_share}")
            self.memory_bound_share = float(memory_bound_share)
        self.utilization = float(fraction)

    def set_memory_used(self, memory_bytes: int) -> None:
        if not 0 <= memory_bytes <= self.info.memory_total_bytes:
            raise ValueError(f"memory used must be within 0..{self.info.memory_total_bytes} bytes, got {memory_bytes}")
        self.memory_used_bytes = int(memory_bytes)

    def set_ambient(self, ambient_c: float) -> None:
        """Inlet air or coolant temperature, e.g. for a facility cooling emergency."""
        self.ambient_c = float(ambient_c)

    def inject_cooling_failure(self) -> None:
        """Fans or coolant flow lost: the path to ambient gets much worse, so the GPU heats and throttles."""
        self.thermal_resistance_k_per_w = self.spec.thermal_resistance_k_per_w * COOLING_FAILURE_RESISTANCE_FACTOR

    def clear_cooling_failure(self) -> None:
        self.thermal_resistance_k_per_w = self.spec.thermal_resistance_k_per_w

    def inject_xid(self, code: int) -> None:
        """An Xid error: the GPU keeps working and reporting, with health "xid" until it is reset."""
        if self.health != "lost":
            self.health = "xid"
        self.last_xid = int(code)

    def fall_off_bus(self) -> None:
        """The GPU disappears (Xid 79): it draws nothing we can see and every query fails."""
        self.health = "lost"
        self.last_xid = XID_FALLEN_OFF_BUS

    @property
    def lost(self) -> bool:
        return self.health == "lost"

    # --- physics -----------------------------------------------------------------------

    def _point(self) -> OperatingPoint:
        if self.lost:
            return OperatingPoint(0.0, 0.0, ())
        return operating_point(self.spec, self.utilization, self.power_limit_w, self.temperature_c,
                               self.memory_bound_share, context=self.memory_used_bytes > 0)

    def _limits_stay_quiet(self, point: OperatingPoint) -> bool:
        """True when no thermal limit can engage before equilibrium, so one exact step is exact."""
        if self.lost:
            return True
        steady_c = self.ambient_c + point.power_w * self.thermal_resistance_k_per_w
        return max(self.temperature_c, steady_c) <= self.spec.max_operating_temperature_c

    def advance(self, now_s: float) -> None:
        """Run the model forward to ``now_s``; the same instant again is a no-op, earlier is an error."""
        if now_s < self.now_s:
            raise DeviceError(f"{self.info.uuid}: time went backwards ({now_s:.6f} s < {self.now_s:.6f} s); "
                              "sample simulated devices with a monotonic clock")
        while self.now_s < now_s:
            point = self._point()
            remaining_s = now_s - self.now_s
            dt = remaining_s if self._limits_stay_quiet(point) else min(MAX_STEP_S, remaining_s)
            resistance = self.thermal_resistance_k_per_w
            steady_c = self.ambient_c + point.power_w * resistance
            decay = math.exp(-dt / (resistance * self.spec.heat_capacity_j_per_k))
            self.temperature_c = steady_c + (self.temperature_c - steady_c) * decay
            self.energy_j += point.power_w * dt
            self.now_s = now_s if dt >= remaining_s else self.now_s + dt
            if not self.lost and self.temperature_c >= self.spec.shutdown_temperature_c:
                self.fall_off_bus()  # thermal shutdown: the board powers off and leaves the bus

    def sample(self, now_s: float) -> DeviceTelemetry:
        self.advance(now_s)
        if self.lost:
            return DeviceTelemetry(
                index=self.info.index, power_w=0.0, energy_j=round(self.energy_j, 3), temperature_c=None,
                memory_used_bytes=0, memory_total_bytes=self.info.memory_total_bytes, utilization_pct=0.0,
                sm_clock_mhz=None, power_limit_w=None, throttle_reasons=(), health="lost", last_xid=self.last_xid)
        point = self._point()
        sigma_w = POWER_NOISE_FRACTION * point.power_w
        bound_w = POWER_NOISE_MAX_SIGMAS * sigma_w
        noise_w = min(max(self.rng.gauss(0.0, sigma_w), -bound_w), bound_w)
        return DeviceTelemetry(
            index=self.info.index, power_w=round(point.power_w + noise_w, 3), energy_j=round(self.energy_j, 3),
            temperature_c=round(self.temperature_c, 2), memory_used_bytes=self.memory_used_bytes,
            memory_total_bytes=self.info.memory_total_bytes, utilization_pct=round(self.utilization * 100.0, 2),
            sm_clock_mhz=round(point.sm_clock_mhz), power_limit_w=self.power_limit_w,
            throttle_reasons=point.throttle_reasons, health=self.health, last_xid=self.last_xid)

    def set_power_limit(self, power_limit_w: float) -> float:
        """Apply a cap from the last sampled instant on, as ``nvidia-smi -pl`` would; returns the watts applied."""
        if self.lost:
            raise DeviceError(f"{self.info.uuid}: GPU has fallen off the bus; it needs a reset or a reboot")
        low, high = self.spec.power_limit_min_w, self.spec.tdp_w
        if not low <= power_limit_w <= high:
            raise PowerLimitOutOfRange(f"{power_limit_w:g} W is outside the power-limit range of "
                                       f"{self.spec.name}: {low:g}-{high:g} W")
        self.power_limit_w = float(power_limit_w)
        return self.power_limit_w


def device_seed(seed: int, index: int) -> int:
    """A per-device seed from (seed, index); string seeding hashes with SHA-512, so it is stable across runs."""
    return random.Random(f"murakkab-sim-gpu/{seed}/{index}").getrandbits(63)


def open_sim_devices(*, node_name: str, model: str, count: int, seed: int, utilization: float = 0.0,
                     ambient_c: float = 25.0, start_s: float = 0.0, memory_used_fraction: float = 0.0) -> list[SimGpu]:
    """``count`` simulated GPUs of one model, each seeded from (seed, index) so runs repeat exactly."""
    spec = gpu_spec(model)
    return [SimGpu(i, spec, seed=device_seed(seed, i), node_name=node_name, ambient_c=ambient_c,
                   utilization=utilization, memory_used_bytes=int(spec.memory_total_bytes * memory_used_fraction),
                   start_s=start_s) for i in range(count)]


# --- scheduled faults ---------------------------------------------------------------------

FaultKind = Literal["cooling_failure", "xid", "fall_off_bus"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


@dataclass(frozen=True)
class SimFault:
    """A fault to inject into one simulated GPU, ``at_s`` seconds after the schedule's start."""

    at_s: float
    device: int
    kind: FaultKind
    xid: int = 79  # for kind "xid": 79 fallen off the bus, 48 double-bit ECC, 13 graphics engine exception

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {', '.join(FAULT_KINDS)}")
        if not self.at_s >= 0 or self.device < 0 or self.xid < 0:
            raise ValueError(f"fault needs at_s >= 0, device >= 0 and xid >= 0, got {self}")


class SimFaultSchedule:
    """Applies each scheduled fault once, when its time has come; pure: the caller supplies the time."""

    def __init__(self, faults: list[SimFault], devices: list[SimGpu], start_s: float) -> None:
        by_index = {d.info.index: d for d in devices}
        for fault in faults:
            if fault.device not in by_index:
                raise ValueError(f"fault for device {fault.device}, but devices are {sorted(by_index)}")
        self.pending = sorted(faults, key=lambda f: f.at_s)
        self.devices = by_index
        self.start_s = start_s

    def __call__(self, now_s: float) -> list[SimFault]:
        """Fire every fault due by ``now_s``, each at its own instant; returns those fired, in order."""
        fired = []
        while self.pending and self.start_s + self.pending[0].at_s <= now_s:
            fault = self.pending.pop(0)
            device = self.devices[fault.device]
            device.advance(max(device.now_s, self.start_s + fault.at_s))  # the fault lands at its time, not later
            if fault.kind == "cooling_failure":
                device.inject_cooling_failure()
            elif fault.kind == "xid":
                device.inject_xid(fault.xid)
            else:
                device.fall_off_bus()
            fired.append(fault)
        return fired
