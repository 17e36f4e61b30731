"""The planning core of the autopilot: forecast, MILP, reactive scaling and cap lifting, in three presets.

The autopilot (``policies.autopilot.engine``) runs one of these, configured by name; the simulator
and the controller daemon run the same object through it.

- ``StaticPolicy`` ("static"): a hand-tuned LangGraph deployment. Every stage runs its best-accuracy
  executor and knob setting, on the fastest GPU type available (CPU executors on CPUs), uncapped, at
  the catalog's tensor-parallel size; each workflow gets its own instances (no sharing across
  workflows), provisioned once for the trace's peak rate times ``headroom`` at the utilization
  target, and never changed.
- ``EpochPolicy`` ("murakkab-epoch"): the paper's approach. The MILP (``policies.optimizer``) re-runs on
  the hour (every ``epoch_s`` = 3600 s, on epoch boundaries) on an EWMA forecast of the hourly rates
  (the mean: z = 0), no power caps, energy objective; between epochs a reactive autoscaler adds or
  removes instances of the chosen configurations when their utilization leaves [0.3, 0.85]. No thermal
  awareness (placement is not told about temperatures by this policy).
- ``MurakkabPolicy`` ("murakkab", ours): the same MILP every 300 s on the forecast's 95th percentile
  (EWMA mean + 1.64 std of 300 s windows), with GPU power-cap levels as decision variables, energy
  objective, and reactive scaling between epochs in its own band (``MURAKKAB_SCALE_BAND``). Its pools
  are sized for their waits (``Problem.wait_quantile``, set by the caller), so the MILP's flat
  utilization target only has to absorb rate noise within a 5-minute epoch: 0.85 rather than 0.8.
  The scaler steps in only near shedding (above 0.92 busy) and brings a pool back to 0.8, not to the
  paper's 0.6: a step to 0.6 overshoots by a third, and the next plan corrects the size within 5
  minutes anyway (bench/README.md, "Planning", has the measured alternatives). Its energy objective
  can also weigh instance prices (``PlanningInputs.price_weight_w``, 0 by default), and it may put
  one-instance GPU pools on the same devices (``PlanningInputs.colocate_max_busy``, off by default;
  docs/planning.md, 5.6); each re-plan hands the running plan's groups back so they stay together.

Both forecasting policies also re-plan at once when a demand with traffic appears that the current
plan does not serve (the paper's system reacts to a new workflow too); its forecast starts at its
first observation. ``step`` is called every ``tick_s`` (the observation window); ``epoch_s`` is how
often the MILP runs. ``step`` returns a ``Decision`` (a reactive change, or a plan made without the
MILP), a ``SolveNeeded`` (the MILP's problem: the caller solves it, inline or on a worker thread, and
hands the solution to ``adopt``) or None when nothing changes. ``decide`` does both in one call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from common.workflow.catalog import ExecutorSpec
from policies.forecast import P95_Z, EwmaForecast
from policies.model import (
    Budgets,
    DemandRate,
    HardwareType,
    InstanceConfig,
    Objective,
    PerfModel,
    PredictedDemand,
    Problem,
    SloTargets,
    Solution,
)
from policies.optimizer import (
    StageOption, critical_path_s, knob_key, latency_target_s, optimize, stage_options, with_caps_lifted,
    with_instances,
)
from policies.perf_model import power_cap_levels
from policies.plan import Demand, StageChoice

SCALE_LOW_UTILIZATION = 0.3
SCALE_HIGH_UTILIZATION = 0.85
SCALE_TARGET_UTILIZATION = 0.6  # scale to bring utilization back here (the middle of the band)
MURAKKAB_UTILIZATION_TARGET = 0.85  # ours: the MILP's flat pool utilization target (waits are sized separately)
CAP_FRACTIONS = (1.0, 0.8, 0.65, 0.5)  # power-cap levels ours considers, as fractions of each GPU's TDP
MIN_RATE_RPS = 1e-3  # demands forecast below this (one request in ~17 minutes) get no instances


@dataclass(frozen=True)
class ClusterState:
    """What a policy may see of the cluster at a decision.

    ``devices_available``: devices per hardware type the plan may use in total (running ones included);
    ``instances``: running instances per configuration; ``utilization``: their mean busy fraction over
    the last window (requests in service / concurrency slots, 0..1, above 1 when requests queue);
    ``peak_rates``: the trace's peak per demand, known only to the static baseline's operator.
    """

    hardware: dict[str, HardwareType]
    devices_available: dict[str, int]
    instances: dict[InstanceConfig, int]
    utilization: dict[InstanceConfig, float]
    peak_rates: dict[Demand, float] | None = None


@dataclass(frozen=True)
class Decision:
    solution: Solution
    reason: str


@dataclass(frozen=True)
class SolveNeeded:
    """The MILP to run for a re-plan; ``adopt(solution, reason)`` takes its result."""

    problem: Problem
    reason: str


class PlanningPolicy(Protocol):
    name: str
    inputs: "PlanningInputs"
    solution: Solution | None
    floor_rps: dict[Demand, float]
    epoch_s: float  # how often the MILP runs (inf: once)
    tick_s: float  # how often to call decide (the observation window); reactive scaling acts per call

    def step(self, now_s: float, observed: dict[Demand, float], state: ClusterState
             ) -> Decision | SolveNeeded | None: ...

    def adopt(self, solution: Solution, reason: str) -> Decision: ...

    def replan(self, state: ClusterState, why: str) -> Decision | SolveNeeded: ...

    def decide(self, now_s: float, observed: dict[Demand, float], state: ClusterState) -> Decision | None: ...


@dataclass(frozen=True)
class PlanningInputs:
    """What every policy plans with besides the cluster state: workflows, catalog, a perf model, SLOs."""

    workflows: dict[str, Any]
    catalog: dict[str, ExecutorSpec]
    perf: PerfModel
    slo: SloTargets = field(default_factory=SloTargets)
    stage_items: dict[str, dict[str, float]] = field(default_factory=dict)
    power_budget_w: float | None = None
    cost_budget_per_hour_usd: float | None = None
    utilization_target: float = 0.8
    time_limit_s: float = 4.0
    mip_rel_gap: float = 1e-2
    queueing_slack: float = 0.0  # share of each latency target kept from service times for waiting
    wait_quantile: float | None = None  # size pools for waits at this quantile (Problem.wait_quantile)
    switch_penalty: float = 0.0  # plan stability (Problem.switch_penalty)
    price_weight_w: float = 0.0  # W per USD/h of instance price in the energy objective (Problem.price_weight_w)
    colocate_max_busy: float | None = None  # one-instance pools may share GPUs up to this busy sum (Problem)

    def problem(self, rates: Mapping[Demand, float], state: ClusterState, objective: Objective = "energy",
                caps: dict[str, tuple[float | None, ...]] | None = None, running: Solution | None = None) -> Problem:
        demands = tuple(DemandRate(d, r) for d, r in sorted(rates.items(), key=lambda i: (i[0].workflow, i[0].slo)))
        budgets = Budgets(devices=dict(state.devices_available), power_w=self.power_budget_w,
                          cost_per_hour_usd=self.cost_budget_per_hour_usd)
        return Problem(workflows=self.workflows, catalog=self.catalog, demands=demands, hardware=state.hardware,
                       budgets=budgets, perf=self.perf, power_cap_levels=caps or {}, objective=objective,
                       slo=self.slo, utilization_target=self.utilization_target, stage_items=self.stage_items,
                       time_limit_s=self.time_limit_s, mip_rel_gap=self.mip_rel_gap,
                       queueing_slack=self.queueing_slack, wait_quantile=self.wait_quantile,
                       incumbent=incumbent_of(running) if running is not None and self.switch_penalty > 0 else {},
                       switch_penalty=self.switch_penalty, price_weight_w=self.price_weight_w,
                       colocate_max_busy=self.colocate_max_busy,
                       incumbent_colocate=(running.colocate or ()) if running is not None else ())


def incumbent_of(solution: Solution) -> dict[tuple[Demand, str], tuple[InstanceConfig, str]]:
    """The running plan's per-stage picks, as ``Problem.incumbent`` wants them."""
    return {(demand, stage): (config, knob_key(solution.choices[demand][stage].knobs))
            for demand, stages in solution.configs.items() for stage, config in stages.items()
            if stage in solution.choices.get(demand, {})}


