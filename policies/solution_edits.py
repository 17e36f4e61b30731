"""Edits of a planned ``Solution`` that do not re-run the planner: other instance counts (reactive
scaling, ``with_instances``) and capped pools uncapped (a burst's first answer, ``with_caps_lifted``),
with power, cost, idle draw and co-location groups following. ``policies.optimizer`` re-exports both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from common.workflow.catalog import ExecutorSpec
from policies.model import InstanceConfig, PerfModel, Solution


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
