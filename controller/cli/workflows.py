"""``murakkabctl catalog | workflow | run | jobs | job | components``: declare workflows and run jobs.

The helpers that parse ``--input``/``--slo`` values and render jobs are pure (data in,
data or rich renderables out) so they are tested without a controller; the ``cmd_*``
handlers only add the admin round trips.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import mimetypes
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from common.protocol import (
    ApplyCatalog, ApplyWorkflow, CancelJob, ComponentView, DeleteWorkflow, ExecutorView, GetJob, GetWorkflow,
    JobSummary, JobView, ListComponents, ListExecutors, ListJobs, ListWorkflows, SubmitJob,
    WorkflowDetail, WorkflowSummary,
)
from common.workflow.types import BLOBS, check_value, element_type, parse_type, value_bytes
from controller.cli.client import AdminClient, ClientError, ControllerUnreachable, client_from_args

SLO_DIMENSIONS = ("accuracy", "latency")
SLO_TIERS = ("best", "good", "fair", "basic")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
MAX_INPUT_BYTES = 768 * 1024  # the controller enforces its own limit; this keeps frames well under 1 MiB
MAX_POLL_S = 10.0
DEFAULT_WAIT_TIMEOUT_S = 600.0
EXIT_WAIT_TIMEOUT = 2
OCTET_STREAM = "application/octet-stream"
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")

FileReader = Callable[[str, int], bytes]


class InputError(ClientError):
    """A ``--input`` or ``--slo`` value that cannot become a job request."""


# --- --slo and --input parsing (pure) ------------------------------------------------------


def parse_slo(items: Iterable[str]) -> dict[str, str]:
    """``["accuracy:good", "latency:best"]`` -> ``{"accuracy": "good", "latency": "best"}``."""
    slo: dict[str, str] = {}
    for item in items:
        dim, sep, tier = item.partition(":")
        dim, tier = dim.strip().lower(), tier.strip().lower()
        if not sep or not dim or not tier:
            raise InputError(f"--slo {item!r}: use DIMENSION:TIER, e.g. accuracy:good")
        if dim not in SLO_DIMENSIONS:
            raise InputError(f"--slo {item!r}: the dimension must be one of {', '.join(SLO_DIMENSIONS)}")
        if tier not in SLO_TIERS:
            raise InputError(f"--slo {item!r}: the tier must be one of {', '.join(SLO_TIERS)}")
        if dim in slo:
            raise InputError(f"--slo {dim} given more than once")
        slo[dim] = tier
    return slo


def split_input(item: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> ``(KEY, VALUE)``; the value keeps any further ``=``."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--input {item!r}: use KEY=VALUE, or KEY=@FILE to read a file")
    return key.strip(), raw


def read_input_file(path: str, limit_bytes: int) -> bytes:
    """Read a file named by ``KEY=@FILE``, refusing one that alone exceeds the input limit."""
    try:
        size = os.stat(path).st_size
        if size > limit_bytes:
            raise InputError(f"{path!r} is {size} bytes, over the {limit_bytes // 1024} KiB limit for a job's inputs")
        with open(path, "rb") as fh:
            return fh.read(limit_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path!r}: {exc.strerror or exc}") from None


def _strict_json(text: str) -> Any:
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")
    return json.loads(text, parse_constant=no_constant)


def _blob(path: str, data: bytes) -> dict[str, Any]:
    media_type = mimetypes.guess_type(path, strict=False)[0] or OCTET_STREAM
    return {"name": os.path.basename(path), "media_type": media_type, "data": data}


def convert_input(name: str, type_: str, raw: str, read_file: FileReader,
                  limit_bytes: int = MAX_INPUT_BYTES) -> Any:
    """Turn the text after ``KEY=`` into a value of the input's type, or raise InputError.

    ``@PATH`` reads a file (a blob for blob types, UTF-8 text otherwise); ``@@`` escapes a
    literal leading ``@``.
    """
    label = f"input {name!r} ({type_})"
    try:
        type_ = parse_type(type_)
    except ValueError as exc:
        raise InputError(f"input {name!r} has a type this murakkabctl does not know: {exc}") from None
    from_file = raw.startswith("@") and not raw.startswith("@@")
    if raw.startswith("@@"):
        raw = raw[1:]
    if type_ in BLOBS or (element_type(type_) or "") in BLOBS:
        if not from_file or len(raw) < 2:
            raise InputError(f"{label}: give a file, as {name}=@PATH")
        try:
            data = read_file(raw[1:], limit_bytes)
        except InputError as exc:
            raise InputError(f"{label}: {exc}") from None
        return _blob(raw[1:], data)
    if from_file:
        try:
            data = read_file(raw[1:], limit_bytes)
        except InputError as exc:
            raise InputError(f"{label}: {exc}") from None
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{label}: {raw[1:]!r} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                             f"{exc.start})") from None
        if type_ != "text":
            raw = raw.strip()
    if type_ == "text":
        return raw
    if type_ == "integer":
        if not _INTEGER.fullmatch(raw.strip()):
            raise InputError(f"{label}: {_quote(raw)} is not an integer")
        return int(raw.strip())
    if type_ == "number":
        text = raw.strip()
        if _INTEGER.fullmatch(text):
            return int(text)
        if not _NUMBER.fullmatch(text) or not math.isfinite(float(text)):
            raise InputError(f"{label}: {_quote(raw)} is not a finite number")
        return float(text)
    if type_ == "boolean":
        word = raw.strip().lower()
        if word not in ("true", "false"):
            raise InputError(f"{label}: {_quote(raw)} is not true or false")
        return word == "true"
    try:
        value = _strict_json(raw)
    except ValueError as exc:
        raise InputError(f"{label}: invalid JSON: {exc}") from None
    problem = check_value(type_, value, name)
    if problem:
        raise InputError(f"{label}: {problem}")
    return value


def _quote(raw: str, limit: int = 40) -> str:
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")


def spec_body(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``spec`` section of a stored workflow document (or the mapping itself if it is already that)."""
    body = spec.get("spec") if isinstance(spec, Mapping) else None
    return body if isinstance(body, Mapping) else spec if isinstance(spec, Mapping) else {}


