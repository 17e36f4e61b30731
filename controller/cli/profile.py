"""``murakkabctl profile | profiles``: run a profile sweep on an agent and inspect stored profiles.

``profile EXECUTOR --node NODE --device INDEX [--sweep FILE]`` starts a run in the controller
and polls it with a progress bar, then shows the samples; ``profiles [--executor E] [--fit]``
lists stored samples and, with ``--fit``, each predictor's held-out MAPE. Rendering is pure
(samples in, tables out) so it is tested without a controller.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.protocol import GetProfileRun, ListProfiles, PredictorFit, ProfileRunStatus, StartProfile
from controller.cli.client import AdminClient, ClientError, client_from_args

TERMINAL = ("succeeded", "failed", "cancelled")
POLL_S = 0.5
MAX_SWEEP_BYTES = 64 * 1024


def read_sweep(path: str) -> dict[str, Any]:
    """A sweep file: a YAML mapping of axes (see policies/profiles.py Sweep), or ``{sweep: {...}}``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClientError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    if len(text) > MAX_SWEEP_BYTES:
        raise ClientError(f"{path} is over {MAX_SWEEP_BYTES // 1024} KiB; a sweep is a few lines")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ClientError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if isinstance(data, dict) and set(data) == {"sweep"}:
        data = data["sweep"]
    if not isinstance(data, dict):
        raise ClientError(f"{path}: a sweep is a mapping of axis -> values (e.g. concurrency: [1, 2, 4])")
    return data


def _num(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}g}"


def _knobs(knobs: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "-"


def samples_table(samples: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(header_style="bold")
    columns = ("EXECUTOR", "HW", "SOURCE", "KNOBS", "CONC", "PROMPT", "OUT", "ITEMS", "CAP W", "LATENCY MS",
               "P90 MS", "TTFT MS", "TPOT MS", "RPS", "ENERGY J", "N")
    for column in columns:
        table.add_column(column, justify="left" if column in ("EXECUTOR", "HW", "SOURCE", "KNOBS") else "right")
    for s in samples:
        table.add_row(s["executor"], s["hardware"], s["source"], _knobs(s["knobs"]), str(s["concurrency"]),
                      str(s["prompt_tokens"]), str(s["output_tokens"]), str(s["items"]),
                      _num(s["power_cap_w"], digits=4), _num(s["latency_s"], 1000), _num(s.get("latency_p90_s"), 1000),
                      _num(s["ttft_s"], 1000), _num(s["tpot_s"], 1000), _num(s["throughput_rps"]),
                      _num(s["energy_j_per_request"]), str(s["samples"]))
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def fits_table(fits: Iterable[PredictorFit]) -> Table:
    table = Table(header_style="bold", title="predictors: held-out error (5-fold MAPE); catalog model's error "
                                              "against the measured samples")
    columns = ("EXECUTOR", "HW", "SOURCE", "SAMPLES", "LATENCY MODEL", "LATENCY MAPE", "ENERGY MODEL", "ENERGY MAPE",
               "CATALOG LATENCY MAPE", "CATALOG ENERGY MAPE")
    for column in columns:
        table.add_column(column, justify="right" if "MAPE" in column or column == "SAMPLES" else "left")
    for f in fits:
        table.add_row(f.executor, f.hardware, f.source, str(f.samples), f.latency_model, _pct(f.latency_mape),
                      f.energy_model or "-", _pct(f.energy_mape), _pct(f.modeled_latency_mape),
                      _pct(f.modeled_energy_mape))
    return table


def run_summary(status: ProfileRunStatus) -> str:
    took = (status.ended_at_unix_s or time.time()) - status.started_at_unix_s
    text = (f"profile run {status.run_id}: {status.executor} on {status.node} device {status.device_index} "
            f"{status.state} after {took:.0f} s ({status.done_points}/{status.total_points} points)")
    return text + (f": {status.message}" if status.message else "")


def _status_json(status: ProfileRunStatus) -> dict[str, Any]:
    return {"run_id": status.run_id, "executor": status.executor, "node": status.node,
            "device_index": status.device_index, "state": status.state, "done_points": status.done_points,
            "total_points": status.total_points, "message": status.message, "samples": list(status.samples),
            "started_at_unix_s": status.started_at_unix_s, "ended_at_unix_s": status.ended_at_unix_s}


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    sweep = read_sweep(args.sweep) if args.sweep else {}
    with client_from_args(args) as client:
        started = client.call(StartProfile(args.executor, args.node, args.device, sweep))
        quiet = args.output == "json" or args.no_progress
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[state]}"), console=Console(stderr=True),
                            disable=quiet, transient=False)
        with progress:
            bar = progress.add_task(f"profiling {args.executor}", total=started.points, state="starting")
            deadline = time.monotonic() + args.timeout_s
            while True:
                status = client.call(GetProfileRun(started.run_id, include_samples=False))
                progress.update(bar, completed=status.done_points, state=status.state)
                if status.state in TERMINAL:
                    break
                if time.monotonic() > deadline:
                    print(f"murakkabctl: run {started.run_id} still {status.state} after {args.timeout_s:g} s; "
                          f"it goes on in the controller", file=sys.stderr)
                    return 2
                time.sleep(POLL_S)
        status = client.call(GetProfileRun(started.run_id))
    if args.output == "json":
        print(json.dumps(_status_json(status), indent=2, sort_keys=True))
    else:
        console.print(run_summary(status), highlight=False, soft_wrap=True)
        if status.samples:
            console.print(samples_table(status.samples))
    return 0 if status.state == "succeeded" else 1


