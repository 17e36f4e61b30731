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

Options are generated and pruned before the MILP is built (``policies.options``: ``stage_options`` and
``_demand_options``); the MILP itself is ``policies.milp._Model``. Demands that keep no option for some
stage are unserved with the reason; when the rest cannot all be served together, the
served request rate is maximised first and the plan is optimised for those (status "infeasible").
This module solves, sizes pools for queueing (``size_for_queueing``), picks pools to co-locate
(``colocate_pools``) and reads the plan out; edits of a finished plan live in ``policies.solution_edits``.
The names other code imports from here stay importable from here (``__all__``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import numpy as np

from policies.colocation import slowdowns
from policies.milp import _Model
from policies.model import InstanceConfig, PredictedDemand, Problem, Solution
from policies.options import (
    _EPS, MAX_TP_SCALE, StageOption, _DemandPlan, _demand_options, critical_path, critical_path_s, knob_key,
    latency_target_s, path_latency_s, stage_counts, stage_options,
)
from policies.perf_model import model_memory_bytes
from policies.plan import Demand, StageChoice
from policies.queueing import probability_waits_within, wait_tail
from policies.solution_edits import _shared_idle_w, with_caps_lifted, with_instances

__all__ = [
    "COLOCATION_HYSTERESIS", "LATENCY_BINDING_FRACTION", "MAX_QUEUEING_STEPS", "MAX_TP_SCALE", "StageOption",
    "colocate_pools", "critical_path", "critical_path_s", "knob_key", "latency_target_s", "optimize",
    "path_latency_s", "size_for_queueing", "stage_counts", "stage_options", "with_caps_lifted", "with_instances",
]

LATENCY_BINDING_FRACTION = 0.95  # a demand's latency is reported binding at >= 95 % of its target
COLOCATION_HYSTERESIS = 0.25  # a running co-location group stays together up to this much above the busy limit
MAX_QUEUEING_STEPS = 5000  # instances the queueing pass may add in one solve (each step adds one)


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
