"""Scheduled faults in the simulator, and the device telemetry that lets the autopilot react to them.

A scenario's ``faults`` fail and recover nodes, take a GPU's cooling away and give it back, and set
power budgets at given times. While a scenario has faults, the simulated fleet also reports per-GPU
telemetry to the autopilot every ``TELEMETRY_INTERVAL_S``: the power the simulator's model draws on each
device, a first-order temperature (``C dT/dt = P - (T - T_ambient) / R``, integrated exactly between
observations, R multiplied by the sim GPU's cooling-failure factor while a fault lasts) and the
clocks-event reasons the driver would set at that temperature. Scenarios without faults report no
telemetry, so placement and the benchmark numbers are what they were. Not modeled: the clock a hot GPU
loses (service does not slow), shutdown at the shutdown temperature (temperature stops just below it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.devices.gpu_specs import GPU_SPECS

TELEMETRY_INTERVAL_S = 5.0
COOLING_FAILURE_RESISTANCE_FACTOR = 6.0  # as the sim GPU (agent.devices.sim) models a lost airflow or coolant flow

DeviceKey = tuple[str, int]


@dataclass
class Thermals:
    """Temperatures of the simulated GPUs, advanced with the power each draws."""

    ambient_c: float
    temperature_c: dict[DeviceKey, float] = field(default_factory=dict)
    cooling_failed: set[DeviceKey] = field(default_factory=set)
    last_s: float = 0.0

    def advance(self, now_s: float, power_w: Mapping[DeviceKey, float], hardware: Mapping[str, str]) -> None:
        """Integrate every GPU in ``power_w`` from the last call to ``now_s`` at that (constant) power.

        ``hardware`` maps a node to its GPU model key ("h100", ...)."""
        dt = max(0.0, now_s - self.last_s)
        self.last_s = now_s
        for key, watts in power_w.items():
            spec = GPU_SPECS[hardware[key[0]]]
            resistance = spec.thermal_resistance_k_per_w * (
                COOLING_FAILURE_RESISTANCE_FACTOR if key in self.cooling_failed else 1.0)
            steady_c = self.ambient_c + watts * resistance
            start_c = self.temperature_c.get(key, steady_c if dt == 0 else self.ambient_c)
            tau_s = resistance * spec.heat_capacity_j_per_k
            now_c = steady_c + (start_c - steady_c) * math.exp(-dt / tau_s) if tau_s > 0 else steady_c
            self.temperature_c[key] = min(now_c, spec.shutdown_temperature_c - 0.1)

    def reasons(self, key: DeviceKey, hardware: str) -> tuple[str, ...]:
        """Clocks-event reasons at the device's temperature (as ``common.devices.physics`` sets them)."""
        spec = GPU_SPECS[hardware]
        temperature = self.temperature_c.get(key)
        if temperature is None:
            return ()
        reasons: list[str] = []
        if temperature > spec.max_operating_temperature_c:
            reasons.append("sw_thermal_slowdown")
        if temperature >= spec.slowdown_temperature_c:
            reasons += ["hw_slowdown", "hw_thermal_slowdown"]
        return tuple(reasons)


@dataclass
class Reaction:
    """How long the autopilot took to react to one fault, for the report."""

    fault: dict[str, Any]
    at_s: float
    reacted_s: float | None = None
    reaction: str | None = None
    subjects: frozenset[str] = frozenset()  # the devices ("node/gpuN") a rack's cooling fault covers

    def view(self) -> dict[str, Any]:
        return {**self.fault, "reaction": self.reaction,
                "reaction_after_s": None if self.reacted_s is None else round(self.reacted_s - self.at_s, 3)}


# What counts as the reaction to each kind of fault: the first autopilot note of these kinds about it.
REACTIONS = {"node-failure": ("replace",), "cooling-failure": ("heat",), "budget": ("budget", "budget-infeasible"),
             "node-recovery": ("replace",), "cooling-restored": ("heat-cleared",)}


def matches(reaction: Reaction, kind: str, subject: str) -> bool:
    """Whether a note (kind, subject) is the reaction to this fault."""
    fault = reaction.fault
    if kind not in REACTIONS.get(fault["kind"], ()):
        return False
    if fault["kind"].startswith("cooling"):
        if fault.get("rack") is not None:
            return subject in reaction.subjects
        return subject == f"{fault['node']}/gpu{fault['device']}"
    if fault["kind"] == "budget":
        return subject == ("cluster" if fault.get("rack") is None else f"rack {fault['rack']}")
    return True
