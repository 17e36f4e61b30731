"""The autopilot: one sans-I/O policy engine that the controller daemon and the cluster simulator both run.

Events in (``policies.autopilot.events``): the fleet with its telemetry, load windows, inputs,
solved MILPs, component states, budgets, pins, ticks. Actions out: MILPs to solve, the desired
components with the plan jobs are admitted with, routing, power limits, and a ``Note`` for every
decision. Its parts:

- the planning core (``policies.autopilot.planning``): forecast, MILP, reactive scaling and cap lifting,
  in one of three presets (``static``, ``murakkab-epoch``, ``murakkab``: ``build_planning``);
- placement (``policies.placement``) of each new solution onto the fleet, around evacuated (hot) GPUs,
  pinned power limits, rack budgets, the avoid list and the executors that live jobs still use;
- rollouts (``policies.autopilot.rollout``): moves are made before the old components break;
- reactions in seconds (``policies.autopilot.reactions``): heat, power budgets, pins; a node that is lost
  or drained has its components placed elsewhere at once, not at the next epoch.

The clock is whatever ``now_s`` the events carry: wall time under the daemon, virtual time in the
simulator, a fake clock in tests. The MILP runs outside (``Solve`` -> ``Solved``) so a shell can put it
on a worker thread; the simulator and tests solve inline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from policies.autopilot.events import (
    Action, BudgetSet, ComponentsObserved, CoolingSet, DesiredChanged, Event, FleetObserved, GridSet, InputsChanged,
    LoadObserved, Note, PinCleared, PinSet, PowerLimitsChanged, Refused, RoutingChanged, Solve, Solved, Tick,
)
from policies.autopilot.explain import explain
from policies.autopilot.planning import ClusterState, Decision, PlanningPolicy, SolveNeeded
from policies.autopilot.reactions import COOLING_STATES, ReactionConfig, Reactions, budget_error
from policies.autopilot.rollout import Rollout
from policies.model import HardwareType, InstanceConfig, Solution
from policies.placement import NodeState, PlacementLimits, PlacementResult, component_config, place
from policies.plan import SLO_TIERS, Demand, PlacedComponent, Plan

PRESETS = ("static", "murakkab-epoch", "murakkab")


@dataclass(frozen=True)
class AutopilotConfig:
    """How the engine around the planning core behaves (the core has its own settings)."""

    preset: str = "murakkab"  # the planning core's name as ``plan show`` reports it (PRESETS when built by name)
    switch_timeout_s: float = 600.0  # a replacement not ready by then is abandoned
    reactions: ReactionConfig = field(default_factory=ReactionConfig)  # heat=False for the paper's baselines
    limits: PlacementLimits = field(default_factory=PlacementLimits)
    warm_floor_rps: float | None = None  # plan wanted demands for at least this rate (a live daemon keeps warm pools)
    cluster_power_budget_w: float | None = None
    rack_power_budget_w: Mapping[str, float] = field(default_factory=dict)
    # Grid signals in the objective: the energy objective then weighs instance prices against energy at the
    # grid's price plus carbon at this price per tonne (off: grid messages are recorded, plans ignore them).
    grid_objective: bool = False
    carbon_price_usd_per_tonne: float = 0.0
    grid_replan_change: float = 0.1  # replan when the weight moved by more than this share since the last plan

    def __post_init__(self) -> None:
        if self.warm_floor_rps is not None and not self.warm_floor_rps > 0:
            raise ValueError(f"warm_floor_rps must be positive, got {self.warm_floor_rps}")


class Autopilot:
    """Feed it events with ``handle``; carry out the actions it returns."""

    def __init__(self, config: AutopilotConfig, policy: PlanningPolicy) -> None:
        self.config = config
        self.policy = policy
        self.rollout = Rollout(config.switch_timeout_s)
        self.reactions = Reactions(config.reactions)
        self.nodes: tuple[NodeState, ...] = ()
        self._by_name: dict[str, NodeState] = {}
        self.hardware: dict[str, HardwareType] = {}
        self.devices_available: dict[str, int] = {}
        self.states: dict[str, dict[str, str]] = {}  # node -> component id -> state
        self.load: LoadObserved | None = None
        self.demands: tuple[Demand, ...] = ()
        self.keep_executors: frozenset[str] = frozenset()
        self.avoid: dict[tuple[str, str], str] = {}
        self.placement: PlacementResult | None = None
        self.power_limits: dict[tuple[str, int], float] = {}
        self.weights: dict[str, float] = {}
        self.plan = Plan(choices={}, components=())
        self.explanation: dict[str, Any] = {"planner": config.preset, "status": "no plan yet"}
        self.solving: int | None = None  # the Solve in flight
        self._next_request = 0
        self._fleet_key: tuple[Any, ...] | None = None
        self._solve_due: str | None = None  # a MILP asked for while another was in flight
        self._solve_reason = ""
        self._changed_workflows: set[str] = set()  # redefined since the routed plan: admitted with the newest plan
        self._dirty = False  # something limits or weights depend on changed since they were last emitted
        self.solve_seconds: list[float] = []
        self.grid: tuple[float, float] | None = None  # the latest (USD/MWh, g CO2/kWh) from the facility
        if config.carbon_price_usd_per_tonne < 0 or not 0 <= config.grid_replan_change < 1:
            raise ValueError("carbon_price_usd_per_tonne must be >= 0 and grid_replan_change within [0, 1)")
        for rack, watts in config.rack_power_budget_w.items():
            self.reactions.set_budget(rack, watts, "config")
        if config.cluster_power_budget_w is not None:
            self.reactions.set_budget(None, config.cluster_power_budget_w, "config")
        self._budgets_to_planning()

    # --- the one entry point --------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        out: list[Action] = []
        match event:
            case FleetObserved():
                self._fleet(event, out)
            case LoadObserved():
                self.load = event
                self._step(event.now_s, out)
            case InputsChanged():
                self._inputs(event, out)
            case Solved():
                self._solved(event, out)
            case ComponentsObserved():
                self._components(event, out)
            case BudgetSet():
                self._budget(event, out)
            case PinSet() | PinCleared():
                self._pin(event, out)
            case CoolingSet():
                self._cooling(event, out)
            case GridSet():
                self._grid(event, out)
            case Tick():
                self._switch(event.now_s, out)
            case _:
                raise TypeError(f"the autopilot takes no {type(event).__name__}")
        if self._dirty:  # limits and weights follow placement, reactions, pins and component states only
            self._dirty = False
            self._emit_limits_and_weights(out)
        return out

    # --- events -------------------------------------------------------------------------------------

    def _fleet(self, ev: FleetObserved, out: list[Action]) -> None:
        before = self._fleet_key
        self.nodes, self.hardware = tuple(ev.nodes), dict(ev.hardware)
        self._by_name = {n.name: n for n in self.nodes}
        self.devices_available = dict(ev.devices_available)
        self._fleet_key = tuple(sorted((n.name, n.schedulable, n.liveness, n.admin,
                                        tuple((d.index, d.hardware, d.health) for d in n.devices),
                                        tuple(sorted(n.labels.items()))) for n in self.nodes))
        live = {n.name for n in self.nodes if n.liveness == "ready"}
        for name in [n for n in self.states if n not in live]:
            self.states[name] = {}
        evacuate = self._react(ev.now_s, out)
        if before is not None and before != self._fleet_key and self.policy.solution is not None:
            changed = self._fleet_change_text(before)
            self._replace(ev.now_s, f"fleet changed ({changed}): components placed again at once", out)
            self._ask_solve(ev.now_s, f"fleet changed ({changed})", out)
        elif evacuate and self.policy.solution is not None:
            self._replace(ev.now_s, f"heat: {', '.join(evacuate)}", out)

    def _react(self, now_s: float, out: list[Action]) -> list[str]:
        """Heat and budget control loops on the latest fleet; returns the GPUs whose evacuation started or ended."""
        if not (self.config.reactions.heat or self.reactions.budgets or self.reactions.cooling):
            return []
        self._dirty = True
        notes = self.reactions.observe(now_s, self.nodes, self._cut_rank(), self.config.limits.rack_label)
        evacuate = []
        for note in notes:
            out.append(Note(now_s, note.kind, note.subject, note.reason, dict(note.details)))
            if note.kind in ("heat-migrate", "heat-cleared"):
                evacuate.append(note.subject)
        return evacuate

    def _fleet_change_text(self, before: tuple[Any, ...]) -> str:
        old = {entry[0]: entry for entry in before}
        new = {entry[0]: entry for entry in self._fleet_key or ()}
        parts = [f"{n} joined" for n in sorted(set(new) - set(old))]
        parts += [f"{n} left" for n in sorted(set(old) - set(new))]
        for name in sorted(set(old) & set(new)):
            if old[name] != new[name]:
                _, schedulable, liveness, admin, *_ = new[name]
                parts.append(f"{name} {liveness}/{admin}")
        return ", ".join(parts[:8]) + (" ..." if len(parts) > 8 else "") or "devices"

    def _inputs(self, ev: InputsChanged, out: list[Action]) -> None:
        inputs = self.policy.inputs
        if ev.workflows is not None:
            old = inputs.workflows
            self._changed_workflows |= {name for name, spec in ev.workflows.items()
                                        if name in old and _spec_key(old[name]) != _spec_key(spec)}
            inputs = replace(inputs, workflows=dict(ev.workflows))
        if ev.catalog is not None:
            inputs = replace(inputs, catalog=dict(ev.catalog))
        if ev.perf is not None:
            inputs = replace(inputs, perf=ev.perf)
        self.policy.inputs = inputs
        if ev.demands is not None:
            self.demands = tuple(ev.demands)
            if self.config.warm_floor_rps is not None:
                self.policy.floor_rps = {d: self.config.warm_floor_rps for d in self.demands}
        if ev.keep_executors is not None:
            self.keep_executors = frozenset(ev.keep_executors)
        if ev.avoid is not None and dict(ev.avoid) != self.avoid:
            self.avoid = dict(ev.avoid)
            if self.policy.solution is not None:
                self._replace(ev.now_s, "the avoid list changed", out)
        if ev.replan:
            self._ask_solve(ev.now_s, "inputs changed", out)

    def _step(self, now_s: float, out: list[Action]) -> None:
        assert self.load is not None
        outcome = self.policy.step(now_s, dict(self.load.arrival_rates_rps), self._state())
        if isinstance(outcome, SolveNeeded):
            self._request(now_s, outcome, out)
        elif isinstance(outcome, Decision):
            self._apply(outcome, now_s, "reactive" if "reactive" in outcome.reason.lower() else "plan", out)

    def _solved(self, ev: Solved, out: list[Action]) -> None:
        if ev.request_id != self.solving:
            out.append(Note(ev.now_s, "plan-stale", "plan", f"solve {ev.request_id} finished after a newer one "
                                                            "was asked for; dropped"))
            return
        self.solving = None
        self.solve_seconds = (self.solve_seconds + [ev.solution.solve_s])[-100:]
        refused = _refusal(ev.solution)
        if refused is not None:
            out.append(Note(ev.now_s, "plan-refused", "plan", refused, {"status": ev.solution.status}))
        else:
            decision = self.policy.adopt(ev.solution, self._solve_reason)
            self._apply(decision, ev.now_s, "plan", out)
        if self._solve_due is not None:
            why, self._solve_due = self._solve_due, None
            self._ask_solve(ev.now_s, why, out)

    def _components(self, ev: ComponentsObserved, out: list[Action]) -> None:
        for node, states in ev.states.items():
            self.states[node] = dict(states)
        self._dirty = True
        self._switch(ev.now_s, out)

    def _budget(self, ev: BudgetSet, out: list[Action]) -> None:
        label = self.config.limits.rack_label
        racks = {n.labels[label] for n in self.nodes if label in n.labels}
        racks |= {r for r in self.reactions.budgets if r is not None}  # a rack whose nodes all left can be cleared
        error = budget_error(ev.rack, ev.power_budget_w, racks)
        if error is not None:
            out.append(Refused("invalid_budget", error))
            return
        scope = "cluster" if ev.rack is None else f"rack {ev.rack}"
        self.reactions.set_budget(ev.rack, ev.power_budget_w, ev.source)
        self._budgets_to_planning()
        text = "cleared" if ev.power_budget_w is None else f"set to {ev.power_budget_w:g} W"
        out.append(Note(ev.now_s, "budget-set", scope, f"{ev.source}: budget {text}; caps follow within seconds, "
                                                       "the next plan is made within it"))
        if self.nodes:
            self._react(ev.now_s, out)  # caps follow on the latest telemetry, not at the next heartbeat
        self._ask_solve(ev.now_s, f"{scope} budget {text}", out)

    def _cooling(self, ev: CoolingSet, out: list[Action]) -> None:
        label = self.config.limits.rack_label
        racks = {n.labels[label] for n in self.nodes if label in n.labels} | set(self.reactions.cooling)
        if ev.state not in COOLING_STATES:
            out.append(Refused("invalid_cooling", f"cooling state {ev.state!r}: one of {', '.join(COOLING_STATES)}"))
            return
        if ev.rack not in racks:
            out.append(Refused("invalid_cooling", f"no node is in rack {ev.rack!r} (racks come from the node label "
                                                  f"{label!r}; known: {', '.join(sorted(racks)) or 'none'})"))
            return
        before = self.reactions.cooling.get(ev.rack)
        was_failed = before is not None and before.state == "failed"
        if not self.reactions.set_cooling(ev.now_s, ev.rack, ev.state, ev.inlet_c, ev.source):
            return  # the same state again (facilities repeat themselves): nothing new to do
        inlet = f", inlet {ev.inlet_c:g} C" if ev.inlet_c is not None else ""
        what = {"ok": "caps and placement back to normal",
                "degraded": "GPU caps lowered in the rack, new work shifted away from it",
                "failed": "GPU caps lowered, its components move out, the plan is made without its GPUs "
                          "(lowest tiers shed first where capacity runs short)"}[ev.state]
        out.append(Note(ev.now_s, "cooling", f"rack {ev.rack}", f"{ev.source}: cooling {ev.state}{inlet}: {what}",
                        {"state": ev.state, "inlet_c": ev.inlet_c}))
        self._dirty = True
        if self.nodes:
            self._react(ev.now_s, out)
        if (ev.state == "failed") != was_failed and self.policy.solution is not None:
            self._replace(ev.now_s, f"rack {ev.rack} cooling {ev.state}", out)
            self._ask_solve(ev.now_s, f"rack {ev.rack} cooling {ev.state}", out)

    def _grid(self, ev: GridSet, out: list[Action]) -> None:
        if not (math.isfinite(ev.price_usd_per_mwh) and math.isfinite(ev.carbon_g_per_kwh)
                and ev.price_usd_per_mwh >= 0 and ev.carbon_g_per_kwh >= 0):
            out.append(Refused("invalid_grid", "grid price and carbon intensity must be finite and not negative"))
            return
        self.grid = (ev.price_usd_per_mwh, ev.carbon_g_per_kwh)
        if not self.config.grid_objective:
            return
        # USD per MWh of energy, carbon priced in: g/kWh x USD/t = USD/MWh / 1000.
        effective = ev.price_usd_per_mwh + ev.carbon_g_per_kwh * self.config.carbon_price_usd_per_tonne / 1000.0
        weight = 1e6 / effective if effective > 0 else 0.0  # W per USD/h: 1 USD/h buys 1e6/price W of energy
        old = self.policy.inputs.price_weight_w
        if old > 0 and abs(weight - old) <= self.config.grid_replan_change * old:
            return
        self.policy.inputs = replace(self.policy.inputs, price_weight_w=weight)
        out.append(Note(ev.now_s, "grid", "cluster", (
            f"{ev.source}: energy at {ev.price_usd_per_mwh:g} USD/MWh and {ev.carbon_g_per_kwh:g} g CO2/kWh "
            f"({effective:.1f} USD/MWh with carbon): instance prices weigh {weight:.0f} W per USD/h in the plan"),
            {"price_usd_per_mwh": ev.price_usd_per_mwh, "carbon_g_per_kwh": ev.carbon_g_per_kwh,
             "price_weight_w": weight}))
        self._ask_solve(ev.now_s, "grid price changed", out)

    def _pin(self, ev: PinSet | PinCleared, out: list[Action]) -> None:
        key = (ev.node, ev.device_index)
        self._dirty = True
        if isinstance(ev, PinCleared):
            if key not in self.reactions.pins:
                pinned = ", ".join(f"{n}/{i}" for n, i in sorted(self.reactions.pins)) or "none"
                out.append(Refused("not_pinned", f"device {ev.device_index} on {ev.node} has no pinned power limit "
                                                 f"(pinned: {pinned})"))
                return
            del self.reactions.pins[key]
            out.append(Note(ev.now_s, "pin-cleared", f"{ev.node}/gpu{ev.device_index}",
                            "operator unpinned the power limit: the plan sets it again"))
            return
        self.reactions.pins[key] = float(ev.power_limit_w)
        hot = self.reactions.hot.get(key)
        if hot is not None:
            hot.cap_w = None  # the operator's limit stands, heat or not
        out.append(Note(ev.now_s, "pin", f"{ev.node}/gpu{ev.device_index}",
                        f"operator pinned the power limit at {ev.power_limit_w:g} W; the autopilot plans around it"))

    def adopt_running(self, components: tuple[PlacedComponent, ...]) -> None:
        """Components agents run that no plan placed (after a controller restart): until the first plan they
        count as current, so placement keeps them where they are instead of starting them again."""
        if self.rollout.first:
            for comp in components:
                self.rollout.desired.setdefault(comp.component_id, comp)

    # --- planning, placement and rollout --------------------------------------------------------

    def _state(self) -> ClusterState:
        load = self.load
        available = dict(self.devices_available)
        for rack in self.reactions.cooling.values():  # a rack whose cooling failed holds no plan
            if rack.state != "failed":
                continue
            for node_name, index in rack.devices:
                node = self._by_name.get(node_name)
                dev = next((d for d in node.devices if d.index == index), None) if node is not None else None
                if dev is not None and available.get(dev.hardware, 0) > 0:
                    available[dev.hardware] -= 1
        return ClusterState(hardware=dict(self.hardware), devices_available=available,
                            instances=dict(load.instances) if load else {},
                            utilization=dict(load.utilization) if load else {},
                            peak_rates=dict(load.peak_rates) if load and load.peak_rates is not None else None)

    def _ask_solve(self, now_s: float, why: str, out: list[Action]) -> None:
        """A MILP now (or, while one is in flight, right after it)."""
        if not self.hardware:
            return  # nothing to plan on yet
        if self.solving is not None:
            self._solve_due = why
            return
        outcome = self.policy.replan(self._state(), why)
        if isinstance(outcome, SolveNeeded):
            self._request(now_s, outcome, out)
        elif isinstance(outcome, Decision):
            self._apply(outcome, now_s, "plan", out)

    def _request(self, now_s: float, needed: SolveNeeded, out: list[Action]) -> None:
        if self.solving is not None:
            self._solve_due = needed.reason
            return
        self._next_request += 1
        self.solving = self._next_request
        self._solve_reason = needed.reason
        out.append(Solve(self.solving, needed.problem, needed.reason))

    def _apply(self, decision: Decision, now_s: float, kind: str, out: list[Action]) -> None:
        refused = _refusal(decision.solution)
        if refused is not None:
            out.append(Note(now_s, "plan-refused", "plan", refused, {"status": decision.solution.status}))
            return
        applied = self.rollout.apply(decision.solution, now_s, lambda current: self._place(decision.solution, current),
                                     self.config_of, self._live_ids(), self._node_live)
        self.placement = applied.result
        if self.rollout.pending is None and kind != "replace":
            self._changed_workflows.clear()  # routed at once: the active plan has the new definitions
        details: dict[str, Any] = {"status": decision.solution.status, "retained": applied.retained,
                                   "routing_changed": applied.routing_changed, "changed": applied.changed}
        if applied.result.unplaced:
            details["unplaced"] = {_config_text(c): f"{n}: {applied.result.reasons.get(c, '')}"
                                   for c, n in sorted(applied.result.unplaced.items(), key=lambda i: str(i[0]))}
        out.append(Note(now_s, kind, "plan", decision.reason, details))
        self._publish(now_s, decision.reason, out)

    def _replace(self, now_s: float, why: str, out: list[Action]) -> None:
        """Place the running solution again (a node left, a GPU got hot): no MILP, at once."""
        solution = self.policy.solution
        if solution is None:
            return
        self._apply(Decision(solution, why), now_s, "replace", out)

    def _switch(self, now_s: float, out: list[Action]) -> None:
        outcome = self.rollout.maybe_switch(now_s, self.states)
        if outcome is not None:
            kind, why = outcome
            if kind == "switched":
                self._changed_workflows.clear()
            out.append(Note(now_s, f"rollout-{kind}", "plan", why))
            self._publish(now_s, why, out)

    def _publish(self, now_s: float, why: str, out: list[Action]) -> None:
        self._dirty = True
        components = tuple(self.rollout.current())
        self.plan = self._admission_plan(components)
        out.append(DesiredChanged(components, self.plan, why))
        if self.rollout.active is not None:
            self.weights = self._weights(components)
            out.append(RoutingChanged(self.rollout.active, dict(self.weights), why))
        if self.placement is not None:
            self.explanation = explain(self.config.preset, self.rollout.active or self.policy.solution,
                                       self.placement, self._planned_rates(), self.plan.unsatisfiable,
                                       self.solve_seconds, self.reactions.budget_view(),
                                       self.rollout.pending is not None)

    def _place(self, solution: Solution, current: list[PlacedComponent]) -> PlacementResult:
        instances, kept_notes = self._with_live_job_instances(solution.instances, current)
        limits = replace(self.config.limits, avoid=dict(self.avoid), rack_power_budget_w={
            **self.config.limits.rack_power_budget_w,
            **{r: b.power_budget_w for r, b in self.reactions.budgets.items() if r is not None}})
        result = place(instances, self._placement_nodes(), self.policy.inputs.catalog, current, limits,
                       perf=self.policy.inputs.perf, hardware=self.hardware, colocate=solution.colocate)
        return replace(result, notes=tuple(kept_notes) + tuple(result.notes)) if kept_notes else result

    def _placement_nodes(self) -> list[NodeState]:
        """What placement sees: evacuated GPUs as unavailable, pinned limits as the limits they run at."""
        evacuated = self.reactions.evacuated()
        pins = self.reactions.pins
        if not evacuated and not pins:
            return list(self.nodes)
        nodes = []
        for node in self.nodes:
            devices = []
            for dev in node.devices:
                key = (node.name, dev.index)
                if key in evacuated:
                    dev = replace(dev, health="hot")
                if key in pins:  # it runs at the pin whatever the plan says; placement predicts power from it
                    dev = replace(dev, power_limit_w=pins[key])
                devices.append(dev)
            nodes.append(replace(node, devices=tuple(devices)))
        return nodes

    def _with_live_job_instances(self, instances: Mapping[InstanceConfig, int], current: list[PlacedComponent],
                                 ) -> tuple[dict[InstanceConfig, int], list[str]]:
        """The solution's instances plus, for executors unfinished jobs chose and the solution dropped (a
        workflow update), the instances of them that run now, in their present configuration."""
        result = dict(instances)
        chosen = {config.executor for config, n in instances.items() if n > 0}
        notes: list[str] = []
        for name in sorted(self.keep_executors - chosen):
            if name not in self.policy.inputs.catalog:
                notes.append(f"executor {name}: unfinished jobs chose it, but it is no longer in the catalog")
                continue
            kept = 0
            for comp in current:
                if comp.executor == name and self._node_live(comp.node):
                    config = self.config_of(comp)
                    result[config] = result.get(config, 0) + 1
                    kept += 1
            if kept:
                notes.append(f"executor {name}: {kept} instance(s) kept for unfinished jobs that chose it")
        return result, notes

    def config_of(self, comp: PlacedComponent) -> InstanceConfig:
        node = self._by_name.get(comp.node)
        first = None
        if node is not None and comp.device_indexes:
            first = next((d for d in node.devices if d.index == comp.device_indexes[0]), None)
        exe = self.policy.inputs.catalog.get(comp.executor)
        on_gpu = exe is not None and exe.resources.device == "gpu" and first is not None and first.kind == "gpu"
        if not on_gpu:
            return component_config(comp, "cpu", False, None)
        assert first is not None
        default = first.power_limit_default_w if first.power_limit_default_w is not None else first.power_limit_max_w
        return component_config(comp, first.hardware, True, default)

    def _node_live(self, name: str) -> bool:
        node = self._by_name.get(name)
        return node is not None and node.liveness == "ready"

    def _live_ids(self) -> set[str]:
        return {cid for states in self.states.values() for cid in states}

    def _admission_plan(self, components: tuple[PlacedComponent, ...]) -> Plan:
        """The choices jobs are admitted with: the routed solution's, for demands whose executors all run; a
        demand only a pending rollout serves is admitted with its choices (its jobs wait for its components)."""
        solution = self.rollout.active or self.policy.solution
        if solution is None:
            return Plan(choices={}, components=components)
        pending = self.rollout.pending.solution if self.rollout.pending is not None else None
        picks = dict(solution.choices)
        unsatisfiable = dict(solution.unserved)
        if pending is not None:  # a redefined workflow's old choices may name stages or executors it no longer has
            picks.update({d: c for d, c in pending.choices.items()
                          if d not in picks or d.workflow in self._changed_workflows})
            unsatisfiable = {d: why for d, why in {**unsatisfiable, **pending.unserved}.items() if d not in picks}
        placed = {c.executor for c in components}
        choices = {}
        for demand, stages in picks.items():
            missing = sorted({c.executor for c in stages.values()} - placed)
            if missing:
                reasons = "; ".join(self.placement.reasons.get(cfg, "") for cfg in self.placement.unplaced
                                    if cfg.executor in missing) if self.placement is not None else ""
                unsatisfiable[demand] = f"no place found for {', '.join(missing)} {reasons}".strip()
            else:
                choices[demand] = stages
        for demand in self.demands:
            if demand not in choices and demand not in unsatisfiable:
                unsatisfiable[demand] = "the optimizer returned no plan for it"
        notes = tuple(solution.notes) + (tuple(self.placement.notes) if self.placement is not None else ())
        return Plan(choices=choices, components=components, unsatisfiable=unsatisfiable, notes=notes)

    def _planned_rates(self) -> dict[Demand, float]:
        rates = getattr(self.policy, "planned_rates", None)
        return rates() if rates is not None else {}

    # --- power limits and routing ----------------------------------------------------------------

    def _weights(self, components: tuple[PlacedComponent, ...]) -> dict[str, float]:
        weights = {}
        plan_ids = {c.component_id for c in self.rollout.plan}
        pending = self.rollout.pending is not None
        live = self._live_ids() if pending else set()
        for comp in components:
            weight = self.reactions.weight(comp.node, comp.device_indexes)
            if pending and comp.component_id in plan_ids and comp.component_id not in live:
                weight = 0.0  # not started yet: nothing to route to
            weights[comp.component_id] = weight
        return weights

    def _emit_limits_and_weights(self, out: list[Action]) -> None:
        planned = dict(self.placement.power_limits) if self.placement is not None else {}
        limits = self.reactions.limits(planned)
        for key in set(self.power_limits) - set(limits):  # a cap or pin that ended: back to the default limit
            default = self._default_limit_w(key)
            if default is not None:
                limits[key] = default
        if limits != self.power_limits:
            changed = sorted(k for k in set(limits) | set(self.power_limits)
                             if limits.get(k) != self.power_limits.get(k))
            self.power_limits = limits
            out.append(PowerLimitsChanged(dict(limits), f"{len(changed)} device limit(s) changed"))
        if self.rollout.active is not None:
            weights = self._weights(tuple(self.rollout.current()))
            if weights != self.weights:
                self.weights = weights
                out.append(RoutingChanged(self.rollout.active, dict(weights), "component weights changed"))

    def _default_limit_w(self, key: tuple[str, int]) -> float | None:
        node = self._by_name.get(key[0])
        for dev in node.devices if node is not None else ():
            if dev.index == key[1]:
                return dev.power_limit_default_w if dev.power_limit_default_w is not None else dev.power_limit_max_w
        return None

    def _cut_rank(self) -> dict[tuple[str, int], int]:
        """Budget cuts go first to GPUs whose components serve only the lowest tiers (highest rank)."""
        solution = self.rollout.active or self.policy.solution
        if solution is None:
            return {}
        best_tier: dict[str, int] = {}  # executor -> most important tier it serves (0 = best)
        for demand, stages in solution.choices.items():
            tiers = [SLO_TIERS.index(t) for _, t in demand.slo if t in SLO_TIERS]
            tier = min(tiers) if tiers else len(SLO_TIERS) - 1
            for choice in stages.values():
                best_tier[choice.executor] = min(best_tier.get(choice.executor, len(SLO_TIERS)), tier)
        rank: dict[tuple[str, int], int] = {}
        for comp in self.rollout.current():
            for index in comp.device_indexes:
                key = (comp.node, index)
                rank[key] = min(rank.get(key, len(SLO_TIERS)), best_tier.get(comp.executor, len(SLO_TIERS)))
        return rank

    def _budgets_to_planning(self) -> None:
        cluster = self.reactions.budgets.get(None)
        self.policy.inputs = replace(self.policy.inputs,
                                     power_budget_w=cluster.power_budget_w if cluster is not None else None)

    # --- persistence -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What survives a controller restart: forecast, budgets and pins (JSON-able)."""
        forecast = getattr(self.policy, "forecast", None)
        return {"forecast": forecast.snapshot() if forecast is not None else [],
                "budgets": [{"rack": r, "power_budget_w": b.power_budget_w, "source": b.source}
                            for r, b in self.reactions.budgets.items()],
                "pins": [{"node": n, "device": i, "power_limit_w": w} for (n, i), w in self.reactions.pins.items()]}

    def restore(self, saved: Mapping[str, Any]) -> None:
        forecast = getattr(self.policy, "forecast", None)
        if forecast is not None and saved.get("forecast"):
            forecast.restore(saved["forecast"])
        for entry in saved.get("budgets", ()):
            self.reactions.set_budget(entry["rack"], float(entry["power_budget_w"]), str(entry.get("source", "stored")))
        for entry in saved.get("pins", ()):
            self.reactions.pins[(str(entry["node"]), int(entry["device"]))] = float(entry["power_limit_w"])
        self._budgets_to_planning()


def _refusal(solution: Solution) -> str | None:
    """A failed plan would stop everything; the running one stays."""
    if solution.status.startswith("error"):
        return f"the optimizer failed ({solution.status}); the running plan stays"
    if not solution.instances and solution.unserved:
        return "the plan serves no demand (" + "; ".join(sorted(set(solution.unserved.values()))[:3]) + \
            "); the running plan stays"
    return None


def _spec_key(spec: Any) -> Any:
    """What identifies a workflow's definition (specs from the loader have ``to_dict``)."""
    to_dict = getattr(spec, "to_dict", None)
    return repr(to_dict()) if to_dict is not None else repr(spec)


def _config_text(config: InstanceConfig) -> str:
    cap = "" if config.power_cap_w is None else f"@{config.power_cap_w:g}W"
    return f"{config.executor}@{config.hardware}x{config.tp}{cap}"
