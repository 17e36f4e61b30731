"""Simulation scenarios: the cluster, the catalog and workflows, the request trace and the control settings.

A scenario is a YAML document (``kind: Scenario``) validated with pydantic. Every problem is
reported at once as ``ScenarioError`` with a field path (``spec.cluster.node_groups[1].hardware:
unknown hardware 'h200' ...``), so an operator can fix a file in one pass. Catalog and workflow
files are named relative to the scenario file and loaded with the same loaders the controller
uses (``common.workflow.loader``), so a scenario can only reference what a real cluster accepts.

The document:

    apiVersion: murakkab.dev/v1
    kind: Scenario
    metadata: {name: day-mix, description: ...}
    spec:
      seed: 7                      # drives the arrivals (and nothing else)
      duration_s: 86400
      step_s: 60                   # arrivals are drawn and service evaluated per step
      cluster:
        ambient_c: 25
        racks: [{name: r1, power_budget_w: 40000}]
        node_groups:
          - {name: h100, count: 40, hardware: h100, devices_per_node: 8, racks: [r1]}
      hardware: {h100: {price_per_hour_usd: 4.0}}   # overrides of the standard hardware types
      catalog: [{file: ../catalog/sim.yaml}, {file: ../catalog/cpu.yaml, engines: [tool]}]
      workflows: [{file: ../workflows/rag-qa.yaml, items: {embed_passages: 20}}]
      trace:                       # load shapes, trace files: docs/traces.md
        workflows: {rag-qa: {base_rps: 1, peak_rps: 4, peak_hour: 14}}
        bursts: [{at_hour: 11, duration_s: 1200, multiplier: 2, workflows: [rag-qa]}]
        tiers: {accuracy_share: 0.7, levels: {best: 0.25, good: 0.25, fair: 0.25, basic: 0.25}}
      control: {reactive_interval_s: 60, startup: {base_s: 15, per_gb_s: 0.5, tool_s: 2}}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from common.devices.gpu_specs import GPU_SPECS
from common.workflow.catalog import ExecutorSpec
from common.workflow.loader import SpecError, load_catalog_file, load_workflow_file
from common.workflow.spec import WorkflowSpec
from controller.simulator.trace_files import TraceFileError, read_rate_file, read_request_file, trace_path
from policies.plan import SLO_TIERS

API_VERSION = "murakkab.dev/v1"
MAX_NODES = 1000  # the scale the issue asks for; larger clusters need a faster placement first
MAX_DURATION_S = 7 * 86400.0
HARDWARE_NAMES = tuple(sorted(GPU_SPECS)) + ("cpu",)
# static: the tier-aware MILP once for the peak x control.static_headroom; static-naive: best accuracy on the fastest
# GPU for the peak x 1.2 (the paper's LangGraph deployment); murakkab-epoch: hourly MILP with every setting murakkab
# has that is not one of the ideas under test; the "+" names add those ideas one at a time (ABLATIONS).
ABLATIONS = ("murakkab-epoch+5min", "murakkab-epoch+5min+caps", "murakkab-epoch+5min+caps+colocation",
             "murakkab-epoch+5min+caps+colocation+lift")
POLICY_NAMES = ("static", "static-naive", "murakkab-epoch", "murakkab") + ABLATIONS


class ScenarioError(ValueError):
    """Everything wrong with a scenario, one ``where: what`` line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: invalid scenario:\n" + "\n".join(f"  {p}" for p in self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the cluster -----------------------------------------------------------------------------


class RackSpec(_Strict):
    name: str = Field(min_length=1, max_length=63)
    power_budget_w: float | None = Field(None, gt=0, description="most the rack's GPUs may draw; None: unlimited")


