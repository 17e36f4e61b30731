"""The internal form of a workflow, shared by the YAML loader and the Python SDK.

A workflow is a DAG of stages. Each stage names an abstract task (``common.workflow.tasks``)
and wires the task's inputs to workflow inputs (``inputs.NAME``) or to outputs of upstream
stages (``STAGE.OUTPUT``). A stage with ``map: PARAM`` runs once per element of the list
bound to PARAM, and each of its outputs becomes ``list[T]`` (fan-out; a later stage that
consumes that list is the fan-in). Workflows never name models or hardware: executors,
knobs and placement are the planner's choice, within optional stage ``constraints``.

``validate_workflow`` is the one semantic check both front ends run, so a workflow is
held to the same rules whichever way it was written. ``WorkflowSpec.to_dict`` returns the
YAML document shape, so a spec round-trips through storage and ``from_dict``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.workflow.tasks import TASKS, task_names
from common.workflow.types import assignable, check_value, element_type, known_types, list_of, parse_type

API_VERSION = "murakkab.dev/v1"
WORKFLOW_KIND = "Workflow"
CATALOG_KIND = "ExecutorCatalog"
WORKFLOW_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
IDENT_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")  # names of stages, workflow inputs and outputs
EXECUTOR_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # mirrors catalog.ExecutorSpec.name
RESERVED_STAGE_NAMES = frozenset({"inputs"})

# Path -> (source, line). The YAML loader answers from node marks, the SDK from call sites.
Locate = Callable[[str], tuple[str, int | None]]


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a workflow or catalog, located as precisely as the front end allows."""

    source: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(ValueError):
    """A spec that cannot be accepted; ``str`` lists every issue, one per line."""

    def __init__(self, issues: Iterable[SpecIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


@dataclass(frozen=True)
class Ref:
    """Where a value comes from: a workflow input (``stage`` None) or a stage output."""

    stage: str | None
    field: str

    @classmethod
    def parse(cls, text: Any) -> "Ref":
        if not isinstance(text, str):
            raise ValueError(f"expected a reference 'inputs.NAME' or 'STAGE.OUTPUT', got {describe(text)}")
        head, dot, tail = text.strip().partition(".")
        if not dot or not head or not tail or "." in tail:
            raise ValueError(f"expected a reference 'inputs.NAME' or 'STAGE.OUTPUT', got {text!r}")
        return cls(None if head == "inputs" else head, tail)

    def __str__(self) -> str:
        return f"{'inputs' if self.stage is None else self.stage}.{self.field}"


@dataclass(frozen=True)
class StageConstraints:
    """Developer constraints the planner must honor: a pinned executor, a minimum accuracy."""

    executor: str | None = None
    min_accuracy: float | None = None

    def is_empty(self) -> bool:
        return self.executor is None and self.min_accuracy is None


@dataclass(frozen=True)
class StageSpec:
    name: str
    task: str
    inputs: dict[str, Ref]
    map_over: str | None = None
    constraints: StageConstraints = field(default_factory=StageConstraints)

    def upstream(self) -> list[str]:
        """Names of the stages this one consumes from, in first-use order, without repeats."""
        seen: list[str] = []
        for ref in self.inputs.values():
            if ref.stage is not None and ref.stage not in seen:
                seen.append(ref.stage)
        return seen


@dataclass(frozen=True)
class WorkflowInput:
    type: str
    description: str = ""
    required: bool = True


@dataclass(frozen=True)
class WorkflowSpec:
    name: str
    description: str
    inputs: dict[str, WorkflowInput]
    stages: tuple[StageSpec, ...]
    outputs: dict[str, Ref]

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"workflow {self.name!r} has no stage {name!r} (stages: {_names(s.name for s in self.stages)})")

    def input_types(self) -> dict[str, str]:
        return {name: spec.type for name, spec in self.inputs.items()}

    def output_type(self, ref: Ref) -> str:
        """The type a reference carries; outputs of a mapped stage are lists of the task's output type."""
        if ref.stage is None:
            if ref.field not in self.inputs:
                raise KeyError(f"no workflow input {ref.field!r}")
            return self.inputs[ref.field].type
        stage = self.stage(ref.stage)
        task = TASKS.get(stage.task)
        if task is None or ref.field not in task.outputs:
            raise KeyError(f"stage {stage.name!r} (task {stage.task}) has no output {ref.field!r}")
        out = task.outputs[ref.field]
        return list_of(out) if stage.map_over else out

    def output_types(self) -> dict[str, str]:
        return {name: self.output_type(ref) for name, ref in self.outputs.items()}

    def topological_order(self) -> list[str]:
        """Stage names, producers before consumers; ties keep declaration order."""
        names = [s.name for s in self.stages]
        pending = {s.name: {u for u in s.upstream() if u in names} for s in self.stages}
        order: list[str] = []
        while pending:
            ready = [n for n in names if n in pending and not pending[n]]
            if not ready:
                raise ValueError(f"workflow {self.name!r} has a cycle among stages {sorted(pending)}")
            for name in ready:
                order.append(name)
                del pending[name]
            for deps in pending.values():
                deps.difference_update(ready)
        return order

    def downstream(self) -> dict[str, list[str]]:
        """Stage name -> the stages that consume its outputs (declaration order)."""
        result: dict[str, list[str]] = {s.name: [] for s in self.stages}
        for stage in self.stages:
            for up in stage.upstream():
                if up in result:
                    result[up].append(stage.name)
        return result

    def check_job_inputs(self, values: Mapping[str, Any]) -> list[str]:
        """Problems with a job's input values (missing, unknown, wrong type); empty when they fit."""
        problems: list[str] = []
        for name in values:
            if name not in self.inputs:
                problems.append(f"inputs.{name}: workflow {self.name!r} has no input {name!r} "
                                f"(inputs: {_names(self.inputs)})")
        for name, spec in self.inputs.items():
            if name not in values:
                if spec.required:
                    problems.append(f"inputs.{name}: missing required input ({spec.type})")
                continue
            problem = check_value(spec.type, values[name], f"inputs.{name}")
            if problem:
                problems.append(problem)
        return problems

    def to_dict(self) -> dict[str, Any]:
        """The canonical YAML document shape: defaults left out, types in canonical form."""
        metadata: dict[str, Any] = {"name": self.name}
        if self.description:
            metadata["description"] = self.description
        inputs: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            entry: dict[str, Any] = {"type": spec.type}
            if spec.description:
                entry["description"] = spec.description
            if not spec.required:
                entry["required"] = False
            inputs[name] = entry
        stages = []
        for stage in self.stages:
            entry = {"name": stage.name, "task": stage.task,
                     "inputs": {param: str(ref) for param, ref in stage.inputs.items()}}
            if stage.map_over is not None:
                entry["map"] = stage.map_over
            constraints: dict[str, Any] = {}
            if stage.constraints.executor is not None:
                constraints["executor"] = stage.constraints.executor
            if stage.constraints.min_accuracy is not None:
                constraints["min_accuracy"] = stage.constraints.min_accuracy
            if constraints:
                entry["constraints"] = constraints
            stages.append(entry)
        return {"apiVersion": API_VERSION, "kind": WORKFLOW_KIND, "metadata": metadata,
                "spec": {"inputs": inputs, "stages": stages,
                         "outputs": {name: str(ref) for name, ref in self.outputs.items()}}}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<workflow>") -> "WorkflowSpec":
        """Build and validate a spec from its document form; raises SpecError naming every problem."""
        issues = Issues(source)
        spec = parse_workflow_document(data, issues)
        if spec is not None and not issues:
            validate_workflow(spec, issues)
        if issues or spec is None:
            raise SpecError(issues.items)
        return spec


class Issues:
    """Collects issues, turning field paths into source locations and display labels."""

    def __init__(self, source: str, locate: Locate | None = None,
                 label: Callable[[str], str] | None = None) -> None:
        self.source = source
        self.locate = locate
        self.label = label
        self.items: list[SpecIssue] = []

    def add(self, path: str, message: str) -> None:
        source, line = self.locate(path) if self.locate else (self.source, None)
        self.items.append(SpecIssue(source, line, self.label(path) if self.label else path, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)


# --- structure: the document's shape, before any cross-references are checked ------------

_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec")
_METADATA_KEYS = ("name", "description")
_SPEC_KEYS = ("inputs", "stages", "outputs")
_INPUT_KEYS = ("type", "description", "required")
_STAGE_KEYS = ("name", "task", "inputs", "map", "constraints")
_CONSTRAINT_KEYS = ("executor", "min_accuracy")
_PLANNER_OWNED = "workflows name tasks, not models, engines or hardware: the planner picks executors, knobs " \
                 "and placement; pin an executor with constraints.executor if you must"
_STAGE_KEY_HINTS = {key: _PLANNER_OWNED for key in (
    "model", "models", "engine", "gpu", "gpus", "hardware", "device", "node", "knobs", "executor", "resources")}
_STAGE_KEY_HINTS["map_over"] = "the key is 'map'"
_STAGE_KEY_HINTS["min_accuracy"] = "put it under constraints"


def parse_workflow_document(data: Any, issues: Issues) -> WorkflowSpec | None:
    """Check the document's shape and build a spec; None (with issues added) when it cannot."""
    before = len(issues)
    if not isinstance(data, dict):
        issues.add("", f"expected a Workflow document (a mapping with {', '.join(_TOP_KEYS)}), got {describe(data)}")
        return None
    check_keys(data, "", _TOP_KEYS, issues, required=_TOP_KEYS)
    check_header(data, WORKFLOW_KIND, issues)
    name, description = "", ""
    metadata = data.get("metadata")
    if "metadata" in data and expect_mapping(metadata, "metadata", issues, "metadata"):
        check_keys(metadata, "metadata", _METADATA_KEYS, issues, required=("name",))
        name = expect_text(metadata.get("name", ""), "metadata.name", issues)
        description = expect_text(metadata.get("description", ""), "metadata.description", issues)
    body = data.get("spec")
    if "spec" not in data or not expect_mapping(body, "spec", issues, "inputs, stages and outputs"):
        return None
    check_keys(body, "spec", _SPEC_KEYS, issues, required=("stages", "outputs"))
    inputs = _parse_inputs(body.get("inputs", {}), issues)
    stages = _parse_stages(body["stages"], issues) if "stages" in body else []
    outputs = _parse_refs(body["outputs"], "spec.outputs", issues, "workflow outputs") if "outputs" in body else {}
    if "outputs" in body and isinstance(body["outputs"], dict) and not body["outputs"]:
        issues.add("spec.outputs", "a workflow needs at least one output (OUTPUT_NAME: STAGE.OUTPUT)")
    if len(issues) > before:
        return None
    return WorkflowSpec(name, description, inputs, tuple(stages), outputs)


def check_header(data: dict[str, Any], kind: str, issues: Issues) -> None:
    if "apiVersion" in data and data["apiVersion"] != API_VERSION:
        issues.add("apiVersion", f"expected '{API_VERSION}', got {describe(data['apiVersion'])}")
    if "kind" in data and data["kind"] != kind:
        other = {WORKFLOW_KIND: "workflow apply", CATALOG_KIND: "catalog apply"}.get(data["kind"])
        hint = f" ({data['kind']} documents are applied with `murakkabctl {other}`)" if other else ""
        issues.add("kind", f"expected '{kind}', got {describe(data['kind'])}{hint}")


def _parse_inputs(raw: Any, issues: Issues) -> dict[str, WorkflowInput]:
    if not expect_mapping(raw, "spec.inputs", issues, "workflow inputs (NAME: TYPE or NAME: {type: ...})"):
        return {}
    result: dict[str, WorkflowInput] = {}
    for name, value in raw.items():
        path = f"spec.inputs.{name}"
        if isinstance(value, str):
            result[name] = WorkflowInput(_canonical_type(value))
            continue
        if not expect_mapping(value, path, issues, "an input declaration (a type name or {type, description, "
                                                     "required})"):
            continue
        check_keys(value, path, _INPUT_KEYS, issues, required=("type",))
        type_text = expect_text(value.get("type", ""), f"{path}.type", issues)
        description = expect_text(value.get("description", ""), f"{path}.description", issues)
        required = value.get("required", True)
        if not isinstance(required, bool):
            issues.add(f"{path}.required", f"expected true or false, got {describe(required)}")
            required = True
        result[name] = WorkflowInput(_canonical_type(type_text), description, required)
    return result


def _parse_stages(raw: Any, issues: Issues) -> list[StageSpec]:
    if not isinstance(raw, list):
        issues.add("spec.stages", f"expected a list of stages, got {describe(raw)}")
        return []
    if not raw:
        issues.add("spec.stages", "a workflow needs at least one stage")
    stages = []
    for index, item in enumerate(raw):
        path = f"spec.stages[{index}]"
        if not expect_mapping(item, path, issues, "a stage (name, task, inputs, ...)"):
            continue
        check_keys(item, path, _STAGE_KEYS, issues, required=("name", "task"), hints=_STAGE_KEY_HINTS)
        name = expect_text(item.get("name", ""), f"{path}.name", issues)
        task = expect_text(item.get("task", ""), f"{path}.task", issues)
        inputs = _parse_refs(item.get("inputs", {}), f"{path}.inputs", issues, "task input bindings")
        map_over = item.get("map")
        if map_over is not None and not isinstance(map_over, str):
            issues.add(f"{path}.map", f"expected the name of one of the stage's inputs, got {describe(map_over)}")
            map_over = None
        stages.append(StageSpec(name, task, inputs, map_over, _parse_constraints(item, path, issues)))
    return stages


def _parse_constraints(stage: dict[str, Any], path: str, issues: Issues) -> StageConstraints:
    raw = stage.get("constraints")
    if raw is None:
        return StageConstraints()
    path = f"{path}.constraints"
    if not expect_mapping(raw, path, issues, "constraints (executor, min_accuracy)"):
        return StageConstraints()
    check_keys(raw, path, _CONSTRAINT_KEYS, issues)
    executor = raw.get("executor")
    if executor is not None and not isinstance(executor, str):
        issues.add(f"{path}.executor", f"expected an executor name, got {describe(executor)}")
        executor = None
    accuracy = raw.get("min_accuracy")
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))):
        issues.add(f"{path}.min_accuracy", f"expected a number between 0 and 1, got {describe(accuracy)}")
        accuracy = None
    return StageConstraints(executor, None if accuracy is None else float(accuracy))


