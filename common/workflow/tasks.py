"""The abstract tasks a workflow stage can name, with their typed inputs and outputs.

A task says *what* is computed; executors in the catalog say *how*. Every executor of a
task takes the task's inputs and produces the task's outputs, so the planner can swap
one for another without touching the workflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskInput:
    type: str
    required: bool = True
    description: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    inputs: dict[str, TaskInput]
    outputs: dict[str, str]
    knobs: tuple[str, ...] = field(default=())  # knobs the task's executors commonly offer (documentation)


def _t(name: str, description: str, inputs: dict[str, TaskInput], outputs: dict[str, str],
       knobs: tuple[str, ...] = ()) -> TaskSpec:
    return TaskSpec(name, description, inputs, outputs, knobs)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _t("load-documents", "parse a JSONL corpus of {id, text} records",
       {"corpus": TaskInput("file")}, {"documents": "list[document]", "texts": "list[text]"}),
    _t("embed", "embed a text as a vector", {"text": TaskInput("text")}, {"embedding": "vector"}),
    _t("retrieve", "rank documents by cosine similarity of their embeddings to a query embedding",
       {"query": TaskInput("vector"), "embeddings": TaskInput("list[vector]"),
        "documents": TaskInput("list[document]")},
       {"passages": "list[passage]", "texts": "list[text]"}, ("top_k",)),
    _t("chat", "answer a question, optionally grounded in context passages and background text",
       {"question": TaskInput("text"), "context": TaskInput("list[text]", required=False),
        "background": TaskInput("text", required=False)},
       {"answer": "text"}, ("max_tokens",)),
    _t("scene-detection", "split a video into scenes", {"video": TaskInput("video")}, {"scenes": "list[scene]"}),
    _t("frame-extraction", "pick representative frames from a video's scenes",
       {"video": TaskInput("video"), "scenes": TaskInput("list[scene]")}, {"frames": "list[image]"}, ("frames",)),
    _t("speech-to-text", "transcribe the speech in an audio or video file", {"media": TaskInput("file")},
       {"transcript": "text"}),
    _t("object-detection", "name the objects seen in a set of frames", {"frames": TaskInput("list[image]")},
       {"objects": "list[text]"}),
    _t("code-generation", "propose candidate programs for a problem (e.g. by an LLM debate)",
       {"problem": TaskInput("text")}, {"candidates": "list[text]"}, ("debaters", "rounds", "max_tokens")),
    _t("code-execution", "run a program against tests in a sandbox with time and memory limits",
       {"code": TaskInput("text"), "tests": TaskInput("text")}, {"result": "test_result"}),
    _t("rank-candidates", "rank candidate programs by their test results",
       {"candidates": TaskInput("list[text]"), "results": TaskInput("list[test_result]")},
       {"best": "text", "ranking": "list[json]"}),
]}


def task_names() -> list[str]:
    return sorted(TASKS)
