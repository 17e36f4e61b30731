"""What goes into the autopilot (events) and what comes out (actions): frozen values, times in seconds.

The shells (the controller daemon, the cluster simulator) turn what they measure into events and
carry out the actions; every action that changes the cluster says why (``reason``), and every
decision also comes out as a ``Note`` for the operator's event log (``murakkabctl events``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.workflow.catalog import ExecutorSpec
from policies.placement import NodeState
from policies.model import HardwareType, InstanceConfig, PerfModel, Problem, Solution
from policies.plan import Demand, PlacedComponent, Plan

DeviceKey = tuple[str, int]  # (node, device index)


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetObserved:
    """The fleet now: nodes with their devices' latest telemetry (temperature, throttle reasons, power),
    the hardware types present and how many devices of each the plan may use."""

    now_s: float
    nodes: tuple[NodeState, ...]
    hardware: Mapping[str, HardwareType]
    devices_available: Mapping[str, int]


@dataclass(frozen=True)
class LoadObserved:
    """One observation window closed: arrival rates per demand, each pool's busy fraction (requests in
    service over its slots; above 1 when they queue) and instance counts; the decision point."""

    now_s: float
    arrival_rates_rps: Mapping[Demand, float]
    utilization: Mapping[InstanceConfig, float]
    instances: Mapping[InstanceConfig, int]
    peak_rates: Mapping[Demand, float] | None = None  # only the static preset's operator knows the peak


@dataclass(frozen=True)
class InputsChanged:
    """What the plan is for changed: workflows, catalog or perf model (``None``: unchanged), the demands that
    must be served now, executors live jobs chose (kept running), and (executor, node) pairs to avoid."""

    now_s: float
    workflows: Mapping[str, Any] | None = None
    catalog: Mapping[str, ExecutorSpec] | None = None
    perf: PerfModel | None = None
    demands: tuple[Demand, ...] | None = None
    keep_executors: frozenset[str] | None = None
    avoid: Mapping[tuple[str, str], str] | None = None
    replan: bool = True  # a new plan at once (a new workflow or catalog); False: at the next epoch


@dataclass(frozen=True)
class Solved:
    """The MILP a ``Solve`` asked for, solved."""

    request_id: int
    solution: Solution
    now_s: float


@dataclass(frozen=True)
class ComponentsObserved:
    """Every component the agents report, by id, with its state ("starting", "ready", "failed", ...)."""

    now_s: float
    states: Mapping[str, str]


@dataclass(frozen=True)
class BudgetSet:
    """An operator's (or facility's) power budget: ``rack`` None for the whole cluster; watts None clears it."""

    now_s: float
    rack: str | None
    power_budget_w: float | None
    source: str = "operator"


@dataclass(frozen=True)
class PinSet:
    """An operator pins a device's power limit; the autopilot plans around it until it is cleared."""

    now_s: float
    node: str
    device_index: int
    power_limit_w: float


@dataclass(frozen=True)
class PinCleared:
    now_s: float
    node: str
    device_index: int


@dataclass(frozen=True)
class CoolingSet:
    """A facility reports a rack's cooling: ``ok``, ``degraded`` (caps come down in the rack) or ``failed``
    (caps come down and its GPUs are evacuated: their components move out, the plan is made without them)."""

    now_s: float
    rack: str
    state: str
    inlet_c: float | None = None
    source: str = "facility"


@dataclass(frozen=True)
class GridSet:
    """The utility's price and carbon intensity now; they weigh energy in the plan where the operator enabled it."""

    now_s: float
    price_usd_per_mwh: float
    carbon_g_per_kwh: float
    source: str = "facility"


@dataclass(frozen=True)
class Tick:
    """Time passes: heat timers, rollout timeouts and the budget control loop are checked."""

    now_s: float


Event = (FleetObserved | LoadObserved | InputsChanged | Solved | ComponentsObserved | BudgetSet | PinSet
         | PinCleared | CoolingSet | GridSet | Tick)


# --- actions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solve:
    """Run ``policies.optimizer.optimize(problem)`` (pure; may take seconds) and feed back ``Solved``."""

    request_id: int
    problem: Problem
    reason: str


@dataclass(frozen=True)
class DesiredChanged:
    """The components to run (retained ones of a rollout included) and the plan jobs are admitted with."""

    components: tuple[PlacedComponent, ...]
    plan: Plan
    reason: str


@dataclass(frozen=True)
class RoutingChanged:
    """Where new work goes: ``active`` routes each (demand, stage) to its pool; ``weights`` scale each
    component's share (1 normal, below 1 on a hot GPU, 0 for components that only finish what they run)."""

    active: Solution
    weights: Mapping[str, float]
    reason: str


@dataclass(frozen=True)
class PowerLimitsChanged:
    """The power limit every device should run at: plan, heat, budget and pins combined (level-triggered)."""

    limits: Mapping[DeviceKey, float]
    reason: str


@dataclass(frozen=True)
class Note:
    """A decision for the operator's log: ``kind`` names the reaction, ``subject`` what it acted on."""

    now_s: float
    kind: str
    subject: str
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """An event the autopilot will not take (an unknown rack, a negative budget, an unpin of no pin)."""

    code: str
    message: str


Action = Solve | DesiredChanged | RoutingChanged | PowerLimitsChanged | Note | Refused
