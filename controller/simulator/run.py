"""Wiring for one simulation run: hardware and perf model, the named policy, the report and plots."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from controller.simulator.engine import Simulator
from controller.simulator.report import write_plots, write_report
from controller.simulator.scenario import POLICY_NAMES, Scenario
from policies.autopilot.planning import (
    CAP_FRACTIONS, MURAKKAB_SCALE_BAND, MURAKKAB_UTILIZATION_TARGET, PAPER_SCALE_BAND, EpochPolicy, MurakkabPolicy,
    PlanningInputs, ScaleBand, StaticPolicy,
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


def stage_items(scenario: Scenario) -> dict[str, dict[str, float]]:
    items: dict[str, dict[str, float]] = {}
    for (workflow, stage), count in scenario.items.items():
        items.setdefault(workflow, {})[stage] = count
    return items


def build_policy(name: str, scenario: Scenario, perf: PerfModel) -> Any:
    """One of the three policies, configured from the scenario's control section."""
    control = scenario.spec.control
    # Both MILP policies keep the margin of every latency bound free for waiting; only murakkab sizes
    # its pools for the waits (the paper's MILP sizes them on throughput).
    inputs = PlanningInputs(workflows=dict(scenario.workflows), catalog=dict(scenario.catalog), perf=perf,
                            stage_items=stage_items(scenario), queueing_slack=control.latency_planning_margin)
    tick_s = control.reactive_interval_s
    if name in control.utilization_target:
        inputs = dataclasses.replace(inputs, utilization_target=control.utilization_target[name])
    band = control.scale_band.get(name)
    if name == "static":
        return StaticPolicy(inputs)
    if name == "murakkab-epoch":
        return EpochPolicy(inputs, epoch_s=control.epoch_s.get(name, 3600.0), tick_s=tick_s,
                           scale_band=PAPER_SCALE_BAND if band is None else ScaleBand(band.low, band.high, band.target))
    if name == "murakkab":
        return MurakkabPolicy(dataclasses.replace(inputs, wait_quantile=control.wait_quantile,
                                                  switch_penalty=control.switch_penalty,
                                                  price_weight_w=control.price_weight_w,
                                                  colocate_max_busy=control.colocate_max_busy),
                              epoch_s=control.epoch_s.get(name, 300.0), tick_s=tick_s,
                              utilization_target=control.utilization_target.get(name, MURAKKAB_UTILIZATION_TARGET),
                              cap_fractions=tuple(control.cap_fractions) if control.cap_fractions else CAP_FRACTIONS,
                              scale_band=MURAKKAB_SCALE_BAND if band is None else
                              ScaleBand(band.low, band.high, band.target),
                              lift_caps_on_bursts=control.lift_caps_on_bursts)
    raise ValueError(f"unknown policy {name!r} (policies: {', '.join(POLICY_NAMES)})")


def run_simulation(scenario: Scenario, policy_name: str, out_dir: str | Path | None = None, *,
                   plots: bool = True, policy: Any = None) -> tuple[dict[str, Any], Simulator]:
    """Run one policy on a scenario; with ``out_dir``, write report.json and the PNG plots there."""
    hardware = scenario_hardware(scenario)
    perf = CatalogPerfModel(hardware)
    policy = policy if policy is not None else build_policy(policy_name, scenario, perf)
    sim = Simulator(scenario, policy, perf=perf, hardware=hardware)
    report = sim.run()
    if out_dir is not None:
        started = time.perf_counter()
        write_report(report, out_dir)
        if plots:
            write_plots(sim.recorder, out_dir, f"{scenario.name} / {report['policy']}")
        report["write_s"] = time.perf_counter() - started
    return report, sim