# --- the reactive autoscaler (shared) ---------------------------------------------------------


@dataclass(frozen=True)
class ScaleBand:
    """When the reactive autoscaler acts (a pool's utilization below ``low`` or above ``high``) and the
    utilization it scales the pool back to (``target``)."""

    low: float = SCALE_LOW_UTILIZATION
    high: float = SCALE_HIGH_UTILIZATION
    target: float = SCALE_TARGET_UTILIZATION

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.target < self.high:
            raise ValueError(f"scale band needs 0 <= low < target < high, got low {self.low}, "
                             f"target {self.target}, high {self.high}")


PAPER_SCALE_BAND = ScaleBand()  # murakkab-epoch: [0.3, 0.85], back to 0.6
MURAKKAB_SCALE_BAND = ScaleBand(low=0.3, high=0.92, target=0.8)  # ours: only near shedding, back to 0.8


def reactive_scale(instances: Mapping[InstanceConfig, int], utilization: Mapping[InstanceConfig, float],
                   devices_per_instance: Mapping[InstanceConfig, float], devices_available: Mapping[str, int],
                   low: float = SCALE_LOW_UTILIZATION, high: float = SCALE_HIGH_UTILIZATION,
                   target: float = SCALE_TARGET_UTILIZATION, min_instances: int = 1) -> dict[InstanceConfig, int] | None:
    """New instance counts when some configuration's utilization left [low, high], else None.

    Like Kubernetes' HPA: ``n' = ceil(n * u / target)``, down to ``min_instances``, up only as far as
    free devices of that hardware type allow (scale-downs are applied first and free devices; the
    busiest configurations grow first). Configurations without a utilization reading are left alone.
    """
    counts = {c: int(n) for c, n in instances.items()}
    used: dict[str, float] = {}
    for c, n in counts.items():
        used[c.hardware] = used.get(c.hardware, 0.0) + n * devices_per_instance.get(c, float(c.tp))
    changed = False
    for c in sorted(counts, key=_config_key):
        u = utilization.get(c)
        n = counts[c]
        if u is None or u >= low or n <= min_instances:
            continue
        want = max(min_instances, math.ceil(n * u / target - 1e-9))
        if want < n:
            used[c.hardware] -= (n - want) * devices_per_instance.get(c, float(c.tp))
            counts[c], changed = want, True
    for c in sorted(counts, key=lambda k: (-utilization.get(k, 0.0), _config_key(k))):
        u = utilization.get(c)
        n = counts[c]
        if u is None or u <= high:
            continue
        per = devices_per_instance.get(c, float(c.tp))
        free = devices_available.get(c.hardware, 0) - used.get(c.hardware, 0.0)
        add = min(math.ceil(max(n, 1) * u / target - 1e-9) - n, math.floor(free / per + 1e-9) if per > 0 else 0)
        if add > 0:
            used[c.hardware] = used.get(c.hardware, 0.0) + add * per
            counts[c], changed = n + add, True
    return counts if changed else None