class NodeGroupSpec(_Strict):
    """``count`` identical nodes, in the named ``racks`` (round-robin) or in racks of their own.

    With ``rack_size`` the group fills racks ``{name}-r{n}`` of that many nodes each, every rack with
    ``rack_power_budget_w`` (GPU power, as placement counts it); ``racks`` then must be empty.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=40)
    count: int = Field(ge=1, le=MAX_NODES)
    hardware: str
    devices_per_node: int = Field(8, ge=1, le=16, description="GPUs per node; for cpu nodes, CPU sockets")
    cpu_cores: int = Field(64, ge=1, le=1024)
    memory_bytes: int = Field(1 << 40, gt=0, description="host memory")
    racks: list[str] = Field(default_factory=list)
    rack_size: int | None = Field(None, ge=1, le=64, description="nodes per rack of the group's own racks")
    rack_power_budget_w: float | None = Field(None, gt=0, description="budget of each of the group's own racks")

    @model_validator(mode="after")
    def _own_racks(self) -> "NodeGroupSpec":
        if self.rack_size is not None and self.racks:
            raise ValueError("racks: give either racks (shared, declared under cluster.racks) or rack_size "
                             "(racks of the group's own), not both")
        if self.rack_power_budget_w is not None and self.rack_size is None:
            raise ValueError("rack_power_budget_w: needs rack_size (the group's own racks)")
        return self

    def rack_of(self, n: int) -> str | None:
        """The rack of the group's n-th node."""
        if self.rack_size is not None:
            return f"{self.name}-r{n // self.rack_size:03d}"
        return self.racks[n % len(self.racks)] if self.racks else None

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, value: str) -> str:
        if value not in HARDWARE_NAMES:
            raise ValueError(f"unknown hardware {value!r} (known: {', '.join(HARDWARE_NAMES)})")
        return value


