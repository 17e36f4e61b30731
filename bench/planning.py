"""Planning benchmark: static, murakkab-epoch and murakkab side by side on one scenario (simulated).

    python bench/planning.py [--scenario examples/scenarios/day-mix.yaml] [--out bench/results/planning]
                             [--policies static,murakkab-epoch,murakkab] [--jobs 1] [--no-plots]

Writes OUT/{policy}/report.json and plots, OUT/summary.json (ratios against static and against
murakkab-epoch, the issue's targets and whether each is met) and OUT/summary.md (the same as a
table). Every number is from the cluster simulator (see controller/simulator and bench/README.md,
"Planning"); the same seed gives the same requests to every policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.simulator.run import run_simulation  # noqa: E402
from controller.simulator.scenario import POLICY_NAMES, ControlSpec, load_scenario  # noqa: E402

DEFAULT_SCENARIO = ROOT / "examples" / "scenarios" / "day-mix.yaml"
DEFAULT_OUT = ROOT / "bench" / "results" / "planning"

# The targets of the honest planning benchmark (issue 13): against the tier-aware static deployment at equal or
# better SLO attainment, 2x lower cost and allocated energy; against murakkab-epoch with equal settings, 1.25x
# less energy; SLO attainment at least 99 %; planning at most 1 s per epoch at p50.
TARGETS = {
    "vs_static": {"cost_usd": 2.0, "energy_mwh": 2.0, "slo_attainment_min": 0.99},
    "vs_murakkab_epoch": {"energy_mwh": 1.25},
    "plan_seconds_p50": 1.0,
}


def control_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The scenario's control fields the command line overrides."""
    changes: dict[str, Any] = {}
    if args.latency_margin is not None:
        changes["latency_planning_margin"] = args.latency_margin
    if args.service_time_factor is not None:
        changes["service_time_factor"] = args.service_time_factor
    if args.wait_quantile is not None:
        changes["wait_quantile"] = args.wait_quantile if args.wait_quantile > 0 else None
    if args.switch_penalty is not None:
        changes["switch_penalty"] = args.switch_penalty
    if args.utilization_target is not None:
        changes["utilization_target"] = {"murakkab": args.utilization_target}
    if args.cap_fractions is not None:
        changes["cap_fractions"] = list(args.cap_fractions)
    if args.price_weight_w is not None:
        changes["price_weight_w"] = args.price_weight_w
    if args.no_lift_caps:
        changes["lift_caps_on_bursts"] = False
    if args.colocate_max_busy is not None:
        changes["colocate_max_busy"] = args.colocate_max_busy if args.colocate_max_busy > 0 else None
    if args.predictor_error is not None:
        changes["predictor_error"] = args.predictor_error
    if args.static_headroom is not None:
        changes["static_headroom"] = args.static_headroom
    if args.scale_band is not None:
        low, high, target = args.scale_band
        changes["scale_band"] = {"murakkab": {"low": low, "high": high, "target": target}}
    return changes


def load(scenario_path: str, seed: int | None, changes: dict[str, Any]):
    changes = dict(changes)
    judge = changes.pop("judge", None)
    scenario = load_scenario(scenario_path)
    if judge is not None:
        scenario = dataclasses.replace(scenario, spec=scenario.spec.model_copy(update={"judge": judge}))
    if seed is not None:
        scenario = scenario.with_seed(seed)
    if changes:
        # Validate the overrides as the scenario file's own fields would be.
        control = ControlSpec.model_validate({**scenario.spec.control.model_dump(), **changes})
        scenario = dataclasses.replace(scenario, spec=scenario.spec.model_copy(update={"control": control}))
    return scenario


def run_one(scenario_path: str, policy: str, out_dir: str, plots: bool, seed: int | None,
            changes: dict[str, Any]) -> dict[str, Any]:
    scenario = load(scenario_path, seed, changes)
    started = time.perf_counter()
    report, _ = run_simulation(scenario, policy, Path(out_dir) / policy, plots=plots)
    report["run_wall_s"] = time.perf_counter() - started
    return report


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _band(text: str) -> tuple[float, float, float]:
    try:
        low, high, target = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH,TARGET (three numbers), got {text!r}") from None
    return low, high, target


def ratio(baseline: float | None, ours: float | None) -> float | None:
    """How many times less ``ours`` uses than ``baseline`` (baseline / ours)."""
    if baseline is None or ours is None or ours <= 0:
        return None
    return baseline / ours


