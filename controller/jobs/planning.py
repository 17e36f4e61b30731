"""The profile-guided planner inside the controller: forecast -> MILP -> placement -> plan.

Job arrivals per (workflow, SLO) are counted in windows and fed to an EWMA forecast; every
``epoch_s`` (and whenever a new demand appears, the catalog or workflows change, or nodes come
and go) the optimizer chooses executors, knobs, hardware, power caps and instance counts for the
forecast rates, and placement maps the instances onto the fleet's actual devices, within memory,
rack power budgets and thermal headroom. The result is the same ``Plan`` the reconciler and the
job executor already consume, plus the power limit each device should run at, plus an
explanation for ``murakkabctl plan show``. Pure apart from the clock values passed in.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.workflow.catalog import ExecutorSpec
from common.workflow.spec import WorkflowSpec
from controller.registry import NodeRecord
from policies.forecast import EwmaForecast
from policies.model import Budgets, DemandRate, HardwareType, InstanceConfig, PerfModel, Problem, Solution
from policies.perf_model import CatalogPerfModel, power_cap_levels, standard_hardware
from policies.placement import (
    NodeState, PlacementLimits, component_config, device_state, hardware_key, place, temperature_trend_c_per_s,
)
from policies.predictors import LearnedPerfModel, Predictors
from policies.plan import Demand, PlacedComponent, Plan

MIN_RATE_RPS = 0.01  # a demand with no recent traffic still keeps one warm instance per configuration
CAP_FRACTIONS = (1.0, 0.8, 0.65, 0.5)  # power-cap levels considered, as fractions of the max limit


@dataclass(frozen=True)
class PlanningConfig:
    epoch_s: float = 300.0
    window_s: float = 60.0
    objective: str = "energy"
    utilization_target: float = 0.8
    rack_power_budget_w: dict[str, float] = field(default_factory=dict)
    time_limit_s: float = 4.0
    queueing_slack: float = 0.2  # see Problem.queueing_slack
    wait_quantile: float | None = 0.99  # see Problem.wait_quantile


@dataclass(frozen=True)
class PlanningInput:
    """A snapshot of what one solve needs, taken on the event loop (see ``OptimizingPlanner.snapshot``)."""

    workflows: dict[str, WorkflowSpec]
    catalog: dict[str, ExecutorSpec]
    wanted: tuple[Demand, ...]
    rates: tuple[DemandRate, ...]
    hardware: dict[str, HardwareType]
    counts: dict[str, int]
    perf: PerfModel
    nodes: list[NodeState]
    current: tuple[PlacedComponent, ...]
    started_s: float
    avoid: dict[tuple[str, str], str] = field(default_factory=dict)  # (executor, node) -> why not there
    keep_executors: frozenset[str] = frozenset()  # unfinished jobs chose them: their running instances stay


@dataclass
class PlanOutcome:
    plan: Plan
    power_limits: dict[tuple[str, int], float]
    explanation: dict[str, Any]


class ArrivalCounter:
    """Counts job submissions per demand in fixed windows and feeds each closed window to the forecast."""

    def __init__(self, forecast: EwmaForecast, window_s: float) -> None:
        self.forecast = forecast
        self.window_s = window_s
        self.window_start_s: float | None = None
        self.counts: dict[Demand, int] = defaultdict(int)

    def record(self, demand: Demand, now_s: float) -> None:
        self.roll(now_s)
        self.counts[demand] += 1

    def roll(self, now_s: float) -> None:
        if self.window_start_s is None:
            self.window_start_s = now_s
            return
        while now_s - self.window_start_s >= self.window_s:
            for demand in set(self.counts) | set(self.forecast.demands()):
                self.forecast.observe(demand, self.counts.get(demand, 0) / self.window_s)
            self.counts = defaultdict(int)
            self.window_start_s += self.window_s

    def rate_rps(self, demand: Demand) -> float:
        """The forecast (a high percentile), or the open window's rate while there is no history yet."""
        forecast = self.forecast.forecast(demand) if demand in self.forecast.demands() else 0.0
        return max(MIN_RATE_RPS, forecast, self.counts.get(demand, 0) / self.window_s)


def fleet_hardware(nodes: Sequence[NodeRecord]) -> tuple[dict[str, HardwareType], dict[str, int]]:
    """The hardware types present on schedulable nodes and how many devices of each.

    Known GPU models take their published characteristics; every node's host CPU counts as one
    ``cpu`` device whose cores are the smallest CPU count among the nodes (conservative).
    """
    standard = standard_hardware()
    counts: dict[str, int] = defaultdict(int)
    cpu_cores: list[int] = []
    for node in nodes:
        if not node.schedulable():
            continue
        for device in node.devices:
            key = hardware_key(device.model, device.kind)
            if key in standard and key != "cpu":
                counts[key] += 1
        if node.host_info is not None:  # every host's CPUs run tools, with or without a cpu device
            counts["cpu"] += 1
            cpu_cores.append(node.host_info.cpu_count)
    hardware = {key: standard[key] for key in counts}
    if "cpu" in hardware and cpu_cores:
        cpu = hardware["cpu"]
        cores = min(cpu_cores)
        share = cores / max(1, cpu.cores)
        hardware["cpu"] = HardwareType(cpu.name, cpu.kind, cpu.memory_bytes, cpu.idle_power_w * share,
                                       cpu.max_power_w * share, None, cpu.price_per_hour_usd * share, cores=cores)
    return hardware, dict(counts)


