"""The discrete-event cluster simulator: virtual time, a thin shell around the autopilot.

What runs for real: the autopilot (``policies.autopilot``: the planning core, placement and
make-before-break rollouts, the object the controller daemon runs too) and the reconciler
(``controller.reconciler.Reconciler``, the daemon's class) driving simulated agents
(``controller.simulator.cluster``) whose components take time to start. The shell feeds the
autopilot the fleet, one load window per decision (every ``control.reactive_interval_s``) and
component states, solves the MILPs it asks for inline, and carries out its actions.
What is modeled: request service, by the scenario's judge: the request-level model of engines
(``controller.simulator.judge``, the default, fed per step by ``judged_steps``) or the fluid model
(``controller.simulator.service``, the planner's own formulas); device power (the sim GPU's DVFS
model, ``common.devices.physics.operating_point``, at busy fractions the judge measures); and the
request trace. Per-GPU telemetry (temperature, measured power, throttle reasons) is modeled only in
scenarios with faults, so the autopilot's heat and budget reactions fire there.

Events sit in a heap ordered by (time, kind): component timers (ready after start-up, gone after
draining) first, then policy decisions, then service steps (every ``step_s``). Between
events nothing changes, so energy, GPU-hours and cost integrate exactly as piecewise-constant
power times time. Service within a step uses the pools that are ready at its start.

Rollouts follow ``policies.autopilot.rollout``: the old routing serves until every new component
is ready (``control.switch_timeout_s`` bounds the wait). While a rollout is pending, instances of
one executor, hardware and tp serve the old routing whatever cap the new plan has already moved
them to (``ServiceModel.evaluate``'s ``merge_caps``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from common.devices.gpu_specs import GPU_SPECS
from common.devices.physics import operating_point
from controller.reconciler import DesiredChanged as DesiredChanged_
from controller.reconciler import CommandDone, NodeReport, Reconciler, ReconcilerConfig, SendStart, SendStop, Tick
from controller.simulator.faults import TELEMETRY_INTERVAL_S, Reaction, Thermals, matches
from controller.simulator.cluster import (
    SimAgents, SimComponent, SimNode, Timer, build_nodes, config_of, rack_budgets, startup_s,
)
from controller.simulator.report import Recorder, tier_label
from controller.simulator.scenario import Scenario
from controller.simulator.service import RouteTable, ServiceModel, StepOutcome
from controller.simulator.judge import CPU_PROFILES, CPU_STARTUP, RequestJudge
from controller.simulator.judged_steps import DRAIN_AFTER_END_S, MAX_REPORTED_UTILIZATION, RequestSteps
from controller.simulator.slo import SloJudge
from controller.simulator.trace import generate_arrivals
from policies.autopilot.engine import Autopilot, AutopilotConfig
from policies.autopilot.reactions import ReactionConfig
from policies.autopilot.events import (
    BudgetSet, ComponentsObserved, DesiredChanged, FleetObserved, LoadObserved, Note, PowerLimitsChanged,
    RoutingChanged, Solve, Solved,
)
from policies.autopilot.events import Tick as AutopilotTick
from policies.model import HardwareType, InstanceConfig, PerfModel, SloTargets, Solution
from policies.optimizer import optimize
from policies.perf_model import gpu_activity
from policies.placement import DeviceState, NodeState, PlacementLimits
from policies.plan import SLO_DIMENSIONS, SLO_TIERS, Demand, PlacedComponent

TIMER, FAULT, OBSERVE, DECIDE, STEP = 0, 1, 2, 3, 4  # event order at equal times
def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class Simulator(RequestSteps):
    """One policy on one scenario; ``run()`` returns the report (see ``controller.simulator.report``)."""

    def __init__(self, scenario: Scenario, policy: Any, *, perf: PerfModel, hardware: Mapping[str, HardwareType],
                 slo: SloTargets | None = None, wall_clock: Callable[[], float] = time.perf_counter) -> None:
        self.scenario = scenario
        self.spec = scenario.spec
        self.control = scenario.spec.control
        self.policy = policy
        self.perf = perf
        self.hardware = dict(hardware)
        self.wall_clock = wall_clock
        self.nodes: dict[str, SimNode] = {n.name: n for n in build_nodes(self.spec)}
        missing = sorted({n.hardware for n in self.nodes.values()} - set(self.hardware))
        if missing:
            raise ValueError(f"no hardware type for {', '.join(missing)} (known: {', '.join(sorted(self.hardware))})")
        self.devices_total: Counter[str] = Counter()
        for node in self.nodes.values():
            self.devices_total[node.hardware] += node.devices
        stage_items: dict[str, dict[str, float]] = {}
        for (workflow, stage), count in scenario.items.items():
            stage_items.setdefault(workflow, {})[stage] = count
        self.stage_items = stage_items
        self.judge = SloJudge(scenario.workflows, scenario.catalog, perf, self.hardware, set(self.devices_total),
                              stage_items, slo, service_time_factor=self.control.service_time_factor)
        self.service = ServiceModel(self.judge, self.control.max_utilization)
        self.arrivals = generate_arrivals(self.spec.trace, self.spec.duration_s, self.spec.step_s, self.spec.seed,
                                          base_dir=scenario.base_dir)
        self.requests_judge: RequestJudge | None = None
        if self.spec.judge == "requests":
            self.requests_judge = RequestJudge(
                scenario.workflows, scenario.catalog,
                {name: hw.memory_bytes for name, hw in self.hardware.items() if hw.kind == "gpu"},
                set(self.devices_total), stage_items, self.arrivals.demands, self.spec.seed, slo,
                cpu_profiles=CPU_PROFILES, cpu_startup=CPU_STARTUP)
            times = self.arrivals.requests.times_s
            self._step_index = np.searchsorted(times, np.arange(self.arrivals.steps + 1) * self.spec.step_s)
        self.peak_rates = self.arrivals.peak_rates()
        self.reconciler = Reconciler(ReconcilerConfig(command_timeout_s=30.0,
                                                      drain_timeout_s=max(self.control.drain_s, 1e-3)),
                                     command_prefix="sim-")
        self.agents = SimAgents(self.nodes, executors=dict(scenario.catalog), device_memory_bytes={
            name: hw.memory_bytes for name, hw in self.hardware.items() if hw.kind == "gpu"})
        self.limits = PlacementLimits(
            rack_power_budget_w={rack: w for rack, w in rack_budgets(self.spec).items() if w is not None},
            ambient_c=self.spec.cluster.ambient_c)
        # Faults, and the per-GPU telemetry the autopilot reacts to (only where a scenario has faults).
        self.telemetry = bool(self.spec.faults)
        self.thermals = Thermals(self.spec.cluster.ambient_c)
        self.down: set[str] = set()  # failed nodes
        self.reaction_limits: dict[tuple[str, int], float] = {}  # limits below a component's planned cap
        self.reactions: list[Reaction] = []
        name = getattr(policy, "name", "murakkab")
        self.autopilot = Autopilot(AutopilotConfig(
            preset=name, switch_timeout_s=self.control.switch_timeout_s, limits=self.limits,
            reactions=ReactionConfig(heat=name == "murakkab")), policy)
        # plan state
        self.desired: dict[str, PlacedComponent] = {}
        self.plan: tuple[PlacedComponent, ...] = ()  # the latest placement (without retained components)
        self.active: Solution | None = None  # routes requests (the autopilot's routed plan)
        self.rollout_pending = False  # a new plan waits for its components while the old one serves
        self.routes: RouteTable | None = None
        self._solve_wall_s = 0.0
        self._decided: tuple[str, bool] | None = None  # this decision's kind and whether it changed anything
        self._measured_w: dict[tuple[str, int], float] = {}
        self.first_plan = True
        # counters kept incrementally (see _track)
        self.groups: Counter[tuple[InstanceConfig, str]] = Counter()
        self.gpu_holders: Counter[tuple[str, int]] = Counter()
        self.gpus_held: Counter[str] = Counter()  # held GPUs per hardware type
        self.shared_idle_w = 0.0  # idle power counted twice for GPUs that several components share
        self.shared_context_w = 0.0  # and their context idle above the fleet idle, for the fleet power
        self.utilization: dict[InstanceConfig, float] = {}  # pool occupancy in the current step
        self.window_util: dict[InstanceConfig, list[float]] = {}
        self.window_start_s = 0.0
        self.window_steps: list[int] = []
        self._point_cache: dict[tuple[str, float, float], float] = {}
        self._judge_step_s = 0.0
        self._outstanding_seen: dict[InstanceConfig, float] = {}
        self._step_served = self._step_met = 0.0
        self.judge_dropped = 0
        self.throttled_gpu_s = 0.0
        self._throttle_seen_s = 0.0
        self._perf_cache: dict[InstanceConfig, Any] = {}
        self._node_state_cache: dict[str, NodeState] = {}
        self._dirty_nodes: set[str] = set(self.nodes)
        # accounting
        tiers = tuple(f"{d}:{t}" for d in SLO_DIMENSIONS for t in SLO_TIERS)
        self.recorder = Recorder(tiers=tiers)
        self.now_s = 0.0
        self._last_s = 0.0
        self._power: tuple[float, float, float] | None = None
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()

    # --- the loop --------------------------------------------------------------------------------

    def _push(self, at_s: float, kind: int, payload: Any = None) -> None:
        heapq.heappush(self._heap, (at_s, kind, next(self._seq), payload))

    def run(self) -> dict[str, Any]:
        started = self.wall_clock()
        duration = self.spec.duration_s
        for name in sorted(self.nodes):
            self._feed(NodeReport(name, True, (), 0.0), 0.0)
        self._observe_fleet(0.0)
        tick_s = getattr(self.policy, "tick_s", self.control.reactive_interval_s)
        t = 0.0
        while t < duration - 1e-9:
            self._push(t, DECIDE)
            if not math.isfinite(tick_s) or tick_s <= 0:
                break  # a policy that decides once (static)
            t += tick_s
        for k in range(self.arrivals.steps):
            self._push(k * self.spec.step_s, STEP, k)
        for fault in self.spec.faults:
            self._push(fault.at_s, FAULT, fault)
        if self.telemetry:
            t = TELEMETRY_INTERVAL_S
            while t < duration - 1e-9:
                self._push(t, OBSERVE)
                t += TELEMETRY_INTERVAL_S
        while self._heap:
            at_s, kind, _, payload = heapq.heappop(self._heap)
            if at_s >= duration:
                break
            self._advance(at_s)
            if kind == TIMER:
                self._on_timer(payload, at_s)
            elif kind == DECIDE:
                self._decide(at_s)
            elif kind == FAULT:
                self._fault(payload, at_s)
            elif kind == OBSERVE:
                self._observe_fleet(at_s)
            else:
                self._step(payload, at_s)
        self._advance(duration)
        judged = self._finish_requests(duration) if self.requests_judge is not None else {
            "judge": "fluid", "dropped": float(sum(self.recorder.arrivals) - sum(self.recorder.served))}
        wall_s = self.wall_clock() - started
        extra = {
            "duration_s": duration,
            "nodes": len(self.nodes),
            "devices": dict(sorted(self.devices_total.items())),
            "components_started": self.agents.starts,
            "components_stopped": self.agents.stops,
            "starts_refused": self.agents.refused,
            "epoch_s": _finite(getattr(self.policy, "epoch_s", None)),  # None: plans once
            "tick_s": _finite(tick_s),
            **judged,
        }
        if self.spec.faults:
            extra["fault_reactions"] = [r.view() for r in self.reactions]
            extra["throttled_gpu_minutes"] = self.throttled_gpu_s / 60.0
        return self.recorder.report(scenario=self.scenario.name, policy=getattr(self.policy, "name", "?"),
                                    seed=self.spec.seed, sim_wall_s=wall_s, extra=extra)

    # --- energy, GPU-hours and cost ----------------------------------------------------------------

    def _advance(self, to_s: float) -> None:
        if self.requests_judge is not None:
            self.requests_judge.advance(to_s)
        dt = to_s - self._last_s
        if dt > 0:
            alloc_w, fleet_w, cost_per_s = self._power_now()
            self.recorder.energy_j += alloc_w * dt
            self.recorder.fleet_energy_j += fleet_w * dt
            self.recorder.gpu_seconds += len(self.gpu_holders) * dt
            for hardware, held in self.gpus_held.items():
                if held:
                    self.recorder.gpu_seconds_by_hardware[hardware] = \
                        self.recorder.gpu_seconds_by_hardware.get(hardware, 0.0) + held * dt
            self.recorder.cost_usd += cost_per_s * dt
        self._last_s = max(self._last_s, to_s)
        self.now_s = to_s

    def _device_busy_w(self, hardware: str, utilization: float, cap_w: float | None,
                       memory_bound_share: float) -> float:
        """Power of one GPU while it serves (at the executor's utilization and bandwidth-bound share, under its
        cap), steady temperature."""
        spec = GPU_SPECS[hardware]
        limit_w = spec.power_limit_default_w if cap_w is None else cap_w
        key = (hardware, round(utilization, 4), limit_w, round(memory_bound_share, 4))
        if key not in self._point_cache:
            ambient = self.spec.cluster.ambient_c
            first = operating_point(spec, utilization, limit_w, ambient, memory_bound_share)
            steady_c = ambient + first.power_w * spec.thermal_resistance_k_per_w
            self._point_cache[key] = operating_point(spec, utilization, limit_w, steady_c, memory_bound_share).power_w
        return self._point_cache[key]

    def _busy_w(self, config: InstanceConfig, exe: Any) -> float:
        """Power of a busy instance's GPUs (all ``tp`` of them): the request judge's model when it judges (its
        roofline's bandwidth-bound share at full activity), else the fluid model's (the executor's catalog
        utilization and share), both through the GPU's DVFS model under the instance's cap."""
        if self.requests_judge is not None:
            found = self.requests_judge.config_busy_power_w(config)
            if found is not None:
                return found
        u_exec, share = gpu_activity(exe)
        return config.tp * self._device_busy_w(config.hardware, u_exec, config.power_cap_w, share)

    def _sync_judge(self, now_s: float) -> None:
        if self.requests_judge is not None:
            self.requests_judge.sync(now_s, ((c.component_id, c.config, c.node, tuple(c.device_indexes), c.state)
                                             for c in self.agents.live()))

    def _instance_perf(self, config: InstanceConfig) -> Any:
        if config not in self._perf_cache:
            exe = self.scenario.catalog[config.executor]
            self._perf_cache[config] = self.perf.perf(exe, config, exe.knob_defaults(), 1.0)
        return self._perf_cache[config]

    def _power_now(self) -> tuple[float, float, float]:
        """(allocated W, fleet W, USD per second) for the present components and pool occupancy."""
        if self._power is not None:
            return self._power
        alloc_w = 0.0
        gpu_dynamic_w = 0.0
        cpu_dynamic_w = 0.0
        cost_per_h = 0.0
        for (config, state), count in self.groups.items():
            if count <= 0:
                continue
            hw = self.hardware[config.hardware]
            exe = self.scenario.catalog[config.executor]
            if hw.kind == "gpu":
                idle_w = config.tp * hw.instance_idle_power_w  # an engine holds a CUDA context
                if state == "ready":
                    rho = self.utilization.get(config, 0.0)
                    busy_w = self._busy_w(config, exe)
                    instance_w = (1.0 - rho) * idle_w + rho * busy_w
                else:
                    instance_w = idle_w  # loading weights or draining: counted at idle
                alloc_w += count * instance_w
                gpu_dynamic_w += count * (instance_w - config.tp * hw.idle_power_w)  # above the fleet's idle
                cost_per_h += count * config.tp * hw.price_per_hour_usd
            else:
                perf = self._instance_perf(config)
                idle_w = perf.idle_power_w if perf is not None else 0.0
                busy_w = perf.busy_power_w if perf is not None else 0.0
                rho = self.utilization.get(config, 0.0) if state == "ready" else 0.0
                instance_w = idle_w + rho * (busy_w - idle_w)
                alloc_w += count * instance_w
                cpu_dynamic_w += count * (instance_w - idle_w)
                share = min(1.0, exe.resources.cpu_cores / hw.cores) if hw.cores > 0 else 1.0
                cost_per_h += count * share * hw.price_per_hour_usd
        alloc_w -= self.shared_idle_w  # a shared GPU idles once; its components add their dynamic power
        fleet_w = gpu_dynamic_w + cpu_dynamic_w - self.shared_context_w  # a shared GPU holds its contexts' idle once
        for name, count in self.devices_total.items():
            hw = self.hardware[name]
            fleet_w += count * hw.idle_power_w
        self._power = (alloc_w, fleet_w, cost_per_h / 3600.0)
        return self._power

    def _track(self, comp: SimComponent, old_state: str | None, new_state: str | None,
               old_config: InstanceConfig | None = None) -> None:
        """Keep the (config, state) counts and the held GPUs in step with a component change."""
        if old_state is not None:
            self.groups[(old_config or comp.config, old_state)] -= 1
        if new_state is not None:
            self.groups[(comp.config, new_state)] += 1
        hw = self.hardware[comp.config.hardware]
        if hw.kind == "gpu" and old_state is None and new_state is not None:
            for index in comp.device_indexes:
                self.gpu_holders[(comp.node, index)] += 1
                if self.gpu_holders[(comp.node, index)] == 1:
                    self.gpus_held[comp.config.hardware] += 1
                if self.gpu_holders[(comp.node, index)] >= 2:
                    self.shared_idle_w += hw.instance_idle_power_w
                    self.shared_context_w += hw.instance_idle_power_w - hw.idle_power_w
        if hw.kind == "gpu" and new_state is None and old_state is not None:
            for index in comp.device_indexes:
                key = (comp.node, index)
                if self.gpu_holders[key] >= 2:
                    self.shared_idle_w -= hw.instance_idle_power_w
                    self.shared_context_w -= hw.instance_idle_power_w - hw.idle_power_w
                self.gpu_holders[key] -= 1
                if self.gpu_holders[key] <= 0:
                    del self.gpu_holders[key]
                    self.gpus_held[comp.config.hardware] -= 1
        self._power = None
        self._dirty_nodes.add(comp.node)

    # --- the reconciler and the agents ------------------------------------------------------------

    def _feed(self, event: Any, now_s: float) -> None:
        """Hand an event to the reconciler and carry out its commands until it has nothing more to say."""
        queue = [event]
        while queue:
            actions = self.reconciler.handle(queue.pop(0))
            changed: list[str] = []
            for action in actions:
                if isinstance(action, SendStart):
                    ok, message = self._start(action, now_s)
                elif isinstance(action, SendStop):
                    ok, message = self._stop(action, now_s)
                else:
                    raise TypeError(f"the simulated agents cannot carry out {type(action).__name__}")
                queue.append(CommandDone(action.command_id, ok, message, now_s))
                if ok and action.node not in changed:
                    changed.append(action.node)
            for node in changed:
                queue.append(NodeReport(node, True, self.agents.reports(node), now_s))
        self._sync_judge(now_s)

    def _start(self, action: SendStart, now_s: float) -> tuple[bool, str]:
        if action.node in self.down:
            return False, f"node {action.node} is down"
        exe = self.scenario.catalog.get(action.executor)
        if exe is None:
            return False, f"unknown executor {action.executor!r}"
        placed = self.desired.get(action.component_id)
        cap = placed.power_limit_w if placed is not None and placed.node == action.node else None
        node = self.nodes[action.node]
        config = config_of(PlacedComponent(action.component_id, action.executor, action.node,
                                           action.device_indexes, cap), node, exe)
        perf = self._instance_perf(config)
        if perf is not None:
            memory = perf.memory_bytes_per_device
        else:
            memory = math.ceil(max(exe.resources.gpu_memory_bytes, exe.sim.memory_bytes if exe.sim else 0)
                               / max(1, len(action.device_indexes)))
        if self.first_plan and self.control.warm_start:
            delay = 0.0
        elif self.requests_judge is not None:
            delay = self.requests_judge.cold_start_s(exe, node.hardware, self.spec.control.startup.tool_s)
        else:
            delay = startup_s(self.spec, exe)
        ok, message, timer = self.agents.start(action.node, action.component_id, exe, action.device_indexes, config,
                                               memory, now_s, delay)
        if timer is not None:
            self._track(self.agents.components[action.node][action.component_id], None, "starting")
            self._push(timer.at_s, TIMER, timer)
        return ok, message

    def _stop(self, action: SendStop, now_s: float) -> tuple[bool, str]:
        comp = self.agents.components.get(action.node, {}).get(action.component_id)
        old = comp.state if comp is not None else None
        ok, message, timer = self.agents.stop(action.node, action.component_id, now_s, self.control.drain_s)
        if timer is not None and comp is not None:
            self._track(comp, old, "draining")
            self._push(timer.at_s, TIMER, timer)
        return ok, message

    def _on_timer(self, timer: Timer, now_s: float) -> None:
        comp = self.agents.components.get(timer.node, {}).get(timer.component_id)
        old = comp.state if comp is not None else None
        if not self.agents.fire(timer, now_s):
            return
        self._track(comp, old, "ready" if timer.kind == "ready" else None)  # type: ignore[arg-type]
        self._sync_judge(now_s)
        self._feed(NodeReport(timer.node, True, self.agents.reports(timer.node), now_s), now_s)
        self._components_changed(timer.node, now_s)

    # --- decisions ---------------------------------------------------------------------------------

    def _observed(self, now_s: float) -> dict[Demand, float]:
        """Arrival rate per demand over the steps since the last decision (at time 0: the current rate)."""
        if not self.window_steps:
            return {d: float(r) for d, r in zip(self.arrivals.demands, self.arrivals.expected_rps[0])}
        counts = self.arrivals.counts[self.window_steps].sum(axis=0)
        width_s = max(now_s - self.window_start_s, self.spec.step_s)
        return {d: float(c) / width_s for d, c in zip(self.arrivals.demands, counts)}

    def _instances_now(self) -> dict[InstanceConfig, int]:
        counts: Counter[InstanceConfig] = Counter()
        for comp in self.plan:
            live = self.agents.components.get(comp.node, {}).get(comp.component_id)
            if live is not None and live.state in ("starting", "ready"):
                counts[live.config] += 1
        return dict(counts)

    def _observe_fleet(self, now_s: float) -> None:
        if self.telemetry:
            self._count_throttled(now_s)
            self._measured_w = self._device_power_w()
            self.thermals.advance(now_s, self._measured_w, {n.name: n.hardware for n in self.nodes.values()})
        self._carry_out(self.autopilot.handle(FleetObserved(now_s, tuple(self._node_states()), self.hardware,
                                                            dict(self.devices_total))), now_s)

    def _decide(self, now_s: float) -> None:
        self._feed(Tick(now_s), now_s)
        self._observe_fleet(now_s)
        observed = self._observed(now_s)
        utilization = {c: float(np.mean(v)) for c, v in self.window_util.items() if v}
        started = self.wall_clock()
        self._solve_wall_s = 0.0
        self._decided = None
        actions = self.autopilot.handle(LoadObserved(now_s, observed, utilization, self._instances_now(),
                                                     dict(self.peak_rates)))
        self.window_steps = []
        self.window_util = {}
        self.window_start_s = now_s
        self.recorder.decisions += 1
        self._carry_out(actions, now_s)
        if self._decided is not None:
            kind, changed = self._decided
            total = self.wall_clock() - started
            self.recorder.timing(kind, total, max(0.0, total - self._solve_wall_s))
            if changed:
                self.recorder.plan_changes += 1

    def _carry_out(self, actions: list[Any], now_s: float) -> None:
        """Do what the autopilot says: solve its MILPs inline, hand its components to the reconciler,
        route by its active plan, and record its notes. Power limits and routing weights from heat and
        budget reactions are not modeled here (the simulated fleet reports no telemetry to react to)."""
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, Solve):
                solve_started = self.wall_clock()
                solution = optimize(action.problem)
                self._solve_wall_s += self.wall_clock() - solve_started
                queue.extend(self.autopilot.handle(Solved(action.request_id, solution, now_s)))
            elif isinstance(action, DesiredChanged):
                self._desire(action, now_s)
            elif isinstance(action, RoutingChanged):
                if action.active is not self.active:
                    switched = self.active is not None and self.rollout_pending
                    self.active = action.active
                    self.routes = None
                    if self.requests_judge is not None:
                        self.requests_judge.set_routes(action.active)
                    if switched:
                        self.window_util = {}
                        self.recorder.switches += 1
                self.rollout_pending = self.autopilot.rollout.pending is not None
            elif isinstance(action, PowerLimitsChanged):
                self._apply_limits(action.limits)
            elif isinstance(action, Note):
                self._note(action)

    def _note(self, note: Note) -> None:
        for reaction in self.reactions:
            if reaction.reacted_s is None and matches(reaction, note.kind, note.subject):
                reaction.reacted_s, reaction.reaction = note.now_s, note.kind
        if note.kind not in ("plan", "reactive", "replace", "plan-refused", "rollout-switched"):  # counted apart
            self.recorder.event(note.now_s, f"autopilot {note.kind}", {"subject": note.subject, "reason": note.reason})
        if note.kind in ("plan", "reactive", "replace"):
            kind = "reactive" if note.kind == "reactive" else "plan"
            if note.kind == "plan":
                status = str(note.details.get("status", "?"))
                self.recorder.plan_statuses[status] = self.recorder.plan_statuses.get(status, 0) + 1
            if "unplaced" in note.details:
                self.recorder.event(note.now_s, "unplaced", dict(note.details["unplaced"]))
            changed = bool(note.details.get("changed")) or bool(note.details.get("routing_changed"))
            previous = self._decided[1] if self._decided is not None else False
            self._decided = (kind, changed or previous)
        elif note.kind == "plan-refused":
            self.recorder.plan_statuses[str(note.details.get("status", "?"))] = \
                self.recorder.plan_statuses.get(str(note.details.get("status", "?")), 0) + 1
            self.recorder.event(note.now_s, "plan refused", {"status": note.details.get("status"),
                                                             "reason": note.reason})
            self._decided = ("plan", False)

    def _desire(self, action: DesiredChanged, now_s: float) -> None:
        desired = {c.component_id: c for c in action.components}
        self.plan = self.autopilot.rollout.plan
        if desired != self.desired:
            self.desired = desired
            if self.agents.recap(desired) | self._recap_reactions():
                self._regroup()
                self._sync_judge(now_s)
            self._feed(DesiredChanged_(tuple(sorted(desired.values(), key=lambda c: c.component_id)), now_s), now_s)
        self.first_plan = False

    def _node_states(self) -> list[NodeState]:
        """What placement sees: devices with the memory live components hold and the caps set on them.

        Telemetry (temperature, power) is left out unless the scenario has faults (``faults``): placement
        then predicts temperatures from its thermal model at the planned power, which is what the
        simulated devices settle at.
        """
        if self.telemetry:
            self._dirty_nodes |= set(self.nodes)
        for name in self._dirty_nodes:
            node = self.nodes[name]
            labels = {"rack": node.rack} if node.rack else {}
            if node.hardware == "cpu":
                devices = (DeviceState(index=0, kind="cpu", model="CPU (simulated)", hardware="cpu", simulated=True,
                                       memory_total_bytes=node.memory_bytes),)
            else:
                spec = GPU_SPECS[node.hardware]
                total = self.agents.device_memory_bytes.get(node.hardware, spec.memory_total_bytes)
                devices = tuple(
                    DeviceState(index=i, kind="gpu", model=f"{spec.name} (simulated)", hardware=node.hardware,
                                simulated=True, memory_total_bytes=total,
                                memory_used_bytes=min(total, self.agents.memory_used_bytes(name, i)),
                                power_limit_w=self.agents.power_limits_w.get((name, i), spec.power_limit_default_w),
                                power_limit_min_w=spec.power_limit_min_w, power_limit_max_w=spec.tdp_w,
                                power_limit_default_w=spec.power_limit_default_w, **self._telemetry_of(name, i))
                    for i in range(node.devices))
            down = name in self.down
            self._node_state_cache[name] = NodeState(name=name, schedulable=not down, devices=devices,
                                                     cpu_cores=node.cpu_cores, memory_total_bytes=node.memory_bytes,
                                                     labels=labels, liveness="lost" if down else "ready")
        self._dirty_nodes.clear()
        return [self._node_state_cache[n] for n in sorted(self.nodes)]

    # --- faults and telemetry ------------------------------------------------------------------------

    def _fault(self, fault: Any, now_s: float) -> None:
        self.recorder.event(now_s, f"fault {fault.kind}", fault.model_dump(exclude_none=True))
        subjects = frozenset(f"{n.name}/gpu{i}" for n in self.nodes.values() if fault.rack is not None
                             and n.rack == fault.rack and n.hardware != "cpu" for i in range(n.devices)) \
            if fault.kind.startswith("cooling") else frozenset()
        self.reactions.append(Reaction(fault.model_dump(exclude_none=True), now_s, subjects=subjects))
        if fault.kind == "node-failure":
            self.down.add(fault.node)
            for comp in list(self.agents.components.get(fault.node, {}).values()):
                self._track(comp, comp.state, None)
            self.agents.components.pop(fault.node, None)
            for key in [k for k in self.agents.power_limits_w if k[0] == fault.node]:
                del self.agents.power_limits_w[key]
            self._dirty_nodes.add(fault.node)
            self._feed(NodeReport(fault.node, False, (), now_s), now_s)
            self._components_changed(fault.node, now_s)
        elif fault.kind == "node-recovery":
            self.down.discard(fault.node)
            self._dirty_nodes.add(fault.node)
            self._feed(NodeReport(fault.node, True, (), now_s), now_s)
        elif fault.kind in ("cooling-failure", "cooling-restored"):
            devices = [(fault.node, fault.device)] if fault.rack is None else [
                (n.name, i) for n in self.nodes.values() if n.rack == fault.rack and n.hardware != "cpu"
                for i in range(n.devices)]
            for key in devices:
                if fault.kind == "cooling-failure":
                    self.thermals.cooling_failed.add(key)
                else:
                    self.thermals.cooling_failed.discard(key)
        else:
            self._carry_out(self.autopilot.handle(BudgetSet(now_s, fault.rack, fault.power_budget_w, "scenario")),
                            now_s)
        self._sync_judge(now_s)
        self._observe_fleet(now_s)

    def _device_power_w(self) -> dict[tuple[str, int], float]:
        """What each GPU draws now under the model: idle, or its components' share at their pool's occupancy."""
        power: dict[tuple[str, int], float] = {}
        for node in self.nodes.values():
            if node.hardware != "cpu" and node.name not in self.down:
                for i in range(node.devices):
                    power[(node.name, i)] = self.hardware[node.hardware].idle_power_w
        for comp in self.agents.live():
            hw = self.hardware[comp.config.hardware]
            if hw.kind != "gpu" or comp.node in self.down:
                continue
            exe = self.scenario.catalog[comp.config.executor]
            rho = self.utilization.get(comp.config, 0.0) if comp.state == "ready" else 0.0
            busy_w = self._busy_w(comp.config, exe) / comp.config.tp
            for index in comp.device_indexes:
                key = (comp.node, index)
                base = power.get(key, hw.idle_power_w)
                power[key] = max(base, hw.instance_idle_power_w) + rho * (busy_w - hw.instance_idle_power_w)
        return power

    def _count_throttled(self, now_s: float) -> None:
        """GPU-seconds spent above the thermal slowdown thresholds since the last reading (for the report)."""
        dt = now_s - self._throttle_seen_s
        self._throttle_seen_s = now_s
        if dt <= 0:
            return
        for (node, index) in self.thermals.temperature_c:
            if node not in self.down and self.thermals.reasons((node, index), self.nodes[node].hardware):
                self.throttled_gpu_s += dt

    def _telemetry_of(self, node: str, index: int) -> dict[str, Any]:
        if not self.telemetry or node in self.down:
            return {}
        key = (node, index)
        hardware = self.nodes[node].hardware
        return {"temperature_c": self.thermals.temperature_c.get(key), "power_w": self._measured_w.get(key),
                "throttle_reasons": self.thermals.reasons(key, hardware)}

    def _apply_limits(self, limits: Mapping[tuple[str, int], float]) -> None:
        """Limits the autopilot lowered below what a device's components were planned at (heat, budgets)."""
        lowered: dict[tuple[str, int], float] = {}
        for comp in self.agents.live():
            planned = self.desired.get(comp.component_id)
            for index in comp.device_indexes:
                key = (comp.node, index)
                limit = limits.get(key)
                spec = GPU_SPECS.get(comp.config.hardware)
                cap = planned.power_limit_w if planned is not None and planned.power_limit_w else (
                    spec.power_limit_default_w if spec else None)
                if limit is not None and cap is not None and limit < cap - 0.5:
                    lowered[key] = limit
        if lowered != self.reaction_limits:
            self.reaction_limits = lowered
            self.agents.recap(self.desired)
            self._recap_reactions()
            self._regroup()
            self._sync_judge(self.now_s)

    def _recap_reactions(self) -> int:
        """Components on devices with a lowered limit run at it (what SetPowerLimit does on a real agent)."""
        moved = 0
        for comp in self.agents.live():
            limits = [self.reaction_limits[(comp.node, i)] for i in comp.device_indexes
                      if (comp.node, i) in self.reaction_limits]
            if limits and comp.state != "draining":
                comp.config = replace(comp.config, power_cap_w=min(limits))
                self.agents.set_caps(comp.node, comp.device_indexes, min(limits))
                moved += 1
        return moved

    def _regroup(self) -> None:
        """Rebuild the (config, state) counts after caps moved in place."""
        self.groups = Counter()
        for comp in self.agents.live():
            self.groups[(comp.config, comp.state)] += 1
        self._power = None
        self._dirty_nodes |= set(self.agents.components)

    def _components_changed(self, node: str, now_s: float) -> None:
        """Tell the autopilot what a node runs now (a rollout switches when its new components are ready)."""
        states = {c.component_id: c.state for c in self.agents.components.get(node, {}).values()}
        self._carry_out(self.autopilot.handle(ComponentsObserved(now_s, {node: states})), now_s)

    # --- service -----------------------------------------------------------------------------------

    def _sharing(self) -> list[tuple[InstanceConfig, ...]]:
        """Configs of the ready components on each set of GPUs that several of them share."""
        if self.shared_idle_w <= 0:
            return []
        on_device: dict[tuple[str, int], list[SimComponent]] = {}
        for comp in self.agents.live():
            if comp.state == "ready" and self.hardware[comp.config.hardware].kind == "gpu":
                for index in comp.device_indexes:
                    on_device.setdefault((comp.node, index), []).append(comp)
        tenant_sets = {tuple(sorted(c.component_id for c in comps)): comps
                       for comps in on_device.values() if len(comps) >= 2}
        return [tuple(c.config for c in comps) for _, comps in sorted(tenant_sets.items())]

    def _step(self, k: int, now_s: float) -> None:
        self._carry_out(self.autopilot.handle(AutopilotTick(now_s)), now_s)  # a rollout that waited too long ends
        if self.requests_judge is not None:
            self._step_requests(k, now_s)
            return
        width_s = min(self.spec.step_s, self.spec.duration_s - now_s)
        counts = self.arrivals.counts[k]
        if self.routes is None and self.active is not None:
            self.routes = RouteTable.build(self.active, self.judge)
        ready = {config: n for (config, state), n in self.groups.items() if state == "ready" and n > 0}
        outcome: StepOutcome = self.service.evaluate(self.routes, self.arrivals.demands, counts, width_s, ready,
                                                     merge_caps=self.rollout_pending or bool(self.reaction_limits),
                                                     shared=self._sharing())
        self.utilization = outcome.utilization
        self._power = None
        # What the policies see (like Kubernetes' HPA): offered load over the slots of every instance
        # of a routed pool, starting ones included (they count as idle until ready). Pools of a plan
        # being rolled out have no reading until routing switches to it (and the window restarts then),
        # so no scaler resizes them on load that the old routing still carries.
        routed = self.routes.pools_used() if self.routes is not None else []
        pending = self.autopilot.rollout.pending
        rolling = set(pending.solution.instances) if pending is not None else set()
        for config in routed:
            if config in rolling:
                continue  # its load still follows the old routing; a reading would mislead the scaler
            n = self.groups.get((config, "ready"), 0) + self.groups.get((config, "starting"), 0)
            if n > 0:
                erlangs = outcome.offered_erlangs.get(config, 0.0)
                rho = min(erlangs / (n * self.judge.slots(config)), MAX_REPORTED_UTILIZATION)
                self.window_util.setdefault(config, []).append(rho)
        self.window_steps.append(k)
        load: dict[str, float] = {}
        for demand, n in zip(self.arrivals.demands, counts):
            load[demand.workflow] = load.get(demand.workflow, 0.0) + float(n) / width_s
        for label, (arrived, served, met) in outcome.per_tier.items():
            self.recorder.tier(label, arrived, served, met)
        gpus_ready = sum(n * c.tp for (c, s), n in self.groups.items()
                         if s == "ready" and self.hardware[c.hardware].kind == "gpu")
        alloc_w, fleet_w, _ = self._power_now()
        self.recorder.step(now_s, float(counts.sum()), outcome.served, outcome.met, len(self.gpu_holders), gpus_ready,
                           alloc_w, fleet_w, load)


__all__ = ["Simulator", "tier_label"]