def required_inputs(detail: WorkflowDetail) -> set[str]:
    """The workflow's inputs a job must give: all, except those its spec marks optional or defaults."""
    names = set(detail.summary.inputs)
    declared = spec_body(detail.spec).get("inputs")
    if isinstance(declared, Mapping):
        for name, decl in declared.items():
            if isinstance(decl, Mapping) and (decl.get("required") is False or decl.get("default") is not None):
                names.discard(name)
    return names


def build_inputs(workflow: str, items: Iterable[str], types: Mapping[str, str], required: Iterable[str],
                 read_file: FileReader = read_input_file, limit_bytes: int = MAX_INPUT_BYTES) -> dict[str, Any]:
    """Convert every ``--input`` to the workflow's declared types; report unknown, repeated,
    missing and oversized inputs before anything is sent."""
    pairs = [split_input(item) for item in items]
    unknown = sorted({key for key, _ in pairs if key not in types})
    if unknown:
        known = ", ".join(f"{n} ({t})" for n, t in sorted(types.items())) or "none"
        raise InputError(f"workflow {workflow!r} has no input{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} (its inputs: {known})")
    missing = sorted(set(required) - {key for key, _ in pairs})
    if missing:
        raise InputError("missing required input" + ("s " if len(missing) > 1 else " ")
                         + ", ".join(f"{n} ({types[n]})" for n in missing)
                         + f"; pass --input {missing[0]}=VALUE or --input {missing[0]}=@FILE")
    inputs: dict[str, Any] = {}
    for key, raw in pairs:
        value = convert_input(key, types[key], raw, read_file, limit_bytes)
        if key in inputs:
            if (element_type(types[key]) or "") not in BLOBS:
                raise InputError(f"input {key!r} given more than once")
            inputs[key].extend(value if isinstance(value, list) else [value])
        else:
            inputs[key] = [value] if (element_type(types[key]) or "") in BLOBS else value
        total = value_bytes(inputs)
        if total > limit_bytes:
            raise InputError(f"the inputs come to {total} bytes, over the {limit_bytes // 1024} KiB limit for a "
                             f"job's inputs; pass smaller files")
    return inputs