def compare(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of every policy against static and murakkab-epoch, and the targets for murakkab."""
    metrics = ("gpu_hours", "h100_equiv_gpu_hours", "energy_mwh", "fleet_energy_mwh", "cost_usd")
    summary: dict[str, Any] = {"policies": {}, "targets": TARGETS, "checks": {}}
    for name, r in reports.items():
        entry: dict[str, Any] = {m: r[m] for m in metrics}
        entry["slo_attainment"] = r["slo_attainment"]["overall"]
        entry["slo_attainment_per_tier"] = r["slo_attainment"]["per_tier"]
        entry["requests_dropped"] = r["requests"]["dropped"]
        entry["judge"] = r.get("judge", "fluid")
        entry["components_started"] = r.get("components_started")
        entry["plan_changes"] = r["plan_changes"]
        entry["plan_seconds"] = r["plan_seconds"]
        entry["peak_gpus_allocated"] = r["peak_gpus_allocated"]
        entry["sim_wall_s"] = r["sim_wall_s"]
        for base in ("static", "murakkab-epoch"):
            if base in reports and base != name:
                entry[f"vs_{base.replace('-', '_')}"] = {m: ratio(reports[base][m], r[m]) for m in metrics}
        summary["policies"][name] = entry
    ours = summary["policies"].get("murakkab")
    checks: dict[str, Any] = {}
    if ours is not None and "vs_static" in ours:
        for metric, want in TARGETS["vs_static"].items():
            if metric == "slo_attainment_min":
                got = ours["slo_attainment"]
                checks["slo_attainment >= 0.99"] = {"measured": got, "met": got is not None and got >= want}
            else:
                got = ours["vs_static"][metric]
                checks[f"{metric} vs static >= {want}x"] = {"measured": got, "met": got is not None and got >= want}
    if ours is not None and "vs_murakkab_epoch" in ours:
        epoch = summary["policies"]["murakkab-epoch"]
        got = ours["vs_murakkab_epoch"]["energy_mwh"]
        want = TARGETS["vs_murakkab_epoch"]["energy_mwh"]
        checks[f"energy vs murakkab-epoch >= {want}x"] = {"measured": got, "met": got is not None and got >= want}
        equal_or_better = (ours["slo_attainment"] or 0.0) >= (epoch["slo_attainment"] or 0.0) - 1e-9
        checks["slo_attainment >= murakkab-epoch's"] = {
            "measured": [ours["slo_attainment"], epoch["slo_attainment"]], "met": equal_or_better}
    if ours is not None and "vs_static" in ours:
        static = summary["policies"]["static"]
        equal_or_better = (ours["slo_attainment"] or 0.0) >= (static["slo_attainment"] or 0.0) - 1e-9
        checks["slo_attainment >= static's"] = {"measured": [ours["slo_attainment"], static["slo_attainment"]],
                                               "met": equal_or_better}
    if ours is not None:
        typical = ours["plan_seconds"]["p50"]
        checks[f"plan_seconds p50 <= {TARGETS['plan_seconds_p50']} s"] = {
            "measured": typical, "met": typical is not None and typical <= TARGETS["plan_seconds_p50"]}
    summary["checks"] = checks
    return summary


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(summary: dict[str, Any], scenario: str, seed: int, margin: float, factor: float = 1.0) -> str:
    lines = [f"Scenario `{scenario}`, seed {seed}, judge `{summary.get('judge', 'fluid')}`, predictor error "
             f"{summary.get('predictor_error', 0):g}, latency planning margin {margin:g}, service time factor "
             f"{factor:g}, simulated.", "",
             "| policy | GPU-hours | energy (MWh, allocated) | energy (MWh, fleet) | cost (USD) | SLO attainment "
             "| dropped | plan changes | plan s p50 / max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in summary["policies"].items():
        plan = p["plan_seconds"]
        lines.append(f"| {name} | {p['gpu_hours']:.1f} | {p['energy_mwh']:.3f} | {p['fleet_energy_mwh']:.3f} | "
                     f"{p['cost_usd']:,.0f} | {_f(p['slo_attainment'] and 100 * p['slo_attainment'], '.2f')} % | "
                     f"{p['requests_dropped']:,.0f} | {p['plan_changes']} | "
                     f"{_f(plan['p50'], '.2f')} / {_f(plan['max'], '.2f')} |")
    lines += ["", "| ratio (baseline / policy) | GPU-hours | energy (allocated) | energy (fleet) | cost |",
              "|---|---:|---:|---:|---:|"]
    for name, p in summary["policies"].items():
        for base in ("vs_static", "vs_murakkab_epoch"):
            if base in p:
                r = p[base]
                lines.append(f"| {name} {base.replace('_', ' ').replace('murakkab epoch', 'murakkab-epoch')} | "
                             f"{_f(r['gpu_hours'], '.2f')}x | {_f(r['energy_mwh'], '.2f')}x | "
                             f"{_f(r['fleet_energy_mwh'], '.2f')}x | {_f(r['cost_usd'], '.2f')}x |")
    tiers = sorted({t for p in summary["policies"].values() for t in p["slo_attainment_per_tier"]})
    lines += ["", "| SLO attainment per tier | " + " | ".join(summary["policies"]) + " |",
              "|---|" + "---:|" * len(summary["policies"])]
    for tier in tiers:
        cells = [_f(p["slo_attainment_per_tier"].get(tier) and 100 * p["slo_attainment_per_tier"][tier], ".2f")
                 for p in summary["policies"].values()]
        lines.append(f"| {tier} | " + " | ".join(f"{c} %" for c in cells) + " |")
    if summary["checks"]:
        lines += ["", "| target (murakkab) | measured | met |", "|---|---:|---|"]
        for name, check in summary["checks"].items():
            got = check["measured"]
            shown = ", ".join(_f(v, ".4g") for v in got) if isinstance(got, list) else _f(got, ".4g")
            lines.append(f"| {name} | {shown} | {'yes' if check['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=str(DEFAULT_SCENARIO))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    parser.add_argument("--latency-margin", type=float, default=None,
                        help="override control.latency_planning_margin (the MILP policies' queueing headroom)")
    parser.add_argument("--service-time-factor", type=float, default=None,
                        help="override control.service_time_factor (true service time / the planners' model)")
    parser.add_argument("--wait-quantile", type=float, default=None,
                        help="override control.wait_quantile (murakkab's queueing-aware sizing; 0 turns it off)")
    parser.add_argument("--switch-penalty", type=float, default=None,
                        help="override control.switch_penalty (murakkab's plan stability)")
    parser.add_argument("--utilization-target", type=float, default=None,
                        help="override murakkab's MILP utilization target (control.utilization_target)")
    parser.add_argument("--cap-fractions", type=_numbers, default=None, metavar="F,F,...",
                        help="override murakkab's power-cap levels, fractions of TDP (control.cap_fractions)")
    parser.add_argument("--price-weight-w", type=float, default=None, metavar="W",
                        help="override the W per USD/h of instance price in murakkab's energy objective "
                             "(control.price_weight_w; 0: energy alone)")
    parser.add_argument("--colocate-max-busy", type=float, default=None, metavar="RHO",
                        help="override control.colocate_max_busy (murakkab's co-location of one-instance GPU "
                             "pools; 0 turns it off)")
    parser.add_argument("--no-lift-caps", action="store_true",
                        help="murakkab's autoscaler adds instances without lifting power caps first "
                             "(control.lift_caps_on_bursts: false)")
    parser.add_argument("--scale-band", type=_band, default=None, metavar="LOW,HIGH,TARGET",
                        help="override murakkab's reactive autoscaler band (control.scale_band)")
    parser.add_argument("--predictor-error", type=float, default=None, metavar="P",
                        help="bias and noise every prediction the planners see by about P (control.predictor_error)")
    parser.add_argument("--static-headroom", type=float, default=None, metavar="X",
                        help="static provisions for the peak times X (control.static_headroom)")
    parser.add_argument("--judge", choices=("requests", "fluid"), default=None,
                        help="override the scenario's spec.judge (requests: the independent request-level model)")
    parser.add_argument("--jobs", type=int, default=1, help="policies simulated in parallel (processes)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        parser.error(f"unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    changes = control_changes(args)
    if args.judge is not None:
        changes["judge"] = args.judge
    try:
        scenario = load(args.scenario, args.seed, changes)
    except ValueError as error:  # pydantic's ValidationError is one
        parser.error(f"control overrides: {error}")
    seed = scenario.seed
    reports: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(policies), os.cpu_count() or 1)) as pool:
            futures = {p: pool.submit(run_one, args.scenario, p, str(out), not args.no_plots, args.seed, changes)
                       for p in policies}
            for p in policies:
                reports[p] = futures[p].result()
    else:
        for p in policies:
            reports[p] = run_one(args.scenario, p, str(out), not args.no_plots, args.seed, changes)
            r = reports[p]
            print(f"{p}: {r['gpu_hours']:.1f} GPU-h, {r['energy_mwh']:.3f} MWh, ${r['cost_usd']:,.0f}, "
                  f"SLO {100 * (r['slo_attainment']['overall'] or 0):.2f} %, {r['sim_wall_s']:.1f} s", flush=True)
    summary = compare(reports)
    summary.update({"scenario": scenario.name, "seed": seed, "simulated": True,
                    "latency_planning_margin": scenario.spec.control.latency_planning_margin,
                    "service_time_factor": scenario.spec.control.service_time_factor,
                    "judge": scenario.spec.judge,
                    "predictor_error": scenario.spec.control.predictor_error,
                    "wait_quantile": scenario.spec.control.wait_quantile,
                    "control_overrides": changes,
                    "bench_wall_s": time.perf_counter() - started})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    table = markdown(summary, scenario.name, seed, scenario.spec.control.latency_planning_margin,
                     scenario.spec.control.service_time_factor)
    (out / "summary.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
