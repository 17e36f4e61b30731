"""Stage options and per-demand pruning for the planner (``policies.optimizer``): every way to run each
stage, and the options each demand keeps, with its latency target, before the MILP (``policies.milp``) is built.

An option is an executor at a knob setting on an instance configuration (``StageOption``); ``stage_options``
lists every runnable one per workflow stage, whatever the demand. ``_demand_options`` then prunes them per
demand (workflow at an SLO): tier filters, options that cannot meet the latency target or a budget on their
own, and options beaten on every count by another option of the same pool. A demand that keeps no option for
some stage gets the reason instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.workflow.catalog import ExecutorSpec
from policies.model import HardwareType, InstanceConfig, Perf, Problem
from policies.perf_model import (
    MAX_TP, devices_per_instance, knob_settings, model_memory_bytes, option_accuracy, runs_on_gpu,
)
from policies.plan import SLO_DIMENSIONS, SLO_TIERS, Demand

_EPS = 1e-9
MAX_TP_SCALE = 2  # besides the smallest tensor-parallel size that fits, try up to this many times it


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
    return _why_not_alone(o, rate, problem, floor_instances) is None


def _why_not_alone(o: StageOption, rate: float, problem: Problem, floor_instances: int) -> str | None:
    """Which budget one option alone exceeds at ``rate``, in words; None when it fits."""
    n = max(floor_instances, math.ceil(rate * o.load / problem.utilization_target - 1e-9))
    budgets = problem.budgets
    where = f"{o.executor} on {o.config.tp}x {o.config.hardware}"
    have = budgets.devices.get(o.config.hardware, 0)
    if o.devices * n > have + _EPS:
        return f"{where} needs {o.devices * n:g} device(s), {have} available"
    if budgets.power_w is not None and o.busy_power_w * n > budgets.power_w + _EPS:
        return f"{where} draws {o.busy_power_w * n:.0f} W busy, the power budget is {budgets.power_w:g} W"
    if budgets.cost_per_hour_usd is not None and o.price_per_hour_usd * n > budgets.cost_per_hour_usd + _EPS:
        return f"{where} costs {o.price_per_hour_usd * n:.2f} USD/h, the budget is {budgets.cost_per_hour_usd:g}"
    return None


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
            whys = sorted({w for o in all_options if (w := _why_not_alone(o, rate, problem, floor_instances))})
            return (f"stage {name!r}: no option fits the device, power and cost budgets at {rate:g} req/s ("
                    + "; ".join(whys[:3]) + ("; ..." if len(whys) > 3 else "") + ")")
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
