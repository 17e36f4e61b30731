"""``murakkabctl sim run SCENARIO.yaml --policy static|murakkab-epoch|murakkab -o DIR``: the cluster simulator.

Runs locally (no controller needed): the scenario's cluster, trace and catalog in virtual time,
with the real policies, placement and reconciler. Writes DIR/report.json and PNG plots.
``murakkabctl sim compare DIR...`` prints runs side by side, with ratios against the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from controller.simulator.scenario import POLICY_NAMES, ScenarioError, load_scenario


def _energy(mwh: float) -> str:
    return f"{mwh:.3f} MWh" if mwh >= 0.1 else f"{mwh * 1000:.2f} kWh"


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(header_style="bold", title=f"{report['scenario']} / {report['policy']} (simulated)")
    table.add_column("METRIC")
    table.add_column("VALUE", justify="right")
    slo = report["slo_attainment"]
    plan = report["plan_seconds"]
    rows = [
        ("GPU-hours", f"{report['gpu_hours']:.1f}"),
        ("energy (allocated devices)", _energy(report["energy_mwh"])),
        ("energy (fleet)", _energy(report["fleet_energy_mwh"])),
        ("cost", f"${report['cost_usd']:,.0f}"),
        ("SLO attainment", "-" if slo["overall"] is None else f"{100 * slo['overall']:.2f} %"),
        ("requests arrived / dropped", f"{report['requests']['arrived']:,} / {report['requests']['dropped']:,.0f}"),
        ("plan changes", str(report["plan_changes"])),
        ("plan seconds p50 / max", "-" if plan["p50"] is None else f"{plan['p50']:.3f} / {plan['max']:.3f}"),
        ("reactive decisions", str(report["reactive_seconds"]["count"])),
        ("simulation wall time", f"{report['sim_wall_s']:.1f} s"),
    ]
    for tier, value in sorted(slo["per_tier"].items()):
        rows.append((f"  {tier}", "-" if value is None else f"{100 * value:.2f} %"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def cmd_sim_run(args: argparse.Namespace, console: Console) -> int:
    from controller.simulator.run import run_simulation  # imports the optimizer and matplotlib only when used

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        return 2
    if args.seed is not None:
        scenario = scenario.with_seed(args.seed)
    changes: dict[str, Any] = {}
    if args.predictor_error is not None:
        changes["control"] = scenario.spec.control.model_copy(update={"predictor_error": args.predictor_error})
    if args.judge is not None:
        changes["judge"] = args.judge
    if changes:
        scenario = dataclasses.replace(scenario, spec=scenario.spec.model_copy(update=changes))
    report, _ = run_simulation(scenario, args.policy, args.output_dir, plots=not args.no_plots)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        console.print(summary_table(report))
        console.print(f"wrote {args.output_dir}/report.json" + ("" if args.no_plots else " and plots"))
    return 0


COMPARED = (  # (label, report key path, format, lower is better)
    ("cost (USD)", ("cost_usd",), "{:,.0f}", True),
    ("GPU-hours", ("gpu_hours",), "{:,.1f}", True),
    ("H100-equivalent GPU-hours", ("h100_equiv_gpu_hours",), "{:,.1f}", True),
    ("energy, allocated (MWh)", ("energy_mwh",), "{:.4f}", True),
    ("energy, fleet (MWh)", ("fleet_energy_mwh",), "{:.4f}", True),
    ("SLO attainment (%)", ("slo_attainment", "overall"), "{:.2%}", False),
    ("dropped", ("requests", "dropped"), "{:,.0f}", True),
    ("components started", ("components_started",), "{:,}", True),
    ("plan seconds p50", ("plan_seconds", "p50"), "{:.3f}", True),
    ("plan seconds max", ("plan_seconds", "max"), "{:.3f}", True),
)


def _value(report: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = report
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def compare_rows(reports: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the side-by-side table: each metric per run, and each run's ratio against the first
    (baseline / run for lower-is-better metrics, so a ratio above 1 means the run is better)."""
    rows: list[list[str]] = []
    base = reports[0]
    for label, path, fmt, lower in COMPARED:
        cells = [label]
        for report in reports:
            value = _value(report, path)
            cells.append("-" if value is None else (fmt.format(value) if "%" not in fmt else f"{100 * value:.2f}"))
        rows.append(cells)
        if lower and len(reports) > 1:
            ratio = [f"{label} ratio"]
            first = _value(base, path)
            for report in reports:
                value = _value(report, path)
                ratio.append(f"{first / value:.2f}x" if isinstance(first, (int, float)) and
                             isinstance(value, (int, float)) and value > 0 else "-")
            rows.append(ratio)
    tiers = sorted({t for r in reports for t in (_value(r, ("slo_attainment", "per_tier")) or {})})
    for tier in tiers:
        cells = [f"  {tier} (%)"]
        for report in reports:
            value = (_value(report, ("slo_attainment", "per_tier")) or {}).get(tier)
            cells.append("-" if value is None else f"{100 * value:.2f}")
        rows.append(cells)
    return rows


def cmd_sim_compare(args: argparse.Namespace, console: Console) -> int:
    reports: list[dict[str, Any]] = []
    for directory in args.runs:
        path = Path(directory) / "report.json" if Path(directory).is_dir() else Path(directory)
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            console.print(f"[red]{path}: cannot read a report: {exc}[/red]", highlight=False)
            return 2
    scenarios = sorted({str(r.get("scenario")) for r in reports})
    judges = sorted({str(r.get("judge", "fluid")) for r in reports})
    rows = compare_rows(reports)
    if args.json:
        print(json.dumps({"scenarios": scenarios, "judges": judges, "runs": list(args.runs),
                          "rows": rows}, indent=2))
        return 0
    table = Table(header_style="bold", title=f"{', '.join(scenarios)} (simulated; judge: {', '.join(judges)})")
    table.add_column("METRIC")
    for report, directory in zip(reports, args.runs):
        table.add_column(f"{report.get('policy')}\n{Path(directory).name}", justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if len(judges) > 1 or len(scenarios) > 1:
        console.print("[yellow]warning: the runs differ in scenario or judge; their ratios compare unlike things[/yellow]")
    return 0


def add_sim_commands(sub: Any) -> None:
    """Register ``sim run`` and ``sim compare``."""
    sim = sub.add_parser("sim", help="simulate a cluster in virtual time (local, no controller)")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    run = sim_sub.add_parser("run", help="run one policy on a scenario; writes report.json and plots")
    run.add_argument("scenario", help="scenario YAML (kind: Scenario), e.g. examples/scenarios/day-mix.yaml")
    run.add_argument("--policy", required=True, choices=POLICY_NAMES)
    run.add_argument("-o", "--output-dir", required=True, help="directory for report.json and the PNG plots")
    run.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    run.add_argument("--no-plots", action="store_true", help="write report.json only")
    run.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    run.add_argument("--predictor-error", type=float, default=None, metavar="P",
                     help="bias and noise every prediction the planner sees by about P (0.1: 10 %%)")
    run.add_argument("--judge", choices=("requests", "fluid"), default=None,
                     help="override the scenario's spec.judge (requests: the independent request-level model)")
    run.set_defaults(handler=cmd_sim_run)
    compare = sim_sub.add_parser("compare", help="print runs (report.json files or their directories) side by side")
    compare.add_argument("runs", nargs="+", help="run directories (or report.json files); ratios are against the first")
    compare.add_argument("--json", action="store_true", help="print the table as JSON")
    compare.set_defaults(handler=cmd_sim_compare)
