"""The autopilot's facility reactions with a fake clock: rack cooling and grid signals (pure, no I/O)."""

from __future__ import annotations

import pytest

from policies.autopilot.engine import Autopilot, AutopilotConfig
from policies.autopilot.events import CoolingSet, GridSet, PowerLimitsChanged, Refused
from policies.autopilot.planning import MurakkabPolicy
from tests.unit.test_autopilot import H100, busy, fleet, notes, of, running_pilot, solution, started, where
from tests.unit.test_baselines import inputs
from tests.unit.test_placement import cfg, node


def racked() -> tuple[Autopilot, str, str]:
    """Two racks of one GPU each; the one component runs in whichever rack placement chose."""
    pilot = running_pilot(node("a1", gpus=1, rack="A"), node("b1", gpus=1, rack="B"), plan=solution({cfg(): 1}))
    ((comp_node, _),) = where(pilot)
    return pilot, comp_node, "b1" if comp_node == "a1" else "a1"


def nodes_drawing(watts: float) -> tuple:
    return node("a1", busy(0, watts), rack="A"), node("b1", busy(0, watts), rack="B")


def test_degraded_cooling_caps_the_rack_and_shifts_work_but_moves_nothing() -> None:
    pilot, comp_node, other = racked()
    rack = "A" if comp_node == "a1" else "B"
    comp = pilot.rollout.current()[0]
    actions = pilot.handle(CoolingSet(5.0, rack, "degraded", 31.5))
    (cooling,) = notes(actions, "cooling")
    assert cooling.subject == f"rack {rack}" and "degraded, inlet 31.5 C" in cooling.reason
    limits = of(actions, PowerLimitsChanged)[-1].limits
    assert limits[(comp_node, 0)] == pytest.approx(0.8 * H100.tdp_w)
    assert limits.get((other, 0), H100.power_limit_default_w) == H100.power_limit_default_w  # other rack untouched
    assert pilot.weights[comp.component_id] == 0.5
    assert where(pilot) == {(comp_node, (0,))}
    assert not notes(pilot.handle(CoolingSet(6.0, rack, "degraded", 32.0)), "cooling")  # a repeat changes nothing
    view = pilot.reactions.budget_view()["cooling"]
    assert [(c["rack"], c["state"], c["inlet_c"]) for c in view] == [(rack, "degraded", 32.0)]


def test_failed_cooling_evacuates_the_rack_make_before_break_and_ok_lifts_it() -> None:
    pilot, comp_node, other = racked()
    rack = "A" if comp_node == "a1" else "B"
    actions = pilot.handle(CoolingSet(5.0, rack, "failed", 40.0))
    assert "its components move out" in notes(actions, "cooling")[0].reason
    assert pilot.power_limits[(comp_node, 0)] == pytest.approx(0.6 * H100.tdp_w)
    assert pilot.reactions.evacuated() == {(comp_node, 0)}
    assert where(pilot) == {(comp_node, (0,)), (other, (0,))}  # the replacement first, the old one still serves
    started(pilot, 8.0)
    assert where(pilot) == {(other, (0,))}
    assert pilot._state().devices_available == {"h100": 1}  # the plan is made without the failed rack
    actions = pilot.handle(CoolingSet(60.0, rack, "ok", 24.0))
    assert "back to normal" in notes(actions, "cooling")[0].reason
    assert not pilot.reactions.evacuated() and pilot._state().devices_available == {"h100": 2}
    assert pilot.power_limits[(comp_node, 0)] == H100.power_limit_default_w


def test_cooling_for_an_unknown_rack_or_state_is_refused() -> None:
    pilot, _, _ = racked()
    (refused,) = of(pilot.handle(CoolingSet(1.0, "Z", "failed")), Refused)
    assert refused.code == "invalid_cooling" and "rack 'Z'" in refused.message
    (refused,) = of(pilot.handle(CoolingSet(1.0, "A", "melting")), Refused)
    assert "one of ok, degraded, failed" in refused.message


def test_a_budget_and_degraded_cooling_both_hold_the_lower_cap() -> None:
    pilot, comp_node, _ = racked()
    rack = "A" if comp_node == "a1" else "B"
    pilot.handle(CoolingSet(1.0, rack, "degraded"))
    pilot.handle(fleet(2.0, *nodes_drawing(650.0)))
    assert pilot.power_limits[(comp_node, 0)] == pytest.approx(0.8 * H100.tdp_w)


def test_grid_prices_weigh_energy_in_the_plan_only_where_enabled() -> None:
    off = Autopilot(AutopilotConfig(), MurakkabPolicy(inputs(), epoch_s=300.0, tick_s=60.0))
    assert not notes(off.handle(GridSet(1.0, 90.0, 400.0)), "grid")
    assert off.policy.inputs.price_weight_w == 0.0 and off.grid == (90.0, 400.0)

    on = Autopilot(AutopilotConfig(grid_objective=True, carbon_price_usd_per_tonne=50.0),
                   MurakkabPolicy(inputs(), epoch_s=300.0, tick_s=60.0))
    (note,) = notes(on.handle(GridSet(1.0, 90.0, 400.0)), "grid")
    effective = 90.0 + 400.0 * 50.0 / 1000.0  # 110 USD/MWh with carbon
    assert on.policy.inputs.price_weight_w == pytest.approx(1e6 / effective)
    assert "110.0 USD/MWh with carbon" in note.reason
    assert not notes(on.handle(GridSet(2.0, 92.0, 400.0)), "grid")  # under 10 %: the plan stands
    assert notes(on.handle(GridSet(3.0, 200.0, 400.0)), "grid")
    (refused,) = of(on.handle(GridSet(4.0, float("nan"), 1.0)), Refused)
    assert refused.code == "invalid_grid"