# --- JSON rendering (pure) --------------------------------------------------------------------


def jsonable(value: Any, media_type: str | None = None) -> Any:
    """Plain JSON data: bytes become ``{"bytes": N, "media_type": ...}`` summaries, tuples lists,
    non-finite floats null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, bytes):
        return {"bytes": len(value), "media_type": media_type or OCTET_STREAM}
    if isinstance(value, dict):
        inner = value.get("media_type") if isinstance(value.get("media_type"), str) else None
        return {str(k): jsonable(v, inner) for k, v in value.items()}
    if hasattr(value, "_asdict"):  # NamedTuple
        return jsonable(value._asdict())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2, sort_keys=True, allow_nan=False)


# --- table rendering (pure) ---------------------------------------------------------------------


def _cell(value: Any) -> Text:
    """A table cell shown literally (no rich markup from user data)."""
    return Text("-" if value is None or value == "" else str(value))


def _seconds(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _energy(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def age(unix_s: float | None, now_unix_s: float) -> str:
    if unix_s is None:
        return "-"
    delta = max(0.0, now_unix_s - unix_s)
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    if delta < 172800:
        return f"{delta / 3600:.0f}h ago"
    return f"{delta / 86400:.0f}d ago"


def truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def slo_text(slo: Mapping[str, str]) -> str:
    return ", ".join(f"{d}:{t}" for d, t in sorted(slo.items())) or "default"


def knobs_text(knobs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(jsonable(v))}" for k, v in sorted(knobs.items())) or "-"


def _table(*columns: str, right: Iterable[str] = ()) -> Table:
    table = Table(header_style="bold")
    right = set(right)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def executors_table(executors: Iterable[ExecutorView]) -> Table:
    table = _table("EXECUTOR", "TASK", "ENGINE", "DEVICE", "KNOBS", "VERSION", right=("VERSION",))
    for ex in sorted(executors, key=lambda e: (e.task, e.name)):
        specs = ex.spec.get("knobs", {}) if isinstance(ex.spec.get("knobs"), Mapping) else {}
        knobs = []
        for name, values in sorted(ex.knobs.items()):
            default = specs.get(name, {}).get("default") if isinstance(specs.get(name), Mapping) else None
            shown = [f"{v}*" if v == default and type(v) is type(default) else str(v) for v in values]
            knobs.append(f"{name}={'|'.join(shown)}")
        table.add_row(_cell(ex.name), _cell(ex.task), _cell(ex.engine), _cell(ex.device),
                      _cell("; ".join(knobs)), _cell(ex.version))
    return table


def workflows_table(workflows: Iterable[WorkflowSummary], now_unix_s: float) -> Table:
    table = _table("WORKFLOW", "VERSION", "STAGES", "INPUTS", "DESCRIPTION", "APPLIED", right=("VERSION", "STAGES"))
    for wf in sorted(workflows, key=lambda w: w.name):
        inputs = ", ".join(f"{n}:{t}" for n, t in wf.inputs.items())
        table.add_row(_cell(wf.name), _cell(wf.version), _cell(wf.stages), _cell(inputs),
                      _cell(truncate(wf.description, 60)), _cell(age(wf.applied_at_unix_s, now_unix_s)))
    return table


def _stage_rows(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    stages = spec_body(spec).get("stages")
    if isinstance(stages, Mapping):
        return [dict(s, name=s.get("name", n)) for n, s in stages.items() if isinstance(s, Mapping)]
    if isinstance(stages, list):
        return [s for s in stages if isinstance(s, Mapping)]
    return []


def workflow_detail(detail: WorkflowDetail, now_unix_s: float) -> list[RenderableType]:
    s = detail.summary
    lines: list[RenderableType] = [
        Text(f"workflow {s.name}@{s.version}   {s.stages} stages   applied {age(s.applied_at_unix_s, now_unix_s)}"),
    ]
    if s.description:
        lines.append(Text(s.description))
    lines.append(Text("inputs: " + (", ".join(f"{n} ({t})" for n, t in s.inputs.items()) or "none")))
    rows = _stage_rows(detail.spec)
    if rows:
        table = _table("STAGE", "TASK", "MAP", "INPUTS", "CONSTRAINTS")
        for row in rows:
            wiring = row.get("inputs", {})
            wiring_text = ", ".join(f"{k}={v}" for k, v in wiring.items()) if isinstance(wiring, Mapping) else wiring
            constraints = row.get("constraints") or {}
            if isinstance(constraints, Mapping):
                constraints = ", ".join(f"{k}={v}" for k, v in constraints.items() if v is not None)
            table.add_row(_cell(row.get("name")), _cell(row.get("task")), _cell(row.get("map")),
                          _cell(wiring_text), _cell(constraints))
        lines.append(table)
    outputs = spec_body(detail.spec).get("outputs")
    if isinstance(outputs, Mapping) and outputs:
        lines.append(Text("outputs: " + ", ".join(f"{k}={v}" for k, v in outputs.items())))
    return lines


def jobs_table(jobs: Iterable[JobSummary], now_unix_s: float) -> Table:
    table = _table("JOB", "WORKFLOW", "STATE", "REASON", "SLO", "SUBMITTED", "LATENCY S", "ENERGY J",
                   right=("LATENCY S", "ENERGY J"))
    for job in jobs:
        table.add_row(_cell(job.job_id), _cell(job.workflow), _cell(job.state), _cell(truncate(job.reason, 40)),
                      _cell(slo_text(job.slo)), _cell(age(job.submitted_at_unix_s, now_unix_s)),
                      _cell(_seconds(job.latency_s)), _cell(_energy(job.energy_j)))
    return table


def _stamp(unix_s: float | None) -> str:
    return "-" if unix_s is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s))


def job_header(job: JobView, now_unix_s: float) -> Text:
    """State, reason, workflow@version, SLO and the job's times, one fact per line."""
    lines = [f"job {job.job_id}  {job.state}"]
    if job.reason:
        lines.append(f"reason: {job.reason}")
    lines.append(f"workflow {job.workflow}@{job.workflow_version}   slo {slo_text(job.slo)}")
    times = f"submitted {_stamp(job.submitted_at_unix_s)} ({age(job.submitted_at_unix_s, now_unix_s)})"
    if job.started_at_unix_s is not None:
        times += f"   queued {job.started_at_unix_s - job.submitted_at_unix_s:.2f} s"
        end = job.ended_at_unix_s if job.ended_at_unix_s is not None else now_unix_s
        times += f"   {'ran' if job.ended_at_unix_s is not None else 'running for'} {end - job.started_at_unix_s:.2f} s"
    elif job.ended_at_unix_s is not None:
        times += f"   ended {_stamp(job.ended_at_unix_s)}"
    lines.append(times)
    energies = [i.energy_j for i in job.invocations if i.energy_j is not None]
    simulated = sum(1 for i in job.invocations if i.simulated)
    if job.invocations:
        summary = f"{len(job.invocations)} invocations"
        if energies:
            summary += f", energy {sum(energies):.2f} J"
        if simulated:
            summary += f" ({simulated} simulated)"
        lines.append(summary)
    return Text("\n".join(lines))


