"""The profile-guided planner's core: a MILP over executors, knobs, hardware, tensor parallelism,
power caps and instance counts, solved with HiGHS through ``scipy.optimize.milp``.

``optimize(problem) -> Solution`` is pure (the only clock read is the solve time it reports). The
formulation is written down in docs/planning.md; in short, per demand d (workflow at an SLO) and
stage s it picks exactly one option o = (executor, knob setting, instance config); instance pools
(one per config, shared by every demand and stage using it when ``share_instances``) get integer
counts that carry the planned load at ``utilization_target``; every path of the workflow DAG meets
the demand's latency target; device, power and cost budgets hold; and the objective is energy
(average power, optionally with instance prices weighed in: ``price_weight_w``), cost (USD per hour)
or accuracy, the latter two with energy as a tie-break.

Options are generated and pruned before the MILP is built (see ``_stage_options`` and
``_demand_options``): tier filters, options that cannot meet the latency target or a budget on their
own, and options beaten on every count by another option of the same pool. Demands that keep no
option for some stage are unserved with the reason; when the rest cannot all be served together, the
served request rate is maximised first and the plan is optimised for those (status "infeasible").
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from common.workflow.catalog import ExecutorSpec
from policies.colocation import slowdowns
from policies.model import HardwareType, InstanceConfig, Perf, PerfModel, PredictedDemand, Problem, Solution
from policies.perf_model import (
    MAX_TP, devices_per_instance, knob_settings, model_memory_bytes, option_accuracy, runs_on_gpu,
)
from policies.plan import SLO_DIMENSIONS, SLO_TIERS, Demand, StageChoice
from policies.queueing import probability_waits_within, wait_tail

_EPS = 1e-9
LATENCY_BINDING_FRACTION = 0.95  # a demand's latency is reported binding at >= 95 % of its target
MAX_TP_SCALE = 2  # besides the smallest tensor-parallel size that fits, try up to this many times it
COLOCATION_HYSTERESIS = 0.25  # a running co-location group stays together up to this much above the busy limit
MAX_QUEUEING_STEPS = 5000  # instances the queueing pass may add in one solve (each step adds one)


@dataclass(frozen=True)
class StageOption:
    """One way to run one stage: the executor at a knob setting on an instance configuration."""

    executor: str
    knobs: dict[str, Any]
    knob_key: str
    config: InstanceConfig
    accuracy: float | None
    latency_s: float  # the stage's latency per workflow request (all waves of a mapped stage)
    service_s: float  # one invocation on one batch slot
    invocations: float  # per workflow request
    slots: int  # requests one instance serves side by side
    load: float  # busy instance-equivalents per request/s of the workflow: invocations / capacity_rps
    energy_j: float  # per workflow request: invocations x energy per invocation (idle share at full load)
    dynamic_energy_j: float  # per workflow request, above the instances' idle power
    busy_power_w: float  # per instance
    idle_power_w: float  # per instance
    devices: float  # per instance, from the hardware budget
    price_per_hour_usd: float  # per instance


@dataclass
class _DemandPlan:
    demand: Demand
    rate_rps: float
    stages: list[str]
    upstream: dict[str, list[str]]
    options: dict[str, list[StageOption]]
    target_s: float  # the end-to-end latency target, waits included
    accuracy_stages: int  # stages whose options have a known accuracy (for the mean)
    service_target_s: float  # what the chosen options' service times may add up to (target less queueing slack)


# --- options ---------------------------------------------------------------------------------


def knob_key(knobs: Mapping[str, Any]) -> str:
    return json.dumps(knobs, sort_keys=True, default=str)


def _configs(exe: ExecutorSpec, problem: Problem) -> tuple[list[InstanceConfig], list[str]]:
    """Instance configs worth asking the perf model about, and why hardware types were skipped."""
    configs: list[InstanceConfig] = []
    skipped: list[str] = []
    gpu = runs_on_gpu(exe)
    for name in sorted(problem.hardware):
        hw = problem.hardware[name]
        if (hw.kind == "gpu") != gpu:
            continue
        if problem.budgets.devices.get(name, 0) <= 0:
            skipped.append(f"no {name} devices in the budget")
            continue
        if not gpu:
            configs.append(InstanceConfig(exe.name, name, 1, None))
            continue
        fitting = [tp for tp in (1, 2, 4, 8) if math.ceil(model_memory_bytes(exe) / tp) <= hw.memory_bytes]
        if not fitting:
            skipped.append(f"does not fit {name} even at tp {MAX_TP}")
            continue
        smallest = fitting[0]
        tps = {tp for tp in fitting if tp <= smallest * MAX_TP_SCALE}
        if exe.resources.gpu_count >= smallest and exe.resources.gpu_count <= MAX_TP:
            tps.add(exe.resources.gpu_count)
        for tp in sorted(tps):
            for cap in problem.power_cap_levels.get(name, (None,)):
                configs.append(InstanceConfig(exe.name, name, tp, cap))
    return configs, skipped


def stage_counts(stage_items: Mapping[str, Mapping[str, float]], workflow: Any, stage: Any) -> tuple[float, float]:
    """(invocations per workflow request, items per invocation) for a stage; ``stage_items`` gives mapped
    stages' fan-out and other stages' list lengths per workflow and stage (else 1 where a list goes in)."""
    given = stage_items.get(workflow.name, {}).get(stage.name)
    if stage.map_over is not None:
        return (1.0 if given is None else max(float(given), 0.0)), 0.0
    if given is not None:
        return 1.0, max(float(given), 0.0)
    has_list = False
    for ref in stage.inputs.values():
        try:
            has_list = has_list or workflow.output_type(ref).startswith("list[")
        except (KeyError, AttributeError):
            continue
    return 1.0, (1.0 if has_list else 0.0)


class _PerfCache:
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.cache: dict[tuple[Any, ...], Perf | None] = {}

    def get(self, exe: ExecutorSpec, config: InstanceConfig, knobs: dict[str, Any], key: str,
            items: float) -> Perf | None:
        cache_key = (exe.name, config, key, items)
        if cache_key not in self.cache:
            perf = self.problem.perf.perf(exe, config, dict(knobs), items)
            if perf is not None and not (perf.latency_s > 0 and perf.capacity_rps > 0):
                perf = None
            self.cache[cache_key] = perf
        return self.cache[cache_key]


def _stage_options(problem: Problem, workflow: Any, stage: Any, perf: _PerfCache) -> tuple[list[StageOption], str]:
    """Every runnable option of a stage (demand independent), or none and why."""
    pin, min_accuracy = stage.constraints.executor, stage.constraints.min_accuracy
    if pin is not None:
        exe = problem.catalog.get(pin)
        if exe is None:
            return [], f"pinned executor {pin!r} is not in the catalog"
        if exe.task != stage.task:
            return [], f"pinned executor {pin!r} implements task {exe.task!r}, not {stage.task!r}"
        candidates = [exe]
    else:
        candidates = sorted((e for e in problem.catalog.values() if e.task == stage.task), key=lambda e: e.name)
        if not candidates:
            return [], "no executor in the catalog implements this task"
    invocations, items = stage_counts(problem.stage_items, workflow, stage)
    options: list[StageOption] = []
    why: list[str] = []
    for exe in candidates:
        configs, skipped = _configs(exe, problem)
        found = 0
        for knobs in knob_settings(exe, workflow.name):
            accuracy = option_accuracy(exe, workflow.name, knobs)
            if min_accuracy is not None and (accuracy is None or accuracy < min_accuracy - _EPS):
                continue
            key = knob_key(knobs)
            by_config: dict[tuple[str, int], list[tuple[InstanceConfig, Perf]]] = {}
            for config in configs:
                p = perf.get(exe, config, knobs, key, items)
                if p is not None:
                    by_config.setdefault((config.hardware, config.tp), []).append((config, p))
            for group in by_config.values():
                for config, p in _distinct_caps(group):
                    options.append(_make_option(problem, exe, knobs, key, config, p, accuracy, invocations))
                    found += 1
        if not found:
            reasons = list(skipped)
            if min_accuracy is not None:
                reasons.append(f"no setting with known accuracy >= min_accuracy {min_accuracy:g}")
            why_not = getattr(problem.perf, "why_not", None)
            if callable(why_not):
                reasons += list(dict.fromkeys(r for r in (why_not(exe, c) for c in configs) if r))[:3]
            why.append(f"{exe.name}: {'; '.join(reasons) or 'the perf model has no prediction for any config'}")
    return options, "; ".join(why)


def _distinct_caps(group: list[tuple[InstanceConfig, Perf]]) -> list[tuple[InstanceConfig, Perf]]:
    """Caps that do not bind repeat the uncapped behaviour: keep the highest cap of identical ones."""
    def rank(item: tuple[InstanceConfig, Perf]) -> float:
        return math.inf if item[0].power_cap_w is None else item[0].power_cap_w

    kept: list[tuple[InstanceConfig, Perf]] = []
    for config, p in sorted(group, key=rank, reverse=True):
        if any(math.isclose(p.latency_s, q.latency_s, rel_tol=1e-9) and
               math.isclose(p.busy_power_w, q.busy_power_w, rel_tol=1e-9) and
               math.isclose(p.capacity_rps, q.capacity_rps, rel_tol=1e-9) for _, q in kept):
            continue
        kept.append((config, p))
    return kept


def _make_option(problem: Problem, exe: ExecutorSpec, knobs: dict[str, Any], key: str, config: InstanceConfig,
                 p: Perf, accuracy: float | None, invocations: float) -> StageOption:
    hw: HardwareType = problem.hardware[config.hardware]
    in_flight = max(1, math.floor(p.capacity_rps * p.latency_s + 1e-9))
    waves = max(1, math.ceil(invocations / in_flight - 1e-9)) if invocations > 0 else 0
    devices = devices_per_instance(exe, config, hw)
    dynamic = max(p.energy_j_per_request - p.idle_power_w / p.capacity_rps, 0.0)
    return StageOption(executor=exe.name, knobs=dict(knobs), knob_key=key, config=config, accuracy=accuracy,
                       latency_s=waves * p.latency_s, service_s=p.latency_s, invocations=invocations,
                       slots=in_flight, load=invocations / p.capacity_rps,
                       energy_j=invocations * p.energy_j_per_request, dynamic_energy_j=invocations * dynamic,
                       busy_power_w=p.busy_power_w, idle_power_w=p.idle_power_w, devices=devices,
                       price_per_hour_usd=devices * hw.price_per_hour_usd)


def stage_options(problem: Problem, workflows: list[str]) -> dict[tuple[str, str], tuple[list[StageOption], str]]:
    """(workflow, stage) -> every runnable option (before tier filters), or none and why."""
    perf = _PerfCache(problem)
    out: dict[tuple[str, str], tuple[list[StageOption], str]] = {}
    for name in workflows:
        workflow = problem.workflows.get(name)
        if workflow is None:
            continue
        for stage in workflow.stages:
            out[(name, stage.name)] = _stage_options(problem, workflow, stage, perf)
    return out


# --- per demand: tiers, targets, pruning ------------------------------------------------------


def path_latency_s(stages: list[str], upstream: Mapping[str, list[str]], latency: Mapping[str, float]) -> float:
    finish: dict[str, float] = {}
    for s in stages:
        finish[s] = max((finish[u] for u in upstream[s]), default=0.0) + latency[s]
    return max(finish.values(), default=0.0)


def critical_path(stages: list[str], upstream: Mapping[str, list[str]], latency: Mapping[str, float]) -> list[str]:
    """The stages of the longest path through the DAG by latency, in order."""
    finish: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for s in stages:
        before = max(upstream[s], key=lambda u: finish[u], default=None)
        via[s] = before
        finish[s] = (finish[before] if before is not None else 0.0) + latency[s]
    last: str | None = max(stages, key=lambda s: finish[s], default=None)
    path: list[str] = []
    while last is not None:
        path.append(last)
        last = via[last]
    return path[::-1]


def _tiers(demand: Demand) -> dict[str, str] | str:
    slo = dict(demand.slo)
    for dimension, tier in slo.items():
        if dimension not in SLO_DIMENSIONS:
            return f"unknown SLO dimension {dimension!r} (known: {', '.join(SLO_DIMENSIONS)})"
        if tier not in SLO_TIERS:
            return f"unknown SLO tier {tier!r} for {dimension} (known: {', '.join(SLO_TIERS)})"
    return slo


def _accuracy_filter(options: list[StageOption], tier: str | None, slack: Mapping[str, float]) -> list[StageOption]:
    """Keep options within the tier's relative slack of the best known accuracy; unknown ones only
    for tier basic (or no tier), or when no option's accuracy is known."""
    if tier is None or tier == "basic":
        return options
    known = [o for o in options if o.accuracy is not None]
    if not known:
        return options
    floor = max(o.accuracy for o in known) * (1.0 - slack.get(tier, 0.0))  # type: ignore[type-var]
    return [o for o in known if o.accuracy >= floor - _EPS]  # type: ignore[operator]