def node_states(nodes: Sequence[NodeRecord]) -> list[NodeState]:
    states = []
    for node in nodes:
        latest = {t.index: t for t in node.latest_telemetry()}
        devices = []
        for info in node.devices:
            ring = node.history.get(info.index)
            trend = _trend(ring) if ring else None
            devices.append(device_state(info, latest.get(info.index), trend))
        host = node.host_info
        states.append(NodeState(node.name, node.schedulable(), tuple(devices), host.cpu_count if host else 0,
                                host.memory_total_bytes if host else 0, dict(node.labels), node.liveness.value,
                                node.admin_state.value))
    return states


def _trend(ring: Any) -> float | None:
    samples = [(t, s.temperature_c) for t, s in list(ring)[-30:] if s.temperature_c is not None]
    return temperature_trend_c_per_s(samples) if len(samples) >= 2 else None


class OptimizingPlanner:
    def __init__(self, config: PlanningConfig, perf: PerfModel | None = None) -> None:
        self.config = config
        self.arrivals = ArrivalCounter(EwmaForecast(), config.window_s)
        self.perf_override = perf
        self.solve_seconds: list[float] = []

    def record_submit(self, demand: Demand, now_s: float) -> None:
        self.arrivals.record(demand, now_s)

    def plan(self, workflows: Mapping[str, WorkflowSpec], catalog: Mapping[str, ExecutorSpec],
             demands: Sequence[Demand], nodes: Sequence[NodeRecord], current: Sequence[PlacedComponent],
             now_s: float, predictors: Predictors | None = None) -> PlanOutcome:
        """Snapshot and solve in one call (tests, and callers that may block)."""
        return self.solve(self.snapshot(workflows, catalog, demands, nodes, current, now_s, predictors))

    def snapshot(self, workflows: Mapping[str, WorkflowSpec], catalog: Mapping[str, ExecutorSpec],
                 demands: Sequence[Demand], nodes: Sequence[NodeRecord], current: Sequence[PlacedComponent],
                 now_s: float, predictors: Predictors | None = None,
                 avoid: Mapping[tuple[str, str], str] | None = None,
                 keep_executors: frozenset[str] = frozenset()) -> PlanningInput:
        """Everything a solve reads, copied on the event loop so ``solve`` can run on a thread.

        ``predictors`` (fitted on stored profiles) take precedence over the catalog's model where they
        cover an executor, hardware type and operating point.
        """
        started = time.perf_counter()
        self.arrivals.roll(now_s)
        hardware, counts = fleet_hardware(nodes)
        perf = self.perf_override or CatalogPerfModel(hardware)
        if self.perf_override is None and predictors is not None and len(predictors):
            perf = LearnedPerfModel(predictors, perf)
        wanted = [d for d in demands if d.workflow in workflows]
        rates = tuple(DemandRate(d, self.arrivals.rate_rps(d)) for d in wanted)
        return PlanningInput(dict(workflows), dict(catalog), tuple(wanted), rates, hardware, counts, perf,
                             node_states(nodes), tuple(current), started, dict(avoid or {}), frozenset(keep_executors))

    def solve(self, given: PlanningInput) -> PlanOutcome:
        """The MILP, placement and the explanation; touches nothing the event loop changes."""
        workflows, catalog, wanted, rates = given.workflows, given.catalog, given.wanted, given.rates
        hardware, counts, perf, started = given.hardware, given.counts, given.perf, given.started_s
        problem = Problem(
            workflows=dict(workflows), catalog=dict(catalog), demands=rates, hardware=hardware,
            budgets=Budgets(devices=counts), perf=perf,
            power_cap_levels=power_cap_levels(hardware, CAP_FRACTIONS),
            objective=self.config.objective,  # type: ignore[arg-type]
            utilization_target=self.config.utilization_target, min_instances=1,
            time_limit_s=self.config.time_limit_s, queueing_slack=self.config.queueing_slack,
            wait_quantile=self.config.wait_quantile)
        solution = _solve(problem)
        instances, kept_notes = _with_live_job_instances(solution.instances, given)
        placement = place(instances, given.nodes, catalog, given.current,
                          PlacementLimits(rack_power_budget_w=dict(self.config.rack_power_budget_w),
                                          avoid=dict(given.avoid)), perf=perf,
                          hardware=hardware)
        unsatisfiable = dict(solution.unserved)
        placed_executors = {c.executor for c in placement.components}
        choices = {}
        for demand, stages in solution.choices.items():
            missing = sorted({c.executor for c in stages.values()} - placed_executors)
            if missing:
                unsatisfiable[demand] = f"no place found for {', '.join(missing)} " + "; ".join(
                    placement.reasons.get(cfg, "") for cfg in placement.unplaced if cfg.executor in missing)
            else:
                choices[demand] = stages
        for demand in wanted:
            if demand not in choices and demand not in unsatisfiable:
                unsatisfiable[demand] = "the optimizer returned no plan for it"
        elapsed = time.perf_counter() - started
        self.solve_seconds = (self.solve_seconds + [elapsed])[-100:]
        plan = Plan(choices=choices, components=placement.components, unsatisfiable=unsatisfiable,
                    notes=tuple(solution.notes) + tuple(kept_notes) + tuple(placement.notes))
        return PlanOutcome(plan, dict(placement.power_limits),
                           explain(solution, placement, rates, unsatisfiable, elapsed, self.solve_seconds))