def _config_key(c: InstanceConfig) -> tuple[str, str, int, float]:
    return c.executor, c.hardware, c.tp, -1.0 if c.power_cap_w is None else c.power_cap_w


# --- static -----------------------------------------------------------------------------------


class StaticPolicy:
    """Hand-tuned LangGraph deployment: best accuracy, fastest GPU, peak x headroom, never changed."""

    def __init__(self, inputs: PlanningInputs, headroom: float = 1.2, name: str = "static") -> None:
        if headroom < 1.0:
            raise ValueError(f"headroom is a factor >= 1, got {headroom}")
        self.inputs = inputs
        self.headroom = headroom
        self.name = name
        self.epoch_s = math.inf
        self.tick_s = math.inf
        self.solution: Solution | None = None
        self.floor_rps: dict[Demand, float] = {}  # demands to plan for at least at these rates (a live daemon's)
        self._peaks: dict[Demand, float] = {}

    def decide(self, now_s: float, observed: dict[Demand, float], state: ClusterState) -> Decision | None:
        return self.step(now_s, observed, state)

    def replan(self, state: ClusterState, why: str) -> Decision:
        """Provision again (new workflows or catalog on a live cluster): the peaks seen so far, floors included."""
        peaks = dict(self._peaks)
        for demand, rate in {**(state.peak_rates or {}), **self.floor_rps}.items():
            peaks[demand] = max(peaks.get(demand, 0.0), rate)
        self._peaks = peaks
        self.solution = self.plan(peaks, state)
        return Decision(self.solution, f"static: provisioned for the peaks seen so far x {self.headroom:g} ({why})")

    def planned_rates(self) -> dict[Demand, float]:
        return {d: r * self.headroom for d, r in self._peaks.items()}

    def adopt(self, solution: Solution, reason: str) -> Decision:
        self.solution = solution
        return Decision(solution, reason)

    def step(self, now_s: float, observed: dict[Demand, float], state: ClusterState) -> Decision | None:
        if self.solution is not None:
            return None
        peaks = dict(state.peak_rates or {})
        for demand, rate in {**observed, **self.floor_rps}.items():
            peaks[demand] = max(peaks.get(demand, 0.0), rate)
        self._peaks = peaks
        self.solution = self.plan(peaks, state)
        source = "the trace's peak" if state.peak_rates else "the first observed rates (no peak given)"
        return Decision(self.solution, f"static: provisioned once for {source} x {self.headroom:g}")

    def plan(self, peaks: Mapping[Demand, float], state: ClusterState) -> Solution:
        rates = {d: r * self.headroom for d, r in peaks.items()}
        problem = self.inputs.problem(rates, state)
        options = stage_options(problem, sorted({d.workflow for d in rates}))
        picks: dict[str, dict[str, StageOption]] = {}
        unserved: dict[Demand, str] = {}
        for name in sorted({d.workflow for d in rates}):
            workflow = problem.workflows.get(name)
            if workflow is None:
                unserved.update({d: f"workflow {name!r} is not known" for d in rates if d.workflow == name})
                continue
            chosen: dict[str, StageOption] = {}
            for stage in workflow.stages:
                stage_opts, why = options[(name, stage.name)]
                pick = _static_pick(stage_opts, problem)
                if pick is None:
                    unserved.update({d: f"stage {stage.name!r}: {why or 'no option'}" for d in rates
                                     if d.workflow == name})
                    break
                chosen[stage.name] = pick
            else:
                picks[name] = chosen
        return _static_solution(problem, rates, picks, options, unserved)