def _dominated(a: StageOption, b: StageOption) -> bool:
    """b is at least as good as a on every count and uses the same pool (so sharing is unaffected)."""
    acc_a = -1.0 if a.accuracy is None else a.accuracy
    acc_b = -1.0 if b.accuracy is None else b.accuracy
    return (b.latency_s <= a.latency_s + _EPS and b.load <= a.load + _EPS
            and b.dynamic_energy_j <= a.dynamic_energy_j + _EPS and acc_b >= acc_a - _EPS)


def _prune_dominated(options: list[StageOption]) -> list[StageOption]:
    by_config: dict[InstanceConfig, list[StageOption]] = {}
    for o in options:
        by_config.setdefault(o.config, []).append(o)
    kept: list[StageOption] = []
    for group in by_config.values():
        for i, a in enumerate(group):
            if not any(_dominated(a, b) and (not _dominated(b, a) or j < i) for j, b in enumerate(group) if j != i):
                kept.append(a)
    return kept


def _fits_alone(o: StageOption, rate: float, problem: Problem, floor_instances: int) -> bool:
    n = max(floor_instances, math.ceil(rate * o.load / problem.utilization_target - 1e-9))
    budgets = problem.budgets
    if o.devices * n > budgets.devices.get(o.config.hardware, 0) + _EPS:
        return False
    if budgets.power_w is not None and o.busy_power_w * n > budgets.power_w + _EPS:
        return False
    return budgets.cost_per_hour_usd is None or o.price_per_hour_usd * n <= budgets.cost_per_hour_usd + _EPS


