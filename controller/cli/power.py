"""``murakkabctl power budget set|clear|show``, ``events``, ``node set-power-limit`` and ``node fault``.

Power budgets bound what the GPUs of the cluster or of one rack draw (the autopilot caps devices to
hold them); a limit an operator sets by hand is pinned, so the autopilot plans around it until it is
unpinned; ``events`` is the autopilot's log of what it did and why; ``node fault`` drives a simulated
GPU into a cooling failure, an Xid or off the bus, to rehearse the reactions on a live cluster.

Argument checks and rendering are pure (data in, text or rich tables out) so they are tested without a
controller; the ``cmd_*`` handlers add one admin round trip each.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table

from common.protocol import (
    FAULT_DRILL_KINDS, MAX_EVENTS, EventList, FaultDrillResult, GetPowerBudget, InjectDeviceFault, ListEvents,
    PowerBudgetDetail, PowerLimitUnpinned, SetNodePowerLimit, SetPowerBudget, UnpinPowerLimit,
)
from controller.cli.client import ClientError
from controller.cli.workflows import admin_client, output_arg, print_json, truncate

DEFAULT_EVENTS = 50
CAPS_SHOWN = 4  # caps listed per budget row; the rest are counted


# --- argument checks (pure) -------------------------------------------------------------------------


def positive_watts(value: float, what: str) -> float:
    """Refuse NaN, infinities, zero and negative watts before anything is sent."""
    if not (math.isfinite(value) and value > 0):
        raise ClientError(f"{what} must be a positive number of watts, got {value:g}")
    return value


def budget_scope(args: argparse.Namespace) -> str | None:
    """The rack a budget command names, or None for the cluster budget."""
    if args.rack is not None and not args.rack.strip():
        raise ClientError("--rack needs a rack name (the node label 'rack')")
    return args.rack


def scope_text(rack: str | None) -> str:
    return "cluster" if rack is None else f"rack {rack}"


# --- rendering (pure) -------------------------------------------------------------------------------


def _table(*columns: str, right: Iterable[str] = ()) -> Table:
    right = set(right)
    table = Table(header_style="bold")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def _watts(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def caps_text(caps_w: Mapping[str, float], shown: int = CAPS_SHOWN) -> str:
    """``2: node-0/0 250 W, node-0/1 300 W`` (devices whose limits a budget holds down), or ``-``."""
    if not caps_w:
        return "-"
    items = [f"{device} {_watts(watts)} W" for device, watts in sorted(caps_w.items())]
    more = f", +{len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)}: " + ", ".join(items[:shown]) + more


def budget_row_scope(budget: Mapping[str, Any]) -> str:
    return "cluster" if budget.get("scope") == "cluster" else f"rack {budget.get('rack')}"


def budget_renderables(view: Mapping[str, Any], now_unix_s: float | None = None) -> list[RenderableType]:
    """``power budget show``: the budgets, then the hot GPUs, then the pinned limits."""
    out: list[RenderableType] = []
    budgets = view.get("budgets") or []
    if budgets:
        table = _table("SCOPE", "BUDGET W", "MEASURED W", "FLOOR W", "FEASIBLE", "OVER", "SOURCE", "CAPS HELD",
                       right=("BUDGET W", "MEASURED W", "FLOOR W"))
        for b in budgets:
            table.add_row(budget_row_scope(b), _watts(b.get("power_budget_w")), _watts(b.get("measured_power_w")),
                          _watts(b.get("floor_w")), "yes" if b.get("feasible") else "NO",
                          "OVER" if b.get("over") else "no", str(b.get("source") or "-"),
                          caps_text(b.get("caps_w") or {}))
        out.append(table)
    else:
        out.append("power budgets: none set")
    hot = view.get("hot_gpus") or []
    if hot:
        table = _table("HOT GPU", "DEVICE", "HOT FOR S", "REASON", "EVACUATED", "LIMIT W",
                       right=("DEVICE", "HOT FOR S", "LIMIT W"))
        now = time.time() if now_unix_s is None else now_unix_s
        for h in hot:
            since = h.get("since_unix_s")
            table.add_row(str(h.get("node")), str(h.get("device")),
                          f"{max(0.0, now - since):.0f}" if isinstance(since, (int, float)) else "-",
                          str(h.get("reason") or "-"), "yes" if h.get("evacuated") else "no",
                          _watts(h.get("power_limit_w")))
        out.append(table)
    else:
        out.append("hot GPUs: none")
    pins = view.get("pins") or []
    if pins:
        table = _table("PINNED ON", "DEVICE", "LIMIT W", right=("DEVICE", "LIMIT W"))
        for p in pins:
            table.add_row(str(p.get("node")), str(p.get("device")), _watts(p.get("power_limit_w")))
        out.append(table)
    else:
        out.append("pinned power limits: none")
    cooling = view.get("cooling") or []
    if cooling:  # racks a facility reported as not ok
        table = _table("COOLING RACK", "STATE", "INLET C", "GPUS", "SOURCE", "CAPS W", right=("INLET C", "GPUS"))
        for c in cooling:
            inlet = c.get("inlet_c")
            table.add_row(str(c.get("rack")), str(c.get("state")),
                          f"{inlet:.1f}" if isinstance(inlet, (int, float)) else "-", str(c.get("gpus", "-")),
                          str(c.get("source") or "-"), caps_text(c.get("caps_w") or {}))
        out.append(table)
    return out


def budget_line(view: Mapping[str, Any], rack: str | None, watts: float | None) -> str:
    """What ``power budget set|clear`` did, in one line."""
    scope = scope_text(rack)
    if watts is None:
        return f"{scope} power budget cleared"
    entry = next((b for b in view.get("budgets") or []
                  if (b.get("scope") == "cluster") == (rack is None) and b.get("rack") == rack), None)
    text = f"{scope} power budget set to {watts:g} W"
    if entry is not None:
        text += f" (measured {_watts(entry.get('measured_power_w'))} W, floor {_watts(entry.get('floor_w'))} W)"
    return text


def budget_warning(view: Mapping[str, Any], rack: str | None) -> str | None:
    """An infeasible budget is taken but cannot be met: say so."""
    for b in view.get("budgets") or []:
        if (b.get("scope") == "cluster") == (rack is None) and b.get("rack") == rack and not b.get("feasible", True):
            return (f"the {scope_text(rack)} budget is below its floor of {_watts(b.get('floor_w'))} W (what its GPUs "
                    "draw at their lowest limits); it is met as far as the caps go and plans shed work to fit")
    return None


def event_time(unix_s: Any) -> str:
    if not isinstance(unix_s, (int, float)) or not math.isfinite(unix_s):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s))


def events_table(events: Iterable[Mapping[str, Any]]) -> Table:
    table = _table("TIME", "KIND", "SUBJECT", "REASON")
    for e in events:
        table.add_row(event_time(e.get("at_unix_s")), str(e.get("kind", "-")), str(e.get("subject", "-")),
                      truncate(str(e.get("reason", "")), 300))
    return table


# --- commands ---------------------------------------------------------------------------------------


def _show(console: Console, renderables: Iterable[RenderableType]) -> None:
    for item in renderables:
        console.print(item, highlight=False)


def cmd_budget_set(args: argparse.Namespace, console: Console) -> int:
    rack = budget_scope(args)
    watts = positive_watts(args.watts, "a power budget")
    with admin_client(args) as client:
        reply: PowerBudgetDetail = client.call(SetPowerBudget(rack, watts))
    if args.output == "json":
        print_json(reply.view)
    else:
        console.print(budget_line(reply.view, rack, watts), highlight=False)
    warning = budget_warning(reply.view, rack)
    if warning:
        print(f"murakkabctl: warning: {warning}", file=sys.stderr)
    return 0


def cmd_budget_clear(args: argparse.Namespace, console: Console) -> int:
    rack = budget_scope(args)
    with admin_client(args) as client:
        reply: PowerBudgetDetail = client.call(SetPowerBudget(rack, None))
    if args.output == "json":
        print_json(reply.view)
    else:
        console.print(budget_line(reply.view, rack, None), highlight=False)
    return 0


def cmd_budget_show(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        reply: PowerBudgetDetail = client.call(GetPowerBudget())
    if args.output == "json":
        print_json(reply.view)
    else:
        _show(console, budget_renderables(reply.view))
    return 0


def cmd_events(args: argparse.Namespace, console: Console) -> int:
    if not 1 <= args.limit <= MAX_EVENTS:
        raise ClientError(f"--limit must be 1-{MAX_EVENTS}, got {args.limit}")
    with admin_client(args) as client:
        reply: EventList = client.call(ListEvents(args.limit))
    if args.output == "json":
        print_json(list(reply.events))
    elif not reply.events:
        console.print("no autopilot events yet")
    else:
        console.print(events_table(reply.events))
    if reply.omitted:
        print(f"murakkabctl: {reply.omitted} older events did not fit in one reply; ask for fewer with --limit",
              file=sys.stderr)
    return 0


def cmd_set_power_limit(args: argparse.Namespace, console: Console) -> int:
    """Set and pin a device's power limit, or (``--unpin``) hand it back to the autopilot."""
    if args.unpin == (args.watts is not None):
        raise ClientError("give either WATTS (set and pin the limit) or --unpin (release the pin), not both or neither")
    if args.unpin:
        with admin_client(args) as client:
            unpinned: PowerLimitUnpinned = client.call(UnpinPowerLimit(args.name, args.device))
        if args.output == "json":
            print_json(unpinned)
        else:
            console.print(unpinned.message, highlight=False)
        return 0
    watts = positive_watts(args.watts, "a power limit")
    with admin_client(args) as client:
        # The controller waits for the agent (its command timeout), so allow more than one round trip.
        result = client.call(SetNodePowerLimit(args.name, args.device, watts), timeout_s=args.timeout * 3)
    if args.output == "json":
        print_json(result)
    if not result.ok:
        raise ClientError(f"agent refused: {result.message}")
    if args.output != "json":
        console.print(result.message, highlight=False)
    return 0


