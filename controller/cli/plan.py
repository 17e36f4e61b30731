"""``murakkabctl plan show``: the current plan, explained.

Per workflow and SLO tier: the executor, knobs and instance configuration chosen for every
stage, the predicted latency (against its target), energy per request and accuracy (murakkab
planner); the instance pools; the constraints that bind; placements and power limits.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from common.protocol import GetPlan
from controller.cli.workflows import admin_client, output_arg, print_json


def cmd_plan_show(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        explanation: dict[str, Any] = client.call(GetPlan()).explanation
    if args.output == "json":
        print_json(explanation)
        return 0
    head = f"planner: {explanation.get('planner')}"
    for key, label in (("status", "status"), ("plan_s", "planned in (s)"), ("power_w", "provisioned power (W)"),
                       ("cost_per_hour_usd", "cost ($/h)")):
        if explanation.get(key) is not None:
            head += f"   {label}: {explanation[key]}"
    console.print(head, highlight=False)
    demands = Table(title="choices per workflow and SLO", header_style="bold", title_justify="left")
    for column in ("WORKFLOW", "SLO", "RATE/S", "STAGE", "EXECUTOR", "KNOBS", "CONFIG", "LATENCY S (TARGET)",
                   "ENERGY J/REQ", "ACCURACY"):
        demands.add_column(column)
    for demand in explanation.get("demands", []):
        slo = ",".join(f"{k}:{v}" for k, v in sorted(demand.get("slo", {}).items())) or "default"
        rate = demand.get("planned_rate_rps")
        predicted = demand.get("predicted") or {}
        latency = (f"{predicted['latency_s']:.3f} ({predicted['latency_target_s']:.3f})"
                   if "latency_s" in predicted else "-")
        energy = f"{predicted['energy_j_per_request']:.1f}" if "energy_j_per_request" in predicted else "-"
        accuracy = predicted.get("accuracy")
        if "unserved" in demand:
            demands.add_row(demand["workflow"], slo, f"{rate}" if rate is not None else "-", "-", "unserved",
                            demand["unserved"], "", "", "", "")
            continue
        for i, (stage, choice) in enumerate(demand.get("stages", {}).items()):
            knobs = ",".join(f"{k}={v}" for k, v in sorted(choice.get("knobs", {}).items())) or "-"
            first = i == 0
            demands.add_row(demand["workflow"] if first else "", slo if first else "",
                            (f"{rate:.3f}" if rate is not None else "-") if first else "", stage, choice["executor"],
                            knobs, choice.get("config") or "-", latency if first else "", energy if first else "",
                            (f"{accuracy:.3f}" if isinstance(accuracy, float) else "-") if first else "")
    console.print(demands)
    if explanation.get("instances"):
        pools = Table(title="instance pools", header_style="bold", title_justify="left")
        for column in ("CONFIG", "INSTANCES", "UNPLACED"):
            pools.add_column(column)
        for pool in explanation["instances"]:
            pools.add_row(pool["config"], str(pool["instances"]), str(pool.get("unplaced", 0)))
        console.print(pools)
    placed = Table(title="placement", header_style="bold", title_justify="left")
    for column in ("COMPONENT", "EXECUTOR", "NODE", "DEVICES"):
        placed.add_column(column)
    for comp in explanation.get("components", []):
        placed.add_row(comp["component_id"], comp["executor"], comp["node"], ",".join(map(str, comp["devices"])) or "-")
    console.print(placed)
    for limit in explanation.get("power_limits", []):
        console.print(f"power limit: {limit['node']} device {limit['device']} -> {limit['power_limit_w']:.0f} W",
                      highlight=False)
    for line in explanation.get("binding", []):
        console.print(f"binding: {line}", highlight=False)
    for note in explanation.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    return 0


def add_plan_commands(sub: Any) -> None:
    plan = sub.add_parser("plan", help="the controller's current plan")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    output_arg(plan_sub.add_parser("show", help="choices, predictions, pools, placements and binding constraints")) \
        .set_defaults(handler=cmd_plan_show)
