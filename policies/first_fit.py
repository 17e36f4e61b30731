"""First-fit planner: picks an executor and knob setting per stage and SLO tier, then places
the chosen executors' component instances on nodes, first fit.

This is the simple placement issue 3 allows before the profile-guided optimizer replaces it.
The seam is ``plan(...) -> Plan``: pure data in, a ``Plan`` out, no sockets, clocks or files;
a replacement planner keeps the signature and the reconciler and job executor do not change.

Choosing, per demand (workflow, SLO) and stage:

- Candidates are the catalog's executors of the stage's task. A pinned executor
  (``constraints.executor``) is the only candidate; a pin that is unknown, of another task or
  cannot be placed makes the demand unsatisfiable.
- Options are (executor, knob setting) pairs: the executor's default setting plus every knob
  setting named by one of its quality entries for this workflow (completed with defaults).
  An option's accuracy is the best quality entry for the workflow whose knobs all match the
  setting (an entry without knobs matches every setting); no match means unknown. Its latency
  is ``expected_latency_s``, else the sim engine's ``latency_s``, times the sim engine's
  ``knob_latency_factors`` for the setting; tools and vLLM executors without a hint: unknown.
- ``min_accuracy`` drops options whose accuracy is unknown or lower. Executors that fit on no
  schedulable node, even an empty one, are not candidates.
- SLO tiers filter the options, accuracy first, then latency, each against the best of what
  is left: accuracy ``best`` keeps the highest accuracy, ``good``/``fair`` keep accuracy of at
  least 95 % / 85 % of it (relative); latency ``best`` keeps the lowest latency, ``good`` /
  ``fair`` keep latency up to 1.5x / 3x of it; ``basic`` keeps everything. Options whose value
  on the dimension is unknown are dropped when some option's value is known. The cheapest
  survivor wins: fewest GPUs, then least GPU memory, then fewest CPU cores, then executor
  name; ties between settings of one executor go to the better value on the SLO's first
  non-basic dimension, then lower latency, higher accuracy, the default setting, knob order.
- Without an SLO the cheapest executor at its default setting is taken (another setting only
  when ``min_accuracy`` rules the default out).

Placing: every executor chosen by any demand gets ``replicas`` component instances, shared by
all demands and stages that chose it. Only schedulable nodes are used, in name order.

- ``sim`` with device gpu: ``gpu_count`` simulated GPUs of one node, each with
  ``memory_total_bytes`` minus the GPU memory already planned on it of at least the executor's
  GPU memory (the larger of ``resources.gpu_memory_bytes`` and ``sim.memory_bytes``);
  ``gpu_models`` entries match a device model case-insensitively as a substring
  ("H100" matches "H100 (simulated)"). ``vllm`` with device gpu: the same on real GPUs.
- ``vllm`` with device cpu: a node with a device of kind cpu (its index is the component's
  device); ``sim`` with device cpu and ``tool``: host cores only, and the node's cpu device
  if it has one, so the invocation's energy is attributed from that device's counter.
- CPU cores: ``tool`` components count a quarter of their ``cpu_cores`` against the node's
  cores (oversubscription factor 4: tools mostly wait between invocations); vLLM and sim
  components on cpu count in full; GPU components do not count. Host memory
  (``resources.memory_bytes``) is counted for every component against the node's memory.
- ``DeviceSlot.memory_used_bytes`` is not subtracted: it includes the memory of this plan's
  own running components, which the ledger already charges.
- Components in ``current`` whose executor is still chosen stay where they are, on the same
  devices, while their node is schedulable and they still fit (no churn on re-plan), up to
  ``replicas`` of them. New replicas go first to nodes without a replica of the executor.
  Executors are placed largest first (GPUs, GPU memory, CPU), first fit.
- An executor no node can take alongside the rest of the plan is dropped and the demands that
  chose it choose again without it (repeated until every chosen executor has an instance).
- Component ids are ``f"{executor}-{node}-{n}"`` with ``n`` the replica number, never reusing
  the id of a component in ``current`` that is not kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.workflow.catalog import ExecutorSpec
from common.workflow.spec import StageSpec, WorkflowSpec
from policies.perf_model import knob_factor, knob_settings, option_accuracy, runs_on_gpu
from policies.plan import (
    SLO_DIMENSIONS, SLO_TIERS, TOOL_CPU_OVERSUBSCRIPTION, Demand, DeviceSlot, NodeSnapshot, PlacedComponent, Plan, StageChoice,
)

ACCURACY_SLACK = {"best": 0.0, "good": 0.05, "fair": 0.15}  # fraction below the best accuracy
LATENCY_SLACK = {"best": 1.0, "good": 1.5, "fair": 3.0}  # multiple of the lowest latency
_EPS = 1e-9
_GIB = float(1 << 30)

Blocked = Callable[[ExecutorSpec], "str | None"]  # why an executor may not be chosen, or None


# --- options: (executor, knob setting) with accuracy, latency and cost -----------------


@dataclass(frozen=True)
class _Option:
    executor: ExecutorSpec
    knobs: dict[str, Any]
    accuracy: float | None
    latency_s: float | None
    is_default: bool

    @property
    def cost(self) -> tuple[int, int, float, str]:
        need = _Need.of(self.executor)
        return need.gpu_count, need.gpu_memory_bytes, self.executor.resources.cpu_cores, self.executor.name


def _latency_s(exe: ExecutorSpec, knobs: Mapping[str, Any]) -> float | None:
    base = exe.expected_latency_s
    if base is None and exe.sim is not None:
        base = exe.sim.latency_s
    if base is None:
        return None
    return base * knob_factor(exe, knobs)


def _options(exe: ExecutorSpec, workflow: str) -> list[_Option]:
    defaults = exe.knob_defaults()
    return [_Option(exe, s, option_accuracy(exe, workflow, s), _latency_s(exe, s), s == defaults)
            for s in knob_settings(exe, workflow)]


def _keep_within(options: list[_Option], dimension: str, tier: str) -> list[_Option]:
    if tier == "basic":
        return options
    if dimension == "accuracy":
        known = [o for o in options if o.accuracy is not None]
        if not known:
            return options
        floor = max(o.accuracy for o in known) * (1.0 - ACCURACY_SLACK[tier])  # type: ignore[type-var]
        return [o for o in known if o.accuracy >= floor - _EPS]  # type: ignore[operator]
    known = [o for o in options if o.latency_s is not None]
    if not known:
        return options
    ceiling = min(o.latency_s for o in known) * LATENCY_SLACK[tier]  # type: ignore[type-var]
    return [o for o in known if o.latency_s <= ceiling + _EPS]  # type: ignore[operator]


def _pick(options: list[_Option], slo: dict[str, str]) -> _Option:
    lead = next((d for d in SLO_DIMENSIONS if slo.get(d, "basic") != "basic"), None)
    for dimension in SLO_DIMENSIONS:
        if dimension in slo:
            options = _keep_within(options, dimension, slo[dimension])

    def key(o: _Option) -> tuple:
        accuracy = -o.accuracy if o.accuracy is not None else 1.0
        latency = o.latency_s if o.latency_s is not None else float("inf")
        primary = accuracy if lead == "accuracy" else latency if lead == "latency" else 0.0
        default_first = 0 if o.is_default else 1
        if not slo:
            return o.cost, default_first, accuracy, latency, json.dumps(o.knobs, sort_keys=True, default=str)
        return o.cost, primary, latency, accuracy, default_first, json.dumps(o.knobs, sort_keys=True, default=str)

    return min(options, key=key)


# --- placement -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Need:
    """What one instance of an executor takes from a node."""

    placement: str  # "sim-gpu" | "gpu" | "cpu-device" (vllm on cpu) | "sim-cpu" | "tool"
    gpu_count: int
    gpu_memory_bytes: int
    gpu_models: tuple[str, ...]
    cpu_weight: float
    memory_bytes: int

    @staticmethod
    def of(exe: ExecutorSpec) -> "_Need":
        res = exe.resources
        if runs_on_gpu(exe):
            memory = max(res.gpu_memory_bytes, exe.sim.memory_bytes if exe.sim is not None else 0)
            return _Need("sim-gpu" if exe.engine == "sim" else "gpu", res.gpu_count, memory,
                         tuple(res.gpu_models), 0.0, res.memory_bytes)
        if exe.engine == "tool":
            return _Need("tool", 0, 0, (), res.cpu_cores / TOOL_CPU_OVERSUBSCRIPTION, res.memory_bytes)
        return _Need("cpu-device" if exe.engine == "vllm" else "sim-cpu", 0, 0, (), res.cpu_cores, res.memory_bytes)

    def describe(self) -> str:
        host = f"{self.cpu_weight:g} weighted cpu core(s)"
        if self.memory_bytes:
            host += f", {self.memory_bytes / _GIB:.1f} GiB host memory"
        if self.placement in ("sim-gpu", "gpu"):
            kind = "simulated" if self.placement == "sim-gpu" else "non-simulated"
            models = f" of model {'/'.join(self.gpu_models)}" if self.gpu_models else ""
            return (f"{self.gpu_count} {kind} GPU(s){models} with {self.gpu_memory_bytes / _GIB:.1f} GiB free each"
                    + (f", {self.memory_bytes / _GIB:.1f} GiB host memory" if self.memory_bytes else ""))
        if self.placement == "cpu-device":
            return f"a cpu device and {host}"
        return host

    def device_ok(self, device: DeviceSlot) -> bool:
        if device.kind != "gpu" or device.simulated != (self.placement == "sim-gpu"):
            return False
        if not self.gpu_models:
            return True
        model = device.model.lower()
        return any(wanted.lower() in model for wanted in self.gpu_models)


@dataclass
class _Ledger:
    """What this plan has already put on each node."""

    gpu_memory_bytes: dict[tuple[str, int], int] = field(default_factory=dict)
    cpu_weight: dict[str, float] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)

    def free_gpu_bytes(self, node: str, device: DeviceSlot) -> int:
        return device.memory_total_bytes - self.gpu_memory_bytes.get((node, device.index), 0)

    def charge(self, node: str, need: _Need, devices: tuple[int, ...]) -> None:
        if need.placement in ("sim-gpu", "gpu"):
            for index in devices:
                self.gpu_memory_bytes[(node, index)] = self.gpu_memory_bytes.get((node, index), 0) + need.gpu_memory_bytes
        self.cpu_weight[node] = self.cpu_weight.get(node, 0.0) + need.cpu_weight
        self.memory_bytes[node] = self.memory_bytes.get(node, 0) + need.memory_bytes


def _host_misfit(need: _Need, node: NodeSnapshot, ledger: _Ledger) -> str | None:
    used_cores = ledger.cpu_weight.get(node.name, 0.0)
    if need.cpu_weight and used_cores + need.cpu_weight > node.cpu_cores + _EPS:
        return f"{node.cpu_cores - used_cores:g} of {node.cpu_cores} cpu core(s) left"
    used_memory = ledger.memory_bytes.get(node.name, 0)
    if need.memory_bytes and used_memory + need.memory_bytes > node.memory_total_bytes:
        return f"{(node.memory_total_bytes - used_memory) / _GIB:.1f} GiB host memory left"
    return None


def _fit(need: _Need, node: NodeSnapshot, ledger: _Ledger) -> tuple[int, ...] | str:
    """Device indexes for one instance on ``node`` (first fit), or why it does not fit."""
    misfit = _host_misfit(need, node, ledger)
    if misfit is not None:
        return misfit
    devices = sorted(node.devices, key=lambda d: d.index)
    if need.placement in ("sim-gpu", "gpu"):
        matching = [d for d in devices if need.device_ok(d)]
        roomy = [d.index for d in matching if ledger.free_gpu_bytes(node.name, d) >= need.gpu_memory_bytes]
        if len(roomy) >= need.gpu_count:
            return tuple(roomy[:need.gpu_count])
        if len(matching) < need.gpu_count:
            return f"{len(matching)} matching GPU(s)"
        return f"{len(roomy)} matching GPU(s) with enough free memory"
    cpu_devices = [d.index for d in devices if d.kind == "cpu"]
    if need.placement == "cpu-device":
        return (cpu_devices[0],) if cpu_devices else "no cpu device"
    return tuple(cpu_devices[:1])  # sim on cpu and tools: the node's cpu device, if any, for energy accounting


def _fits_at(need: _Need, node: NodeSnapshot, devices: tuple[int, ...], ledger: _Ledger) -> bool:
    """Whether an existing instance on exactly these devices still fits."""
    if _host_misfit(need, node, ledger) is not None:
        return False
    by_index = {d.index: d for d in node.devices}
    if need.placement in ("sim-gpu", "gpu"):
        if len(devices) != need.gpu_count or len(set(devices)) != len(devices):
            return False
        return all(i in by_index and need.device_ok(by_index[i])
                   and ledger.free_gpu_bytes(node.name, by_index[i]) >= need.gpu_memory_bytes for i in devices)
    if need.placement == "cpu-device":
        return len(devices) == 1 and devices[0] in by_index and by_index[devices[0]].kind == "cpu"
    return all(i in by_index and by_index[i].kind == "cpu" for i in devices)


def _why_nowhere(need: _Need, nodes: Sequence[NodeSnapshot], ledger: _Ledger) -> str:
    if not nodes:
        return "no schedulable node"
    misses = [f"{n.name}: {_fit(need, n, ledger)}" for n in nodes]
    shown = "; ".join(misses[:3]) + (f"; and {len(misses) - 3} more" if len(misses) > 3 else "")
    return f"needs {need.describe()}, no schedulable node has that ({shown})"


def _unplaceable_reason(exe: ExecutorSpec, nodes: Sequence[NodeSnapshot],
                        avoid: Mapping[tuple[str, str], str]) -> str | None:
    """Why no schedulable node could take one instance even when empty, or None."""
    need = _Need.of(exe)
    empty = _Ledger()
    allowed = [n for n in nodes if (exe.name, n.name) not in avoid]
    if any(not isinstance(_fit(need, n, empty), str) for n in allowed):
        return None
    avoided = [f"{n.name} avoided: {avoid[(exe.name, n.name)]}" for n in nodes if (exe.name, n.name) in avoid]
    if not allowed and avoided:
        return "; ".join(avoided)
    reason = _why_nowhere(need, allowed, empty)
    return reason + (f"; {'; '.join(avoided)}" if avoided else "")


def _component_id(executor: str, node: str, taken: set[str], numbers: set[int]) -> tuple[str, int]:
    n = 0
    while n in numbers or f"{executor}-{node}-{n}" in taken:
        n += 1
    return f"{executor}-{node}-{n}", n


def _place(chosen: list[ExecutorSpec], nodes: Sequence[NodeSnapshot], current: Sequence[PlacedComponent],
           avoid: Mapping[tuple[str, str], str]) -> tuple[list[PlacedComponent], dict[str, str], list[str]]:
    """Components for the chosen executors; executors with no instance placed -> reason; notes."""
    ledger = _Ledger()
    by_node = {n.name: n for n in nodes}
    taken = {c.component_id for c in current}
    placed: dict[str, list[PlacedComponent]] = {e.name: [] for e in chosen}
    numbers: dict[str, set[int]] = {e.name: set() for e in chosen}
    notes: list[str] = []
    specs = {e.name: e for e in chosen}
    seen: set[str] = set()
    for comp in sorted(current, key=lambda c: c.component_id):  # sticky: keep what still fits
        exe = specs.get(comp.executor)
        if exe is None or comp.component_id in seen:
            continue
        seen.add(comp.component_id)
        node = by_node.get(comp.node)
        need = _Need.of(exe)
        if len(placed[exe.name]) >= exe.replicas:
            notes.append(f"component {comp.component_id} not kept: executor {exe.name} needs only "
                         f"{exe.replicas} replica(s)")
        elif node is None:
            notes.append(f"component {comp.component_id} not kept: node {comp.node} is not schedulable")
        elif (exe.name, comp.node) in avoid:
            notes.append(f"component {comp.component_id} not kept: {exe.name} is avoided on {comp.node}: "
                         f"{avoid[(exe.name, comp.node)]}")
        elif not _fits_at(need, node, tuple(comp.device_indexes), ledger):
            notes.append(f"component {comp.component_id} not kept: it no longer fits on {comp.node} "
                         f"devices {list(comp.device_indexes)}")
        else:
            ledger.charge(node.name, need, tuple(comp.device_indexes))
            placed[exe.name].append(comp)
            suffix = comp.component_id.rsplit("-", 1)[-1]
            if comp.component_id.startswith(f"{exe.name}-{comp.node}-") and suffix.isdigit():
                numbers[exe.name].add(int(suffix))
    unplaced: dict[str, str] = {}
    order = sorted(chosen, key=lambda e: (-_Need.of(e).gpu_count, -_Need.of(e).gpu_memory_bytes,
                                          -_Need.of(e).cpu_weight, e.name))
    for exe in order:
        need = _Need.of(exe)
        allowed = [n for n in nodes if (exe.name, n.name) not in avoid]
        while len(placed[exe.name]) < exe.replicas:
            used_nodes = {c.node for c in placed[exe.name]}
            ranked = [n for n in allowed if n.name not in used_nodes] + [n for n in allowed if n.name in used_nodes]
            spot = next(((n, fit) for n in ranked if not isinstance(fit := _fit(need, n, ledger), str)), None)
            if spot is None:
                reason = _why_nowhere(need, allowed, ledger)
                avoided = [n.name for n in nodes if (exe.name, n.name) in avoid]
                if avoided:
                    reason += f" (avoided there: {', '.join(avoided)})"
                if placed[exe.name]:
                    notes.append(f"executor {exe.name}: placed {len(placed[exe.name])} of {exe.replicas} "
                                 f"replica(s): {reason}")
                else:
                    unplaced[exe.name] = reason
                break
            node, devices = spot
            component_id, n = _component_id(exe.name, node.name, taken, numbers[exe.name])
            taken.add(component_id)
            numbers[exe.name].add(n)
            ledger.charge(node.name, need, devices)
            placed[exe.name].append(PlacedComponent(component_id, exe.name, node.name, devices))
    components = [c for cs in placed.values() for c in cs]
    return components, unplaced, notes


# --- choosing --------------------------------------------------------------------------


def _choose(demand: Demand, workflows: Mapping[str, WorkflowSpec], catalog: Mapping[str, ExecutorSpec],
            blocked: Blocked) -> dict[str, StageChoice] | str:
    """Stage choices for one demand, or why it cannot be served."""
    workflow = workflows.get(demand.workflow)
    if workflow is None:
        known = ", ".join(sorted(workflows)[:10]) or "none"
        return f"workflow {demand.workflow!r} is not defined (defined: {known})"
    slo = dict(demand.slo)
    for dimension, tier in demand.slo:
        if dimension not in SLO_DIMENSIONS:
            return f"unknown SLO dimension {dimension!r} (known: {', '.join(SLO_DIMENSIONS)})"
        if tier not in SLO_TIERS:
            return f"unknown SLO tier {tier!r} for {dimension} (known: {', '.join(SLO_TIERS)})"
    choices: dict[str, StageChoice] = {}
    for stage in workflow.stages:
        picked = _choose_stage(demand.workflow, stage, catalog, blocked, slo)
        if isinstance(picked, str):
            return f"stage {stage.name!r} (task {stage.task}): {picked}"
        choices[stage.name] = picked
    return choices


def _choose_stage(workflow: str, stage: StageSpec, catalog: Mapping[str, ExecutorSpec], blocked: Blocked,
                  slo: dict[str, str]) -> StageChoice | str:
    pin, min_accuracy = stage.constraints.executor, stage.constraints.min_accuracy
    if pin is not None:
        exe = catalog.get(pin)
        if exe is None:
            return f"pinned executor {pin!r} is not in the catalog"
        if exe.task != stage.task:
            return f"pinned executor {pin!r} implements task {exe.task!r}, not {stage.task!r}"
        candidates = [exe]
    else:
        candidates = sorted((e for e in catalog.values() if e.task == stage.task), key=lambda e: e.name)
        if not candidates:
            return "no executor in the catalog implements this task"
    options: list[_Option] = []
    rejected: list[str] = []
    for exe in candidates:
        reason = blocked(exe)
        if reason is not None:
            rejected.append(f"{exe.name} cannot be placed: {reason}")
            continue
        mine = _options(exe, workflow)
        if min_accuracy is not None:
            ok = [o for o in mine if o.accuracy is not None and o.accuracy >= min_accuracy - _EPS]
            if not ok:
                known = [o.accuracy for o in mine if o.accuracy is not None]
                what = (f"best accuracy {max(known):g}" if known  # type: ignore[type-var]
                        else f"no accuracy known for workflow {workflow!r}")
                rejected.append(f"{exe.name}: {what}, below min_accuracy {min_accuracy:g}")
                continue
            mine = ok
        elif not slo:
            mine = [o for o in mine if o.is_default]
        options.extend(mine)
    if not options:
        prefix = f"pinned executor {pin!r}: " if pin is not None else "no executor qualifies: "
        return prefix + "; ".join(rejected)
    best = _pick(options, slo)
    return StageChoice(best.executor.name, dict(best.knobs))


def plan(workflows: Mapping[str, WorkflowSpec], catalog: Mapping[str, ExecutorSpec], demands: Iterable[Demand],
         nodes: Sequence[NodeSnapshot], current: Sequence[PlacedComponent] = (),
         avoid: Mapping[tuple[str, str], str] | None = None, keep_executors: Iterable[str] = ()) -> Plan:
    """Choose executors and knobs for every demand and place their components first fit.

    ``avoid``: (executor, node) pairs not to use, with why (an executor that keeps failing to start there).
    ``keep_executors``: executors to place even when no demand chooses them now (unfinished jobs chose
    them before a workflow update); those not in the catalog are named in the notes.
    """
    avoid = avoid or {}
    kept = sorted({name for name in keep_executors if name in catalog})
    missing = sorted({name for name in keep_executors if name not in catalog})
    schedulable = sorted((n for n in nodes if n.schedulable), key=lambda n: n.name)
    wanted = list(dict.fromkeys(demands))
    static: dict[str, str | None] = {}
    crowded: dict[str, str] = {}  # executors dropped because the rest of the plan left no room

    def blocked(exe: ExecutorSpec) -> str | None:
        if exe.name in crowded:
            return crowded[exe.name]
        if exe.name not in static:
            static[exe.name] = _unplaceable_reason(exe, schedulable, avoid)
        return static[exe.name]

    while True:
        choices: dict[Demand, dict[str, StageChoice]] = {}
        unsatisfiable: dict[Demand, str] = {}
        for demand in wanted:
            result = _choose(demand, workflows, catalog, blocked)
            if isinstance(result, str):
                unsatisfiable[demand] = result
            else:
                choices[demand] = result
        names = sorted({c.executor for stage_choices in choices.values() for c in stage_choices.values()}
                       | {n for n in kept if n not in crowded})
        components, unplaced, notes = _place([catalog[n] for n in names], schedulable, current, avoid)
        if not unplaced:
            break
        for name, reason in unplaced.items():
            crowded[name] = f"no room left beside the rest of the plan: {reason}"
    for name, reason in sorted(crowded.items()):
        notes.append(f"executor {name} left out: {reason}")
    for name in missing:
        notes.append(f"executor {name}: unfinished jobs chose it, but it is no longer in the catalog")
    for name, reason in sorted((n, r) for n, r in static.items() if r is not None):
        notes.append(f"executor {name} cannot be placed: {reason}")
    return Plan(choices=choices, components=tuple(sorted(components, key=lambda c: c.component_id)),
                unsatisfiable=unsatisfiable, notes=tuple(notes))