def _demand_options(problem: Problem, demand: Demand, rate: float,
                    stage_options: dict[tuple[str, str], tuple[list[StageOption], str]]) -> _DemandPlan | str:
    workflow = problem.workflows.get(demand.workflow)
    if workflow is None:
        return f"workflow {demand.workflow!r} is not known"
    tiers = _tiers(demand)
    if isinstance(tiers, str):
        return tiers
    names = workflow.topological_order()
    upstream = {s.name: [u for u in s.upstream() if u in names] for s in workflow.stages}
    floor_instances = max(problem.min_instances, 1)
    options: dict[str, list[StageOption]] = {}
    for name in names:
        all_options, why = stage_options[(demand.workflow, name)]
        if not all_options:
            return f"stage {name!r}: {why}"
        kept = [o for o in all_options if _fits_alone(o, rate, problem, floor_instances)]
        if not kept:
            return f"stage {name!r}: no option fits the device, power and cost budgets at {rate:g} req/s"
        kept = _accuracy_filter(kept, tiers.get("accuracy"), problem.slo.accuracy_slack)
        options[name] = kept
    best = {s: min(o.latency_s for o in options[s]) for s in names}
    factor = problem.slo.latency_factor.get(tiers["latency"], problem.slo.default_latency_factor) \
        if "latency" in tiers else problem.slo.default_latency_factor
    target_s = factor * path_latency_s(names, upstream, best)
    # Latency alone: the best path through the option must meet the target.
    head = {}
    for s in names:
        head[s] = max((head[u] + best[u] for u in upstream[s]), default=0.0)
    downstream: dict[str, list[str]] = {s: [] for s in names}
    for s in names:
        for u in upstream[s]:
            downstream[u].append(s)
    tail: dict[str, float] = {}
    for s in reversed(names):
        tail[s] = max((best[v] + tail[v] for v in downstream[s]), default=0.0)
    service_target_s = target_s * (1.0 - problem.queueing_slack)
    for s in names:
        limit = service_target_s * (1 + 1e-9) + _EPS
        options[s] = _prune_dominated([o for o in options[s] if head[s] + o.latency_s + tail[s] <= limit])
        if not options[s]:  # the tier's target less the queueing slack is below the fastest path
            return (f"stage {s!r}: no option meets the latency target: the fastest path takes "
                    f"{head[s] + best[s] + tail[s]:.3g} s, the target {target_s:.3g} s less the queueing slack "
                    f"({problem.queueing_slack:.0%}) leaves {service_target_s:.3g} s")
    accuracy_stages = sum(1 for s in names if any(o.accuracy is not None for o in options[s]))
    return _DemandPlan(demand, rate, names, upstream, options, target_s, accuracy_stages, service_target_s)


def latency_target_s(problem: Problem, demand: Demand,
                     options: dict[tuple[str, str], tuple[list[StageOption], str]]) -> float | None:
    """The demand's end-to-end latency target (tier factor x best achievable), or None if it cannot be served."""
    result = _demand_options(problem, demand, 0.0, options)
    return None if isinstance(result, str) else result.target_s


def critical_path_s(workflow: Any, latency_s: Mapping[str, float]) -> float:
    """End-to-end latency of a workflow whose stages take these latencies (longest path of the DAG)."""
    names = workflow.topological_order()
    upstream = {s.name: [u for u in s.upstream() if u in names] for s in workflow.stages}
    return path_latency_s(names, upstream, latency_s)


@dataclass
class _Ledger:
    """Pool loads, instance counts and budget use of a plan under construction (the greedy fallback)."""

    load: np.ndarray
    counts: np.ndarray
    devices: dict[str, float]
    power_w: float
    cost_per_hour_usd: float

    def copy(self) -> _Ledger:
        return _Ledger(self.load.copy(), self.counts.copy(), dict(self.devices), self.power_w, self.cost_per_hour_usd)

    def add(self, model: _Model, i: int) -> bool:
        """Put option i's load on its pool, growing the pool within the budgets; False (unchanged) if it cannot."""
        d, _, o = model.x[i]
        p, problem = model.pool_of[i], model.problem
        load = self.load[p] + model.plans[d].rate_rps * o.load
        n = max(problem.min_instances, 1, math.ceil(load / problem.utilization_target - 1e-9))
        more = max(n - int(self.counts[p]), 0)
        hw, budgets = o.config.hardware, problem.budgets
        devices = self.devices.get(hw, 0.0) + more * o.devices
        power_w = self.power_w + more * o.busy_power_w
        cost = self.cost_per_hour_usd + more * o.price_per_hour_usd
        if devices > budgets.devices.get(hw, 0) + _EPS or \
                (budgets.power_w is not None and power_w > budgets.power_w + _EPS) or \
                (budgets.cost_per_hour_usd is not None and cost > budgets.cost_per_hour_usd + _EPS):
            return False
        self.load[p], self.counts[p] = load, max(n, int(self.counts[p]))
        self.devices[hw], self.power_w, self.cost_per_hour_usd = devices, power_w, cost
        return True


# --- the MILP ----------------------------------------------------------------------------------


