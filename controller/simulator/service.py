"""Request service per step: routing through instance pools, queueing, shedding and SLO outcomes.

Per step (``step_s``) and demand d (a workflow at an SLO tier) with N_d arrivals, lambda_d =
N_d / step_s. The routing plan sends each stage s of d to a pool p (an ``InstanceConfig``); a
stage runs ``invocations`` times per request, each for ``service_s`` (the perf model at the
chosen knobs and the pool's hardware and cap), so it offers lambda_d * invocations * service_s
erlangs to p. A pool has c = ready instances x batch slots servers (``queueing`` module).

- A stage whose planned pool has no ready instance runs on a ready instance of the same
  executor, hardware and tensor-parallel size at another power cap (placement re-caps instances
  in place), at that cap's service time.
- While a new plan rolls out (``merge_caps``), pools of the same executor, hardware and
  tensor-parallel size share their ready instances whatever their caps: the old routing keeps
  its pools' instances even when the new plan has already re-capped some of them in place, as a
  dispatcher that sends requests to any instance of the executor would.
- Shedding: a pool offered more than ``max_utilization * c`` erlangs admits only that share;
  a pool with no ready instance admits nothing. A request is served when every pool on its
  path admitted it (product of the admitted shares); the rest are dropped and miss their SLO.
- Sharing: instances that placement put on the same GPUs slow each other (``policies.colocation``):
  each pool's service times grow by the mean factor of its ready instances, from the other
  tenants' busy fractions this step.
- Waiting: each pool's admitted load gives P(wait) and the wait's rate (Erlang C).
- Latency: the critical path of the workflow DAG by stage latency plus mean wait; its stages'
  service times are summed and their waits combined exactly (phase-type), so the share of
  served requests within the bound is P(sum of waits <= bound - sum of service times).
- SLO: met = served x P(latency within bound) x (1 if the chosen options satisfy the accuracy
  tier else 0). Counts are expected values (a fluid model), so totals are not integers.

Service times are the perf model's times ``control.service_time_factor`` (1 by default: the
planners and the simulator then share one performance model and no model error is simulated;
1.1 makes the truth 10 % slower than what the planners believe, see bench/README.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from policies.colocation import slowdowns
from policies.queueing import probability_waits_within, wait_tail
from controller.simulator.report import tier_label
from controller.simulator.slo import SloJudge, StageCost
from policies.model import InstanceConfig, Solution
from policies.plan import Demand, StageChoice


@dataclass(frozen=True)
class Route:
    demand: Demand
    order: tuple[str, ...]
    upstream: dict[str, tuple[str, ...]]
    pools: dict[str, InstanceConfig]
    choices: dict[str, StageChoice]
    costs: dict[str, StageCost]
    target_s: float
    accuracy_ok: bool


@dataclass(frozen=True)
class RouteTable:
    routes: dict[Demand, Route]
    unroutable: dict[Demand, str] = field(default_factory=dict)

    def pools_used(self) -> list[InstanceConfig]:
        """Every pool the routing sends load to, in a stable order."""
        return list(dict.fromkeys(pool for route in self.routes.values() for pool in route.pools.values()))

    @classmethod
    def build(cls, solution: Solution, judge: SloJudge) -> "RouteTable":
        routes: dict[Demand, Route] = {}
        unroutable: dict[Demand, str] = {}
        for demand, pools in solution.configs.items():
            spec = judge.workflows.get(demand.workflow)
            if spec is None:
                unroutable[demand] = f"unknown workflow {demand.workflow!r}"
                continue
            order = tuple(spec.topological_order())
            choices = solution.choices.get(demand, {})
            missing = [s for s in order if s not in pools or s not in choices]
            if missing:
                unroutable[demand] = f"no pool for stage(s) {missing}"
                continue
            costs: dict[str, StageCost] = {}
            for stage in order:
                cost = judge.stage_cost(demand.workflow, stage, choices[stage], pools[stage])
                if cost is None:
                    break
                costs[stage] = cost
            else:
                upstream = {s.name: tuple(u for u in s.upstream() if u in order) for s in spec.stages}
                routes[demand] = Route(demand, order, upstream, {s: pools[s] for s in order},
                                       {s: choices[s] for s in order}, costs, judge.target_s(demand),
                                       judge.accuracy_ok(demand, choices))
                continue
            unroutable[demand] = f"stage {stage!r}: {choices[stage].executor} cannot run on {pools[stage]}"
        return cls(routes, unroutable)


@dataclass(frozen=True)
class StepOutcome:
    served: float
    met: float
    utilization: dict[InstanceConfig, float]  # admitted erlangs / servers, per pool with ready instances
    offered_erlangs: dict[InstanceConfig, float]  # before shedding, per pool with any load
    per_tier: dict[str, tuple[float, float, float]]  # tier label -> (arrived, served, met)


class ServiceModel:
    def __init__(self, judge: SloJudge, max_utilization: float) -> None:
        self.judge = judge
        self.max_utilization = max_utilization
        self._labels: dict[Demand, str] = {}

    def evaluate(self, routes: RouteTable | None, demands: Sequence[Demand], counts: np.ndarray, width_s: float,
                 ready: Mapping[InstanceConfig, int], merge_caps: bool = False,
                 shared: Sequence[Sequence[InstanceConfig]] = ()) -> StepOutcome:
        per_tier: dict[str, list[float]] = {}
        rate: dict[InstanceConfig, float] = {}
        erlangs: dict[InstanceConfig, float] = {}
        active: list[tuple[Route, float]] = []
        siblings: dict[tuple[str, str, int], InstanceConfig] = {}
        for config, n in sorted(ready.items(), key=lambda item: (-item[1], str(item[0]))):
            if n > 0:
                siblings.setdefault((config.executor, config.hardware, config.tp), config)
        for demand, n in zip(demands, counts):
            label = self._labels.get(demand)
            if label is None:
                label = self._labels[demand] = tier_label(demand.slo)
            tier = per_tier.setdefault(label, [0.0, 0.0, 0.0])
            tier[0] += float(n)
            route = routes.routes.get(demand) if routes is not None else None
            if n <= 0 or route is None:
                continue
            route = self._resolve(route, ready, siblings)
            lam = float(n) / width_s
            active.append((route, float(n)))
            for stage in route.order:
                pool, cost = route.pools[stage], route.costs[stage]
                rate[pool] = rate.get(pool, 0.0) + lam * cost.invocations
                erlangs[pool] = erlangs.get(pool, 0.0) + lam * cost.invocations * cost.service_s
        factor = self.sharing_factors(erlangs, ready, shared)
        for pool, f in factor.items():
            if pool in erlangs:
                erlangs[pool] *= f
        admitted: dict[InstanceConfig, float] = {}
        waits: dict[InstanceConfig, tuple[float, float]] = {}
        utilization: dict[InstanceConfig, float] = {c: 0.0 for c, n in ready.items() if n > 0}
        groups: dict[Any, list[InstanceConfig]] = {}
        for pool in sorted(set(erlangs) | {c for c, n in ready.items() if n > 0}, key=str):
            key = (pool.executor, pool.hardware, pool.tp) if merge_caps else pool
            groups.setdefault(key, []).append(pool)
        for members in groups.values():
            offered = sum(erlangs.get(m, 0.0) for m in members)
            servers = sum(ready.get(m, 0) * self.judge.slots(m) for m in members)
            if offered <= 0 and not any(m in erlangs for m in members):
                continue
            if servers <= 0:
                for m in members:
                    admitted[m] = 0.0
                continue
            share = min(1.0, self.max_utilization * servers / offered) if offered > 0 else 1.0
            load = offered * share
            group_rate = sum(rate.get(m, 0.0) for m in members)
            mean_service_s = offered / group_rate if group_rate > 0 else 0.0
            tail = wait_tail(servers, load, mean_service_s)
            for m in members:
                admitted[m] = share
                waits[m] = tail
                if ready.get(m, 0) > 0:
                    utilization[m] = load / servers
        served_total = met_total = 0.0
        for route, n in active:
            share = 1.0
            for stage in route.order:
                share *= admitted[route.pools[stage]]
            served = n * share
            met = 0.0
            if served > 0 and route.accuracy_ok:
                path = self._critical_path(route, waits)
                service_s = sum(route.costs[s].latency_s * factor.get(route.pools[s], 1.0) for s in path)
                met = served * probability_waits_within(route.target_s - service_s,
                                                        [waits[route.pools[s]] for s in path])
            tier = per_tier[self._labels[route.demand]]
            tier[1] += served
            tier[2] += met
            served_total += served
            met_total += met
        return StepOutcome(served=served_total, met=met_total, utilization=utilization, offered_erlangs=erlangs,
                           per_tier={k: (v[0], v[1], v[2]) for k, v in per_tier.items()})

    def sharing_factors(self, erlangs: Mapping[InstanceConfig, float], ready: Mapping[InstanceConfig, int],
                        shared: Sequence[Sequence[InstanceConfig]]) -> dict[InstanceConfig, float]:
        """Service-time factor per pool from instances that share GPUs (``policies.colocation``): each
        shared instance is slowed by its co-tenants' busy fractions (their pools' load over their slots,
        unslowed); a pool's factor is the mean over its ready instances."""
        if not shared:
            return {}
        def busy(c: InstanceConfig) -> float:
            n = ready.get(c, 0)
            return min(1.0, erlangs.get(c, 0.0) / (n * self.judge.slots(c))) if n > 0 else 0.0

        total: dict[InstanceConfig, float] = {}
        count: dict[InstanceConfig, int] = {}
        for tenants in shared:
            for config, f in zip(tenants, slowdowns([busy(c) for c in tenants])):
                total[config] = total.get(config, 0.0) + f
                count[config] = count.get(config, 0) + 1
        factors = {}
        for config, f_sum in total.items():
            n = ready.get(config, 0)
            if n > 0:
                factors[config] = (f_sum + max(0, n - count[config])) / max(n, count[config])
        return factors

    def _resolve(self, route: Route, ready: Mapping[InstanceConfig, int],
                 siblings: Mapping[tuple[str, str, int], InstanceConfig]) -> Route:
        """Serve a stage whose planned pool has no ready instance on the same executor, hardware and tp
        at another power cap, if one is ready (a new plan re-caps instances in place while the old
        routing still serves), with the service time at that cap."""
        pools, costs = route.pools, route.costs
        for stage in route.order:
            pool = route.pools[stage]
            if ready.get(pool, 0) > 0:
                continue
            sibling = siblings.get((pool.executor, pool.hardware, pool.tp))
            if sibling is None:
                continue
            cost = self.judge.stage_cost(route.demand.workflow, stage, route.choices[stage], sibling)
            if cost is None:
                continue
            if pools is route.pools:
                pools, costs = dict(pools), dict(costs)
            pools[stage], costs[stage] = sibling, cost
        if pools is route.pools:
            return route
        return replace(route, pools=pools, costs=costs)

    @staticmethod
    def _critical_path(route: Route, waits: Mapping[InstanceConfig, tuple[float, float]]) -> list[str]:
        """Stages of the longest path by latency plus mean wait."""
        finish: dict[str, float] = {}
        via: dict[str, str | None] = {}
        for stage in route.order:
            p, theta = waits[route.pools[stage]]
            mean_wait = p / theta if theta > 0 else (0.0 if p <= 0 else float("inf"))
            before = max(route.upstream[stage], key=lambda u: finish[u], default=None)
            finish[stage] = (finish[before] if before is not None else 0.0) + route.costs[stage].latency_s + mean_wait
            via[stage] = before
        end = max(route.order, key=lambda s: finish[s])
        path: list[str] = []
        node: str | None = end
        while node is not None:
            path.append(node)
            node = via[node]
        return path[::-1]