def _parse_refs(raw: Any, path: str, issues: Issues, what: str) -> dict[str, Ref]:
    if not expect_mapping(raw, path, issues, f"{what} (NAME: inputs.NAME or NAME: STAGE.OUTPUT)"):
        return {}
    refs: dict[str, Ref] = {}
    for name, text in raw.items():
        try:
            refs[name] = Ref.parse(text)
        except ValueError as exc:
            issues.add(f"{path}.{name}", str(exc))
    return refs


def _canonical_type(text: str) -> str:
    try:
        return parse_type(text)
    except ValueError:
        return text  # validate_workflow reports it, for SDK and YAML alike


# --- semantics: names, tasks, references, types, cycles -------------------------------


def validate_workflow(spec: WorkflowSpec, issues: Issues | None = None) -> list[SpecIssue]:
    """Every semantic problem of a structurally sound spec; the list is empty when it is valid."""
    issues = issues if issues is not None else Issues("<workflow>")
    start = len(issues)
    if not isinstance(spec.name, str) or not WORKFLOW_NAME_RE.match(spec.name):
        issues.add("metadata.name", f"{spec.name!r} is not a workflow name (lowercase letters, digits and '-', "
                                    "starting and ending with a letter or digit, at most 63 characters)")
    for name, declared in spec.inputs.items():
        _check_ident(name, f"spec.inputs.{name}", "workflow input", issues)
        try:
            parse_type(declared.type)
        except ValueError:
            issues.add(f"spec.inputs.{name}.type",
                       f"unknown type {declared.type!r} (expected one of {', '.join(known_types())})")
    if not spec.stages:
        issues.add("spec.stages", "a workflow needs at least one stage")
    first_index: dict[str, int] = {}
    for index, stage in enumerate(spec.stages):
        path = f"spec.stages[{index}]"
        _check_ident(stage.name, f"{path}.name", "stage", issues)
        if stage.name in RESERVED_STAGE_NAMES:
            issues.add(f"{path}.name", f"'{stage.name}' is reserved: references 'inputs.NAME' mean workflow inputs")
        if stage.name in first_index:
            issues.add(f"{path}.name", f"duplicate stage name '{stage.name}' (first used by "
                                       f"spec.stages[{first_index[stage.name]}])")
        else:
            first_index[stage.name] = index
    by_name = {s.name: s for s in reversed(spec.stages)}  # first declaration wins
    for index, stage in enumerate(spec.stages):
        _check_stage(spec, stage, f"spec.stages[{index}]", by_name, issues)
    _check_cycles(spec, by_name, issues)
    if not spec.outputs:
        issues.add("spec.outputs", "a workflow needs at least one output (OUTPUT_NAME: STAGE.OUTPUT)")
    for name, ref in spec.outputs.items():
        _check_ident(name, f"spec.outputs.{name}", "workflow output", issues)
        _ref_type(spec, ref, f"spec.outputs.{name}", by_name, issues)
    return issues.items[start:]


