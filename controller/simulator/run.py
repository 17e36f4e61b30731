"""Wiring for one simulation run: hardware and perf model, the named policy, the report and plots."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from controller.simulator.engine import Simulator
from controller.simulator.predictor_error import ErroneousPerfModel
from controller.simulator.report import write_plots, write_report
from controller.simulator.scenario import POLICY_NAMES, Scenario
from policies.autopilot.planning import (
    CAP_FRACTIONS, MURAKKAB_SCALE_BAND, MURAKKAB_UTILIZATION_TARGET, MurakkabPolicy, PeakPolicy, PlanningInputs,
    ScaleBand, StaticPolicy,
)
from policies.model import HardwareType, PerfModel
from policies.perf_model import CatalogPerfModel, standard_hardware


def scenario_hardware(scenario: Scenario) -> dict[str, HardwareType]:
    """The standard hardware types with the scenario's overrides (prices, power)."""
    hardware = standard_hardware()
    for name, override in scenario.spec.hardware.items():
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        hardware[name] = dataclasses.replace(hardware[name], **changes)
    return hardware


def h100_equivalent_gpu_hours(gpu_hours: dict[str, float], hardware: dict[str, HardwareType]) -> float:
    """GPU-hours with each device weighted by its price relative to an H100 (an L4 hour is not an H100 hour)."""
    reference = hardware["h100"].price_per_hour_usd
    return sum(h * hardware[name].price_per_hour_usd / reference for name, h in gpu_hours.items()
               if name in hardware and hardware[name].kind == "gpu")


def scenario_digest(scenario: Scenario) -> str:
    """SHA-256 of the scenario as run: its validated spec and the catalog and workflows it loaded."""
    blob = json.dumps({"spec": scenario.spec.model_dump(mode="json"),
                       "catalog": sorted(scenario.catalog), "workflows": sorted(scenario.workflows),
                       "source": Path(scenario.source).name}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def settings_digest(scenario: Scenario) -> str:
    """SHA-256 of the control settings alone (the same for every scenario that shares them)."""
    blob = json.dumps(scenario.spec.control.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_items(scenario: Scenario) -> dict[str, dict[str, float]]:
    items: dict[str, dict[str, float]] = {}
    for (workflow, stage), count in scenario.items.items():
        items.setdefault(workflow, {})[stage] = count
    return items


def build_policy(name: str, scenario: Scenario, perf: PerfModel) -> Any:
    """A policy by name (``POLICY_NAMES``), configured from the scenario's control section.

    One set of settings serves every MILP policy (utilization target, scale band, queueing-aware sizing,
    forecast quantile: murakkab's), so murakkab-epoch differs from murakkab only in the ideas under test:
    5-minute epochs, power caps, co-location, cap lifting on bursts and heat reactions. The ablations add
    them in that order; murakkab has them all.
    """
    control = scenario.spec.control
    inputs = PlanningInputs(workflows=dict(scenario.workflows), catalog=dict(scenario.catalog), perf=perf,
                            stage_items=stage_items(scenario), queueing_slack=control.latency_planning_margin)
    if name == "static-naive":
        return StaticPolicy(inputs, name="static-naive")
    target = control.utilization_target.get(name, control.utilization_target.get("murakkab",
                                                                                  MURAKKAB_UTILIZATION_TARGET))
    tuned = dataclasses.replace(inputs, wait_quantile=control.wait_quantile, switch_penalty=control.switch_penalty,
                                price_weight_w=control.price_weight_w, utilization_target=target)
    if name == "static":
        return PeakPolicy(tuned, headroom=control.static_headroom)
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r} (policies: {', '.join(POLICY_NAMES)})")
    ideas = set(name.split("+")[1:]) if name.startswith("murakkab-epoch") else \
        {"5min", "caps", "colocation", "lift"}
    band = control.scale_band.get(name) or control.scale_band.get("murakkab")
    caps = (tuple(control.cap_fractions) if control.cap_fractions else CAP_FRACTIONS) if "caps" in ideas else (1.0,)
    if "colocation" in ideas:
        tuned = dataclasses.replace(tuned, colocate_max_busy=control.colocate_max_busy)
    epoch_s = control.epoch_s.get(name, control.epoch_s.get("murakkab", 300.0) if "5min" in ideas else 3600.0)
    return MurakkabPolicy(tuned, name=name, epoch_s=epoch_s, tick_s=control.reactive_interval_s,
                          utilization_target=target, cap_fractions=caps,
                          scale_band=MURAKKAB_SCALE_BAND if band is None else ScaleBand(band.low, band.high, band.target),
                          lift_caps_on_bursts="lift" in ideas and control.lift_caps_on_bursts)


def run_simulation(scenario: Scenario, policy_name: str, out_dir: str | Path | None = None, *,
                   plots: bool = True, policy: Any = None) -> tuple[dict[str, Any], Simulator]:
    """Run one policy on a scenario; with ``out_dir``, write report.json and the PNG plots there."""
    hardware = scenario_hardware(scenario)
    perf = CatalogPerfModel(hardware)
    error = scenario.spec.control.predictor_error
    planner_perf = ErroneousPerfModel(perf, error, scenario.spec.seed) if error > 0 else perf
    policy = policy if policy is not None else build_policy(policy_name, scenario, planner_perf)
    sim = Simulator(scenario, policy, perf=perf, hardware=hardware)
    report = sim.run()
    report["predictor_error"] = error
    report["h100_equiv_gpu_hours"] = h100_equivalent_gpu_hours(sim.recorder.gpu_hours_by_hardware, hardware)
    report["scenario_sha256"] = scenario_digest(scenario)
    report["settings_sha256"] = settings_digest(scenario)
    if out_dir is not None:
        started = time.perf_counter()
        write_report(report, out_dir)
        if plots:
            write_plots(sim.recorder, out_dir, f"{scenario.name} / {report['policy']}")
        report["write_s"] = time.perf_counter() - started
    return report, sim