class _Model:
    """Variables and constraints of the MILP; see docs/planning.md for the formulation."""

    def __init__(self, problem: Problem, plans: list[_DemandPlan]) -> None:
        self.problem = problem
        self.plans = plans
        self.x: list[tuple[int, str, StageOption]] = []  # (plan index, stage, option)
        self.pool_of: list[int] = []
        self.pools: list[Any] = []
        pool_index: dict[Any, int] = {}
        self.pool_option: list[StageOption] = []  # a representative option (same config => same per-instance numbers)
        self.first_x: dict[tuple[int, str], list[int]] = {}
        for d, plan in enumerate(plans):
            for s in plan.stages:
                for o in plan.options[s]:
                    key = o.config if problem.share_instances else (plan.demand, s, o.config)
                    if key not in pool_index:
                        pool_index[key] = len(self.pools)
                        self.pools.append(key)
                        self.pool_option.append(o)
                    self.first_x.setdefault((d, s), []).append(len(self.x))
                    self.x.append((d, s, o))
                    self.pool_of.append(pool_index[key])
        self.nx, self.np = len(self.x), len(self.pools)
        self.need_y = problem.min_instances > 0 or any(p.rate_rps <= 0 for p in plans)
        self.ny = self.np if self.need_y else 0
        self.t_index: dict[tuple[int, str], int] = {}
        for d, plan in enumerate(plans):
            for s in plan.stages:
                self.t_index[(d, s)] = len(self.t_index)
        self.nt = len(self.t_index)
        self.nz = len(plans)
        self.n0 = self.nx
        self.y0 = self.n0 + self.np
        self.t0 = self.y0 + self.ny
        self.z0 = self.t0 + self.nt
        self.nvar = self.z0 + self.nz
        self._build()

    def _build(self) -> None:
        problem, rows, cols, vals, lb, ub = self.problem, [], [], [], [], []

        def row(entries: list[tuple[int, float]], low: float, high: float) -> None:
            r = len(lb)
            for c, v in entries:
                rows.append(r)
                cols.append(c)
                vals.append(v)
            lb.append(low)
            ub.append(high)

        for d, plan in enumerate(self.plans):  # one option per stage (or the demand is unserved: z = 1)
            for s in plan.stages:
                row([(i, 1.0) for i in self.first_x[(d, s)]] + [(self.z0 + d, 1.0)], 1.0, 1.0)
        loads: dict[int, list[tuple[int, float]]] = {}
        for i, (d, _, o) in enumerate(self.x):
            loads.setdefault(self.pool_of[i], []).append((i, self.plans[d].rate_rps * o.load))
        for p in range(self.np):  # capacity: planned load <= utilization target x instances
            row(loads.get(p, []) + [(self.n0 + p, -problem.utilization_target)], -np.inf, 0.0)
        if self.need_y:
            floor = float(max(problem.min_instances, 1))
            for i in range(self.nx):
                row([(i, 1.0), (self.y0 + self.pool_of[i], -1.0)], -np.inf, 0.0)
            for p in range(self.np):
                row([(self.n0 + p, 1.0), (self.y0 + p, -floor)], 0.0, np.inf)
        for d, plan in enumerate(self.plans):  # latency: finish(s) >= finish(u) + latency(s)
            for s in plan.stages:
                chosen = [(i, self.x[i][2].latency_s) for i in self.first_x[(d, s)]]
                t_s = self.t0 + self.t_index[(d, s)]
                ups = plan.upstream[s] or [None]
                for u in ups:
                    entries = chosen + [(t_s, -1.0)]
                    if u is not None:
                        entries.append((self.t0 + self.t_index[(d, u)], 1.0))
                    row(entries, -np.inf, 0.0)
        budgets = problem.budgets
        by_hw: dict[str, list[tuple[int, float]]] = {}
        for p, o in enumerate(self.pool_option):
            by_hw.setdefault(o.config.hardware, []).append((self.n0 + p, o.devices))
        self.budget_rows: dict[str, int] = {}
        for hw, entries in sorted(by_hw.items()):
            self.budget_rows[f"devices {hw}"] = len(lb)
            row(entries, -np.inf, float(budgets.devices.get(hw, 0)))
        if budgets.power_w is not None:
            self.budget_rows["power"] = len(lb)
            row([(self.n0 + p, o.busy_power_w) for p, o in enumerate(self.pool_option)], -np.inf, budgets.power_w)
        if budgets.cost_per_hour_usd is not None:
            self.budget_rows["cost"] = len(lb)
            row([(self.n0 + p, o.price_per_hour_usd) for p, o in enumerate(self.pool_option)], -np.inf,
                budgets.cost_per_hour_usd)
        self.A = coo_matrix((vals, (rows, cols)), shape=(len(lb), self.nvar)).tocsr()
        self.lb, self.ub = np.array(lb), np.array(ub)
        # Bounds and integrality.
        low = np.zeros(self.nvar)
        high = np.ones(self.nvar)
        most_load = np.zeros(self.np)
        per_stage_max: dict[tuple[int, str, int], float] = {}
        for i, (d, s, o) in enumerate(self.x):
            key = (d, s, self.pool_of[i])
            per_stage_max[key] = max(per_stage_max.get(key, 0.0), self.plans[d].rate_rps * o.load)
        for (_, _, p), value in per_stage_max.items():
            most_load[p] += value
        for p, o in enumerate(self.pool_option):
            n_high = math.ceil(most_load[p] / problem.utilization_target + 1e-9) + max(problem.min_instances, 1)
            n_high = min(n_high, math.floor(budgets.devices.get(o.config.hardware, 0) / o.devices + 1e-9))
            if budgets.power_w is not None and o.busy_power_w > 0:
                n_high = min(n_high, math.floor(budgets.power_w / o.busy_power_w + 1e-9))
            if budgets.cost_per_hour_usd is not None and o.price_per_hour_usd > 0:
                n_high = min(n_high, math.floor(budgets.cost_per_hour_usd / o.price_per_hour_usd + 1e-9))
            high[self.n0 + p] = max(n_high, 0)
        for d, plan in enumerate(self.plans):
            for s in plan.stages:
                high[self.t0 + self.t_index[(d, s)]] = plan.service_target_s * (1 + 1e-9) + _EPS
        self.integrality = np.ones(self.nvar)
        self.integrality[self.t0:self.t0 + self.nt] = 0
        self.low, self.high = low, high
        self.high_z = high[self.z0:].copy()

    # objectives (vectors over all variables)
    def energy(self) -> np.ndarray:
        c = np.zeros(self.nvar)
        for i, (d, _, o) in enumerate(self.x):
            c[i] = self.plans[d].rate_rps * o.dynamic_energy_j
        for p, o in enumerate(self.pool_option):
            c[self.n0 + p] = o.idle_power_w
        return c

    def energy_objective(self) -> np.ndarray:
        """Energy (average power) plus every instance's price at ``price_weight_w`` W per USD/h."""
        return self.energy() + self.problem.price_weight_w * self.cost()

    def cost(self) -> np.ndarray:
        c = np.zeros(self.nvar)
        for p, o in enumerate(self.pool_option):
            c[self.n0 + p] = o.price_per_hour_usd
        return c

    def accuracy(self) -> np.ndarray:
        """Negative rate-weighted mean accuracy over the stages with known accuracy (to minimise)."""
        c = np.zeros(self.nvar)
        for i, (d, _, o) in enumerate(self.x):
            plan = self.plans[d]
            if o.accuracy is not None and plan.accuracy_stages:
                c[i] = -max(plan.rate_rps, 1e-6) * o.accuracy / plan.accuracy_stages
        return c

    def objective_vector(self) -> np.ndarray:
        """The objective to minimise. Cost and accuracy carry energy as a tie-break whose whole range is worth
        less than half the smallest step of the primary (the cheapest instance; the smallest accuracy
        difference within a stage), so it never costs the primary anything and keeps instance counts
        minimal. One solve: a lexicographic second solve with the primary fixed is far slower for HiGHS
        (the cost optimum is highly degenerate) and gained 0.1 % energy on the day-mix problem."""
        energy = self.energy()
        if self.problem.objective == "energy":
            return self._with_switch_penalty(self.energy_objective())
        upper = float(energy[self.n0:self.n0 + self.np] @ self.high[self.n0:self.n0 + self.np])
        most: dict[tuple[int, str], float] = {}
        for i, (d, s, _) in enumerate(self.x):
            most[(d, s)] = max(most.get((d, s), 0.0), energy[i])
        upper += sum(most.values())
        if self.problem.objective == "cost":
            primary = self.cost()
            steps = [o.price_per_hour_usd for o in self.pool_option if o.price_per_hour_usd > 0]
        else:
            primary = self.accuracy()
            steps = []
            for indexes in self.first_x.values():
                values = sorted({round(float(primary[i]), 12) for i in indexes})
                steps += [b - a for a, b in itertools.pairwise(values) if b - a > 1e-12]
        weight = 0.5 * min(steps) / upper if steps and upper > 0 else 0.0
        return primary + weight * energy

    def _with_switch_penalty(self, c: np.ndarray) -> np.ndarray:
        """Picks and pools the running plan does not have cost ``switch_penalty`` more (see Problem.incumbent)."""
        problem = self.problem
        if not problem.incumbent or problem.switch_penalty <= 0:
            return c
        c = c.copy()
        kept_configs = {config for config, _ in problem.incumbent.values()}
        for i, (d, s, o) in enumerate(self.x):
            if problem.incumbent.get((self.plans[d].demand, s)) != (o.config, o.knob_key):
                c[i] *= 1.0 + problem.switch_penalty
        for p, o in enumerate(self.pool_option):
            if o.config not in kept_configs:
                c[self.n0 + p] *= 1.0 + problem.switch_penalty
        return c

    def greedy(self) -> np.ndarray:
        """A plan without the solver: demands by rate (largest first), each stage the best-scoring option that
        keeps the demand's latency within target (stages not yet decided at their fastest) and its pool
        within the budgets; a demand with a stage that fits nowhere is left unserved."""
        objective, u = self.problem.objective, self.problem.utilization_target

        def score(i: int) -> tuple[float, float, float]:
            d, _, o = self.x[i]
            rate = max(self.plans[d].rate_rps, 1e-6)
            if objective == "cost":
                return rate * o.load * o.price_per_hour_usd / u, rate * o.energy_j, o.latency_s
            if objective == "accuracy":
                return -(o.accuracy or 0.0), rate * o.energy_j, o.latency_s
            priced_w = rate * o.load / u * o.price_per_hour_usd * self.problem.price_weight_w
            return rate * o.energy_j + priced_w, o.latency_s, 0.0

        v = np.zeros(self.nvar)
        ledger = _Ledger(np.zeros(self.np), np.zeros(self.np, dtype=int), {}, 0.0, 0.0)
        for d in sorted(range(len(self.plans)), key=lambda k: -self.plans[k].rate_rps):
            plan = self.plans[d]
            fastest = {s: min(self.first_x[(d, s)], key=lambda i: self.x[i][2].latency_s) for s in plan.stages}
            trial_ledger = ledger.copy()
            picked: dict[str, int] = {}
            for s in plan.stages:
                for i in sorted(self.first_x[(d, s)], key=score):
                    latency = {k: self.x[j][2].latency_s for k, j in {**fastest, **picked, s: i}.items()}
                    if path_latency_s(plan.stages, plan.upstream, latency) > plan.service_target_s * (1 + 1e-9) + _EPS:
                        continue
                    if trial_ledger.add(self, i):
                        picked[s] = i
                        break
                else:
                    break
            if len(picked) < len(plan.stages):
                v[self.z0 + d] = 1.0
                continue
            ledger = trial_ledger
            for i in picked.values():
                v[i] = 1.0
        v[self.n0:self.n0 + self.np] = ledger.counts
        return v

    def served(self) -> np.ndarray:
        c = np.zeros(self.nvar)
        for d, plan in enumerate(self.plans):
            c[self.z0 + d] = max(plan.rate_rps, 0.0) + 1e-3
        return c

    def solve(self, c: np.ndarray, z_high: np.ndarray, extra: list[tuple[np.ndarray, float]],
              time_limit_s: float, gap: float) -> tuple[str, np.ndarray | None]:
        high = self.high.copy()
        high[self.z0:] = z_high
        constraints = [LinearConstraint(self.A, self.lb, self.ub)]
        for vector, bound in extra:
            constraints.append(LinearConstraint(vector.reshape(1, -1), -np.inf, bound))
        result = milp(c, integrality=self.integrality, bounds=Bounds(self.low, high), constraints=constraints,
                      options={"time_limit": max(time_limit_s, 0.05), "mip_rel_gap": gap,
                               "disp": False})
        if result.status == 0 and result.x is not None:
            return "optimal", result.x
        if result.x is not None:
            return "feasible", result.x
        if result.status == 2:
            return "infeasible", None
        return f"error: {result.message}", None