def _static_pick(stage_opts: list[StageOption], problem: Problem) -> StageOption | None:
    """Best accuracy (executor, knobs); then the fastest hardware for it, uncapped, catalog tp."""
    uncapped = [o for o in stage_opts if o.config.power_cap_w is None]
    if not uncapped:
        return None

    def accuracy(o: StageOption) -> float:
        return -1.0 if o.accuracy is None else o.accuracy

    best = max(accuracy(o) for o in uncapped)
    top = [o for o in uncapped if accuracy(o) >= best - 1e-12]
    exe_knobs = min(top, key=lambda o: (o.latency_s, o.executor, o.knob_key))
    mine = [o for o in top if o.executor == exe_knobs.executor and o.knob_key == exe_knobs.knob_key]
    gpu_count = problem.catalog[exe_knobs.executor].resources.gpu_count

    def deployed(hardware: str) -> StageOption:  # the catalog's tp where it fits, else the smallest that does
        on_hw = [o for o in mine if o.config.hardware == hardware]
        at_catalog_tp = [o for o in on_hw if o.config.tp == gpu_count]
        return min(at_catalog_tp or on_hw, key=lambda o: (o.config.tp, o.latency_s))

    fastest = min({o.config.hardware for o in mine}, key=lambda h: (deployed(h).latency_s, h))
    return deployed(fastest)


