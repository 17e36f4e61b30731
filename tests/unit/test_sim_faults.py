"""Scheduled faults in the simulator: node failures and recoveries, cooling failures with modeled GPU
temperatures, budget changes; the autopilot reacts and the report says how fast. Scenario validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.simulator.faults import Thermals
from tests.unit.fluid import run_simulation
from controller.simulator.scenario import ScenarioError, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
DRILLS = ROOT / "examples" / "scenarios" / "drills.yaml"


RACK = "rack-a"


def drills(duration_s: float | None = None, faults: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(DRILLS.read_text())
    if duration_s is not None:
        doc["spec"]["duration_s"] = duration_s
        doc["spec"]["trace"]["bursts"] = []
    if faults is not None:
        doc["spec"]["faults"] = faults
    return doc


def run(doc: dict[str, Any], policy: str = "murakkab") -> dict[str, Any]:
    scenario = parse_scenario(copy.deepcopy(doc), "drills.yaml", ROOT / "examples" / "scenarios")
    report, _ = run_simulation(scenario, policy, plots=False)
    return report


def reaction(report: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(r for r in report["fault_reactions"] if r["kind"] == kind)


def test_a_failed_node_has_its_stages_placed_elsewhere_at_once() -> None:
    report = run(drills(1200.0, [{"at_s": 300, "kind": "node-failure", "node": "h100-0000"},
                                 {"at_s": 900, "kind": "node-recovery", "node": "h100-0000"}]))
    failed = reaction(report, "node-failure")
    assert failed["reaction"] == "replace" and failed["reaction_after_s"] == 0.0
    assert report["event_counts"]["fault node-failure"] == 1
    assert report["components_started"] > run(drills(1200.0, []))["components_started"]  # replacements


def test_a_cooling_failure_heats_a_busy_gpu_until_the_autopilot_moves_its_load() -> None:
    report = run(drills(3000.0, [{"at_s": 1800, "kind": "cooling-failure", "node": "a100-0000", "device": 0}]))
    heat = reaction(report, "cooling-failure")
    assert heat["reaction"] == "heat" and 0 < heat["reaction_after_s"] < 1200  # it takes minutes to heat up
    counts = report["event_counts"]
    assert counts.get("autopilot heat", 0) >= 1 and counts.get("autopilot heat-migrate", 0) >= 1


def test_the_baseline_presets_do_not_react_to_heat() -> None:
    report = run(drills(3000.0, [{"at_s": 1800, "kind": "cooling-failure", "node": "a100-0000", "device": 0}]),
                 policy="murakkab-epoch")
    assert reaction(report, "cooling-failure")["reaction"] is None
    assert "autopilot heat" not in report["event_counts"]


def test_a_budget_cut_in_the_scenario_lowers_caps_within_one_observation() -> None:
    report = run(drills(1800.0, [{"at_s": 600, "kind": "budget", "power_budget_w": 1200.0},
                                 {"at_s": 1500, "kind": "budget"}]))
    cut = reaction(report, "budget")
    assert cut["reaction"] in ("budget", "budget-infeasible") and cut["reaction_after_s"] <= 5.0
    assert report["event_counts"]["autopilot budget-set"] == 2


def test_scenarios_without_faults_report_no_telemetry_and_no_reactions() -> None:
    report = run(drills(600.0, []))
    assert "fault_reactions" not in report
    assert not any(k.startswith("autopilot") for k in report["event_counts"])


def test_the_thermal_model_heats_towards_its_steady_state_and_faster_without_cooling() -> None:
    thermals = Thermals(ambient_c=25.0)
    thermals.advance(0.0, {("n", 0): 300.0, ("n", 1): 300.0}, {"n": "h100"})
    thermals.cooling_failed.add(("n", 1))
    thermals.advance(600.0, {("n", 0): 300.0, ("n", 1): 300.0}, {"n": "h100"})
    cooled, failed = thermals.temperature_c[("n", 0)], thermals.temperature_c[("n", 1)]
    assert cooled == pytest.approx(25.0 + 300.0 * 0.057, abs=0.5)  # steady under normal cooling
    assert failed > cooled + 30 and thermals.reasons(("n", 1), "h100")  # throttling by now
    assert thermals.reasons(("n", 0), "h100") == ()


@pytest.mark.parametrize("fault, message", [
    ({"at_s": 10, "kind": "node-failure"}, "node-failure needs node"),
    ({"at_s": 10, "kind": "node-failure", "node": "h100-0009"}, "no node 'h100-0009'"),
    ({"at_s": 10, "kind": "cooling-failure", "node": "h100-0000"}, "cooling-failure needs device"),
    ({"at_s": 10, "kind": "cooling-failure", "node": "h100-0000", "device": 8}, "has no GPU 8"),
    ({"at_s": 10, "kind": "cooling-failure", "node": "cpu-0000", "device": 0}, "has no GPU 0"),
    ({"at_s": 10, "kind": "budget", "rack": "rack-z", "power_budget_w": 100}, "no rack 'rack-z'"),
    ({"at_s": 10, "kind": "budget", "power_budget_w": -5}, "greater than 0"),
    ({"at_s": 10, "kind": "node-failure", "node": "h100-0000", "power_budget_w": 5}, "takes no power_budget_w"),
    ({"at_s": 99999, "kind": "budget"}, "past the end"),
    ({"at_s": 10, "kind": "meteor"}, "kind"),
])
def test_bad_faults_are_refused_with_the_field_and_why(fault: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(drills(faults=[fault]), "drills.yaml", ROOT / "examples" / "scenarios")
    assert "faults" in str(err.value) and message in str(err.value), str(err.value)


def test_a_racks_cooling_failure_reaches_every_gpu_of_the_rack() -> None:
    doc = drills(600.0, [{"at_s": 60, "kind": "cooling-failure", "rack": RACK},
                         {"at_s": 300, "kind": "cooling-restored", "rack": RACK}])
    scenario = parse_scenario(copy.deepcopy(doc), "drills.yaml", ROOT / "examples" / "scenarios")
    from controller.simulator.engine import Simulator
    from controller.simulator.run import build_policy, scenario_hardware
    from policies.perf_model import CatalogPerfModel
    from tests.unit.fluid import fluid
    scenario = fluid(scenario)
    hardware = scenario_hardware(scenario)
    perf = CatalogPerfModel(hardware)
    sim = Simulator(scenario, build_policy("murakkab", scenario, perf), perf=perf, hardware=hardware)
    in_rack = {(n.name, i) for n in sim.nodes.values() if n.rack == RACK for i in range(n.devices)}
    assert in_rack
    failure, restore = scenario.spec.faults
    sim._fault(failure, 60.0)
    assert sim.thermals.cooling_failed == in_rack
    sim._fault(restore, 300.0)
    assert not sim.thermals.cooling_failed
    with pytest.raises(ScenarioError, match="cooling-failure needs node"):
        parse_scenario(drills(600.0, [{"at_s": 60, "kind": "cooling-failure", "device": 0}]), "drills.yaml",
                       ROOT / "examples" / "scenarios")


def test_the_autopilot_reacts_to_a_racks_cooling_failure() -> None:
    report = run(drills(3000.0, [{"at_s": 1800, "kind": "cooling-failure", "rack": RACK}]))
    heat = reaction(report, "cooling-failure")
    assert heat["reaction"] == "heat" and 0 < heat["reaction_after_s"] < 1200
    assert report["throttled_gpu_minutes"] >= 0