# --- solution ----------------------------------------------------------------------------------


def optimize(problem: Problem) -> Solution:
    """Choose options and instance counts for every demand; see the module doc and docs/planning.md."""
    started = time.perf_counter()
    deadline = started + problem.time_limit_s
    if problem.objective not in ("energy", "cost", "accuracy"):
        return _empty(problem, {}, started, status=f"error: unknown objective {problem.objective!r}")
    if not 0.0 <= problem.queueing_slack < 1.0:
        return _empty(problem, {}, started, status=f"error: queueing_slack must be within [0, 1), got "
                                                   f"{problem.queueing_slack}")
    if problem.wait_quantile is not None and not 0.0 < problem.wait_quantile < 1.0:
        return _empty(problem, {}, started, status=f"error: wait_quantile must be within (0, 1), got "
                                                   f"{problem.wait_quantile}")
    if not 0.0 < problem.utilization_target <= 1.0:
        return _empty(problem, {}, started, status=f"error: utilization_target must be within (0, 1], got "
                                                   f"{problem.utilization_target}")
    if problem.colocate_max_busy is not None and not 0.0 <= problem.colocate_max_busy <= 1.0:
        return _empty(problem, {}, started, status=f"error: colocate_max_busy must be within [0, 1], got "
                                                   f"{problem.colocate_max_busy}")
    if not (problem.price_weight_w >= 0.0 and math.isfinite(problem.price_weight_w)):
        return _empty(problem, {}, started, status=f"error: price_weight_w must be a finite number >= 0, got "
                                                   f"{problem.price_weight_w}")
    rates: dict[Demand, float] = {}
    for demand_rate in problem.demands:
        if not demand_rate.rate_rps >= 0.0 or not math.isfinite(demand_rate.rate_rps):
            return _empty(problem, {}, started, status=f"error: rate of {demand_rate.demand} must be a finite "
                                                       f"number >= 0, got {demand_rate.rate_rps}")
        rates[demand_rate.demand] = rates.get(demand_rate.demand, 0.0) + demand_rate.rate_rps
    options = stage_options(problem, sorted({d.workflow for d in rates}))
    plans: list[_DemandPlan] = []
    unserved: dict[Demand, str] = {}
    for demand, rate in rates.items():
        result = _demand_options(problem, demand, rate, options)
        if isinstance(result, str):
            unserved[demand] = result
        else:
            plans.append(result)
    if not plans:
        return _empty(problem, unserved, started)
    model = _Model(problem, plans)
    primary = model.objective_vector()
    # A 1 % gap on accuracy is a whole tier's worth of slack: prove accuracy plans tighter.
    gap = min(problem.mip_rel_gap, 1e-4) if problem.objective == "accuracy" else problem.mip_rel_gap
    z_fixed = np.zeros(model.nz)
    status, x = model.solve(primary, z_fixed, [], deadline - time.perf_counter(), gap)
    if status == "infeasible":  # serve the most traffic that fits, then plan those demands as well as possible
        served_status, served_x = model.solve(model.served(), model.high_z, [], deadline - time.perf_counter(), gap)
        status = served_status
        if served_x is not None:
            z_fixed = np.round(served_x[model.z0:])
            status, x = model.solve(primary, z_fixed, [], deadline - time.perf_counter(), gap)
            if x is None:
                x, status = served_x, served_status
    notes: tuple[str, ...] = ()
    if x is None:  # the solver ran out of time without a plan: a greedy one beats none
        notes = (f"greedy plan: the MILP found no solution in {problem.time_limit_s:g} s ({status})",)
        x, status = model.greedy(), "feasible"
    colocate: tuple[tuple[InstanceConfig, ...], ...] | None = None
    if problem.wait_quantile is not None:
        x, queueing_notes = size_for_queueing(model, x, problem.wait_quantile)
        notes += queueing_notes
        if problem.colocate_max_busy is not None and problem.share_instances:
            colocate, colocation_notes = colocate_pools(model, x, problem.wait_quantile, problem.colocate_max_busy)
            notes += colocation_notes
    return _extract(problem, model, x, status, unserved, started, notes, colocate)