def _check_stage(spec: WorkflowSpec, stage: StageSpec, path: str, by_name: dict[str, StageSpec],
                 issues: Issues) -> None:
    task = TASKS.get(stage.task)
    if task is None:
        issues.add(f"{path}.task", f"unknown task '{stage.task}' (known tasks: {', '.join(task_names())})"
                                   f"{_did_you_mean(stage.task, TASKS)}")
    else:
        for param in stage.inputs:
            if param not in task.inputs:
                issues.add(f"{path}.inputs.{param}", f"task {task.name} has no input '{param}' (inputs: "
                                                     f"{_names(task.inputs)}){_did_you_mean(param, task.inputs)}")
        missing = [p for p, spec_in in task.inputs.items() if spec_in.required and p not in stage.inputs]
        if missing:
            issues.add(f"{path}.inputs", f"missing required input{'s' if len(missing) > 1 else ''} "
                                         f"{', '.join(repr(m) for m in missing)} of task {task.name} "
                       f"({', '.join(f'{m}: {task.inputs[m].type}' for m in missing)})")
    if stage.map_over is not None and stage.map_over not in stage.inputs:
        known = task is not None and stage.map_over in task.inputs
        issues.add(f"{path}.map", f"map names '{stage.map_over}', which is "
                                  f"{'not bound in this stage' if known else 'not an input of this stage'} "
                                  f"(bound inputs: {_names(stage.inputs)})")
    for param, ref in stage.inputs.items():
        ref_path = f"{path}.inputs.{param}"
        if ref.stage == stage.name:
            continue  # a self-reference is reported as a cycle
        source_type = _ref_type(spec, ref, ref_path, by_name, issues)
        if ref.stage is None and ref.field in spec.inputs and not spec.inputs[ref.field].required \
                and task is not None and param in task.inputs and task.inputs[param].required:
            issues.add(ref_path, f"optional workflow input '{ref.field}' feeds required input '{param}' of task "
                                 f"{task.name}; declare it required: true")
        if source_type is None or task is None or param not in task.inputs:
            continue
        target = task.inputs[param].type
        if param == stage.map_over:
            element = element_type(source_type)
            if element is None:
                issues.add(f"{path}.map", f"map over '{param}' needs a list to fan out over, but {ref} is "
                                          f"{source_type}")
            elif not assignable(element, target):
                issues.add(ref_path, f"map over '{param}': the elements of {ref} are {element}, but input "
                                     f"'{param}' of task {task.name} expects {target}")
        elif not assignable(source_type, target):
            element = element_type(source_type)
            hint = f"; add `map: {param}` to run the stage once per element" \
                if element is not None and assignable(element, target) and stage.map_over is None else ""
            issues.add(ref_path, f"{ref} is {source_type}, but input '{param}' of task {task.name} expects "
                                 f"{target}{hint}")
    _check_constraints(stage.constraints, f"{path}.constraints", issues)