def invocations_table(job: JobView) -> Table:
    """One row per stage invocation (each item of a mapped stage, each attempt)."""
    base = job.started_at_unix_s if job.started_at_unix_s is not None else job.submitted_at_unix_s
    with_errors = any(i.error for i in job.invocations)
    columns = ["STAGE", "ITEM", "TRY", "EXECUTOR", "KNOBS", "NODE", "DEVICES", "STATE", "START S", "END S",
               "LATENCY S", "ENERGY J"] + (["ERROR"] if with_errors else [])
    table = _table(*columns, right=("ITEM", "TRY", "START S", "END S", "LATENCY S", "ENERGY J"))
    for inv in job.invocations:
        row = [inv.stage, inv.item, inv.attempt, inv.executor, knobs_text(inv.knobs), inv.node,
               ",".join(map(str, inv.device_indexes)) or None,
               inv.state + (" (simulated)" if inv.simulated else ""),
               _relative(inv.started_at_unix_s, base), _relative(inv.ended_at_unix_s, base),
               _seconds(inv.latency_s, 3), _energy(inv.energy_j)]
        if with_errors:
            row.append(truncate(inv.error, 60))
        table.add_row(*map(_cell, row))
    return table


def _relative(unix_s: float | None, base: float) -> str:
    return "-" if unix_s is None else f"{unix_s - base:.2f}"