def _planned_traffic(model: _Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                dict[int, list[tuple[int, float]]]]:
    """What a plan sends through its pools: instance counts, offered erlangs and invocation rate per
    pool, and per served demand its critical path as (pool, stage latency) pairs."""
    counts = np.round(x[model.n0:model.n0 + model.np]).astype(int)
    chosen: dict[int, dict[str, tuple[int, StageOption]]] = {}
    for i, (d, s, o) in enumerate(model.x):
        if x[i] > 0.5:
            chosen.setdefault(d, {})[s] = (model.pool_of[i], o)
    erlangs = np.zeros(model.np)
    invocation_rate = np.zeros(model.np)
    paths: dict[int, list[tuple[int, float]]] = {}
    for d, plan in enumerate(model.plans):
        picks = chosen.get(d, {})
        if len(picks) != len(plan.stages) or plan.rate_rps <= 0:
            continue
        for p, o in picks.values():
            invocation_rate[p] += plan.rate_rps * o.invocations
            erlangs[p] += plan.rate_rps * o.invocations * o.service_s
        latency = {s: picks[s][1].latency_s for s in plan.stages}
        paths[d] = [(picks[s][0], latency[s]) for s in critical_path(plan.stages, plan.upstream, latency)]
    return counts, erlangs, invocation_rate, paths


def _pool_wait_tail(servers: int, erlangs: float, invocation_rate: float, slowdown: float = 1.0
                    ) -> tuple[float, float]:
    """A pool's wait (Erlang C) with its service times ``slowdown`` times as long."""
    mean_s = erlangs * slowdown / invocation_rate if invocation_rate > 0 else 0.0
    return wait_tail(servers, erlangs * slowdown, mean_s)


def size_for_queueing(model: _Model, x: np.ndarray, quantile: float) -> tuple[np.ndarray, tuple[str, ...]]:
    """Add instances until each served demand meets its latency target, waits included, at ``quantile``.

    Each pool is an M/M/c queue (c = instances x batch slots, Erlang C, ``policies.queueing``); a
    request's waits along its critical path add up, and must fit in what its target leaves after
    the service times. Greedy: the demand furthest below the quantile gets one instance more in the
    pool on its path that raises its share most per device, within the budgets; a demand no
    instance can help (its waits have no room at all, or budgets are spent) is reported in the notes.
    """
    problem = model.problem
    x = x.copy()
    counts, erlangs, invocation_rate, critical = _planned_traffic(model, x)
    paths = {d: ([p for p, _ in stages], model.plans[d].target_s - sum(lat for _, lat in stages))
             for d, stages in critical.items()}
    slots = [o.slots for o in model.pool_option]

    def tail(p: int, n: int) -> tuple[float, float]:
        return _pool_wait_tail(n * slots[p], erlangs[p], invocation_rate[p])

    def within(d: int, grown: int | None = None) -> float:
        pools, budget_s = paths[d]
        return probability_waits_within(budget_s, [tail(p, counts[p] + (p == grown)) for p in pools])

    budgets = problem.budgets
    used_devices: dict[str, float] = {}
    for p, o in enumerate(model.pool_option):
        used_devices[o.config.hardware] = used_devices.get(o.config.hardware, 0.0) + counts[p] * o.devices
    used_power = float(sum(counts[p] * o.busy_power_w for p, o in enumerate(model.pool_option)))
    used_cost = float(sum(counts[p] * o.price_per_hour_usd for p, o in enumerate(model.pool_option)))

    def fits(p: int) -> bool:
        o = model.pool_option[p]
        if used_devices[o.config.hardware] + o.devices > budgets.devices.get(o.config.hardware, 0) + _EPS:
            return False
        if budgets.power_w is not None and used_power + o.busy_power_w > budgets.power_w + _EPS:
            return False
        return budgets.cost_per_hour_usd is None or used_cost + o.price_per_hour_usd <= budgets.cost_per_hour_usd + _EPS

    share = {d: within(d) for d in paths}
    stuck: set[int] = set()
    added = 0
    for _ in range(MAX_QUEUEING_STEPS):
        short = [(share[d], d) for d in paths if d not in stuck and share[d] < quantile - 1e-12]
        if not short:
            break
        current, d = min(short)
        best: tuple[float, int] | None = None
        for p in sorted(set(paths[d][0])):
            if not fits(p):
                continue
            gain = within(d, grown=p) - current
            score = gain / max(model.pool_option[p].devices, 1e-3)
            if gain > 1e-9 and (best is None or score > best[0]):
                best = (score, p)
        if best is None:
            stuck.add(d)
            continue
        p = best[1]
        o = model.pool_option[p]
        counts[p] += 1
        added += 1
        used_devices[o.config.hardware] += o.devices
        used_power += o.busy_power_w
        used_cost += o.price_per_hour_usd
        for other, (pools, _) in paths.items():
            if p in pools:
                share[other] = within(other)
    x[model.n0:model.n0 + model.np] = counts
    notes = []
    if added:
        notes.append(f"queueing: {added} instance(s) added so {quantile:.1%} of requests meet their targets "
                     "with waits")
    for d in sorted(stuck):
        plan = model.plans[d]
        notes.append(f"queueing: {plan.demand.workflow} {dict(plan.demand.slo) or 'default'} stays at "
                     f"{share[d]:.1%} within its target (wait room {paths[d][1]:.3g} s; budgets or no room)")
    return x, tuple(notes)