class ClusterSpec(_Strict):
    ambient_c: float = Field(25.0, ge=-20, le=60, description="inlet air or coolant temperature")
    racks: list[RackSpec] = Field(default_factory=list)
    node_groups: list[NodeGroupSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterSpec":
        names = [r.name for r in self.racks]
        if len(set(names)) != len(names):
            raise ValueError(f"racks: rack names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        groups = [g.name for g in self.node_groups]
        if len(set(groups)) != len(groups):
            raise ValueError(f"node_groups: group names repeat: {sorted({n for n in groups if groups.count(n) > 1})}")
        for i, group in enumerate(self.node_groups):
            unknown = [r for r in group.racks if r not in names]
            if unknown:
                raise ValueError(f"node_groups[{i}].racks: unknown rack(s) {unknown} "
                                 f"(declared racks: {', '.join(names) or 'none'})")
        total = sum(g.count for g in self.node_groups)
        if total > MAX_NODES:
            raise ValueError(f"node_groups: {total} nodes in all; at most {MAX_NODES} are supported")
        return self


class HardwareOverride(_Strict):
    price_per_hour_usd: float | None = Field(None, ge=0)
    idle_power_w: float | None = Field(None, gt=0)
    max_power_w: float | None = Field(None, gt=0)


# --- what runs -------------------------------------------------------------------------------


class CatalogRef(_Strict):
    file: str = Field(min_length=1)
    engines: list[Literal["vllm", "tool", "sim"]] | None = Field(None, description="keep only these engines")
    executors: list[str] | None = Field(None, description="keep only these executors")


class WorkflowRef(_Strict):
    file: str = Field(min_length=1)
    items: dict[str, float] = Field(default_factory=dict,
                                    description="stage -> elements a mapped stage runs over (e.g. passages)")

    @field_validator("items")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for stage, count in value.items():
            if not count >= 1:
                raise ValueError(f"{stage}: items must be at least 1, got {count}")
        return value


# --- the request trace -------------------------------------------------------------------------


class WorkflowLoad(_Strict):
    """Diurnal load: a raised cosine from ``base_rps`` (at peak_hour +- 12 h) to ``peak_rps`` at ``peak_hour``."""

    base_rps: float = Field(ge=0)
    peak_rps: float = Field(gt=0)
    peak_hour: float = Field(14.0, ge=0, lt=24)

    @model_validator(mode="after")
    def _ordered(self) -> "WorkflowLoad":
        if self.base_rps > self.peak_rps:
            raise ValueError(f"base_rps: {self.base_rps} is above peak_rps {self.peak_rps}")
        return self


class RequestFileLoad(_Strict):
    """Replays a per-request trace (``TIMESTAMP,ContextTokens,GeneratedTokens``, docs/traces.md)."""

    requests_file: str = Field(min_length=1, description="relative to the scenario file")
    time_scale: float = Field(1.0, gt=0, le=1000, description="arrival times are multiplied by this (0.5: twice "
                                                               "as fast, so twice the rate)")
    rate_scale: float = Field(1.0, gt=0, le=1000, description="below 1 keeps each request with this probability; "
                                                               "above 1 replicates requests, copies jittered in time")
    start_s: float = Field(0.0, ge=0, description="scenario time 0 is this far into the trace (trace seconds)")
    repeat: bool = Field(True, description="the trace tiles to cover the scenario; false: it plays once")


class RateFileLoad(_Strict):
    """Replays a rate curve (``window_start_s,rate_rps,arrival_cv``, docs/traces.md), scaled to ``peak_rps``."""

    rate_file: str = Field(min_length=1, description="relative to the scenario file")
    start_s: float = Field(0.0, ge=0, description="scenario time 0 is this far into the file (its window_start_s)")
    peak_rps: float = Field(gt=0, description="the highest window within the scenario's duration gets this rate")


FileLoad = RequestFileLoad | RateFileLoad
LOAD_SHAPES: dict[str, type[BaseModel]] = {"cosine": WorkflowLoad, "requests-file": RequestFileLoad,
                                           "rate-file": RateFileLoad}
_SHAPE_HELP = ("a load is a mapping of one of three shapes: cosine {base_rps, peak_rps, peak_hour}, "
               "requests-file {requests_file, time_scale, rate_scale, start_s, repeat} or "
               "rate-file {rate_file, start_s, peak_rps}")


def _load_shape(value: Any) -> str | None:
    """The shape a load is validated as: by its file key, cosine without one (errors then name that shape)."""
    if isinstance(value, BaseModel):
        return next((tag for tag, model in LOAD_SHAPES.items() if isinstance(value, model)), None)
    if not isinstance(value, dict):
        return None
    return "requests-file" if "requests_file" in value else "rate-file" if "rate_file" in value else "cosine"


LoadSpec = Annotated[
    Annotated[WorkflowLoad, Tag("cosine")] | Annotated[RequestFileLoad, Tag("requests-file")]
    | Annotated[RateFileLoad, Tag("rate-file")],
    Discriminator(_load_shape, custom_error_type="load_shape", custom_error_message=_SHAPE_HELP)]


class BurstSpec(_Strict):
    at_hour: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    multiplier: float = Field(gt=0)
    workflows: list[str] | None = Field(None, description="workflows the burst hits; None: all")


def _default_levels() -> dict[str, float]:
    return {"best": 0.25, "good": 0.25, "fair": 0.25, "basic": 0.25}


class TierMix(_Strict):
    """Share of requests with an accuracy tier (the rest carry a latency tier), and how each spreads over levels."""

    accuracy_share: float = Field(0.7, ge=0, le=1)
    levels: dict[str, float] = Field(default_factory=_default_levels)
    accuracy_levels: dict[str, float] | None = None  # overrides ``levels`` for accuracy tiers
    latency_levels: dict[str, float] | None = None  # overrides ``levels`` for latency tiers

    @model_validator(mode="after")
    def _distributions(self) -> "TierMix":
        for name in ("levels", "accuracy_levels", "latency_levels"):
            dist = getattr(self, name)
            if dist is None:
                continue
            unknown = [k for k in dist if k not in SLO_TIERS]
            if unknown:
                raise ValueError(f"{name}: unknown tier(s) {unknown} (tiers: {', '.join(SLO_TIERS)})")
            if any(v < 0 for v in dist.values()):
                raise ValueError(f"{name}: shares must not be negative")
            total = sum(dist.values())
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ValueError(f"{name}: shares must sum to 1, got {total:g}")
        return self

    def distribution(self, dimension: str) -> dict[str, float]:
        override = self.accuracy_levels if dimension == "accuracy" else self.latency_levels
        return dict(override if override is not None else self.levels)


class TraceSpec(_Strict):
    workflows: dict[str, LoadSpec] = Field(min_length=1)
    bursts: list[BurstSpec] = Field(default_factory=list, description="rate multipliers; cosine loads only")
    tiers: TierMix = Field(default_factory=TierMix)

    @field_validator("workflows", mode="before")
    @classmethod
    def _one_shape_each(cls, value: Any) -> Any:
        """Say which shape was meant when a load mixes them (pydantic would only list unknown keys)."""
        if not isinstance(value, dict):
            return value
        problems = []
        cosine_keys = set(WorkflowLoad.model_fields)
        file_only = (set(RequestFileLoad.model_fields) | set(RateFileLoad.model_fields)) - cosine_keys
        cosine_only = cosine_keys - set(RateFileLoad.model_fields)
        for name, load in value.items():
            if not isinstance(load, dict):
                continue
            files = sorted({"requests_file", "rate_file"} & set(load))
            if len(files) > 1:
                problems.append(f"{name}: both requests_file and rate_file given; a load replays one file")
            elif not files and set(load) & file_only and not set(load) & cosine_only:
                keys = sorted(set(load) & file_only)
                problems.append(f"{name}: {', '.join(keys)} belong to a file load, which needs requests_file or "
                                f"rate_file ({_SHAPE_HELP})")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def file_loads(self) -> dict[str, FileLoad]:
        """The workflows whose load replays a trace file."""
        return {name: load for name, load in self.workflows.items()
                if isinstance(load, (RequestFileLoad, RateFileLoad))}


def _trace_file_problems(trace: TraceSpec, duration_s: float, base: Path) -> list[str]:
    """Read every trace file now, so a bad file is reported with the scenario (file and line), not mid-run."""
    problems = []
    for name, load in trace.file_loads().items():
        key = "requests_file" if isinstance(load, RequestFileLoad) else "rate_file"
        where = f"spec.trace.workflows.{name}.{key}"
        path = trace_path(base, getattr(load, key))
        try:
            if isinstance(load, RequestFileLoad):
                requests = read_request_file(path)
                if load.repeat:
                    requests.period_s  # noqa: B018 - raises when the trace cannot tile
                elif load.start_s >= requests.span_s:
                    problems.append(f"spec.trace.workflows.{name}.start_s: {load.start_s:g} s is past the last "
                                    f"request of {path} ({requests.span_s:g} s) and repeat is false")
            else:
                curve = read_rate_file(path)
                windows = curve.covering(load.start_s, load.start_s + duration_s)
                if not curve.rate_rps[windows].max() > 0:
                    problems.append(f"{where}: {path}: every window within start_s {load.start_s:g} .. "
                                    f"{load.start_s + duration_s:g} s has rate 0; nothing to scale to peak_rps")
        except TraceFileError as exc:
            problems.append(f"{where}: {exc}")
    return problems


# --- control -----------------------------------------------------------------------------------


class StartupSpec(_Strict):
    """Start-up delay of a component: model engines load weights, tools start quickly (estimates)."""

    base_s: float = Field(15.0, ge=0, description="engine process start and warm-up")
    per_gb_s: float = Field(0.5, ge=0, description="seconds per GB of device memory loaded (about 2 GB/s)")
    tool_s: float = Field(2.0, ge=0, description="start-up of tool components")


class ScaleBandSpec(_Strict):
    """The reactive autoscaler's band: it acts below ``low`` or above ``high`` and scales back to ``target``."""

    low: float = Field(ge=0, le=1)
    high: float = Field(gt=0)
    target: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ScaleBandSpec":
        if not self.low < self.target < self.high:
            raise ValueError(f"needs low < target < high, got low {self.low}, target {self.target}, high {self.high}")
        return self


class ControlSpec(_Strict):
    reactive_interval_s: float = Field(60.0, gt=0, description="how often policies are asked for a decision")
    epoch_s: dict[str, float] = Field(default_factory=dict, description="policy name -> planning epoch override")
    startup: StartupSpec = Field(default_factory=StartupSpec)
    drain_s: float = Field(5.0, ge=0, description="a stopped component holds its devices this long")
    switch_timeout_s: float = Field(600.0, gt=0, description="longest an old plan serves while a new one starts")
    max_utilization: float = Field(0.98, gt=0, le=1, description="pools shed load above this occupancy")
    warm_start: bool = Field(True, description="the first plan's components are ready at time 0")
    service_time_factor: float = Field(
        1.0, gt=0, le=10, description="true service times are the perf model's times this (1.1: the model the "
                                      "planners use is 10 % optimistic); for sensitivity to model error")
    latency_planning_margin: float = Field(
        0.0, ge=0, lt=1, description="share of every latency bound the MILP policies keep free for queueing: they "
                                     "plan against (1 - margin) x the bound; requests are judged against the bound")
    wait_quantile: float | None = Field(
        0.99, gt=0, lt=1, description="murakkab only: pools grow until this share of each demand's requests is "
                                      "predicted (M/M/c) to meet its bound with waits; null: service times only")
    switch_penalty: float = Field(
        0.0, ge=0, le=1, description="murakkab only: a re-plan moves a stage or opens a pool only when that saves "
                                      "more than this share of its energy")
    price_weight_w: float = Field(
        0.0, ge=0, le=100_000, description="murakkab only: its energy objective adds every instance's price at "
                                           "this many W per USD/h (Problem.price_weight_w); 0: energy alone")
    colocate_max_busy: float | None = Field(
        None, ge=0, le=1, description="murakkab only: one-instance GPU pools may share devices while their busy "
                                      "fractions add up to at most this and every demand keeps its wait quantile "
                                      "(Problem.colocate_max_busy); null: each instance gets devices of its own")
    predictor_error: float = Field(
        0.0, ge=0, le=0.5, description="every prediction the planner sees (latency, capacity, power, energy) is "
                                       "biased per executor and hardware and noised per configuration by about "
                                       "this share (controller.simulator.predictor_error); 0: the planner's own "
                                       "model, unchanged")
    static_headroom: float = Field(
        1.2, ge=1, le=10, description="static only: it provisions once for the trace's peak rates times this")
    lift_caps_on_bursts: bool = Field(
        True, description="murakkab only: a capped pool busier than its scale band first gets its power cap "
                          "lifted (at once), before the autoscaler adds instances")
    utilization_target: dict[str, float] = Field(
        default_factory=dict, description="policy name -> the utilization its pools are sized for (defaults: 0.8; "
                                          "murakkab 0.85, see policies/autopilot/planning.py)")
    cap_fractions: list[float] | None = Field(
        None, min_length=1, description="murakkab only: the power-cap levels it may choose, as fractions of each "
                                        "GPU's TDP (1 = uncapped); null: policies.autopilot.planning.CAP_FRACTIONS")
    scale_band: dict[str, ScaleBandSpec] = Field(
        default_factory=dict, description="murakkab-epoch or murakkab -> its reactive autoscaler band (defaults: "
                                          "[0.3, 0.85] back to 0.6; murakkab [0.3, 0.92] back to 0.8)")

    @field_validator("epoch_s", "utilization_target")
    @classmethod
    def _known_policies(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        for name, number in value.items():
            if name not in POLICY_NAMES:
                raise ValueError(f"{name}: unknown policy (policies: {', '.join(POLICY_NAMES)})")
            if info.field_name == "epoch_s" and not number > 0:
                raise ValueError(f"{name}: epoch must be positive, got {number}")
            if info.field_name == "utilization_target" and not 0 < number <= 1:
                raise ValueError(f"{name}: utilization target must be within (0, 1], got {number}")
        return value

    @field_validator("cap_fractions")
    @classmethod
    def _fractions(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(0 < f <= 1 for f in value):
            raise ValueError(f"cap fractions must be within (0, 1], got {value}")
        return value

    @field_validator("scale_band")
    @classmethod
    def _scaling_policies(cls, value: dict[str, ScaleBandSpec]) -> dict[str, ScaleBandSpec]:
        scaling = [p for p in POLICY_NAMES if not p.startswith("static")]
        for name in value:
            if name not in scaling:
                raise ValueError(f"{name}: not a policy that scales reactively (those are: {', '.join(scaling)})")
        return value


FAULT_KINDS = ("node-failure", "node-recovery", "cooling-failure", "cooling-restored", "budget")


class FaultSpec(_Strict):
    """A fault or facility change at a scheduled time: a node fails or comes back (``node``, the node's
    ``{group}-{n:04d}`` name), a GPU loses or regains its cooling (``node``, ``device``; or ``rack``: every
    GPU of the rack), or a power budget
    is set (``rack``: null for the cluster; ``power_budget_w``: null clears it)."""

    at_s: float = Field(ge=0)
    kind: Literal["node-failure", "node-recovery", "cooling-failure", "cooling-restored", "budget"]
    node: str | None = None
    device: int | None = Field(None, ge=0)
    rack: str | None = None
    power_budget_w: float | None = Field(None, gt=0, le=1e9)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> "FaultSpec":
        cooling_of_rack = self.kind.startswith("cooling-") and self.rack is not None
        needs = {"node-failure": {"node"}, "node-recovery": {"node"}, "cooling-failure": {"node", "device"},
                 "cooling-restored": {"node", "device"}, "budget": set()}[self.kind]
        if cooling_of_rack:  # a rack's cooling: every GPU of every node in the rack
            needs = {"rack"}
        allowed = needs | ({"rack", "power_budget_w"} if self.kind == "budget" else set())
        for name in ("node", "device", "rack", "power_budget_w"):
            given = getattr(self, name) is not None
            if name in needs and not given:
                raise ValueError(f"{self.kind} needs {name}")
            if given and name not in allowed:
                raise ValueError(f"{self.kind} takes no {name}")
        return self


JUDGE_KINDS = ("requests", "fluid")


class ScenarioSpecModel(_Strict):
    seed: int = 0
    judge: Literal["requests", "fluid"] = Field(
        "requests", description="how requests are served and judged: 'requests', the request-level discrete-event "
                                "model of engines (controller.simulator.judge, independent of the planner's "
                                "formulas); 'fluid', expected values per step from the planner's own perf and "
                                "queueing model (quick, but it grades the planner with its own rules)")
    duration_s: float = Field(86400.0, gt=0, le=MAX_DURATION_S)
    step_s: float = Field(60.0, ge=1, le=3600)
    cluster: ClusterSpec
    hardware: dict[str, HardwareOverride] = Field(default_factory=dict)
    catalog: list[CatalogRef] = Field(min_length=1)
    workflows: list[WorkflowRef] = Field(min_length=1)
    trace: TraceSpec
    control: ControlSpec = Field(default_factory=ControlSpec)
    faults: list[FaultSpec] = Field(default_factory=list, max_length=1000,
                                    description="faults and budget changes at scheduled times")

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, value: dict[str, HardwareOverride]) -> dict[str, HardwareOverride]:
        for name in value:
            if name not in HARDWARE_NAMES:
                raise ValueError(f"{name}: unknown hardware (known: {', '.join(HARDWARE_NAMES)})")
        return value

    @model_validator(mode="after")
    def _times(self) -> "ScenarioSpecModel":
        if self.step_s > self.duration_s:
            raise ValueError(f"step_s: {self.step_s} is longer than duration_s {self.duration_s}")
        nodes = {f"{g.name}-{n:04d}": g for g in self.cluster.node_groups for n in range(g.count)}
        racks = {r.name for r in self.cluster.racks} | {g.rack_of(n) for g in self.cluster.node_groups
                                                         for n in range(g.count) if g.rack_of(n)}
        for i, fault in enumerate(self.faults):
            where = f"faults[{i}]"
            if fault.at_s >= self.duration_s:
                raise ValueError(f"{where}.at_s: {fault.at_s:g} s is past the end of the scenario "
                                 f"({self.duration_s:g} s)")
            if fault.node is not None and fault.node not in nodes:
                shown = ", ".join(sorted(nodes)[:5]) + (" ..." if len(nodes) > 5 else "")
                raise ValueError(f"{where}.node: no node {fault.node!r} (nodes are named group-NNNN: {shown})")
            if fault.device is not None and fault.node is not None:
                group = nodes[fault.node]
                if group.hardware == "cpu" or fault.device >= group.devices_per_node:
                    raise ValueError(f"{where}.device: {fault.node} has no GPU {fault.device}")
            if fault.rack is not None and fault.rack not in racks:
                raise ValueError(f"{where}.rack: no rack {fault.rack!r} (racks: {', '.join(sorted(racks)) or 'none'})")
        file_loads = self.trace.file_loads()
        for i, burst in enumerate(self.trace.bursts):
            if burst.at_hour * 3600.0 >= self.duration_s:
                raise ValueError(f"trace.bursts[{i}].at_hour: {burst.at_hour} h is past the end of the scenario "
                                 f"({self.duration_s / 3600.0:g} h)")
            hit = sorted(file_loads) if burst.workflows is None else [w for w in burst.workflows if w in file_loads]
            if hit:
                raise ValueError(f"trace.bursts[{i}].workflows: bursts apply to cosine loads only, and "
                                 f"{', '.join(hit)} replay{'s' if len(hit) == 1 else ''} a trace file (list the "
                                 f"cosine workflows the burst hits, or scale the file's rate)")
        return self


class ScenarioMetadata(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=63)
    description: str = ""


class ScenarioDocument(_Strict):
    apiVersion: Literal["murakkab.dev/v1"]
    kind: Literal["Scenario"]
    metadata: ScenarioMetadata
    spec: ScenarioSpecModel


# --- the loaded scenario -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A validated scenario with its catalog and workflows loaded."""

    name: str
    description: str
    source: str
    spec: ScenarioSpecModel
    catalog: dict[str, ExecutorSpec]
    workflows: dict[str, WorkflowSpec]
    items: dict[tuple[str, str], float] = field(default_factory=dict)  # (workflow, stage) -> elements
    base_dir: str = "."  # the scenario file's folder: trace files are named relative to it

    @property
    def seed(self) -> int:
        return self.spec.seed

    def with_seed(self, seed: int) -> "Scenario":
        """The same scenario with another seed (another draw of the same trace)."""
        return dataclasses.replace(self, spec=self.spec.model_copy(update={"seed": int(seed)}))


def _pydantic_problems(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        path = ""
        for part in error["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "missing required key"
        elif error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] not in ("value_error",):
            message = f"{message}, got {error.get('input')!r}"
        problems.append(f"{path}: {message}" if path else message)
    return problems


def parse_scenario(data: Any, source: str = "<scenario>", base_dir: str | Path = ".",
                   with_files: bool = True) -> Scenario:
    """Validate a scenario document; load its catalog and workflow files relative to ``base_dir``."""
    if not isinstance(data, dict):
        raise ScenarioError(source, [f"expected a Scenario document (a mapping), got {type(data).__name__}"])
    try:
        doc = ScenarioDocument.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(source, _pydantic_problems(exc)) from None
    spec = doc.spec
    problems: list[str] = []
    catalog: dict[str, ExecutorSpec] = {}
    workflows: dict[str, WorkflowSpec] = {}
    items: dict[tuple[str, str], float] = {}
    base = Path(base_dir)
    if with_files:
        for i, ref in enumerate(spec.catalog):
            try:
                executors = load_catalog_file(base / ref.file)
            except SpecError as exc:
                problems.append(f"spec.catalog[{i}].file: {ref.file}: {exc}")
                continue
            names = {e.name for e in executors}
            for name in ref.executors or []:
                if name not in names:
                    problems.append(f"spec.catalog[{i}].executors: {ref.file} has no executor {name!r}")
            for exe in executors:
                if ref.engines is not None and exe.engine not in ref.engines:
                    continue
                if ref.executors is not None and exe.name not in ref.executors:
                    continue
                if exe.name in catalog:
                    problems.append(f"spec.catalog[{i}]: executor {exe.name!r} is defined twice")
                catalog[exe.name] = exe
        for i, ref in enumerate(spec.workflows):
            try:
                workflow = load_workflow_file(base / ref.file)
            except SpecError as exc:
                problems.append(f"spec.workflows[{i}].file: {ref.file}: {exc}")
                continue
            if workflow.name in workflows:
                problems.append(f"spec.workflows[{i}]: workflow {workflow.name!r} is listed twice")
            workflows[workflow.name] = workflow
            stages = {s.name: s for s in workflow.stages}
            for stage_name, count in ref.items.items():
                if stage_name not in stages:
                    problems.append(f"spec.workflows[{i}].items.{stage_name}: workflow {workflow.name!r} has no "
                                    f"stage {stage_name!r} (stages: {', '.join(stages)})")
                    continue
                items[(workflow.name, stage_name)] = float(count)
            tasks = {e.task for e in catalog.values()}
            for stage in workflow.stages:
                if stage.task not in tasks:
                    problems.append(f"spec.workflows[{i}]: stage {stage.name!r} of {workflow.name!r} needs task "
                                    f"{stage.task!r}, which no executor in the scenario's catalog performs")
        for name in spec.trace.workflows:
            if name not in workflows and not problems:
                problems.append(f"spec.trace.workflows.{name}: not one of the scenario's workflows "
                                f"({', '.join(workflows)})")
        for i, burst in enumerate(spec.trace.bursts):
            for name in burst.workflows or []:
                if name not in spec.trace.workflows:
                    problems.append(f"spec.trace.bursts[{i}].workflows: {name!r} has no load in trace.workflows")
        problems.extend(_trace_file_problems(spec.trace, spec.duration_s, base))
    hardware_used = {g.hardware for g in spec.cluster.node_groups}
    if not hardware_used - {"cpu"}:
        problems.append("spec.cluster.node_groups: the cluster has no GPU nodes")
    if problems:
        raise ScenarioError(source, problems)
    return Scenario(name=doc.metadata.name, description=doc.metadata.description, source=source, spec=spec,
                    catalog=catalog, workflows=workflows, items=items, base_dir=str(base))


def load_scenario(path: str | Path) -> Scenario:
    """Read, validate and resolve a scenario file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(str(path), [f"cannot read the file: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_scenario(data, str(path), path.parent)