def cmd_node_fault(args: argparse.Namespace, console: Console) -> int:
    if args.xid is not None and args.kind != "xid":
        raise ClientError(f"--xid goes with fault xid only, not {args.kind}")
    with admin_client(args) as client:
        result: FaultDrillResult = client.call(InjectDeviceFault(args.name, args.device, args.kind, args.xid),
                                               timeout_s=args.timeout * 3)
    if args.output == "json":
        print_json(result)
    else:
        console.print(result.message, highlight=False)
    return 0


def add_node_power_commands(node_sub: Any) -> None:
    """``node set-power-limit`` and ``node fault``; each sets ``handler``."""
    spl = output_arg(node_sub.add_parser(
        "set-power-limit", help="set and pin a device's power limit, or release the pin with --unpin",
        description="A limit set here is pinned: the autopilot's heat, budget and plan caps leave it alone until "
                    "--unpin hands the device back to the autopilot."))
    spl.add_argument("name")
    spl.add_argument("device", type=int, help="device index")
    spl.add_argument("watts", type=float, nargs="?", help="the limit in watts (within the device's range)")
    spl.add_argument("--unpin", action="store_true", help="release a pinned limit instead of setting one")
    spl.set_defaults(handler=cmd_set_power_limit)

    fault = output_arg(node_sub.add_parser(
        "fault", help="fault drill on a simulated GPU: cooling-failure, xid, fall-off-bus, or clear",
        description="Drive a simulated GPU into a fault to rehearse the autopilot's and operators' reactions. "
                    "clear ends a cooling failure; an Xid or a fall off the bus lasts until the agent restarts. "
                    "Real GPUs and CPUs are refused."))
    fault.add_argument("name")
    fault.add_argument("device", type=int, help="device index")
    fault.add_argument("kind", choices=FAULT_DRILL_KINDS)
    fault.add_argument("--xid", type=int, help="Xid code for kind xid (default 48, double-bit ECC)")
    fault.set_defaults(handler=cmd_node_fault)