def _check_constraints(constraints: StageConstraints, path: str, issues: Issues) -> None:
    accuracy = constraints.min_accuracy
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        issues.add(f"{path}.min_accuracy", f"expected a number between 0 and 1, got {accuracy!r}")
    executor = constraints.executor
    if executor is not None and not EXECUTOR_NAME_RE.match(executor):
        issues.add(f"{path}.executor", f"{executor!r} is not an executor name (lowercase letters, digits, "
                                       "'.', '_' and '-', starting with a letter or digit)")


def _ref_type(spec: WorkflowSpec, ref: Ref, path: str, by_name: dict[str, StageSpec],
              issues: Issues) -> str | None:
    """The type a reference carries, or None after reporting why it cannot be resolved."""
    if ref.stage is None:
        declared = spec.inputs.get(ref.field)
        if declared is None:
            issues.add(path, f"refers to workflow input '{ref.field}', which does not exist (inputs: "
                             f"{_names(spec.inputs)}){_did_you_mean(ref.field, spec.inputs)}")
            return None
        try:
            return parse_type(declared.type)
        except ValueError:
            return None  # reported at the input's declaration
    producer = by_name.get(ref.stage)
    if producer is None:
        issues.add(path, f"refers to stage '{ref.stage}', which does not exist (stages: "
                         f"{_names(s.name for s in spec.stages)}){_did_you_mean(ref.stage, by_name)}")
        return None
    task = TASKS.get(producer.task)
    if task is None:
        return None  # reported at the producer's task
    out = task.outputs.get(ref.field)
    if out is None:
        issues.add(path, f"stage '{producer.name}' (task {task.name}) has no output '{ref.field}' (outputs: "
                         f"{_names(task.outputs)}){_did_you_mean(ref.field, task.outputs)}")
        return None
    return list_of(out) if producer.map_over else out


