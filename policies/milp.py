"""The planner's MILP (``_Model``): variables, constraints and objectives over the options each demand
kept (``policies.options``), solved with HiGHS through ``scipy.optimize.milp``, and a greedy plan for
when the solver finds none in time.

The formulation is written down in docs/planning.md; in short, per demand d and stage s exactly one
option is picked (or the demand is unserved); instance pools (one per config, shared by every demand and
stage using it when ``share_instances``) get integer counts that carry the planned load at
``utilization_target``; every path of the workflow DAG meets the demand's latency target; device, power
and cost budgets hold. ``policies.optimizer`` builds and solves it and reads the plan out.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from policies.model import Problem
from policies.plan import SLO_TIERS
from policies.options import _EPS, StageOption, _DemandPlan, path_latency_s

TIER_DROP_FACTOR = 10.0  # when demands must be dropped, a best-tier request is worth 10**3 basic ones


def _tier_rank(slo: Any) -> int:
    """3 for best ... 0 for basic (no tier given: basic)."""
    tiers = [SLO_TIERS.index(t) for _, t in slo if t in SLO_TIERS]
    return len(SLO_TIERS) - 1 - (min(tiers) if tiers else len(SLO_TIERS) - 1)


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
        """The cost of dropping demands, for when not all of them fit: their request rate, a request of
        each SLO tier counting ``TIER_DROP_FACTOR`` times one of the tier below, so the lowest tiers are
        shed first (a demand's tier is its most demanding dimension's)."""
        c = np.zeros(self.nvar)
        for d, plan in enumerate(self.plans):
            c[self.z0 + d] = (max(plan.rate_rps, 0.0) + 1e-3) * TIER_DROP_FACTOR ** _tier_rank(plan.demand.slo)
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