def summarize(value: Any, media_type: str | None = None, max_vector: int = 6) -> Any:
    """A value made small for a terminal: bytes as ``<N bytes type>``, long number lists elided."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes {media_type or OCTET_STREAM}>"
    if isinstance(value, dict):
        if isinstance(value.get("data"), bytes) and isinstance(value.get("media_type"), str):
            name = f" {value['name']}" if isinstance(value.get("name"), str) and value["name"] else ""
            return f"<{len(value['data'])} bytes {value['media_type']}>{name}"
        return {k: summarize(v, media_type, max_vector) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > max_vector and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            head = ", ".join(f"{v:.4g}" for v in value[:3])
            return f"<vector of {len(value)} numbers: [{head}, ..., {value[-1]:.4g}]>"
        return [summarize(v, media_type, max_vector) for v in value]
    return value


def renderoutput_arg(value: Any, max_rows: int = 50) -> RenderableType:
    """Text as is; a list of records as a table; lists of text numbered; anything else as JSON."""
    if isinstance(value, str):
        return Text(value)
    small = summarize(value)
    if isinstance(small, str):
        return Text(small)
    if isinstance(small, list) and small and all(isinstance(v, dict) for v in small):
        keys: list[str] = []
        for record in small:
            keys += [str(k) for k in record if str(k) not in keys]
        if len(keys) <= 8:
            table = _table("#", *(k.upper() for k in keys), right=("#",))
            for i, record in enumerate(small[:max_rows]):
                table.add_row(_cell(i), *(_cell(_scalar_text(record.get(k))) for k in keys))
            if len(small) > max_rows:
                return Group(table, Text(f"... {len(small) - max_rows} more"))
            return table
    if isinstance(small, list) and small and all(isinstance(v, str) for v in small):
        lines = [f"[{i}] {v}" for i, v in enumerate(small[:max_rows])]
        if len(small) > max_rows:
            lines.append(f"... {len(small) - max_rows} more")
        return Text("\n".join(lines))
    return Text(json.dumps(jsonable(small), indent=2, sort_keys=True, ensure_ascii=False))


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return truncate(json.dumps(jsonable(value), ensure_ascii=False), 80)
    return "-" if value is None else str(value)


def job_detail(job: JobView, now_unix_s: float) -> list[RenderableType]:
    parts: list[RenderableType] = [job_header(job, now_unix_s)]
    if job.invocations:
        parts.append(invocations_table(job))
    if job.outputs:
        parts.append(Text("outputs:", style="bold"))
        for name, value in job.outputs.items():
            parts.append(Text(f"{name}:", style="bold"))
            parts.append(renderoutput_arg(value))
    return parts


def components_table(components: Iterable[ComponentView]) -> Table:
    table = _table("NODE", "COMPONENT", "EXECUTOR", "DEVICES", "DESIRED", "ACTUAL", "INFLIGHT", "RESTARTS",
                   "REASON", right=("INFLIGHT", "RESTARTS"))
    for c in sorted(components, key=lambda c: (c.node, c.component_id)):
        report = c.report
        actual = "not reported" if report is None else report.state + (" (simulated)" if report.simulated else "")
        reasons = [r for r in ((report.reason if report else ""), c.last_error) if r]
        table.add_row(_cell(c.node), _cell(c.component_id), _cell(c.executor),
                      _cell(",".join(map(str, c.device_indexes)) or None), _cell("yes" if c.desired else "no"),
                      _cell(actual), _cell(report.inflight if report else None),
                      _cell(report.restarts if report else None), _cell(truncate(" / ".join(reasons), 60)))
    return table


# --- waiting for a job ----------------------------------------------------------------------------


def wait_for_job(call: Callable[[Any, float], Any], job_id: str, timeout_s: float, rpc_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[JobView, bool]:
    """Long-poll the job until it ends or ``timeout_s`` passes; return (job, timed_out)."""
    deadline = clock() + timeout_s
    while True:
        remaining = max(0.0, deadline - clock())
        wait_s = min(remaining, MAX_POLL_S)
        asked = clock()
        job = call(GetJob(job_id, wait_s=wait_s), wait_s + rpc_timeout_s).job
        if job.state in TERMINAL_STATES:
            return job, False
        if clock() >= deadline:
            return job, True
        if clock() - asked < min(wait_s, 0.5):  # a controller that answers at once must not be spun on
            sleep(min(0.5, max(0.0, deadline - clock())))


# --- commands -------------------------------------------------------------------------------------


def show(console: Console, renderables: Iterable[RenderableType]) -> None:
    """Print tables normally and text unwrapped, so outputs reach the terminal as they are."""
    for item in renderables:
        console.print(item, soft_wrap=isinstance(item, Text), highlight=False)


def print_json(value: Any) -> None:
    print(dumps(value))


def admin_client(args: argparse.Namespace) -> AdminClient:
    return client_from_args(args)


def _validate_file(path: str, kind: str) -> str:
    """Check a workflow or catalog file locally (errors name file:line), then return its text."""
    from common.workflow.loader import SpecError, load_catalog_file, load_workflow_file
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClientError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ClientError(f"{path!r} is not UTF-8 text (offset {exc.start})") from None
    try:
        (load_catalog_file if kind == "catalog" else load_workflow_file)(path)
    except SpecError as exc:
        raise ClientError(f"{path} is not a valid {kind}:\n{exc}") from None
    return text


def _warn(warnings: Iterable[str]) -> None:
    for warning in warnings:
        print(f"murakkabctl: warning: {warning}", file=sys.stderr)


def cmd_catalog_apply(args: argparse.Namespace, console: Console) -> int:
    text = _validate_file(args.file, "catalog")
    with admin_client(args) as client:
        reply = client.call(ApplyCatalog(os.path.basename(args.file), text))
    if args.output == "json":
        print_json(reply)
    else:
        console.print(Text(f"catalog version {reply.version}: {len(reply.executors)} executors applied "
                           f"({', '.join(reply.executors)})"), soft_wrap=True)
    _warn(reply.warnings)
    return 0


def cmd_catalog_list(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        executors = client.call(ListExecutors()).executors
    if args.output == "json":
        print_json(list(executors))
    elif not executors:
        console.print("no executors; apply a catalog with 'murakkabctl catalog apply FILE'")
    else:
        console.print(executors_table(executors))
    return 0


def cmd_workflow_apply(args: argparse.Namespace, console: Console) -> int:
    text = _validate_file(args.file, "workflow")
    with admin_client(args) as client:
        reply = client.call(ApplyWorkflow(os.path.basename(args.file), text))
    if args.output == "json":
        print_json(reply)
    else:
        note = " (unchanged)" if reply.unchanged else ""
        console.print(Text(f"workflow {reply.name} version {reply.version}{note}"), soft_wrap=True)
    _warn(reply.warnings)
    return 0


def cmd_workflow_list(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        workflows = client.call(ListWorkflows()).workflows
    if args.output == "json":
        print_json(list(workflows))
    elif not workflows:
        console.print("no workflows; apply one with 'murakkabctl workflow apply FILE'")
    else:
        console.print(workflows_table(workflows, time.time()))
    return 0


def cmd_workflow_show(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        detail = client.call(GetWorkflow(args.name))
    if args.output == "json":
        print_json(detail)
    elif args.output == "yaml":
        sys.stdout.write(detail.yaml_text if detail.yaml_text.endswith("\n") else detail.yaml_text + "\n")
    else:
        show(console, workflow_detail(detail, time.time()))
    return 0


def cmd_workflow_delete(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        reply = client.call(DeleteWorkflow(args.name))
    if args.output == "json":
        print_json(reply)
    else:
        console.print(Text(f"deleted workflow {reply.name} ({reply.versions} versions)"))
    return 0


def _print_job(args: argparse.Namespace, console: Console, job: JobView) -> None:
    if args.output == "json":
        print_json(job)
    else:
        show(console, job_detail(job, time.time()))


def _job_exit(job: JobView) -> int:
    if job.state == "succeeded":
        return 0
    print(f"murakkabctl: job {job.job_id} {job.state}: {job.reason or 'no reason given'}", file=sys.stderr)
    return 1


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    slo = parse_slo(args.slo or [])
    if args.timeout_s <= 0:
        raise InputError("--timeout-s must be positive")
    with admin_client(args) as client:
        detail = client.call(GetWorkflow(args.workflow))
        inputs = build_inputs(args.workflow, args.input or [], detail.summary.inputs, required_inputs(detail))
        accepted = client.call(SubmitJob(args.workflow, inputs, slo, args.idempotency_key))
        if not args.wait:
            if args.output == "json":
                print_json({"job_id": accepted.job_id, "workflow_version": accepted.workflow_version})
            else:
                print(accepted.job_id)
            return 0
        try:
            job, timed_out = wait_for_job(client.call, accepted.job_id, args.timeout_s, args.timeout)
        except ControllerUnreachable as exc:
            raise ClientError(f"job {accepted.job_id} was accepted, but waiting for it failed: {exc}") from None
        except KeyboardInterrupt:
            print(f"murakkabctl: stopped waiting; job {accepted.job_id} goes on "
                  f"(murakkabctl job show {accepted.job_id})", file=sys.stderr)
            raise
    _print_job(args, console, job)
    if timed_out:
        print(f"murakkabctl: job {job.job_id} is still {job.state} after {args.timeout_s:g}s; follow it with "
              f"'murakkabctl job show {job.job_id}'", file=sys.stderr)
        return EXIT_WAIT_TIMEOUT
    return _job_exit(job)


def cmd_jobs(args: argparse.Namespace, console: Console) -> int:
    if args.limit < 1:
        raise InputError("--limit must be at least 1")
    with admin_client(args) as client:
        jobs = client.call(ListJobs(limit=args.limit, state=args.state or "", workflow=args.workflow or "")).jobs
    if args.output == "json":
        print_json(list(jobs))
    elif not jobs:
        console.print("no jobs")
    else:
        console.print(jobs_table(jobs, time.time()))
    return 0


def cmd_job_show(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        job = client.call(GetJob(args.job_id)).job
    _print_job(args, console, job)
    return 0


def cmd_job_cancel(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        job = client.call(CancelJob(args.job_id, args.reason)).job
    if args.output == "json":
        print_json(job)
    else:
        reason = f" ({job.reason})" if job.reason else ""
        console.print(Text(f"job {job.job_id}: {job.state}{reason}"), soft_wrap=True)
    return 0


def cmd_components(args: argparse.Namespace, console: Console) -> int:
    with admin_client(args) as client:
        components = client.call(ListComponents()).components
    if args.output == "json":
        print_json(list(components))
    elif not components:
        console.print("no components planned or running")
    else:
        console.print(components_table(components))
    return 0


def output_arg(parser: argparse.ArgumentParser, *extra: str) -> argparse.ArgumentParser:
    parser.add_argument("-o", "--output", choices=("table", "json", *extra), default="table")
    return parser


def add_workflow_commands(sub: Any) -> None:
    """Register catalog, workflow, run, jobs, job and components; each sets ``handler``."""
    catalog = sub.add_parser("catalog", help="the executors the cluster offers")
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True)
    apply = output_arg(catalog_sub.add_parser("apply", help="validate a catalog file, then add or replace its executors"))
    apply.add_argument("file")
    apply.set_defaults(handler=cmd_catalog_apply)
    output_arg(catalog_sub.add_parser("list", help="executors with their knobs")).set_defaults(handler=cmd_catalog_list)

    workflow = sub.add_parser("workflow", help="declare, inspect and delete workflows")
    wf_sub = workflow.add_subparsers(dest="workflow_command", required=True)
    apply = output_arg(wf_sub.add_parser("apply", help="validate a workflow file, then store it as a new version"))
    apply.add_argument("file")
    apply.set_defaults(handler=cmd_workflow_apply)
    output_arg(wf_sub.add_parser("list", help="stored workflows")).set_defaults(handler=cmd_workflow_list)
    wf_show = output_arg(wf_sub.add_parser("show", help="one workflow (yaml: the text as applied)"), "yaml")
    wf_show.add_argument("name")
    wf_show.set_defaults(handler=cmd_workflow_show)
    delete = output_arg(wf_sub.add_parser("delete", help="delete a workflow and its versions"))
    delete.add_argument("name")
    delete.set_defaults(handler=cmd_workflow_delete)

    run = output_arg(sub.add_parser("run", help="submit a job; with --wait, wait for it and show it",
                                 description="Exit status with --wait: 0 succeeded, 1 failed or cancelled, "
                                             "2 still running at --timeout-s."))
    run.add_argument("workflow")
    run.add_argument("-i", "--input", action="append", metavar="KEY=VALUE|KEY=@FILE",
                     help="a workflow input; @FILE reads a file (@@ escapes a leading @); repeat per input")
    run.add_argument("--slo", action="append", metavar="DIM:TIER",
                     help="accuracy|latency : best|good|fair|basic, e.g. --slo accuracy:good (repeatable)")
    run.add_argument("--wait", action="store_true", help="wait for the job to end and show it")
    run.add_argument("--timeout-s", type=float, default=DEFAULT_WAIT_TIMEOUT_S,
                     help="with --wait, give up waiting after this many seconds (default %(default)g)")
    run.add_argument("--idempotency-key", default="",
                     help="a repeated key returns the first job's id instead of submitting again")
    run.set_defaults(handler=cmd_run)

    jobs = output_arg(sub.add_parser("jobs", help="recent jobs, newest first"))
    jobs.add_argument("--state", choices=JOB_STATES)
    jobs.add_argument("--workflow")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.set_defaults(handler=cmd_jobs)

    job = sub.add_parser("job", help="inspect or cancel one job")
    job_sub = job.add_subparsers(dest="job_command", required=True)
    job_show = output_arg(job_sub.add_parser("show", help="a job's stages, executors, times, energy and outputs"))
    job_show.add_argument("job_id")
    job_show.set_defaults(handler=cmd_job_show)
    cancel = output_arg(job_sub.add_parser("cancel", help="cancel a queued or running job"))
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", default="cancelled by operator")
    cancel.set_defaults(handler=cmd_job_cancel)

    output_arg(sub.add_parser("components", help="planned and running components on every node")) \
        .set_defaults(handler=cmd_components)

    from controller.cli.plan import add_plan_commands
    add_plan_commands(sub)