def colocate_pools(model: _Model, x: np.ndarray, quantile: float,
                   max_busy: float) -> tuple[tuple[tuple[InstanceConfig, ...], ...], tuple[str, ...]]:
    """Groups of one-instance GPU pools to run on the same devices (``policies.colocation``).

    Candidates: pools of one instance on GPUs. Pools of the same hardware, tp and power cap join a
    group, busiest first (the running plan's groups, ``Problem.incumbent_colocate``, first and with
    ``COLOCATION_HYSTERESIS`` more room), while the group's busy fractions add up to at most
    ``max_busy``, its models fit one device's memory together, and every demand whose critical path
    uses a member still meets its latency target at ``quantile`` (waits included, as in
    ``size_for_queueing``) with the members slowed by sharing, or, for a demand below the quantile
    already, loses nothing. Returns the groups of two or more, and a note per group.
    """
    problem = model.problem
    counts, erlangs, invocation_rate, paths = _planned_traffic(model, x)
    uses: dict[int, set[int]] = {}  # pool -> demands whose critical path uses it
    for d, stages in paths.items():
        for p, _ in stages:
            uses.setdefault(p, set()).add(d)
    slots = [o.slots for o in model.pool_option]
    busy = {p: min(1.0, erlangs[p] / max(1, slots[p])) for p in range(model.np)}

    def within(d: int, factor: Mapping[int, float]) -> float:
        budget_s = model.plans[d].target_s - sum(lat * factor.get(p, 1.0) for p, lat in paths[d])
        return probability_waits_within(budget_s, [
            _pool_wait_tail(counts[p] * slots[p], erlangs[p], invocation_rate[p], factor.get(p, 1.0))
            for p, _ in paths[d]])

    before = {d: within(d, {}) for d in paths}

    candidates = [p for p in range(model.np) if counts[p] == 1 and
                  problem.hardware[model.pool_option[p].config.hardware].kind == "gpu"]
    memory_per_device = {}
    for p in candidates:
        o = model.pool_option[p]
        exe = problem.catalog.get(o.executor)
        memory_per_device[p] = math.ceil(model_memory_bytes(exe) / o.config.tp) if exe is not None else 0

    def joins(group: list[int], p: int, limit: float = max_busy) -> bool:
        head, config = model.pool_option[group[0]].config, model.pool_option[p].config
        if (head.hardware, head.tp, head.power_cap_w) != (config.hardware, config.tp, config.power_cap_w):
            return False
        members = group + [p]
        if sum(busy[q] for q in members) > limit + _EPS:
            return False
        if sum(memory_per_device[q] for q in members) > problem.hardware[config.hardware].memory_bytes:
            return False
        factor = dict(zip(members, slowdowns([busy[q] for q in members])))
        touched = set().union(*(uses.get(q, set()) for q in members))
        return all(within(d, factor) >= min(quantile, before[d]) - 1e-12 for d in touched)

    def by_busy(pools: list[int]) -> list[int]:
        return sorted(pools, key=lambda q: (-busy[q], str(model.pool_option[q].config)))

    # The running plan's groups first, and up to COLOCATION_HYSTERESIS above the busy limit, so a plan
    # re-made on slightly other loads does not move instances between groups (each move restarts an
    # engine); then the rest, busiest first, into the first group that takes them.
    index = {model.pool_option[p].config: p for p in candidates}
    groups: list[list[int]] = []
    for incumbent in problem.incumbent_colocate:
        members = by_busy([index[c] for c in dict.fromkeys(incumbent) if c in index])
        if len(members) < 2:
            continue
        group = [members[0]]
        for p in members[1:]:
            if joins(group, p, max_busy * (1.0 + COLOCATION_HYSTERESIS)):
                group.append(p)
        if len(group) >= 2:
            groups.append(group)
    grouped = {p for group in groups for p in group}
    for p in by_busy([p for p in candidates if p not in grouped]):
        for group in groups:
            if joins(group, p):
                group.append(p)
                break
        else:
            groups.append([p])
    shared = [group for group in groups if len(group) >= 2]
    notes = tuple(f"co-located on {model.pool_option[g[0]].config.tp}x {model.pool_option[g[0]].config.hardware}: "
                  + ", ".join(f"{model.pool_option[q].executor} ({busy[q]:.0%} busy)" for q in g) for g in shared)
    return tuple(tuple(model.pool_option[q].config for q in g) for g in shared), notes


def _empty(problem: Problem, unserved: dict[Demand, str], started: float, status: str = "") -> Solution:
    if not status:
        status = "infeasible" if unserved else "optimal"
    return Solution(status=status, choices={}, configs={}, instances={}, predicted={}, power_w=0.0,
                    cost_per_hour_usd=0.0, objective_value=0.0, binding=(), solve_s=time.perf_counter() - started,
                    unserved=dict(unserved))


def _extract(problem: Problem, model: _Model, x: np.ndarray, status: str,
             unserved: dict[Demand, str], started: float, notes: tuple[str, ...] = (),
             colocate: tuple[tuple[InstanceConfig, ...], ...] | None = None) -> Solution:
    choices: dict[Demand, dict[str, StageChoice]] = {}
    configs: dict[Demand, dict[str, InstanceConfig]] = {}
    chosen: dict[int, dict[str, StageOption]] = {}
    for i, (d, s, o) in enumerate(model.x):
        if x[i] > 0.5:
            chosen.setdefault(d, {})[s] = o
    counts = np.round(x[model.n0:model.n0 + model.np]).astype(int)
    instances: dict[InstanceConfig, int] = {}
    load: dict[InstanceConfig, float] = {}
    busy: dict[InstanceConfig, float] = {}
    idle: dict[InstanceConfig, float] = {}
    price: dict[InstanceConfig, float] = {}
    devices: dict[InstanceConfig, float] = {}
    for p, o in enumerate(model.pool_option):
        if counts[p] > 0:
            instances[o.config] = instances.get(o.config, 0) + int(counts[p])
            busy[o.config], idle[o.config] = o.busy_power_w, o.idle_power_w
            price[o.config], devices[o.config] = o.price_per_hour_usd, o.devices
    predicted: dict[Demand, PredictedDemand] = {}
    dynamic_w = 0.0
    accuracy_sum = 0.0
    for d, plan in enumerate(model.plans):
        picks = chosen.get(d)
        if picks is None or len(picks) != len(plan.stages):
            unserved[plan.demand] = _drop_reason(problem, model, counts)
            continue
        choices[plan.demand] = {s: StageChoice(picks[s].executor, dict(picks[s].knobs)) for s in plan.stages}
        configs[plan.demand] = {s: picks[s].config for s in plan.stages}
        latency_s = path_latency_s(plan.stages, plan.upstream, {s: picks[s].latency_s for s in plan.stages})
        known = [picks[s].accuracy for s in plan.stages if picks[s].accuracy is not None]
        accuracy = sum(known) / len(known) if known else None  # type: ignore[arg-type]
        predicted[plan.demand] = PredictedDemand(latency_s=latency_s, latency_target_s=plan.target_s,
                                                 energy_j_per_request=sum(picks[s].energy_j for s in plan.stages),
                                                 accuracy=accuracy)
        for s in plan.stages:
            o = picks[s]
            dynamic_w += plan.rate_rps * o.dynamic_energy_j
            load[o.config] = load.get(o.config, 0.0) + plan.rate_rps * o.load
        if plan.accuracy_stages:
            accuracy_sum += plan.rate_rps * sum(picks[s].accuracy or 0.0 for s in plan.stages) / plan.accuracy_stages
    power_w = sum(n * busy[c] for c, n in instances.items())
    cost = sum(n * price[c] for c, n in instances.items())
    average_w = sum(n * idle[c] for c, n in instances.items()) + dynamic_w
    average_w -= _shared_idle_w(colocate or (), idle)
    objective = {"energy": average_w, "cost": cost, "accuracy": accuracy_sum}[problem.objective]
    binding = _binding(problem, model, counts, predicted)
    if unserved:
        status = "infeasible"
    return Solution(status=status, choices=choices, configs=configs, instances=instances, predicted=predicted,
                    power_w=power_w, cost_per_hour_usd=cost, objective_value=objective, binding=binding,
                    solve_s=time.perf_counter() - started, unserved=dict(unserved), average_power_w=average_w,
                    load=load, instance_busy_power_w=busy, instance_idle_power_w=idle,
                    instance_cost_per_hour_usd=price, instance_devices=devices, notes=notes, colocate=colocate)


