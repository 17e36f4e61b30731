"""``murakkabctl``: the operator's command line for a Murakkab cluster."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from common.protocol import (
    ClusterStatus, DrainNode, GetNode, GetStatus, LabelNode, NodeView, UndrainNode,
)
from controller.cli.client import ClientError, add_key_arguments, client_from_args

DEFAULT_CONTROLLER = "tcp://127.0.0.1:7501"
GIB = 1 << 30


def node_json(node: NodeView) -> dict[str, Any]:
    """A node as JSON: devices carry their identity and latest telemetry side by side."""
    samples = {t.index: t._asdict() for t in node.telemetry}
    devices = []
    for info in node.devices:
        device = dataclasses.asdict(info)
        device.update(samples.get(info.index, {}))
        device["throttle_reasons"] = list(device.get("throttle_reasons", ()))
        devices.append(device)
    data = dataclasses.asdict(node)
    data.pop("telemetry")
    data["devices"] = devices
    return data


def _age(unix_s: float | None) -> str:
    if unix_s is None:
        return "never"
    age = max(0.0, time.time() - unix_s)
    return f"{age:.1f}s ago" if age < 120 else f"{age / 60:.0f}m ago"


def _devices_summary(node: NodeView) -> str:
    counts: dict[str, int] = {}
    for d in node.devices:
        label = d.model.replace("NVIDIA ", "")
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n}x {m}" for m, n in counts.items()) or "-"


def nodes_table(nodes: list[NodeView]) -> Table:
    table = Table(title=None, header_style="bold")
    for column in ("NODE", "STATE", "DEVICES", "POWER W", "TEMP C", "MEMORY USED/TOTAL", "LAST SEEN"):
        table.add_column(column, justify="right" if column in ("POWER W", "TEMP C") else "left")
    for node in nodes:
        power = sum(t.power_w for t in node.telemetry)
        temps = [t.temperature_c for t in node.telemetry if t.temperature_c is not None]
        used = sum(t.memory_used_bytes for t in node.telemetry)
        total = sum(t.memory_total_bytes for t in node.telemetry)
        state = node.state + (f" ({node.drain_reason})" if node.drain_reason else "")
        table.add_row(node.name, state, _devices_summary(node), f"{power:.0f}" if node.telemetry else "-",
                      f"{max(temps):.0f}" if temps else "-",
                      f"{used / GIB:.1f}/{total / GIB:.1f} GiB" if node.telemetry else "-", _age(node.last_seen_unix_s))
    return table


def node_detail(console: Console, node: NodeView) -> None:
    console.print(f"[bold]{node.name}[/bold]  host {node.hostname}  state {node.state}  generation {node.generation}")
    if node.drain_reason:
        console.print(f"drain reason: {node.drain_reason}")
    labels = ", ".join(f"{k}={v}" for k, v in sorted(node.labels.items())) or "none"
    console.print(f"labels: {labels}   last seen: {_age(node.last_seen_unix_s)}")
    if node.host:
        h = node.host
        console.print(f"host: cpu {h.cpu_utilization_pct:.0f}%  memory {h.memory_used_bytes / GIB:.1f}/"
                      f"{h.memory_total_bytes / GIB:.1f} GiB  load {h.load_avg_1m:.2f}")
    table = Table(header_style="bold")
    for column in ("DEV", "MODEL", "BACKEND", "POWER W", "LIMIT W", "ENERGY J", "TEMP C", "UTIL %", "SM MHZ",
                   "MEMORY", "HEALTH", "THROTTLE"):
        table.add_column(column)
    samples = {t.index: t for t in node.telemetry}
    for info in node.devices:
        t = samples.get(info.index)
        backend = info.backend + (" (simulated)" if info.simulated else "")
        if t is None:
            table.add_row(str(info.index), info.model, backend, *["-"] * 9)
            continue
        table.add_row(
            str(info.index), info.model, backend, f"{t.power_w:.0f}",
            f"{t.power_limit_w:.0f}" if t.power_limit_w is not None else "-", f"{t.energy_j:.0f}",
            f"{t.temperature_c:.1f}" if t.temperature_c is not None else "-", f"{t.utilization_pct:.0f}",
            str(t.sm_clock_mhz) if t.sm_clock_mhz is not None else "-",
            f"{t.memory_used_bytes / GIB:.1f}/{t.memory_total_bytes / GIB:.1f} GiB",
            t.health + (f" xid {t.last_xid}" if t.last_xid is not None else ""), ",".join(t.throttle_reasons) or "-")
    console.print(table)
    if node.pinned_power_limits:
        pins = ", ".join(f"device {p.device_index} {p.power_limit_w:g} W" for p in node.pinned_power_limits)
        console.print(f"pinned power limits: {pins} (set-power-limit --unpin releases one)", highlight=False)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _label_changes(items: list[str]) -> dict[str, str | None]:
    changes: dict[str, str | None] = {}
    for item in items:
        if item.endswith("-") and "=" not in item:
            changes[item[:-1]] = None
        elif "=" in item:
            key, value = item.split("=", 1)
            changes[key] = value
        else:
            raise ClientError(f"label {item!r}: use KEY=VALUE to set or KEY- to remove")
    return changes


def run_admin(args: argparse.Namespace, console: Console) -> int:
    with client_from_args(args) as client:
        if args.command == "nodes":
            nodes = client.list_nodes()
            if args.output == "json":
                _print_json([node_json(n) for n in nodes])
            else:
                console.print(nodes_table(nodes))
        elif args.command == "status":
            status: ClusterStatus = client.call(GetStatus())
            if args.output == "json":
                _print_json(dataclasses.asdict(status))
            else:
                states = ", ".join(f"{n} {s}" for s, n in sorted(status.nodes_by_state.items())) or "no nodes"
                console.print(f"controller {status.version} epoch {status.controller_epoch}, up "
                              f"{status.uptime_s:.0f}s\nagents {status.agent_endpoint}  admin {status.admin_endpoint}\n"
                              f"nodes: {states}\ndevices: {status.devices_total}, drawing {status.power_w_total:.0f} W\n"
                              f"frames rejected: {status.frames_rejected_total}")
        elif args.command == "node":
            if args.node_command == "show":
                reply = client.call(GetNode(args.name))
            elif args.node_command == "drain":
                reply = client.call(DrainNode(args.name, args.reason))
            elif args.node_command == "undrain":
                reply = client.call(UndrainNode(args.name))
            else:
                reply = client.call(LabelNode(args.name, _label_changes(args.labels)))
            if getattr(args, "output", "table") == "json":
                _print_json(node_json(reply.node))
            elif args.node_command == "show":
                node_detail(console, reply.node)
            else:
                console.print(f"node {reply.node.name}: {reply.node.state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="murakkabctl", description="Operate a Murakkab cluster.")
    parser.add_argument("--controller", default=os.environ.get("MURAKKAB_CONTROLLER", DEFAULT_CONTROLLER),
                        help="controller admin address (default: $MURAKKAB_CONTROLLER or %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the controller")
    add_key_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    from controller.cli.workflows import output_arg as with_output

    with_output(sub.add_parser("nodes", help="list nodes with live telemetry"))
    with_output(sub.add_parser("status", help="controller and cluster summary"))
    node = sub.add_parser("node", help="inspect or change one node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    with_output(node_sub.add_parser("show", help="one node in detail")).add_argument("name")
    drain = with_output(node_sub.add_parser("drain", help="stop placing work on a node"))
    drain.add_argument("name")
    drain.add_argument("--reason", required=True, help="why (kept with the node, shown to operators)")
    with_output(node_sub.add_parser("undrain", help="allow work on a node again")).add_argument("name")
    label = with_output(node_sub.add_parser("label", help="set KEY=VALUE or remove KEY- labels"))
    label.add_argument("name")
    label.add_argument("labels", nargs="+")
    from controller.cli.power import add_node_power_commands, add_power_commands
    add_node_power_commands(node_sub)  # set-power-limit (pins) and fault (drills on simulated GPUs)
    add_power_commands(sub)

    from controller.cli.cluster import add_cluster_commands
    from controller.cli.sim import add_sim_commands
    from controller.cli.workflows import add_workflow_commands
    add_cluster_commands(sub)
    add_workflow_commands(sub)
    add_sim_commands(sub)
    from controller.cli.profile import add_profile_commands
    add_profile_commands(sub)
    from controller.cli.keys import add_keys_commands
    add_keys_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Piped output gets a wide console so tables are not folded into 80 columns.
    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
    try:
        # cluster, catalog, workflow, run, jobs, job, components, sim, plan, profile, power, events,
        # node set-power-limit and node fault
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args, console))
        return run_admin(args, console)
    except ClientError as exc:
        print(f"murakkabctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `murakkabctl nodes | head`
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