def _static_solution(problem: Problem, rates: Mapping[Demand, float], picks: dict[str, dict[str, StageOption]],
                     options: dict[tuple[str, str], tuple[list[StageOption], str]],
                     unserved: dict[Demand, str]) -> Solution:
    pool_load: dict[tuple[str, InstanceConfig], float] = {}
    option_of: dict[InstanceConfig, StageOption] = {}
    choices: dict[Demand, dict[str, StageChoice]] = {}
    configs: dict[Demand, dict[str, InstanceConfig]] = {}
    predicted: dict[Demand, PredictedDemand] = {}
    dynamic_w = 0.0
    for demand, rate in sorted(rates.items(), key=lambda i: (i[0].workflow, i[0].slo)):
        chosen = picks.get(demand.workflow)
        if chosen is None:
            continue
        choices[demand] = {s: StageChoice(o.executor, dict(o.knobs)) for s, o in chosen.items()}
        configs[demand] = {s: o.config for s, o in chosen.items()}
        for o in chosen.values():
            key = (demand.workflow, o.config)
            pool_load[key] = pool_load.get(key, 0.0) + rate * o.load
            option_of[o.config] = o
            dynamic_w += rate * o.dynamic_energy_j
        known = [o.accuracy for o in chosen.values() if o.accuracy is not None]
        target = latency_target_s(problem, demand, options)
        predicted[demand] = PredictedDemand(
            latency_s=critical_path_s(problem.workflows[demand.workflow], {s: o.latency_s for s, o in chosen.items()}),
            latency_target_s=math.inf if target is None else target,
            energy_j_per_request=sum(o.energy_j for o in chosen.values()),
            accuracy=sum(known) / len(known) if known else None)  # type: ignore[arg-type]
    instances: dict[InstanceConfig, int] = {}
    for (_, config), load in pool_load.items():
        n = max(1, problem.min_instances, math.ceil(load / problem.utilization_target - 1e-9))
        instances[config] = instances.get(config, 0) + n
    busy = {c: option_of[c].busy_power_w for c in instances}
    idle = {c: option_of[c].idle_power_w for c in instances}
    price = {c: option_of[c].price_per_hour_usd for c in instances}
    devices = {c: option_of[c].devices for c in instances}
    load = {c: sum(v for (_, k), v in pool_load.items() if k == c) for c in instances}
    binding: list[str] = []
    for hw in sorted({c.hardware for c in instances}):
        need = sum(n * devices[c] for c, n in instances.items() if c.hardware == hw)
        have = problem.budgets.devices.get(hw, 0)
        if need > have + 1e-9:
            binding.append(f"devices {hw}: peak provisioning needs {need:g}, {have} available")
    power_w = sum(n * busy[c] for c, n in instances.items())
    average_w = sum(n * idle[c] for c, n in instances.items()) + dynamic_w
    return Solution(status="infeasible" if binding or unserved else "optimal", choices=choices, configs=configs,
                    instances=instances, predicted=predicted, power_w=power_w,
                    cost_per_hour_usd=sum(n * price[c] for c, n in instances.items()), objective_value=average_w,
                    binding=tuple(binding), solve_s=0.0, unserved=unserved, average_power_w=average_w, load=load,
                    instance_busy_power_w=busy, instance_idle_power_w=idle, instance_cost_per_hour_usd=price,
                    instance_devices=devices)



class PeakPolicy(StaticPolicy):
    """What a careful operator deploys and never touches: the tier-aware MILP (any GPU type, no power caps)
    solved once for the peak rates times ``headroom``; no re-planning, no reactive scaling."""

    def __init__(self, inputs: PlanningInputs, headroom: float = 1.2, name: str = "static") -> None:
        super().__init__(inputs, headroom=headroom, name=name)
        self._asked = False  # the one MILP was asked for (a refused solve is not retried)

    def decide(self, now_s: float, observed: dict[Demand, float], state: ClusterState) -> Decision | None:
        outcome = self.step(now_s, observed, state)
        if isinstance(outcome, SolveNeeded):
            return self.adopt(optimize(outcome.problem), outcome.reason)
        return outcome

    def step(self, now_s: float, observed: dict[Demand, float], state: ClusterState  # type: ignore[override]
             ) -> Decision | SolveNeeded | None:
        if self.solution is not None or self._asked:
            return None
        peaks = dict(state.peak_rates or {})
        for demand, rate in {**observed, **self.floor_rps}.items():
            peaks[demand] = max(peaks.get(demand, 0.0), rate)
        self._peaks = peaks
        self._asked = True
        source = "the trace's peak" if state.peak_rates else "the first observed rates (no peak given)"
        return SolveNeeded(self.inputs.problem(self.planned_rates(), state),
                           f"{self.name}: MILP once for {source} x {self.headroom:g}")

    def replan(self, state: ClusterState, why: str) -> SolveNeeded:  # type: ignore[override]
        for demand, rate in {**(state.peak_rates or {}), **self.floor_rps}.items():
            self._peaks[demand] = max(self._peaks.get(demand, 0.0), rate)
        return SolveNeeded(self.inputs.problem(self.planned_rates(), state),
                           f"{self.name}: MILP for the peaks seen so far x {self.headroom:g} ({why})")

# --- forecasting policies ---------------------------------------------------------------------


