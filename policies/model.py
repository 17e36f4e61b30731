"""Shared vocabulary of the profile-guided planner: hardware types, instance configurations,
predicted performance, demand rates, and the optimizer's problem and solution.

Pure, frozen data. The optimizer, the baselines, placement, the learned predictors and the
cluster simulator all speak these types, so each can be replaced without touching the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from common.workflow.catalog import ExecutorSpec
from policies.plan import Demand, StageChoice

Objective = Literal["energy", "cost", "accuracy"]


@dataclass(frozen=True)
class HardwareType:
    """One kind of device a fleet has, with what the planner needs to know about it."""

    name: str  # "h100" | "a100" | "l4" | "cpu" ... (matches GpuSpec.key for GPUs)
    kind: Literal["gpu", "cpu"]
    memory_bytes: int  # per device
    idle_power_w: float  # per device, nothing running
    max_power_w: float  # per device, the maximum power limit (TDP); CPUs: package TDP
    min_power_cap_w: float | None  # lowest settable power limit; None: not cappable
    price_per_hour_usd: float  # per device (cloud list price or amortised cost; the scenario says which)
    cores: int = 0  # CPU hardware: cores per device (CPU executors take resources.cpu_cores of them); 0 = unknown
    loaded_idle_power_w: float = 0.0  # per device, idle with an engine loaded (a GPU holding a CUDA context); 0: idle

    @property
    def instance_idle_power_w(self) -> float:
        """What a device serving an instance draws between requests."""
        return max(self.loaded_idle_power_w, self.idle_power_w)


@dataclass(frozen=True)
class InstanceConfig:
    """How one component instance runs: executor on ``tp`` devices of a hardware type at a power cap."""

    executor: str
    hardware: str
    tp: int = 1
    power_cap_w: float | None = None  # per device; None = the device's default (uncapped)


@dataclass(frozen=True)
class Perf:
    """Predicted behaviour of one instance serving one stage's requests at given knobs.

    ``latency_s`` is the service time of one request (all of a mapped stage's items) at the
    instance's operating point and ``concurrency``; ``capacity_rps`` the request rate one instance
    sustains while keeping that latency; energy is per request, including the instance's share of
    idle power at that load; power is per instance (all ``tp`` devices).
    """

    latency_s: float
    capacity_rps: float
    energy_j_per_request: float
    busy_power_w: float
    idle_power_w: float
    memory_bytes_per_device: int
    source: Literal["measured", "learned", "modeled"] = "modeled"


class PerfModel(Protocol):
    """Predicts how an executor performs on a configuration; None when it cannot run there."""

    def perf(self, executor: ExecutorSpec, config: InstanceConfig, knobs: dict[str, Any],
             items: float = 1.0) -> Perf | None: ...


@dataclass(frozen=True)
class DemandRate:
    demand: Demand
    rate_rps: float  # requests per second to plan for (a high percentile of the forecast)


@dataclass(frozen=True)
class SloTargets:
    """How tiers translate into constraints.

    Accuracy tiers keep options whose accuracy is within ``accuracy_slack[tier]`` (relative) of
    the best option of that stage. Latency tiers bound the workflow's end-to-end latency by
    ``latency_factor[tier]`` times the best achievable; requests with no latency tier get
    ``default_latency_factor``.
    """

    accuracy_slack: dict[str, float] = field(default_factory=lambda: {"best": 0.0, "good": 0.05, "fair": 0.15,
                                                                      "basic": 1.0})
    latency_factor: dict[str, float] = field(default_factory=lambda: {"best": 1.25, "good": 2.0, "fair": 4.0,
                                                                      "basic": 10.0})
    default_latency_factor: float = 10.0


@dataclass(frozen=True)
class Budgets:
    devices: dict[str, int]  # hardware type -> devices available to this plan
    power_w: float | None = None  # cluster (or rack) power budget for the planned instances
    cost_per_hour_usd: float | None = None


@dataclass(frozen=True)
class Problem:
    workflows: dict[str, Any]  # name -> WorkflowSpec
    catalog: dict[str, ExecutorSpec]
    demands: tuple[DemandRate, ...]
    hardware: dict[str, HardwareType]
    budgets: Budgets
    perf: PerfModel
    power_cap_levels: dict[str, tuple[float | None, ...]] = field(default_factory=dict)  # hw -> caps to consider
    objective: Objective = "energy"
    slo: SloTargets = field(default_factory=SloTargets)
    utilization_target: float = 0.8  # plan instances to run at most this busy
    share_instances: bool = True  # one instance pool per configuration, shared by every demand using it
    min_instances: int = 0  # keep at least this many of every chosen configuration (e.g. 1 for warm pools)
    # workflow -> stage -> list elements per request: for a mapped stage, the elements it maps over (one
    # invocation each); for another stage, the length of its largest list input (the perf model's ``items``).
    # Missing: 1. See docs/planning.md.
    stage_items: dict[str, dict[str, float]] = field(default_factory=dict)
    time_limit_s: float = 4.0  # MILP solver time limit; the best plan found by then is returned ("feasible")
    mip_rel_gap: float = 1e-2  # the MILP stops within this fraction of the optimum (its LP bound); tests: 1e-9
    # Queueing. The MILP sizes pools on service times; waits in a pool's queue come on top. The share
    # ``queueing_slack`` of every latency target is kept from the service-time path for waiting; with
    # ``wait_quantile`` set, pools then grow until that share of each demand's requests is predicted
    # (M/M/c, Erlang C) to finish within its target, waits included. See docs/planning.md.
    queueing_slack: float = 0.0
    wait_quantile: float | None = None
    # Plan stability: the running plan's per-stage picks, (demand, stage) -> (config, knob key as in
    # StageOption.knob_key). An energy objective counts any other pick, and any pool the running
    # plan lacks, ``switch_penalty`` (a fraction) dearer, so a re-plan moves work only for a real gain.
    incumbent: dict[tuple[Demand, str], tuple[InstanceConfig, str]] = field(default_factory=dict)
    switch_penalty: float = 0.0
    # The energy objective adds every instance's price at this many W per USD/h, so a power cap that saves
    # energy only by running more, slower devices must save more than the devices it adds cost (0: energy
    # alone). See docs/planning.md.
    price_weight_w: float = 0.0
    # Co-location (needs ``wait_quantile``): one-instance GPU pools of the same hardware, tp and cap may
    # share devices while their busy fractions add up to at most this and every demand still meets its
    # wait quantile with the slowdown sharing causes (policies.colocation). None: every instance gets
    # its own devices.
    colocate_max_busy: float | None = None
    incumbent_colocate: tuple[tuple[InstanceConfig, ...], ...] = ()  # the running plan's groups, kept first


@dataclass(frozen=True)
class PredictedDemand:
    latency_s: float
    latency_target_s: float
    energy_j_per_request: float
    accuracy: float | None


@dataclass(frozen=True)
class Solution:
    status: str  # "optimal" | "feasible" | "infeasible" | "error: ..."
    choices: dict[Demand, dict[str, StageChoice]]
    configs: dict[Demand, dict[str, InstanceConfig]]  # which instance pool serves each stage
    instances: dict[InstanceConfig, int]
    predicted: dict[Demand, PredictedDemand]
    power_w: float
    cost_per_hour_usd: float
    objective_value: float
    binding: tuple[str, ...]  # constraints at their limit, in words
    solve_s: float
    unserved: dict[Demand, str] = field(default_factory=dict)  # demands dropped, and why
    average_power_w: float = 0.0  # predicted mean draw at the planned rates (idle of every instance + dynamic)
    load: dict[InstanceConfig, float] = field(default_factory=dict)  # planned busy instance-equivalents per pool
    instance_busy_power_w: dict[InstanceConfig, float] = field(default_factory=dict)  # per instance, serving
    instance_idle_power_w: dict[InstanceConfig, float] = field(default_factory=dict)  # per instance, idle
    instance_cost_per_hour_usd: dict[InstanceConfig, float] = field(default_factory=dict)  # per instance
    instance_devices: dict[InstanceConfig, float] = field(default_factory=dict)  # devices per instance (CPU: share)
    notes: tuple[str, ...] = ()  # how the plan was reached when not by a finished MILP (e.g. a greedy fallback)
    # Pools (one instance each) to put on the same devices; None: co-location not planned (placement keeps
    # its own rules), () : planned, and every instance gets devices of its own.
    colocate: tuple[tuple[InstanceConfig, ...], ...] | None = None
