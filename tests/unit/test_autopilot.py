"""The autopilot as a pure state machine with a fake clock: rollouts, heat, budgets, pins, node loss,
restart, and the rule that the daemon and the simulator drive this one class."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from common.devices.gpu_specs import GPU_SPECS
from policies.autopilot.engine import Autopilot, AutopilotConfig
from policies.autopilot.events import (
    BudgetSet, ComponentsObserved, DesiredChanged, FleetObserved, InputsChanged, LoadObserved, Note, PinCleared,
    PinSet, PowerLimitsChanged, Refused, RoutingChanged, Solve, Solved, Tick,
)
from policies.autopilot.planning import Decision, MurakkabPolicy, PlanningInputs
from policies.autopilot.reactions import ReactionConfig
from policies.model import PredictedDemand, Solution
from policies.perf_model import standard_hardware
from policies.plan import Demand, StageChoice
from tests.unit.test_baselines import RAG_BEST, inputs
from tests.unit.test_placement import CATALOG, cfg, gpu, node

ROOT = Path(__file__).resolve().parents[2]
BASIC = Demand.of("wf", {"latency": "basic"})
BEST = Demand.of("wf", {"latency": "best"})
H100 = GPU_SPECS["h100"]


def solution(instances: dict[Any, int], demands: tuple[Demand, ...] = (BASIC,), executor: str = "chat") -> Solution:
    config = next(iter(instances))
    return Solution(status="optimal", choices={d: {"answer": StageChoice(executor)} for d in demands},
                    configs={d: {"answer": config} for d in demands}, instances=dict(instances),
                    predicted={d: PredictedDemand(1.0, 2.0, 10.0, None) for d in demands}, power_w=700.0,
                    cost_per_hour_usd=1.0, objective_value=0.0, binding=(), solve_s=0.0,
                    instance_devices={c: float(c.tp) for c in instances})


class Scripted:
    """A planning core that plays back one solution, so these tests watch the engine alone."""

    name = "murakkab"

    def __init__(self, plan: Solution | None) -> None:
        self.plan = plan
        self.solution: Solution | None = None
        self.floor_rps: dict[Demand, float] = {}
        self.inputs = PlanningInputs(workflows={}, catalog=dict(CATALOG), perf=None)  # type: ignore[arg-type]

    def step(self, now_s: float, observed: dict, state: Any) -> Decision | None:
        if self.solution is None and self.plan is not None:
            self.solution = self.plan
            return Decision(self.plan, "scripted first plan")
        return None

    def replan(self, state: Any, why: str) -> Decision | None:
        if self.plan is None:
            return None
        self.solution = self.plan
        return Decision(self.plan, f"scripted ({why})")

    def adopt(self, sol: Solution, reason: str) -> Decision:
        self.solution = sol
        return Decision(sol, reason)


def fleet(t: float, *nodes: Any) -> FleetObserved:
    return FleetObserved(t, tuple(nodes), {"h100": standard_hardware()["h100"]},
                         {"h100": sum(len(n.devices) for n in nodes)})


def load(t: float) -> LoadObserved:
    return LoadObserved(t, {BASIC: 1.0}, {}, {})


def of(actions: list[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def notes(actions: list[Any], kind: str) -> list[Note]:
    return [a for a in actions if isinstance(a, Note) and a.kind == kind]


def started(pilot: Autopilot, t: float, state: str = "ready") -> list[Any]:
    """Every desired component reports ``state`` on its node."""
    by_node: dict[str, dict[str, str]] = {}
    for comp in pilot.rollout.current():
        by_node.setdefault(comp.node, {})[comp.component_id] = state
    return pilot.handle(ComponentsObserved(t, by_node))


def running_pilot(*nodes: Any, plan: Solution | None = None, config: AutopilotConfig | None = None) -> Autopilot:
    pilot = Autopilot(config or AutopilotConfig(), Scripted(plan or solution({cfg(): 1})))
    pilot.handle(fleet(0.0, *nodes))
    pilot.handle(load(0.0))
    started(pilot, 1.0)
    return pilot


def where(pilot: Autopilot) -> set[tuple[str, tuple[int, ...]]]:
    return {(c.node, c.device_indexes) for c in pilot.rollout.current()}


# --- plans, placement and rollouts ------------------------------------------------------------------


def test_a_plan_is_placed_routed_and_its_power_limits_set() -> None:
    pilot = Autopilot(AutopilotConfig(), Scripted(solution({cfg(cap=500.0): 2})))
    assert of(pilot.handle(fleet(0.0, node("n1", gpus=2))), DesiredChanged) == []  # no load window yet
    actions = pilot.handle(load(0.0))
    desired = of(actions, DesiredChanged)[-1]
    assert len(desired.components) == 2 and desired.plan.choices[BASIC]["answer"].executor == "chat"
    assert of(actions, PowerLimitsChanged)[-1].limits == {("n1", 0): 500.0, ("n1", 1): 500.0}
    assert of(actions, RoutingChanged)[-1].weights  # routed at once: the first plan has nothing to wait for
    assert notes(actions, "plan") and pilot.explanation["planner"] == "murakkab"


def test_a_lost_node_has_its_components_placed_elsewhere_at_once() -> None:
    pilot = running_pilot(node("n1", gpus=1), node("n2", gpus=1))
    (before,) = where(pilot)
    lost = "n1" if before[0] == "n1" else "n2"
    other = "n2" if lost == "n1" else "n1"
    actions = pilot.handle(fleet(5.0, node(lost, gpus=1, liveness="lost"), node(other, gpus=1)))
    assert where(pilot) == {(other, (0,))}  # replaced in the same event, not at the next epoch
    assert notes(actions, "replace") and "fleet changed" in notes(actions, "replace")[0].reason


def test_a_drained_node_keeps_serving_until_its_replacement_is_ready() -> None:
    pilot = running_pilot(node("n1", gpus=1), node("n2", gpus=1))
    ((old_node, _),) = where(pilot)
    new_node = "n2" if old_node == "n1" else "n1"
    old_id = pilot.rollout.current()[0].component_id
    drained = [node(old_node, gpus=1, admin="draining"), node(new_node, gpus=1)]
    pilot.handle(fleet(5.0, *drained))
    assert where(pilot) == {(old_node, (0,)), (new_node, (0,))}  # make before break
    assert pilot.weights[old_id] == 1.0  # the old one serves on meanwhile
    pilot.handle(ComponentsObserved(6.0, {new_node: {c.component_id: "starting" for c in pilot.rollout.plan}}))
    assert old_node in {n for n, _ in where(pilot)}
    actions = pilot.handle(ComponentsObserved(30.0, {new_node: {c.component_id: "ready" for c in pilot.rollout.plan}}))
    assert notes(actions, "rollout-switched")
    assert where(pilot) == {(new_node, (0,))}  # only now is the old one dropped


def test_a_replacement_that_never_becomes_ready_is_abandoned_and_the_old_one_serves_on() -> None:
    pilot = running_pilot(node("n1", gpus=1), node("n2", gpus=1), config=AutopilotConfig(switch_timeout_s=60.0))
    ((old_node, _),) = where(pilot)
    new_node = "n2" if old_node == "n1" else "n1"
    pilot.handle(fleet(5.0, node(old_node, gpus=1, admin="draining"), node(new_node, gpus=1)))
    pilot.handle(ComponentsObserved(6.0, {new_node: {c.component_id: "failed" for c in pilot.rollout.plan}}))
    assert pilot.handle(Tick(64.0)) == []  # still within the timeout
    actions = pilot.handle(Tick(66.0))
    (abandoned,) = notes(actions, "rollout-abandoned")
    assert "old components keep serving" in abandoned.reason
    assert where(pilot) == {(old_node, (0,))}


# --- heat ---------------------------------------------------------------------------------------------


def hot(index: int = 0, **kw: Any) -> Any:
    return gpu(index, temperature_c=H100.slowdown_temperature_c - 1.0, power_w=650.0, **kw)


def test_a_hot_gpu_gets_a_lower_cap_and_less_work_at_once_then_its_components_move() -> None:
    pilot = running_pilot(node("n1", gpus=1), node("n2", gpus=1))
    ((hot_node, _),) = where(pilot)
    cool_node = "n2" if hot_node == "n1" else "n1"
    comp = pilot.rollout.current()[0]
    actions = pilot.handle(fleet(10.0, node(hot_node, hot()), node(cool_node, gpus=1)))
    (heat,) = notes(actions, "heat")
    assert "within 5 C of slowdown" in heat.reason
    limits = of(actions, PowerLimitsChanged)[-1].limits
    assert limits[(hot_node, 0)] == pytest.approx(0.8 * H100.power_limit_default_w)
    assert pilot.weights[comp.component_id] == 0.5  # load shifted
    assert where(pilot) == {(hot_node, (0,))}  # not moved yet
    actions = pilot.handle(fleet(24.0, node(hot_node, hot()), node(cool_node, gpus=1)))
    assert not notes(actions, "heat-migrate")  # 14 s: not yet
    actions = pilot.handle(fleet(25.0, node(hot_node, hot()), node(cool_node, gpus=1)))
    assert notes(actions, "heat-migrate")
    assert (cool_node, (0,)) in where(pilot) and (hot_node, (0,)) in where(pilot)  # replacement first
    started(pilot, 40.0)
    assert where(pilot) == {(cool_node, (0,))}
    # it takes no new components until it has cooled
    assert pilot.reactions.evacuated() == {(hot_node, 0)}
    cool = gpu(0, temperature_c=40.0, power_w=100.0)
    pilot.handle(fleet(50.0, node(hot_node, cool), node(cool_node, gpus=1)))
    actions = pilot.handle(fleet(81.0, node(hot_node, cool), node(cool_node, gpus=1)))
    assert notes(actions, "heat-cleared") and not pilot.reactions.evacuated()


def test_thermal_and_power_brake_throttle_reasons_make_a_gpu_hot() -> None:
    pilot = running_pilot(node("n1", gpus=1))
    braking = replace(gpu(0, temperature_c=50.0, power_w=300.0), throttle_reasons=("hw_power_brake_slowdown",))
    (heat,) = notes(pilot.handle(fleet(5.0, node("n1", braking))), "heat")
    assert "hw_power_brake_slowdown" in heat.reason


def test_heat_reactions_are_off_for_the_baseline_presets() -> None:
    pilot = running_pilot(node("n1", gpus=1), config=AutopilotConfig(preset="murakkab-epoch",
                                                                    reactions=ReactionConfig(heat=False)))
    assert not notes(pilot.handle(fleet(5.0, node("n1", hot()))), "heat")


# --- budgets -----------------------------------------------------------------------------------------


def busy(index: int, watts: float) -> Any:
    return gpu(index, temperature_c=60.0, power_w=watts)


def test_a_cut_budget_brings_caps_down_lowest_tiers_first_and_releases_them_later() -> None:
    plan = Solution(status="optimal", choices={BEST: {"answer": StageChoice("chat")},
                                               BASIC: {"answer": StageChoice("tiny")}},
                    configs={BEST: {"answer": cfg("chat")}, BASIC: {"answer": cfg("tiny")}},
                    instances={cfg("chat"): 1, cfg("tiny"): 1}, predicted={}, power_w=0, cost_per_hour_usd=0,
                    objective_value=0, binding=(), solve_s=0, instance_devices={cfg("chat"): 1, cfg("tiny"): 1})
    pilot = running_pilot(node("n1", gpus=2), plan=plan)
    devices = {c.executor: c.device_indexes[0] for c in pilot.rollout.current()}
    drawing = node("n1", busy(0, 600.0), busy(1, 600.0))
    assert of(pilot.handle(BudgetSet(10.0, None, 1000.0)), Refused) == []
    actions = pilot.handle(fleet(11.0, drawing))
    limits = pilot.power_limits
    basic_gpu, best_gpu = ("n1", devices["tiny"]), ("n1", devices["chat"])
    assert limits[basic_gpu] == pytest.approx(600.0 - (1200.0 - 970.0))  # the basic tier's GPU is cut first ...
    assert limits[best_gpu] == H100.power_limit_default_w  # ... and the cut covers the excess alone
    assert notes(actions, "budget")
    view = pilot.reactions.budget_view()["budgets"][0]
    assert view["scope"] == "cluster" and view["over"] and view["feasible"]
    # power came down: once it has stayed below 90 % of the budget for 30 s, the caps rise again
    low = node("n1", busy(0, 350.0), busy(1, 400.0))
    assert not notes(pilot.handle(fleet(20.0, low)), "budget-release")
    assert not notes(pilot.handle(fleet(49.0, low)), "budget-release")
    actions = pilot.handle(fleet(50.0, low))
    assert notes(actions, "budget-release") and pilot.power_limits[basic_gpu] > limits[basic_gpu]


def test_an_infeasible_budget_is_accepted_and_reported() -> None:
    pilot = running_pilot(node("n1", gpus=2))
    pilot.handle(BudgetSet(1.0, None, 300.0))
    actions = pilot.handle(fleet(2.0, node("n1", busy(0, 650.0), busy(1, 650.0))))
    (infeasible,) = notes(actions, "budget-infeasible")
    assert "lowest caps" in infeasible.reason
    assert pilot.reactions.budget_view()["budgets"][0]["feasible"] is False
    assert all(w == pytest.approx(H100.power_limit_min_w) for w in pilot.power_limits.values())


def test_rack_budgets_only_cut_their_rack_and_bad_budgets_are_refused() -> None:
    pilot = running_pilot(node("a1", gpus=1, rack="A"), node("b1", gpus=1, rack="B"),
                          plan=solution({cfg(): 2}))
    pilot.handle(BudgetSet(1.0, "A", 400.0))
    pilot.handle(fleet(2.0, node("a1", busy(0, 650.0), rack="A"), node("b1", busy(0, 650.0), rack="B")))
    assert pilot.power_limits[("a1", 0)] < 650.0 and pilot.power_limits[("b1", 0)] == H100.power_limit_default_w
    for rack, watts, word in ((None, -5.0, "positive"), (None, float("nan"), "positive"), ("C", 100.0, "rack 'C'")):
        (refused,) = of(pilot.handle(BudgetSet(3.0, rack, watts)), Refused)
        assert refused.code == "invalid_budget" and word in refused.message


def test_a_budget_enters_the_next_plan() -> None:
    policy = MurakkabPolicy(inputs(), epoch_s=300.0, tick_s=60.0)
    pilot = Autopilot(AutopilotConfig(), policy)
    pilot.handle(BudgetSet(0.0, None, 5000.0))
    assert policy.inputs.power_budget_w == 5000.0
    pilot.handle(BudgetSet(1.0, None, None))
    assert policy.inputs.power_budget_w is None


# --- pins ----------------------------------------------------------------------------------------------


def test_a_pinned_limit_stands_against_plan_heat_and_budget_until_unpinned() -> None:
    pilot = running_pilot(node("n1", gpus=1), plan=solution({cfg(cap=500.0): 1}))
    assert of(pilot.handle(PinCleared(1.0, "n1", 0)), Refused)[0].code == "not_pinned"
    actions = pilot.handle(PinSet(2.0, "n1", 0, 450.0))
    assert notes(actions, "pin") and pilot.power_limits[("n1", 0)] == 450.0
    pilot.handle(BudgetSet(3.0, None, 200.0))
    pilot.handle(fleet(4.0, node("n1", hot())))
    assert pilot.power_limits[("n1", 0)] == 450.0
    pilot.handle(PinCleared(5.0, "n1", 0))
    assert pilot.power_limits[("n1", 0)] != 450.0


# --- restart ---------------------------------------------------------------------------------------------


def test_forecast_budgets_and_pins_survive_a_restart() -> None:
    def pilot() -> Autopilot:
        return Autopilot(AutopilotConfig(), MurakkabPolicy(inputs(), epoch_s=300.0, tick_s=60.0))

    first = pilot()
    for k in range(12):
        first.policy.forecast.observe(RAG_BEST, 2.0 + (k % 3))
    first.handle(BudgetSet(0.0, None, 9000.0))
    first.handle(PinSet(0.0, "n1", 0, 400.0))
    saved = first.snapshot()
    second = pilot()
    second.restore(saved)
    assert second.policy.planned_rates() == pytest.approx(first.policy.planned_rates())
    assert second.reactions.pins == {("n1", 0): 400.0} and second.policy.inputs.power_budget_w == 9000.0
    # the first MILP after the restart plans for the stored forecast, not for an empty history
    hardware = standard_hardware()
    second.handle(FleetObserved(0.0, (), {"h100": hardware["h100"], "cpu": hardware["cpu"]}, {"h100": 64, "cpu": 8}))
    (solve,) = of(second.handle(InputsChanged(0.0, replan=True)), Solve)
    rates = {d.demand: d.rate_rps for d in solve.problem.demands}
    assert rates[RAG_BEST] == pytest.approx(first.policy.planned_rates()[RAG_BEST])


def test_a_stale_solve_is_dropped_and_a_failed_one_keeps_the_plan() -> None:
    policy = MurakkabPolicy(inputs(), epoch_s=300.0, tick_s=60.0)
    pilot = Autopilot(AutopilotConfig(), policy)
    hardware = standard_hardware()
    pilot.handle(FleetObserved(0.0, (), {"h100": hardware["h100"]}, {"h100": 8}))
    (solve,) = of(pilot.handle(LoadObserved(0.0, {RAG_BEST: 1.0}, {}, {})), Solve)
    broken = replace(solution({cfg(): 1}), status="error: solver crashed")
    actions = pilot.handle(Solved(solve.request_id, broken, 1.0))
    assert notes(actions, "plan-refused") and policy.solution is None
    assert notes(pilot.handle(Solved(solve.request_id + 5, broken, 2.0)), "plan-stale")


# --- one engine ------------------------------------------------------------------------------------------


SHELLS = ("controller/simulator/engine.py", "controller/autopilot_shell.py", "controller/jobs/service.py")
POLICY_NAMES = {"place", "reactive_scale", "with_caps_lifted", "with_instances", "stage_options", "EwmaForecast",
                "power_cap_levels", "Rollout", "Reactions"}


@pytest.mark.parametrize("path", SHELLS)
def test_the_daemon_and_the_simulator_grow_no_planning_path_of_their_own(path: str) -> None:
    """Both shells feed the one Autopilot; none of them imports placement, scaling, forecasting or rollout
    logic to run beside it (first fit, the daemon's no-autopilot planner, is the one exception)."""
    tree = ast.parse((ROOT / path).read_text())
    imported = {alias.asname or alias.name for node_ in ast.walk(tree) if isinstance(node_, ast.ImportFrom)
                for alias in node_.names}
    assert not imported & POLICY_NAMES, imported & POLICY_NAMES
    source = (ROOT / path).read_text()
    assert "Autopilot(" in source or "AutopilotShell(" in source


def test_both_shells_hold_the_same_autopilot_class() -> None:
    from controller.autopilot_shell import AutopilotShell
    from controller.simulator.engine import Simulator

    assert "self.autopilot = Autopilot(" in (ROOT / "controller/autopilot_shell.py").read_text()
    assert "self.autopilot = Autopilot(" in (ROOT / "controller/simulator/engine.py").read_text()
    assert AutopilotShell.__init__.__globals__["Autopilot"] is Simulator.__init__.__globals__["Autopilot"] is Autopilot
