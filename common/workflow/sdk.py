"""Python SDK: build a WorkflowSpec by composing task calls like ordinary functions.

    from common.workflow.sdk import Workflow, tasks

    with Workflow("video-qa", description="...") as wf:
        video = wf.input("video", "video")
        question = wf.input("question", "text")
        scenes = tasks.scene_detection(video)               # one required input: positional
        frames = tasks.frame_extraction(video=video, scenes=scenes)
        objects = tasks.object_detection(frames)
        answer = tasks.chat(question=question, context=objects.objects)
        wf.output("answer", answer.answer)
    spec = wf.build()

``tasks.<task name with '_' for '-'>`` adds a stage and returns a handle whose attributes are
the stage's output references; a handle with one output also stands for that output. Stage
names default to the task name (``embed``, then ``embed_2``, ...). ``map="PARAM"`` fans the
stage out over the list bound to PARAM; a later stage consuming the resulting list fans in.
``build()`` runs the same validation as the YAML loader and reports each problem at the
line of the call that caused it, naming the stage.
"""

from __future__ import annotations

import contextvars
import difflib
import os
import re
import sys
from typing import Any

from common.workflow.spec import (
    Issues, Ref, SpecError, StageConstraints, StageSpec, WorkflowInput, WorkflowSpec, validate_workflow,
)
from common.workflow.tasks import TASKS, TaskSpec, task_names
from common.workflow.types import parse_type

_CURRENT: contextvars.ContextVar["Workflow | None"] = contextvars.ContextVar("murakkab_workflow", default=None)
_THIS_FILE = os.path.normcase(os.path.abspath(__file__))
_STAGE_PATH = re.compile(r"^spec\.stages\[(\d+)\]")
RESERVED_KWARGS = ("name", "map", "executor", "min_accuracy")


def _call_site() -> tuple[str, int]:
    """File and line of the user code that called into the SDK."""
    frame = sys._getframe(1)
    while frame is not None and os.path.normcase(os.path.abspath(frame.f_code.co_filename)) == _THIS_FILE:
        frame = frame.f_back
    if frame is None:
        return "<sdk>", 0
    filename = frame.f_code.co_filename
    try:
        relative = os.path.relpath(filename)
        filename = relative if not relative.startswith("..") else filename
    except ValueError:
        pass  # another drive on Windows
    return filename, frame.f_lineno


class StageHandle:
    """A stage added to a workflow; ``handle.OUTPUT`` is a reference to one of its outputs."""

    __slots__ = ("_workflow", "_name", "_task")

    def __init__(self, workflow: "Workflow", name: str, task: TaskSpec) -> None:
        self._workflow = workflow
        self._name = name
        self._task = task

    @property
    def name(self) -> str:
        return self._name

    @property
    def task(self) -> str:
        return self._task.name

    @property
    def outputs(self) -> dict[str, Ref]:
        return {out: Ref(self._name, out) for out in self._task.outputs}

    def __getattr__(self, attr: str) -> Ref:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr in self._task.outputs:
            return Ref(self._name, attr)
        raise AttributeError(f"stage '{self._name}' (task {self._task.name}) has no output '{attr}' "
                             f"(outputs: {', '.join(self._task.outputs)})")

    def __dir__(self) -> list[str]:
        return ["name", "task", "outputs", *self._task.outputs]

    def __repr__(self) -> str:
        return f"<stage {self._name} ({self._task.name}) -> {', '.join(self._task.outputs)}>"