class _ForecastPolicy:
    """MILP every epoch on a forecast of per-epoch window rates, reactive scaling on every call between."""

    def __init__(self, inputs: PlanningInputs, *, name: str, epoch_s: float, tick_s: float, alpha: float,
                 percentile_z: float, cap_fractions: tuple[float, ...] | None, objective: Objective,
                 min_rate_rps: float, scale_band: ScaleBand) -> None:
        if epoch_s <= 0 or tick_s <= 0:
            raise ValueError("epoch_s and tick_s must be positive")
        self.inputs = inputs
        self.scale_band = scale_band
        self.name = name
        self.epoch_s = epoch_s
        self.tick_s = tick_s
        self.cap_fractions = cap_fractions
        self.min_rate_rps = min_rate_rps
        self.objective: Objective = objective
        self.forecast = EwmaForecast(alpha, percentile_z)
        self.solution: Solution | None = None
        self.epoch_index: int | None = None
        self._window_sum: dict[Demand, float] = {}
        self._window_samples = 0
        self.plans = 0
        self.floor_rps: dict[Demand, float] = {}  # demands to plan for at least at these rates (a live daemon's)

    def decide(self, now_s: float, observed: dict[Demand, float], state: ClusterState) -> Decision | None:
        """``step``, with the MILP solved here when it asks for one."""
        outcome = self.step(now_s, observed, state)
        if isinstance(outcome, SolveNeeded):
            return self.adopt(optimize(outcome.problem), outcome.reason)
        return outcome

    def step(self, now_s: float, observed: dict[Demand, float], state: ClusterState
             ) -> Decision | SolveNeeded | None:
        epoch = math.floor(now_s / self.epoch_s)
        for demand in set(self._window_sum) | set(observed):
            self._window_sum[demand] = self._window_sum.get(demand, 0.0) + max(observed.get(demand, 0.0), 0.0)
        self._window_samples += 1
        if self.solution is None or epoch != self.epoch_index:
            why = "first plan" if self.solution is None else f"epoch {epoch} (t={now_s:g} s)"
            self.epoch_index = epoch
            self._close_window()
            return self._replan(state, why)
        new = [d for d, r in sorted(observed.items(), key=lambda i: (i[0].workflow, i[0].slo))
               if r >= self.min_rate_rps and d not in self.solution.choices and d not in self.solution.unserved]
        new += [d for d in sorted(self.floor_rps, key=lambda d: (d.workflow, d.slo))
                if d not in new and d not in self.solution.choices and d not in self.solution.unserved]
        if new:
            for demand in new:  # its forecast starts at its first observation
                if demand in observed:
                    self._window_sum.pop(demand, None)
                    self.forecast.observe(demand, observed[demand])
            return self._replan(state, f"new demand(s) {', '.join(_name(d) for d in new)}")
        return self._react(state)

    def _close_window(self) -> None:
        if self._window_samples:
            for demand, total in self._window_sum.items():
                self.forecast.observe(demand, total / self._window_samples)
        self._window_sum = {}
        self._window_samples = 0

    def replan(self, state: ClusterState, why: str) -> SolveNeeded:
        """A MILP now, whatever the epoch (inputs changed, a node joined, a budget was set)."""
        return self._replan(state, why)

    def _replan(self, state: ClusterState, why: str) -> SolveNeeded:
        """The MILP for the forecast rates; the running plan is handed back for stability and groups."""
        rates = self.planned_rates()
        caps = power_cap_levels(state.hardware, self.cap_fractions) if self.cap_fractions else None
        problem = self.inputs.problem(rates, state, self.objective, caps, running=self.solution)
        return SolveNeeded(problem, f"{self.name}: MILP, {why}, {len(rates)} demand(s)")

    def planned_rates(self) -> dict[Demand, float]:
        """The forecast per demand, without faded demands (below ``min_rate_rps``: no instances)."""
        rates = {d: self.forecast.forecast(d) for d in self.forecast.demands()}
        rates = {d: r for d, r in rates.items() if r >= self.min_rate_rps}
        for demand, floor in self.floor_rps.items():
            rates[demand] = max(rates.get(demand, 0.0), floor)
        return rates

    def adopt(self, solution: Solution, reason: str) -> Decision:
        """Take a solved MILP as the running plan."""
        self.solution = solution
        self.plans += 1
        return Decision(solution, f"{reason}, status {solution.status}, solved in {solution.solve_s:.2f} s")

    def _react(self, state: ClusterState) -> Decision | None:
        assert self.solution is not None
        current = {c: state.instances.get(c, n) for c, n in self.solution.instances.items()}
        band = self.scale_band
        scaled = reactive_scale(current, state.utilization, self.solution.instance_devices, state.devices_available,
                                low=band.low, high=band.high, target=band.target)
        if scaled is None:
            return None
        changes = [f"{c.executor}@{c.hardware}: {current[c]} -> {n}" for c, n in sorted(scaled.items(),
                   key=lambda i: _config_key(i[0])) if n != current[c]]
        self.solution = with_instances(self.solution, scaled)
        return Decision(self.solution, f"{self.name}: reactive scaling, {'; '.join(changes)}")


