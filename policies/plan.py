"""The data a planner produces and the executor and reconciler consume: pure, frozen values.

A plan says, per (workflow, SLO) demand, which executor and knob settings each stage uses,
and which component instances should run where. The reconciler drives agents towards
``components``; the job executor dispatches to the ready ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SLO_DIMENSIONS = ("accuracy", "latency")
# Tool components count a quarter of their cpu_cores against a host: they mostly wait between invocations.
TOOL_CPU_OVERSUBSCRIPTION = 4.0
SLO_TIERS = ("best", "good", "fair", "basic")


@dataclass(frozen=True)
class Demand:
    """A workflow requested at an SLO: ``slo`` is a sorted tuple of (dimension, tier) pairs."""

    workflow: str
    slo: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def of(workflow: str, slo: dict[str, str]) -> "Demand":
        return Demand(workflow, tuple(sorted(slo.items())))


@dataclass(frozen=True)
class StageChoice:
    executor: str
    knobs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceSlot:
    index: int
    kind: str  # "gpu" | "cpu"
    model: str
    simulated: bool
    memory_total_bytes: int
    memory_used_bytes: int = 0


@dataclass(frozen=True)
class NodeSnapshot:
    """What placement may know about a node: only schedulable (ready, not drained) nodes take new work."""

    name: str
    schedulable: bool
    devices: tuple[DeviceSlot, ...]
    cpu_cores: int
    memory_total_bytes: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacedComponent:
    component_id: str
    executor: str
    node: str
    device_indexes: tuple[int, ...]
    power_limit_w: float | None = None  # per device, to apply on each of device_indexes; None: leave as is


@dataclass(frozen=True)
class Plan:
    choices: dict[Demand, dict[str, StageChoice]]
    components: tuple[PlacedComponent, ...]
    unsatisfiable: dict[Demand, str] = field(default_factory=dict)  # demand -> why it cannot be served
    notes: tuple[str, ...] = ()  # e.g. executors that could not be placed, and why