def _usage(model: _Model, counts: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Budget name -> (used, limit, smallest increment one more instance would add)."""
    budgets = model.problem.budgets
    out: dict[str, tuple[float, float, float]] = {}
    for name, r in model.budget_rows.items():
        coefficients = model.A.getrow(r)
        used, smallest = 0.0, math.inf
        for col, value in zip(coefficients.indices, coefficients.data):
            used += value * counts[col - model.n0]
            if value > 0:
                smallest = min(smallest, value)
        limit = {"power": budgets.power_w, "cost": budgets.cost_per_hour_usd}.get(name)
        if limit is None:
            limit = float(budgets.devices.get(name.split(" ", 1)[1], 0))
        out[name] = (used, limit, smallest)
    return out


def _binding(problem: Problem, model: _Model, counts: np.ndarray,
             predicted: dict[Demand, PredictedDemand]) -> tuple[str, ...]:
    notes: list[str] = []
    units = {"power": " W", "cost": " USD/h"}
    for name, (used, limit, smallest) in _usage(model, counts).items():
        if used + smallest > limit + 1e-6:
            unit = units.get(name, "")
            notes.append(f"{name}: {used:g}{unit} of {limit:g}{unit} used, no room for another instance")
    for demand, p in sorted(predicted.items(), key=lambda item: (item[0].workflow, item[0].slo)):
        if p.latency_s >= LATENCY_BINDING_FRACTION * p.latency_target_s:
            slo = ",".join(f"{k}={v}" for k, v in demand.slo) or "no tier"
            notes.append(f"latency {demand.workflow} [{slo}]: {p.latency_s:.3g} s of {p.latency_target_s:.3g} s target")
    return tuple(notes)


def _drop_reason(problem: Problem, model: _Model, counts: np.ndarray) -> str:
    full = [f"{name} ({used:g} of {limit:g})" for name, (used, limit, smallest) in _usage(model, counts).items()
            if used + smallest > limit + 1e-6]
    what = ", ".join(full) if full else "the budgets"
    return f"not enough room in {what} to serve it beside demands with higher request rates"


def with_instances(solution: Solution, instances: Mapping[InstanceConfig, int]) -> Solution:
    """The same plan at other instance counts (reactive scaling): power, cost and idle draw follow.

    Counts for configs the solution does not describe are dropped, as nothing is known about them.
    """
    known = {c: int(n) for c, n in instances.items() if c in solution.instance_busy_power_w and n > 0}
    power_w = sum(n * solution.instance_busy_power_w[c] for c, n in known.items())
    cost = sum(n * solution.instance_cost_per_hour_usd[c] for c, n in known.items())
    idle_change = sum((known.get(c, 0) - solution.instances.get(c, 0)) * solution.instance_idle_power_w[c]
                      for c in set(known) | set(solution.instances) if c in solution.instance_idle_power_w)
    # A co-located pool that scaling resizes is no longer a one-instance pool: it gets devices of its own.
    colocate, unshared_w = _end_groups(solution, lambda group: any(known.get(c, 0) != 1 for c in group))
    return replace(solution, instances=known, power_w=power_w, cost_per_hour_usd=cost,
                   average_power_w=solution.average_power_w + idle_change + unshared_w, colocate=colocate)


def _shared_idle_w(groups: Sequence[Sequence[InstanceConfig]], idle_w: Mapping[InstanceConfig, float]) -> float:
    """Idle draw that co-location saves: a group's devices idle once, at its busiest member's idle draw."""
    return sum(sum(idle_w[c] for c in group) - max(idle_w[c] for c in group) for group in groups)


def _end_groups(solution: Solution, ends: Callable[[tuple[InstanceConfig, ...]], bool]
                ) -> tuple[tuple[tuple[InstanceConfig, ...], ...] | None, float]:
    """The solution's co-location groups without those ``ends`` picks, and the idle draw their members
    add back now that they hold devices of their own."""
    if solution.colocate is None:
        return None, 0.0
    ended = [g for g in solution.colocate if ends(g)]
    return (tuple(g for g in solution.colocate if not ends(g)),
            _shared_idle_w(ended, solution.instance_idle_power_w))


def with_caps_lifted(solution: Solution, configs: Sequence[InstanceConfig], perf: PerfModel,
                     catalog: Mapping[str, ExecutorSpec]) -> tuple[Solution, dict[InstanceConfig, float]]:
    """The same plan with these capped pools uncapped (a burst's first answer: a limit rises in
    milliseconds, an engine starts in tens of seconds), and each lifted pool's capacity gain.

    Each config moves to the same executor, hardware and tp without a cap (merging with such a pool if
    the plan has one); routing follows; per-instance power and the pools' planned load follow the
    perf model at the executor's default knobs. Co-location groups with a lifted member end (one GPU
    has one power limit). Configs that are uncapped, unknown to the plan or to the perf model stay.
    """
    lifted: dict[InstanceConfig, InstanceConfig] = {}
    gain: dict[InstanceConfig, float] = {}
    busy, idle = dict(solution.instance_busy_power_w), dict(solution.instance_idle_power_w)
    price, devices = dict(solution.instance_cost_per_hour_usd), dict(solution.instance_devices)
    for config in configs:
        exe = catalog.get(config.executor)
        if config.power_cap_w is None or config not in solution.instances or exe is None:
            continue
        free = replace(config, power_cap_w=None)
        before, after = perf.perf(exe, config, exe.knob_defaults()), perf.perf(exe, free, exe.knob_defaults())
        if before is None or after is None or after.capacity_rps <= 0:
            continue
        lifted[config], gain[config] = free, after.capacity_rps / before.capacity_rps
        busy[free], idle[free] = after.busy_power_w, after.idle_power_w
        price.setdefault(free, price[config])
        devices.setdefault(free, devices[config])
    if not lifted:
        return solution, {}
    instances: dict[InstanceConfig, int] = {}
    for config, n in solution.instances.items():
        target = lifted.get(config, config)
        instances[target] = instances.get(target, 0) + n
    load: dict[InstanceConfig, float] = {}
    for config, busy_instances in solution.load.items():
        target = lifted.get(config, config)
        load[target] = load.get(target, 0.0) + busy_instances / gain.get(config, 1.0)
    configs_by_demand = {d: {s: lifted.get(c, c) for s, c in stages.items()} for d, stages in solution.configs.items()}
    old_dynamic = sum(solution.load.get(c, 0.0) * (solution.instance_busy_power_w.get(c, 0.0) -
                                                   solution.instance_idle_power_w.get(c, 0.0)) for c in solution.load)
    new_dynamic = sum(load.get(c, 0.0) * (busy.get(c, 0.0) - idle.get(c, 0.0)) for c in load)
    colocate, unshared_w = _end_groups(solution, lambda group: bool(set(group) & set(lifted)))
    keep = set(instances)
    return replace(solution, configs=configs_by_demand, instances=instances, load=load,
                   instance_busy_power_w={c: v for c, v in busy.items() if c in keep},
                   instance_idle_power_w={c: v for c, v in idle.items() if c in keep},
                   instance_cost_per_hour_usd={c: v for c, v in price.items() if c in keep},
                   instance_devices={c: v for c, v in devices.items() if c in keep},
                   power_w=sum(n * busy[c] for c, n in instances.items()),
                   cost_per_hour_usd=sum(n * price[c] for c, n in instances.items()),
                   average_power_w=solution.average_power_w + new_dynamic - old_dynamic + unshared_w,
                   colocate=colocate), gain