class Workflow:
    """Collects inputs, stages and outputs; use as a context manager so ``tasks.*`` know where to add."""

    def __init__(self, name: str, description: str = "") -> None:
        _expect(str, name=name, description=description)
        self.name = name
        self.description = description
        self._inputs: dict[str, WorkflowInput] = {}
        self._stages: list[StageSpec] = []
        self._outputs: dict[str, Ref] = {}
        self._sites: dict[str, tuple[str, int]] = {"": _call_site()}
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> "Workflow":
        self._tokens.append(_CURRENT.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._tokens.pop())

    def input(self, name: str, type: str, description: str = "", required: bool = True) -> Ref:
        """Declare a workflow input and return a reference to it."""
        _expect(str, name=name, type=type, description=description)
        _expect(bool, required=required)
        if name in self._inputs:
            raise ValueError(f"workflow {self.name!r}: input {name!r} is declared twice")
        try:
            canonical = parse_type(type)
        except ValueError:
            canonical = type  # build() reports it at this line
        self._inputs[name] = WorkflowInput(canonical, description, required)
        self._sites[f"spec.inputs.{name}"] = _call_site()
        return Ref(None, name)

    def output(self, name: str, value: Ref | StageHandle) -> None:
        """Expose a stage output (or a workflow input) as a workflow output."""
        _expect(str, name=name)
        if name in self._outputs:
            raise ValueError(f"workflow {self.name!r}: output {name!r} is declared twice")
        self._outputs[name] = self._as_ref(value, f"output {name!r}")
        self._sites[f"spec.outputs.{name}"] = _call_site()

    def stage(self, task: str, *args: Any, name: str | None = None, map: str | None = None,
              executor: str | None = None, min_accuracy: float | None = None, **inputs: Any) -> StageHandle:
        """Add a stage running ``task`` (its hyphenated name); ``tasks.<name>(...)`` calls this."""
        spec = TASKS.get(task)
        if spec is None:
            raise ValueError(f"unknown task {task!r} (known tasks: {', '.join(task_names())})")
        call = f"tasks.{task.replace('-', '_')}()"
        _expect(str | None, name=name, map=map, executor=executor)
        if min_accuracy is not None and (isinstance(min_accuracy, bool) or not isinstance(min_accuracy, (int, float))):
            raise TypeError(f"{call}: min_accuracy must be a number between 0 and 1, got {min_accuracy!r}")
        if args:
            required = [p for p, t in spec.inputs.items() if t.required]
            if len(args) > 1 or len(required) != 1:
                raise TypeError(f"{call} takes its inputs by keyword ({', '.join(spec.inputs)}); a single positional "
                                f"argument is allowed only for tasks with exactly one required input")
            if required[0] in inputs:
                raise TypeError(f"{call} got input {required[0]!r} both by position and by keyword")
            inputs = {required[0]: args[0], **inputs}
        refs = {param: self._as_ref(value, f"{call} input {param!r}") for param, value in inputs.items()}
        stage_name = name if name is not None else self._fresh_name(task.replace("-", "_"))
        accuracy = None if min_accuracy is None else float(min_accuracy)
        self._stages.append(StageSpec(stage_name, task, refs, map, StageConstraints(executor, accuracy)))
        self._sites[f"spec.stages[{len(self._stages) - 1}]"] = _call_site()
        return StageHandle(self, stage_name, spec)

    def build(self) -> WorkflowSpec:
        """The validated spec; raises SpecError with one line per problem, at the call that caused it."""
        spec = WorkflowSpec(self.name, self.description, dict(self._inputs), tuple(self._stages),
                            dict(self._outputs))
        issues = Issues("<sdk>", self._locate, self._label)
        validate_workflow(spec, issues)
        if issues:
            raise SpecError(sorted(issues.items, key=lambda i: (i.source, i.line or 0)))
        return spec

    # -- helpers --

    def _fresh_name(self, base: str) -> str:
        taken = {s.name for s in self._stages}
        if base not in taken:
            return base
        n = 2
        while f"{base}_{n}" in taken:
            n += 1
        return f"{base}_{n}"

    def _as_ref(self, value: Any, where: str) -> Ref:
        if isinstance(value, Ref):
            return value
        if isinstance(value, StageHandle):
            if value._workflow is not self:
                raise TypeError(f"{where}: stage {value.name!r} belongs to workflow {value._workflow.name!r}, "
                                f"not {self.name!r}")
            outputs = list(value._task.outputs)
            if len(outputs) != 1:
                raise TypeError(f"{where}: stage {value.name!r} has outputs {', '.join(outputs)}; pass one of them, "
                                f"e.g. {value.name}.{outputs[0]}")
            return Ref(value.name, outputs[0])
        raise TypeError(f"{where}: expected a workflow input (wf.input(...)) or a stage output, got "
                        f"{type(value).__name__} {value!r:.40}; stages are wired, not given constants")

    def _locate(self, path: str) -> tuple[str, int | None]:
        match = _STAGE_PATH.match(path)
        key = match.group(0) if match else ".".join(path.split(".")[:3])
        source, line = self._sites.get(key) or self._sites[""]
        return source, line

    def _label(self, path: str) -> str:
        """'spec.stages[2].inputs.text' -> "stage 'embed_passages': inputs.text" (stages by name)."""
        match = _STAGE_PATH.match(path)
        if match:
            name = self._stages[int(match.group(1))].name
            rest = path[match.end():].lstrip(".")
            return f"stage '{name}'" + (f": {rest}" if rest else "")
        return path.removeprefix("spec.")


def _expect(kind: Any, **values: Any) -> None:
    for key, value in values.items():
        if not isinstance(value, kind):
            raise TypeError(f"{key} must be {getattr(kind, '__name__', kind)}, got {value!r:.40}")


class _Tasks:
    """``tasks.embed(...)``, ``tasks.scene_detection(...)``: one function per task, for the current workflow."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        task = attr.replace("_", "-")
        if task not in TASKS:
            known = [t.replace("-", "_") for t in task_names()]
            close = difflib.get_close_matches(attr, known, n=1)
            raise AttributeError(f"no task '{attr}' (tasks: {', '.join(known)})"
                                 + (f"; did you mean '{close[0]}'?" if close else ""))
        spec = TASKS[task]

        def call(*args: Any, name: str | None = None, map: str | None = None, executor: str | None = None,
                 min_accuracy: float | None = None, **inputs: Any) -> StageHandle:
            workflow = _CURRENT.get()
            if workflow is None:
                raise RuntimeError(f"tasks.{attr}() adds a stage to the current workflow: call it inside "
                                   "`with Workflow(...) as wf:`")
            return workflow.stage(task, *args, name=name, map=map, executor=executor, min_accuracy=min_accuracy,
                                  **inputs)

        call.__name__ = attr
        call.__qualname__ = f"tasks.{attr}"
        params = ", ".join(f"{p}: {t.type}{'' if t.required else ' = None'}" for p, t in spec.inputs.items())
        outs = ", ".join(f"{o}: {t}" for o, t in spec.outputs.items())
        call.__doc__ = f"{spec.description}.\n\n({params}) -> stage with outputs ({outs})"
        return call

    def __dir__(self) -> list[str]:
        return [t.replace("-", "_") for t in task_names()]


tasks = _Tasks()