def _name(demand: Demand) -> str:
    return f"{demand.workflow}[{','.join(f'{k}={v}' for k, v in demand.slo)}]"


class EpochPolicy(_ForecastPolicy):
    """murakkab-epoch (the paper): hourly MILP on the EWMA mean, no power caps, reactive autoscaler."""

    def __init__(self, inputs: PlanningInputs, epoch_s: float = 3600.0, tick_s: float = 60.0, alpha: float = 0.5,
                 percentile_z: float = 0.0, objective: Objective = "energy", name: str = "murakkab-epoch",
                 min_rate_rps: float = MIN_RATE_RPS, scale_band: ScaleBand = PAPER_SCALE_BAND) -> None:
        super().__init__(inputs, name=name, epoch_s=epoch_s, tick_s=tick_s, alpha=alpha, percentile_z=percentile_z,
                         cap_fractions=None, objective=objective, min_rate_rps=min_rate_rps, scale_band=scale_band)


class MurakkabPolicy(_ForecastPolicy):
    """Ours: MILP every 300 s on the forecast's p95 with power-cap levels, energy objective, reactive scaling.

    ``utilization_target`` replaces the inputs' (None keeps theirs); see the module doc for the defaults.
    """

    def __init__(self, inputs: PlanningInputs, epoch_s: float = 300.0, tick_s: float = 60.0, alpha: float = 0.5,
                 percentile_z: float = P95_Z, objective: Objective = "energy", name: str = "murakkab",
                 cap_fractions: tuple[float, ...] = CAP_FRACTIONS, min_rate_rps: float = MIN_RATE_RPS,
                 utilization_target: float | None = MURAKKAB_UTILIZATION_TARGET,
                 scale_band: ScaleBand = MURAKKAB_SCALE_BAND, lift_caps_on_bursts: bool = True) -> None:
        self.lift_caps_on_bursts = lift_caps_on_bursts
        if utilization_target is not None:
            if not 0.0 < utilization_target <= 1.0:
                raise ValueError(f"utilization_target must be within (0, 1], got {utilization_target}")
            inputs = replace(inputs, utilization_target=utilization_target)
        super().__init__(inputs, name=name, epoch_s=epoch_s, tick_s=tick_s, alpha=alpha, percentile_z=percentile_z,
                         cap_fractions=cap_fractions, objective=objective, min_rate_rps=min_rate_rps,
                         scale_band=scale_band)

    def _react(self, state: ClusterState) -> Decision | None:
        """A capped pool above the band first gets its cap lifted (at once, no engine starts); the scaler
        then adds instances only where the pool, at its uncapped speed, would still be above the band.
        The next plan (within ``epoch_s``) sets caps again for the load it then forecasts."""
        assert self.solution is not None
        hot = sorted((c for c in self.solution.instances if c.power_cap_w is not None
                      and state.utilization.get(c, 0.0) > self.scale_band.high), key=_config_key)
        if not self.lift_caps_on_bursts or not hot:
            return super()._react(state)
        lifted, gain = with_caps_lifted(self.solution, hot, self.inputs.perf, self.inputs.catalog)
        if not gain:
            return super()._react(state)
        self.solution = lifted

        def moved(config: InstanceConfig) -> InstanceConfig:
            return replace(config, power_cap_w=None) if config in gain else config

        utilization: dict[InstanceConfig, float] = {}
        instances: dict[InstanceConfig, int] = {}
        for config, u in state.utilization.items():  # readings and counts move to the uncapped configs
            utilization[moved(config)] = max(utilization.get(moved(config), 0.0), u / gain.get(config, 1.0))
        for config, n in state.instances.items():
            instances[moved(config)] = instances.get(moved(config), 0) + n
        lift = "; ".join(f"{c.executor}@{c.hardware}: cap {c.power_cap_w:g} W lifted "
                         f"({state.utilization[c]:.0%} busy, {gain[c]:.2f}x faster)" for c in gain)
        scaled = super()._react(replace(state, utilization=utilization, instances=instances))
        if scaled is None:
            return Decision(self.solution, f"{self.name}: reactive, {lift}")
        return Decision(scaled.solution, f"{scaled.reason}; {lift}")