def _check_cycles(spec: WorkflowSpec, by_name: dict[str, StageSpec], issues: Issues) -> None:
    """Report each cycle once, at the input that closes it, with the data-flow path."""
    index = {s.name: i for i, s in reversed(list(enumerate(spec.stages)))}
    consumers: dict[str, list[str]] = {name: [] for name in by_name}
    for name, stage in by_name.items():
        for up in stage.upstream():
            if up in consumers:
                consumers[up].append(name)
    producers = {name: [u for u in stage.upstream() if u in by_name] for name, stage in by_name.items()}
    in_reported: set[str] = set()
    for start in sorted(by_name, key=index.__getitem__):
        if start in in_reported:
            continue
        parent: dict[str, str] = {}
        frontier, closing = [start], None
        while frontier and closing is None:
            nxt = []
            for node in frontier:
                for consumer in consumers[node]:
                    if consumer == start:
                        closing = node
                        break
                    if consumer not in parent:
                        parent[consumer] = node
                        nxt.append(consumer)
                if closing is not None:
                    break
            frontier = nxt
        if closing is None:
            continue
        path_nodes = [closing]
        while path_nodes[-1] != start:
            path_nodes.append(parent[path_nodes[-1]])
        cycle = [start] + list(reversed(path_nodes))[1:] + [start]
        in_reported.update(_reachable(start, consumers) & _reachable(start, producers))  # one report per SCC
        param = next(p for p, ref in by_name[start].inputs.items() if ref.stage == closing)
        where = f"spec.stages[{index[start]}].inputs.{param}"
        if closing == start:
            issues.add(where, f"stage '{start}' consumes its own output {by_name[start].inputs[param]} "
                              f"(a cycle: {start} -> {start})")
        else:
            issues.add(where, f"stages form a cycle: {' -> '.join(cycle)} (arrows point from producer to consumer; "
                              "a workflow must be acyclic)")