def add_power_commands(sub: Any) -> None:
    """``power budget set|clear|show`` and ``events``; each sets ``handler``."""
    power = sub.add_parser("power", help="power budgets of the cluster and its racks")
    power_sub = power.add_subparsers(dest="power_command", required=True)
    budget = power_sub.add_parser("budget", help="set, clear or show power budgets, hot GPUs and pins")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)

    def scoped(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        scope = parser.add_mutually_exclusive_group(required=True)
        scope.add_argument("--cluster", action="store_true", help="the whole cluster's budget")
        scope.add_argument("--rack", help="one rack's budget (racks come from the node label 'rack')")
        return parser

    budget_set = scoped(output_arg(budget_sub.add_parser(
        "set", help="bound the GPU power of the cluster or a rack; the autopilot caps devices to hold it")))
    budget_set.add_argument("watts", type=float, help="the budget in watts")
    budget_set.set_defaults(handler=cmd_budget_set)
    scoped(output_arg(budget_sub.add_parser("clear", help="remove a budget"))).set_defaults(handler=cmd_budget_clear)
    output_arg(budget_sub.add_parser("show", help="budgets with measured power, floors and caps; hot GPUs; pins")) \
        .set_defaults(handler=cmd_budget_show)

    events = output_arg(sub.add_parser("events", help="the autopilot's recent events (caps, heat, budgets, pins)"))
    events.add_argument("--limit", type=int, default=DEFAULT_EVENTS,
                        help=f"how many of the newest events (1-{MAX_EVENTS}, default %(default)s)")
    events.set_defaults(handler=cmd_events)
