"""The daemon's shell around the autopilot: measure, feed events, carry out actions. No policy here.

What it measures and feeds (``policies.autopilot.events``): the fleet from the node registry with its
latest telemetry (at most once per ``fleet_interval_s``), job arrivals and each pool's busy fraction
(in-flight and queued invocations over its slots, sampled every controller tick) per load window,
the components agents report, workflow/catalog/demand changes, budgets and pins from the admin API,
and ticks. What it carries out: MILPs on a worker thread (one at a time; a later ask waits for it),
the desired components (handed to the workload service, which reconciles them), routing weights
(a component's share of new invocations), power limits (sent level-triggered by the workload
service), and every ``Note``: logged, counted in ``murakkab_autopilot_decisions_total{kind}``, kept in
SQLite for ``murakkabctl events``. Forecast, budgets and pins are stored too, so a restarted
controller plans with the history it had.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter as MetricCounter

from common.protocol import ErrorReply
from controller.fleet_view import fleet_hardware, node_states
from policies.autopilot.engine import Autopilot, AutopilotConfig
from policies.autopilot.events import (
    Action, BudgetSet, ComponentsObserved, CoolingSet, DesiredChanged, Event, FleetObserved, GridSet, InputsChanged,
    LoadObserved, Note, PinCleared, PinSet, PowerLimitsChanged, Refused, RoutingChanged, Solve, Solved, Tick,
)
from policies.autopilot.planning import (
    CAP_FRACTIONS, EpochPolicy, MurakkabPolicy, PlanningInputs, StaticPolicy,
)
from policies.autopilot.reactions import ReactionConfig
from policies.model import InstanceConfig, Solution
from policies.optimizer import optimize
from policies.perf_model import CatalogPerfModel
from policies.placement import PlacementLimits
from policies.plan import Demand, PlacedComponent



class WorkloadPort(Protocol):
    """What the shell needs of the workload service (controller.jobs.service.WorkloadService)."""

    c: Any
    store: Any
    executor: Any
    catalog: dict[str, Any]
    workflows: dict[str, tuple[Any, Any]]

    def wanted_demands(self) -> tuple[Demand, ...]: ...

    def live_job_executors(self) -> frozenset[str]: ...

    def avoided(self) -> dict[tuple[str, str], str]: ...

    def avoid_entries(self) -> dict[tuple[str, str], tuple[float, str]]: ...

    def unplanned_running(self) -> tuple[PlacedComponent, ...]: ...

    def adopt_plan(self, plan: Any, now_s: float) -> Any: ...

    def routing_changed(self, now_s: float) -> None: ...

log = logging.getLogger("murakkab.controller.autopilot")

WARM_FLOOR_RPS = 0.01  # every wanted demand keeps a warm instance per configuration, traffic or not
MAX_EVENTS_KEPT = 10_000  # rows in SQLite; older ones are deleted
EVENTS_IN_MEMORY = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS autopilot_state (key TEXT PRIMARY KEY, value_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS autopilot_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at_unix_s REAL NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
    reason TEXT NOT NULL, details_json TEXT NOT NULL);
"""


@dataclass(frozen=True)
class AutopilotSettings:
    preset: str = "murakkab"
    epoch_s: float = 300.0
    window_s: float = 10.0
    queueing_slack: float = 0.2
    wait_quantile: float | None = 0.99
    switch_timeout_s: float = 120.0
    heat_margin_c: float = 5.0
    heat_migrate_after_s: float = 15.0
    cluster_power_budget_w: float | None = None
    rack_power_budget_w: dict[str, float] = field(default_factory=dict)
    fleet_interval_s: float = 1.0
    time_limit_s: float = 4.0
    grid_objective: bool = False
    carbon_price_usd_per_tonne: float = 0.0


def solve(problem: Any) -> Solution:
    """The MILP (on a worker thread); a module-level name so tests can slow it down."""
    return optimize(problem)