def _reachable(start: str, edges: dict[str, list[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _check_ident(name: Any, path: str, what: str, issues: Issues) -> None:
    if not isinstance(name, str) or not IDENT_RE.match(name):
        issues.add(path, f"{name!r} is not a valid {what} name (lowercase letters, digits and '_', starting "
                         "with a letter, at most 63 characters)")


# --- small shared helpers (the loader uses them too) ------------------------------------


def describe(value: Any) -> str:
    """A short, human description of a parsed YAML value, for 'expected X, got Y' messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"text {value!r}" if len(value) <= 60 else f"text {value[:57]!r}..."
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def expect_mapping(value: Any, path: str, issues: Issues, what: str) -> bool:
    if isinstance(value, dict):
        return True
    issues.add(path, f"expected a mapping of {what}, got {describe(value)}")
    return False


def expect_text(value: Any, path: str, issues: Issues) -> str:
    if isinstance(value, str):
        return value
    issues.add(path, f"expected text, got {describe(value)}")
    return ""


def check_keys(value: dict[str, Any], path: str, allowed: Iterable[str], issues: Issues,
               required: Iterable[str] = (), hints: Mapping[str, str] | None = None) -> None:
    allowed = list(allowed)
    for key in value:
        if key not in allowed:
            hint = f"; {hints[key]}" if hints and key in hints else _did_you_mean(key, allowed)
            issues.add(f"{path}.{key}" if path else str(key),
                       f"unknown key '{key}' (allowed: {', '.join(allowed)}){hint}")
    for key in required:
        if key not in value:
            issues.add(f"{path}.{key}" if path else key, f"missing required key '{key}'")


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _names(items: Iterable[str]) -> str:
    names = list(items)
    return ", ".join(names) if names else "none"