def cmd_profiles(args: argparse.Namespace, console: Console) -> int:
    with client_from_args(args) as client:
        listed = client.call(ListProfiles(args.executor or "", args.hardware or "", args.fit, args.limit,
                                          args.run or ""),
                             timeout_s=max(args.timeout, 120.0) if args.fit else None)
    if args.output == "json":
        print(json.dumps({"total": listed.total, "samples": list(listed.samples),
                          "fits": [dataclasses.asdict(f) for f in listed.fits]}, indent=2, sort_keys=True))
        return 0
    if not listed.samples:
        console.print("no profile samples stored" + (f" for {args.executor}" if args.executor else ""))
    else:
        console.print(samples_table(listed.samples))
        if listed.total > len(listed.samples):
            console.print(f"showing {len(listed.samples)} of {listed.total} samples (raise --limit for more)")
    if args.fit:
        console.print(fits_table(listed.fits))
    return 0


def add_profile_commands(sub: Any) -> None:
    profile = sub.add_parser("profile", help="measure an executor on a node's device (a sweep), store the samples")
    profile.add_argument("executor")
    profile.add_argument("--node", required=True)
    profile.add_argument("--device", type=int, required=True, help="device index on the node")
    profile.add_argument("--sweep", metavar="FILE", help="YAML: concurrency, knobs, prompt_tokens, items, "
                                                         "power_caps_w | power_cap_fractions, requests_per_client, ...")
    profile.add_argument("--timeout-s", type=float, default=3600.0, help="stop waiting after this long")
    profile.add_argument("--no-progress", action="store_true", help="no progress bar")
    profile.add_argument("-o", "--output", choices=("table", "json"), default="table")
    profile.set_defaults(handler=cmd_profile)
    profiles = sub.add_parser("profiles", help="stored profile samples; --fit: predictors' held-out error")
    profiles.add_argument("--executor")
    profiles.add_argument("--hardware")
    profiles.add_argument("--run", metavar="RUN_ID", help="only the samples of one profile run")
    profiles.add_argument("--fit", action="store_true", help="also fit predictors and show their held-out MAPE")
    profiles.add_argument("--limit", type=int, default=1000)
    profiles.add_argument("-o", "--output", choices=("table", "json"), default="table")
    profiles.set_defaults(handler=cmd_profiles)
