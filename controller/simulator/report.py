"""What a simulation run measured: totals for ``report.json`` and time series for the plots.

Definitions (they are also written into the report under ``definitions``):

- ``gpu_hours``: GPU device-hours allocated to components (starting, ready or draining).
- ``energy_mwh``: energy of the allocated devices: allocated GPUs (busy at their operating
  point, idle while loading or waiting for work) plus CPU instances (their share of package power).
- ``fleet_energy_mwh``: every GPU of the fleet (unallocated ones at idle power: they stay
  powered on a real fleet) plus every CPU socket at idle and CPU instances' dynamic power.
  Host overhead (CPUs of GPU nodes, fans, network, cooling) is not modeled.
- ``cost_usd``: allocated device-hours times the hardware price (CPU instances pay their share
  of a socket by cores).
- ``slo_attainment``: requests that met their tier / requests that arrived (dropped requests miss).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

J_PER_MWH = 3.6e9
MAX_EVENTS = 50

DEFINITIONS = {
    "gpu_hours": "GPU device-hours held by components (starting, ready or draining)",
    "h100_equiv_gpu_hours": "GPU device-hours weighted by each device's price relative to an H100",
    "judge": "how requests were served and judged: 'requests' (controller.simulator.judge, a request-level "
             "discrete-event model independent of the planner's formulas) or 'fluid' (expected values per step "
             "from the planner's own perf and queueing model)",
    "dropped": "requests that never finished: no instance of a stage's executor within the grace, no route, or "
               "still unfinished 600 s after the end (request judge); shed load (fluid judge)",
    "energy_mwh": "energy of allocated devices: allocated GPUs at their DVFS operating point (idle power while "
                  "loading or idle) plus CPU instances' share of package power",
    "fleet_energy_mwh": "all GPUs of the fleet (unallocated ones at idle power) plus CPU sockets at idle and CPU "
                        "instances' dynamic power; host overhead, fans and cooling are not modeled",
    "cost_usd": "allocated device-hours x price per device-hour (CPU instances: their share of a socket by cores)",
    "slo_attainment": "requests meeting their tier / requests arrived; an accuracy tier is met when every stage's "
                      "chosen option is within the tier's accuracy slack and the request finishes within the "
                      "default latency bound; a latency tier when it finishes within the tier's bound",
    "plan_seconds": "wall time of one planning decision (an epoch's decide, e.g. the MILP, plus placement and "
                    "reconciliation), per decision that produced a plan; reactive scaling decisions are in "
                    "reactive_seconds, placement + reconciliation alone in placement_seconds",
    "plan_changes": "decisions that changed the desired components (started, stopped or re-capped any) or the "
                    "routing",
    "plan_statuses": "solution status of each planning decision; 'feasible' means the MILP stopped at its time "
                     "limit, so the plan (and the run) can depend on the machine's speed",
}


def tier_label(slo: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{dim}:{tier}" for dim, tier in slo) or "none"


@dataclass
class Recorder:
    """Accumulates per-step series and run totals."""

    tiers: tuple[str, ...]
    times_s: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    served: list[float] = field(default_factory=list)
    met: list[float] = field(default_factory=list)
    gpus_allocated: list[int] = field(default_factory=list)
    gpus_ready: list[int] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    fleet_power_w: list[float] = field(default_factory=list)
    load_by_workflow: dict[str, list[float]] = field(default_factory=dict)
    tier_arrivals: dict[str, float] = field(default_factory=dict)
    tier_served: dict[str, float] = field(default_factory=dict)
    tier_met: dict[str, float] = field(default_factory=dict)
    plan_seconds: list[float] = field(default_factory=list)  # planning decisions (epochs): decide + apply
    reactive_seconds: list[float] = field(default_factory=list)  # reactive scaling decisions
    apply_seconds: list[float] = field(default_factory=list)  # placement + reconciliation of every decision
    plan_changes: int = 0
    plan_statuses: dict[str, int] = field(default_factory=dict)  # solution status -> planning decisions
    decisions: int = 0
    switches: int = 0
    energy_j: float = 0.0
    fleet_energy_j: float = 0.0
    gpu_seconds: float = 0.0
    gpu_seconds_by_hardware: dict[str, float] = field(default_factory=dict)
    cost_usd: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_EVENTS notable events
    event_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tier in self.tiers:
            self.tier_arrivals.setdefault(tier, 0.0)
            self.tier_served.setdefault(tier, 0.0)
            self.tier_met.setdefault(tier, 0.0)

    @property
    def gpu_hours_by_hardware(self) -> dict[str, float]:
        return {k: v / 3600.0 for k, v in sorted(self.gpu_seconds_by_hardware.items())}

    def step(self, t_s: float, arrivals: float, served: float, met: float, gpus_allocated: int, gpus_ready: int,
             power_w: float, fleet_power_w: float, load: dict[str, float]) -> None:
        self.times_s.append(t_s)
        self.arrivals.append(arrivals)
        self.served.append(served)
        self.met.append(met)
        self.gpus_allocated.append(gpus_allocated)
        self.gpus_ready.append(gpus_ready)
        self.power_w.append(power_w)
        self.fleet_power_w.append(fleet_power_w)
        for workflow, rate in load.items():
            self.load_by_workflow.setdefault(workflow, []).append(rate)

    def event(self, t_s: float, kind: str, detail: Any) -> None:
        """A notable event (a refused plan, instances placement could not place), kept for the report."""
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        if len(self.events) < MAX_EVENTS:
            self.events.append({"t_s": t_s, "event": kind, "detail": detail})

    def timing(self, kind: str, decision_s: float, apply_s: float) -> None:
        (self.reactive_seconds if kind == "reactive" else self.plan_seconds).append(decision_s)
        self.apply_seconds.append(apply_s)

    def tier(self, label: str, arrivals: float, served: float, met: float) -> None:
        self.tier_arrivals[label] = self.tier_arrivals.get(label, 0.0) + arrivals
        self.tier_served[label] = self.tier_served.get(label, 0.0) + served
        self.tier_met[label] = self.tier_met.get(label, 0.0) + met

    def report(self, *, scenario: str, policy: str, seed: int, sim_wall_s: float,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        arrived = float(sum(self.arrivals))
        served = float(sum(self.served))
        met = float(sum(self.met))
        per_tier = {t: (self.tier_met[t] / self.tier_arrivals[t]) if self.tier_arrivals[t] > 0 else None
                    for t in sorted(self.tier_arrivals)}
        def timing(values: list[float]) -> dict[str, Any]:
            ordered = sorted(values)
            return {"p50": _percentile(ordered, 0.5), "max": ordered[-1] if ordered else None, "count": len(ordered)}

        report: dict[str, Any] = {
            "scenario": scenario,
            "policy": policy,
            "seed": seed,
            "simulated": True,
            "gpu_hours": self.gpu_seconds / 3600.0,
            "gpu_hours_by_hardware": self.gpu_hours_by_hardware,
            "energy_mwh": self.energy_j / J_PER_MWH,
            "fleet_energy_mwh": self.fleet_energy_j / J_PER_MWH,
            "cost_usd": self.cost_usd,
            "slo_attainment": {"overall": met / arrived if arrived > 0 else None, "per_tier": per_tier},
            "requests": {"arrived": int(round(arrived)), "served": served, "dropped": arrived - served,
                         "met_slo": met},
            "requests_per_tier": {t: {"arrived": self.tier_arrivals[t], "served": self.tier_served[t],
                                      "met_slo": self.tier_met[t]} for t in sorted(self.tier_arrivals)},
            "plan_changes": self.plan_changes,
            "decisions": self.decisions,
            "plan_switches": self.switches,
            "plan_statuses": dict(sorted(self.plan_statuses.items())),
            "plan_seconds": timing(self.plan_seconds),
            "reactive_seconds": timing(self.reactive_seconds),
            "placement_seconds": timing(self.apply_seconds),
            "peak_gpus_allocated": max(self.gpus_allocated, default=0),
            "mean_power_kw": (float(np.mean(self.power_w)) / 1000.0) if self.power_w else 0.0,
            "event_counts": dict(sorted(self.event_counts.items())),
            "events": list(self.events),
            "sim_wall_s": sim_wall_s,
            "definitions": DEFINITIONS,
        }
        if extra:
            report.update(extra)
        return report


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


WALL_TIME_KEYS = ("sim_wall_s", "plan_seconds", "reactive_seconds", "placement_seconds", "write_s")


def without_wall_time(report: dict[str, Any]) -> dict[str, Any]:
    """The report minus the fields that measure wall time (what determinism compares)."""
    return {k: v for k, v in report.items() if k not in WALL_TIME_KEYS}


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_plots(recorder: Recorder, out_dir: str | Path, title: str, window_s: float = 600.0) -> list[Path]:
    """load.png, gpus.png, power.png, slo.png: one PNG per quantity over the simulated time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hours = np.asarray(recorder.times_s) / 3600.0
    step_s = (recorder.times_s[1] - recorder.times_s[0]) if len(recorder.times_s) > 1 else 60.0
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)

    def lines(name: str, what: str, ylabel: str, series: list[tuple[Any, str]]) -> None:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        for values, label in series:
            ax.plot(hours, values, label=label, linewidth=1)
        ax.set_xlabel("time (h)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {what}")
        ax.legend(loc="upper left", fontsize=8)
        save(fig, name)

    lines("load.png", "offered load", "arrivals (requests/s)",
          [(series, workflow) for workflow, series in sorted(recorder.load_by_workflow.items())])
    lines("gpus.png", "GPUs in use", "GPUs",
          [(recorder.gpus_allocated, "allocated"), (recorder.gpus_ready, "serving (ready)")])
    lines("power.png", "power", "power (kW)",
          [(np.asarray(recorder.power_w) / 1000.0, "allocated devices"),
           (np.asarray(recorder.fleet_power_w) / 1000.0, "fleet")])

    window = max(1, int(round(window_s / step_s)))
    arrivals = np.convolve(np.asarray(recorder.arrivals, dtype=float), np.ones(window), mode="same")
    met = np.convolve(np.asarray(recorder.met, dtype=float), np.ones(window), mode="same")
    attainment = np.divide(met, arrivals, out=np.ones_like(met), where=arrivals > 0) * 100.0
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(hours, attainment, linewidth=1)
    ax.axhline(99.0, color="grey", linestyle="--", linewidth=0.8, label="99 %")
    ax.set_xlabel("time (h)")
    ax.set_ylabel(f"SLO attainment (%, {window_s / 60:.0f}-min window)")
    ax.set_ylim(min(90.0, float(attainment.min()) - 1.0) if len(attainment) else 90.0, 100.5)
    ax.set_title(f"{title}: requests meeting their tier")
    ax.legend(loc="lower left", fontsize=8)
    save(fig, "slo.png")
    return paths