def _with_live_job_instances(instances: Mapping[InstanceConfig, int], given: PlanningInput,
                             ) -> tuple[dict[InstanceConfig, int], list[str]]:
    """The solution's instances plus, for executors unfinished jobs chose and the solution dropped (a workflow
    update), the instances of them that run now, in their present configuration."""
    result = dict(instances)
    chosen = {config.executor for config, n in instances.items() if n > 0}
    nodes = {n.name: n for n in given.nodes}
    notes: list[str] = []
    for name in sorted(given.keep_executors - chosen):
        executor = given.catalog.get(name)
        if executor is None:
            notes.append(f"executor {name}: unfinished jobs chose it, but it is no longer in the catalog")
            continue
        kept = 0
        for comp in given.current:
            node = nodes.get(comp.node)
            if comp.executor != name or node is None:
                continue
            devices = {d.index: d for d in node.devices}
            first = devices.get(comp.device_indexes[0]) if comp.device_indexes else None
            if first is None:  # a tool on a node without a cpu device: placement's cpu hardware
                config = component_config(comp, "cpu", False, None)
            else:
                config = component_config(comp, first.hardware, first.kind == "gpu", first.power_limit_default_w)
            result[config] = result.get(config, 0) + 1
            kept += 1
        if kept:
            notes.append(f"executor {name}: {kept} instance(s) kept for unfinished jobs that chose it")
    return result, notes


def _solve(problem: Problem) -> Solution:
    from policies.optimizer import optimize

    return optimize(problem)


def _config_text(config: InstanceConfig) -> str:
    cap = f" @ {config.power_cap_w:.0f} W" if config.power_cap_w else ""
    return f"{config.executor} on {config.tp}x {config.hardware}{cap}"


def explain(solution: Solution, placement: Any, rates: Sequence[DemandRate], unsatisfiable: Mapping[Demand, str],
            elapsed_s: float, history_s: Sequence[float]) -> dict[str, Any]:
    """What ``plan show`` prints: per demand the choice and its predictions, the pools, the limits that bind."""
    rate_of = {r.demand: r.rate_rps for r in rates}
    demands = []
    for r in rates:
        d = r.demand
        entry: dict[str, Any] = {"workflow": d.workflow, "slo": dict(d.slo), "planned_rate_rps": round(r.rate_rps, 4)}
        if d in solution.choices:
            configs = solution.configs.get(d, {})
            entry["stages"] = {stage: {"executor": c.executor, "knobs": dict(c.knobs),
                                       "config": _config_text(configs[stage]) if stage in configs else None}
                               for stage, c in solution.choices[d].items()}
            predicted = solution.predicted.get(d)
            if predicted is not None:
                entry["predicted"] = {"latency_s": round(predicted.latency_s, 4),
                                      "latency_target_s": round(predicted.latency_target_s, 4),
                                      "energy_j_per_request": round(predicted.energy_j_per_request, 3),
                                      "accuracy": predicted.accuracy}
        if d in unsatisfiable:
            entry["unserved"] = unsatisfiable[d]
        demands.append(entry)
    demands.sort(key=lambda e: (e["workflow"], sorted(e["slo"].items())))
    instances = [{"config": _config_text(c), "executor": c.executor, "hardware": c.hardware, "tp": c.tp,
                  "power_cap_w": c.power_cap_w, "instances": n,
                  "unplaced": placement.unplaced.get(c, 0)} for c, n in sorted(solution.instances.items(),
                                                                                key=lambda kv: _config_text(kv[0]))]
    return {
        "planner": "murakkab (MILP + placement)", "status": solution.status, "objective_value": solution.objective_value,
        "demands": demands, "instances": instances, "binding": list(solution.binding),
        "power_w": round(solution.power_w, 1), "cost_per_hour_usd": round(solution.cost_per_hour_usd, 3),
        "solve_s": round(solution.solve_s, 4), "plan_s": round(elapsed_s, 4),
        "plan_s_p50": round(statistics.median(history_s), 4) if history_s else None,
        "components": [{"component_id": p.component_id, "executor": p.executor, "node": p.node,
                        "devices": list(p.device_indexes)} for p in placement.components],
        "power_limits": [{"node": n, "device": i, "power_limit_w": w} for (n, i), w in sorted(placement.power_limits.items())],
        "notes": list(solution.notes) + list(placement.notes),
        "rates_known": {f"{d.workflow} {dict(d.slo)}": rate_of[d] for d in rate_of},
    }
