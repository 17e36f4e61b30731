"""``murakkabctl sim run SCENARIO.yaml --policy static|murakkab-epoch|murakkab -o DIR``: the cluster simulator.

Runs locally (no controller needed): the scenario's cluster, trace and catalog in virtual time,
with the real policies, placement and reconciler. Writes DIR/report.json and PNG plots.
"""

from __future__ import annotations

import argparse
import json
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
    report, _ = run_simulation(scenario, args.policy, args.output_dir, plots=not args.no_plots)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        console.print(summary_table(report))
        console.print(f"wrote {args.output_dir}/report.json" + ("" if args.no_plots else " and plots"))
    return 0


def add_sim_commands(sub: Any) -> None:
    """Register ``sim run``."""
    sim = sub.add_parser("sim", help="simulate a cluster in virtual time (local, no controller)")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    run = sim_sub.add_parser("run", help="run one policy on a scenario; writes report.json and plots")
    run.add_argument("scenario", help="scenario YAML (kind: Scenario), e.g. examples/scenarios/day-mix.yaml")
    run.add_argument("--policy", required=True, choices=POLICY_NAMES)
    run.add_argument("-o", "--output-dir", required=True, help="directory for report.json and the PNG plots")
    run.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    run.add_argument("--no-plots", action="store_true", help="write report.json only")
    run.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    run.set_defaults(handler=cmd_sim_run)