def build_planning(settings: AutopilotSettings, inputs: PlanningInputs) -> Any:
    """The planning core for a preset, with the daemon's settings."""
    if settings.preset == "static":
        return StaticPolicy(inputs)
    if settings.preset == "murakkab-epoch":
        return EpochPolicy(inputs, epoch_s=settings.epoch_s, tick_s=settings.window_s)
    if settings.preset == "murakkab":
        return MurakkabPolicy(inputs, epoch_s=settings.epoch_s, tick_s=settings.window_s, cap_fractions=CAP_FRACTIONS)
    raise ValueError(f"unknown autopilot preset {settings.preset!r}")


class AutopilotShell:
    def __init__(self, workloads: WorkloadPort, settings: AutopilotSettings) -> None:
        self.w = workloads
        self.c = workloads.c
        self.settings = settings
        self.db = workloads.store.db
        self.db.executescript(SCHEMA)
        inputs = PlanningInputs(workflows={}, catalog={}, perf=CatalogPerfModel({}),
                                queueing_slack=settings.queueing_slack, wait_quantile=settings.wait_quantile,
                                time_limit_s=settings.time_limit_s)
        self.autopilot = Autopilot(AutopilotConfig(
            preset=settings.preset, switch_timeout_s=settings.switch_timeout_s,
            reactions=ReactionConfig(heat=settings.preset == "murakkab", heat_margin_c=settings.heat_margin_c,
                                     heat_migrate_after_s=settings.heat_migrate_after_s),
            limits=PlacementLimits(),
            warm_floor_rps=WARM_FLOOR_RPS, cluster_power_budget_w=settings.cluster_power_budget_w,
            rack_power_budget_w=dict(settings.rack_power_budget_w), grid_objective=settings.grid_objective,
            carbon_price_usd_per_tonne=settings.carbon_price_usd_per_tonne), build_planning(settings, inputs))
        self.decisions = MetricCounter("murakkab_autopilot_decisions", "Autopilot decisions, by kind.", ["kind"],
                                       registry=self.c.metrics_registry)
        self.recent: deque[dict[str, Any]] = deque(maxlen=EVENTS_IN_MEMORY)
        # called with each event dict as it is recorded (the MQTT events topic); one that raises is logged
        self.event_observers: list[Callable[[dict[str, Any]], None]] = []
        self.weights: dict[str, float] = {}
        self.power_limits: dict[tuple[str, int], float] = {}
        self._arrivals: Counter[Demand] = Counter()
        self._busy: Counter[str] = Counter()  # component id -> summed in-flight + queued share over samples
        self._samples = 0
        self._window_start_s: float | None = None
        self._fleet_at_s = -math.inf
        self._fleet_sig: tuple[Any, ...] | None = None
        self._hardware_sig: tuple[Any, ...] | None = None
        self._reported: dict[str, dict[str, str]] = {}
        self._solve_task: asyncio.Task[None] | None = None
        self._solved_waiters: list[asyncio.Future[None]] = []
        self._inline = False
        self._load_state()

    # --- persistence ------------------------------------------------------------------------------

    def _load_state(self) -> None:
        row = self.db.execute("SELECT value_json FROM autopilot_state WHERE key = 'snapshot'").fetchone()
        self.stored_avoid: list[tuple[str, str, float, str]] = []  # (executor, node, until unix s, why)
        if row is not None:
            try:
                saved = json.loads(row[0])
                self.autopilot.restore(saved)
                self.stored_avoid = [(str(e), str(n), float(u), str(w)) for e, n, u, w in saved.get("avoid", ())]
            except (ValueError, TypeError, KeyError) as exc:
                log.error("stored autopilot state does not parse; starting without it: %s", exc)
        for seq, at, kind, subject, reason, details in self.db.execute(
                "SELECT seq, at_unix_s, kind, subject, reason, details_json FROM autopilot_events "
                "ORDER BY seq DESC LIMIT ?", (EVENTS_IN_MEMORY,)).fetchall()[::-1]:
            self.recent.append({"seq": seq, "at_unix_s": at, "kind": kind, "subject": subject, "reason": reason,
                                "details": json.loads(details)})

    def save_state(self) -> None:
        """Forecast, budgets, pins and the avoid list, for the next controller start."""
        offset = time.time() - self.c.clock()
        avoid = [[executor, node, until_s + offset, why] for (executor, node), (until_s, why)
                 in self.w.avoid_entries().items()]
        self.db.execute("INSERT OR REPLACE INTO autopilot_state (key, value_json) VALUES ('snapshot', ?)",
                        (json.dumps({**self.autopilot.snapshot(), "avoid": avoid}),))

    # --- the admin API ----------------------------------------------------------------------------

    def set_budget(self, rack: str | None, power_budget_w: float | None,
                   source: str = "operator") -> ErrorReply | None:
        error = self._feed(BudgetSet(self.c.clock(), rack, power_budget_w, source))
        if error is None:
            self.save_state()
        return error

    def set_rack_cooling(self, rack: str, state: str, inlet_c: float | None,
                         source: str = "facility") -> ErrorReply | None:
        """A facility's cooling report for a rack (``ok``, ``degraded``, ``failed``): caps and placement follow."""
        return self._feed(CoolingSet(self.c.clock(), rack, state, inlet_c, source))

    def set_grid(self, price_usd_per_mwh: float, carbon_g_per_kwh: float,
                 source: str = "facility") -> ErrorReply | None:
        """The grid's price and carbon intensity; they enter the plan's objective where ``grid_objective`` is on."""
        return self._feed(GridSet(self.c.clock(), price_usd_per_mwh, carbon_g_per_kwh, source))

    def budget_view(self) -> dict[str, Any]:
        return self.autopilot.reactions.budget_view()

    def events(self, limit: int) -> list[dict[str, Any]]:
        return list(self.recent)[-limit:] if limit > 0 else []

    def pin(self, node: str, device_index: int, power_limit_w: float) -> ErrorReply | None:
        error = self._feed(PinSet(self.c.clock(), node, device_index, power_limit_w))
        if error is None:
            self.save_state()
        return error

    def unpin(self, node: str, device_index: int) -> ErrorReply | None:
        error = self._feed(PinCleared(self.c.clock(), node, device_index))
        if error is None:
            self.save_state()
        return error

    def pins_for(self, node: str) -> dict[int, float]:
        return {i: w for (n, i), w in self.autopilot.reactions.pins.items() if n == node}

    @property
    def explanation(self) -> dict[str, Any]:
        return self.autopilot.explanation

    def latency_target_s(self, demand: Demand) -> float | None:
        """The running plan's end-to-end latency target for a demand (its SLO tier), None where it has none."""
        solution = getattr(self.autopilot.policy, "solution", None)
        predicted = solution.predicted.get(demand) if solution is not None else None
        target = predicted.latency_target_s if predicted is not None else None
        return target if target is not None and math.isfinite(target) else None

    # --- measurements -----------------------------------------------------------------------------

    def record_arrival(self, demand: Demand) -> None:
        self._arrivals[demand] += 1

    def tick(self, now_s: float) -> None:
        """Every controller tick: sample load, feed the fleet (at most once per interval), close load windows."""
        self._sample_busy()
        if now_s - self._fleet_at_s >= self.settings.fleet_interval_s:
            self._fleet_at_s = now_s
            self._observe_fleet(now_s)
        if self._window_start_s is None:
            self._window_start_s = now_s
        elif now_s - self._window_start_s >= self.settings.window_s:
            self._close_window(now_s)
        self._feed(Tick(now_s))

    def observe_fleet_now(self) -> None:
        """Nodes came, went or changed state: the next tick shows the autopilot the fleet, whatever the interval."""
        self._fleet_at_s = -math.inf

    def _observe_fleet(self, now_s: float) -> None:
        nodes = list(self.c.registry.nodes.values())
        hardware, counts = fleet_hardware(nodes)
        sig = tuple(sorted(hardware.items(), key=lambda kv: kv[0]))
        if sig != self._hardware_sig:  # a new GPU type or CPU size: the perf model follows
            self._hardware_sig = sig
            self._feed(InputsChanged(now_s, perf=self.perf(hardware), replan=False))
        self._feed(FleetObserved(now_s, tuple(node_states(nodes)), hardware, counts))

    def perf(self, hardware: Mapping[str, Any] | None = None) -> Any:
        """The catalog's perf model for the fleet's hardware, with fitted predictors where they cover it."""
        from policies.predictors import LearnedPerfModel

        base = CatalogPerfModel(hardware if hardware is not None else self.autopilot.hardware)
        profiler = getattr(self.c, "profiler", None)
        predictors = profiler.predictors if profiler is not None else None
        return LearnedPerfModel(predictors, base) if predictors is not None and len(predictors) else base

    def _sample_busy(self) -> None:
        """In-flight invocations per component and queued ones spread over their executor's components."""
        executor = self.w.executor
        by_executor: dict[str, list[str]] = {}
        for comp in self.autopilot.rollout.desired.values():
            by_executor.setdefault(comp.executor, []).append(comp.component_id)
        for name, ids in by_executor.items():
            queued = executor.queued_for(name) / len(ids)
            for cid in ids:
                self._busy[cid] += len(executor.inflight_for(cid)) + queued
        self._samples += 1

    def _close_window(self, now_s: float) -> None:
        assert self._window_start_s is not None
        width_s = max(now_s - self._window_start_s, 1e-6)
        rates = {d: n / width_s for d, n in self._arrivals.items()}
        for demand in self.autopilot.demands:
            rates.setdefault(demand, 0.0)
        slots: Counter[InstanceConfig] = Counter()
        busy: Counter[InstanceConfig] = Counter()
        instances: Counter[InstanceConfig] = Counter()
        for comp in self.autopilot.rollout.plan:
            state = self._reported.get(comp.node, {}).get(comp.component_id)
            if state not in ("starting", "ready", "pending"):
                continue
            config = self.autopilot.config_of(comp)
            spec = self.w.catalog.get(comp.executor)
            instances[config] += 1
            slots[config] += spec.max_concurrency if spec is not None else 1
            busy[config] += self._busy.get(comp.component_id, 0.0) / max(1, self._samples)
        utilization = {c: busy[c] / slots[c] for c in slots if slots[c] > 0}
        self._arrivals.clear()
        self._busy.clear()
        self._samples = 0
        self._window_start_s = now_s
        self._feed(LoadObserved(now_s, rates, utilization, dict(instances)))
        self.save_state()  # the forecast moves on every window

    def components_reported(self, node: str, reports: tuple[Any, ...], ready: bool, now_s: float) -> None:
        states = {r.component_id: r.state for r in reports} if ready else {}
        if states != self._reported.get(node):
            self._reported[node] = states
            self._feed(ComponentsObserved(now_s, {node: states}))

    def inputs_changed(self, now_s: float, replan: bool, running: tuple[PlacedComponent, ...] = ()) -> None:
        workflows = {name: spec for name, (_, spec) in self.w.workflows.items()}
        demands = self.w.wanted_demands()
        if running:
            self.autopilot.adopt_running(running)
        self._feed(InputsChanged(now_s, workflows=workflows, catalog=dict(self.w.catalog), perf=self.perf(),
                                 demands=demands,
                                 keep_executors=self.w.live_job_executors(), avoid=self.w.avoided(), replan=replan))

    def plan_now(self, now_s: float) -> asyncio.Future[None]:
        """Ask for a plan from the latest inputs; the future is done once it (or the solve in flight, and the
        one after it) has been adopted."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._solved_waiters.append(waiter)
        self._observe_fleet(now_s)  # the fleet as it is now (after a restart, the first the autopilot sees)
        self.inputs_changed(now_s, replan=True, running=self.w.unplanned_running())
        if self._solve_task is None and not self.autopilot.solving:
            self._wake_waiters()
        return waiter

    def plan_inline(self, now_s: float) -> None:
        """Plan on the event loop (a failed off-loop solve after a restart): the MILP runs here."""
        self._inline = True
        try:
            self._observe_fleet(now_s)
            self.inputs_changed(now_s, replan=True, running=self.w.unplanned_running())
        finally:
            self._inline = False

    # --- carrying out actions ---------------------------------------------------------------------

    def _feed(self, event: Event) -> ErrorReply | None:
        return self._carry_out(self.autopilot.handle(event))

    def _carry_out(self, actions: list[Action]) -> ErrorReply | None:
        refused: ErrorReply | None = None
        for action in actions:
            match action:
                case Solve():
                    self._start_solve(action)
                case DesiredChanged():
                    self.w.adopt_plan(action.plan, self.c.clock())
                case RoutingChanged():
                    if dict(action.weights) != self.weights:
                        self.weights = dict(action.weights)
                        self.w.routing_changed(self.c.clock())
                case PowerLimitsChanged():
                    self.power_limits = dict(action.limits)
                case Note():
                    self._record(action)
                case Refused(code=code, message=message):
                    refused = ErrorReply(code, message)
        return refused

    def _start_solve(self, action: Solve) -> None:
        inline = self._solve_task is None and (self._inline or not self._loop_running())
        if inline:  # asked to, or no event loop (a synchronous caller): solve here
            self._carry_out(self.autopilot.handle(Solved(action.request_id, solve(action.problem), self.c.clock())))
            return
        self._solve_task = asyncio.ensure_future(self._solve_off_loop(action))

    @staticmethod
    def _loop_running() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    async def _solve_off_loop(self, action: Solve) -> None:
        try:
            solution = await asyncio.to_thread(solve, action.problem)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the MILP failed; the running plan stays")
            self.autopilot.solving = None
            self._solve_task = None
            self._wake_waiters()
            return
        self._solve_task = None
        self._carry_out(self.autopilot.handle(Solved(action.request_id, solution, self.c.clock())))
        if self._solve_task is None and not self.autopilot.solving:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        waiters, self._solved_waiters = self._solved_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _record(self, note: Note) -> None:
        self.decisions.labels(note.kind).inc()
        quiet = note.kind in ("reactive", "plan", "replace", "budget-release", "rollout-switched")
        log.log(logging.INFO if quiet else logging.WARNING, "autopilot %s %s: %s", note.kind, note.subject,
                note.reason)
        details = _jsonable(dict(note.details))
        at = time.time()
        cursor = self.db.execute("INSERT INTO autopilot_events (at_unix_s, kind, subject, reason, details_json) "
                                 "VALUES (?, ?, ?, ?, ?)", (at, note.kind, note.subject, note.reason[:2000],
                                                            json.dumps(details)[:20000]))
        seq = int(cursor.lastrowid or 0)
        if seq % 1000 == 0:
            self.db.execute("DELETE FROM autopilot_events WHERE seq <= ?", (seq - MAX_EVENTS_KEPT,))
        event = {"seq": seq, "at_unix_s": at, "kind": note.kind, "subject": note.subject, "reason": note.reason,
                 "details": details}
        self.recent.append(event)
        for observer in list(self.event_observers):
            try:
                observer(event)
            except Exception:
                log.exception("an autopilot event observer failed")

    async def close(self) -> None:
        if self._solve_task is not None:
            self._solve_task.cancel()
            await asyncio.gather(self._solve_task, return_exceptions=True)
        for waiter in self._solved_waiters:
            waiter.cancel()



def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
