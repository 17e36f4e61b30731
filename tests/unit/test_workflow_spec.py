"""Workflow spec: YAML loading with located errors, validation, round trips, and the Python SDK."""

from __future__ import annotations

import inspect
import runpy
from pathlib import Path

import pytest
import yaml

from common.workflow.loader import MAX_DOCUMENT_BYTES, load_workflow, load_workflow_file
from common.workflow.sdk import RESERVED_KWARGS, StageHandle, Workflow, tasks
from common.workflow.spec import (
    Ref, SpecError, SpecIssue, StageConstraints, WorkflowInput, WorkflowSpec, validate_workflow,
)
from common.workflow.tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "workflows"

# Line numbers matter: the table below names them.
BASE = """\
apiVersion: murakkab.dev/v1
kind: Workflow
metadata:
  name: rag-qa
spec:
  inputs:
    question: {type: text}
    corpus: {type: file}
  stages:
    - name: load
      task: load-documents
      inputs:
        corpus: inputs.corpus
    - name: embed_question
      task: embed
      inputs:
        text: inputs.question
    - name: embed_passages
      task: embed
      map: text
      inputs:
        text: load.texts
    - name: retrieve
      task: retrieve
      inputs:
        query: embed_question.embedding
        embeddings: embed_passages.embedding
        documents: load.documents
    - name: answer
      task: chat
      inputs:
        question: inputs.question
        context: retrieve.texts
  outputs:
    answer: answer.answer
    passages: retrieve.passages
"""


def edit(old: str, new: str, count: int = 1) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, count)


BROKEN_WORKFLOWS = [
    ("dangling stage", edit("text: load.texts", "text: lod.texts"),
     "rag-qa.yaml:22: spec.stages[2].inputs.text: refers to stage 'lod', which does not exist (stages: load, "
     "embed_question, embed_passages, retrieve, answer); did you mean 'load'?"),
    ("dangling output", edit("context: retrieve.texts", "context: retrieve.text"),
     "rag-qa.yaml:33: spec.stages[4].inputs.context: stage 'retrieve' (task retrieve) has no output 'text' "
     "(outputs: passages, texts); did you mean 'texts'?"),
    ("dangling workflow input", edit("question: inputs.question", "question: inputs.query"),
     "rag-qa.yaml:32: spec.stages[4].inputs.question: refers to workflow input 'query', which does not exist "
     "(inputs: question, corpus)"),
    ("unknown task", edit("task: retrieve", "task: retreive"),
     "rag-qa.yaml:24: spec.stages[3].task: unknown task 'retreive' (known tasks: chat, code-execution,"),
    ("missing required input", edit("        documents: load.documents\n", ""),
     "rag-qa.yaml:25: spec.stages[3].inputs: missing required input 'documents' of task retrieve "
     "(documents: list[document])"),
    ("unknown stage input", edit("context: retrieve.texts", "contxt: retrieve.texts"),
     "rag-qa.yaml:33: spec.stages[4].inputs.contxt: task chat has no input 'contxt' (inputs: question, context, "
     "background); did you mean 'context'?"),
    ("type mismatch", edit("context: retrieve.texts", "context: retrieve.passages"),
     "rag-qa.yaml:33: spec.stages[4].inputs.context: retrieve.passages is list[passage], but input 'context' of "
     "task chat expects list[text]"),
    ("list into scalar suggests map", edit("      map: text\n", ""),
     "rag-qa.yaml:21: spec.stages[2].inputs.text: load.texts is list[text], but input 'text' of task embed "
     "expects text; add `map: text` to run the stage once per element"),
    ("map over a scalar", edit("      inputs:\n        text: inputs.question", "      map: text\n      inputs:\n"
                                                                                 "        text: inputs.question"),
     "rag-qa.yaml:16: spec.stages[1].map: map over 'text' needs a list to fan out over, but inputs.question is text"),
    ("map names an unknown input", edit("map: text", "map: texts"),
     "rag-qa.yaml:20: spec.stages[2].map: map names 'texts', which is not an input of this stage (bound inputs: "
     "text)"),
    ("map element type mismatch", edit("text: load.texts", "text: load.documents"),
     "rag-qa.yaml:22: spec.stages[2].inputs.text: map over 'text': the elements of load.documents are document, "
     "but input 'text' of task embed expects text"),
    ("cycle", edit("text: inputs.question", "text: answer.answer"),
     "rag-qa.yaml:17: spec.stages[1].inputs.text: stages form a cycle: embed_question -> retrieve -> answer -> "
     "embed_question"),
    ("self reference", edit("text: inputs.question", "text: embed_question.embedding"),
     "rag-qa.yaml:17: spec.stages[1].inputs.text: stage 'embed_question' consumes its own output "
     "embed_question.embedding (a cycle: embed_question -> embed_question)"),
    ("duplicate stage name", edit("- name: embed_passages", "- name: embed_question"),
     "rag-qa.yaml:18: spec.stages[2].name: duplicate stage name 'embed_question' (first used by spec.stages[1])"),
    ("unknown stage key", edit("      map: text\n", "      mapp: text\n"),
     "rag-qa.yaml:20: spec.stages[2].mapp: unknown key 'mapp' (allowed: name, task, inputs, map, constraints); "
     "did you mean 'map'?"),
    ("model named in a workflow", edit("      task: chat\n", "      task: chat\n      model: llama-3-70b\n"),
     "rag-qa.yaml:31: spec.stages[4].model: unknown key 'model' (allowed: name, task, inputs, map, constraints); "
     "workflows name tasks, not models, engines or hardware"),
    ("gpu named in a workflow", edit("      task: chat\n", "      task: chat\n      gpu: H100\n"),
     "rag-qa.yaml:31: spec.stages[4].gpu: unknown key 'gpu'"),
    ("wrong apiVersion", edit("murakkab.dev/v1", "murakkab.dev/v2"),
     "rag-qa.yaml:1: apiVersion: expected 'murakkab.dev/v1', got text 'murakkab.dev/v2'"),
    ("catalog kind", edit("kind: Workflow", "kind: ExecutorCatalog"),
     "rag-qa.yaml:2: kind: expected 'Workflow', got text 'ExecutorCatalog' (ExecutorCatalog documents are "
     "applied with `murakkabctl catalog apply`)"),
    ("bad workflow name", edit("name: rag-qa", "name: RAG_QA"),
     "rag-qa.yaml:4: metadata.name: 'RAG_QA' is not a workflow name (lowercase letters, digits and '-'"),
    ("missing workflow name", edit("  name: rag-qa\n", "  description: no name\n"),
     "rag-qa.yaml:3: metadata.name: missing required key 'name'"),
    ("bad stage name", edit("- name: answer", "- name: Final-Answer"),
     "rag-qa.yaml:29: spec.stages[4].name: 'Final-Answer' is not a valid stage name (lowercase letters, digits"),
    ("reserved stage name", edit("- name: load", "- name: inputs"),
     "rag-qa.yaml:10: spec.stages[0].name: 'inputs' is reserved: references 'inputs.NAME' mean workflow inputs"),
    ("unknown input type", edit("question: {type: text}", "question: {type: txt}"),
     "rag-qa.yaml:7: spec.inputs.question.type: unknown type 'txt' (expected one of audio, boolean,"),
    ("output refers to a missing stage", edit("answer: answer.answer", "answer: final.answer"),
     "rag-qa.yaml:35: spec.outputs.answer: refers to stage 'final', which does not exist"),
    ("no outputs", edit("  outputs:\n    answer: answer.answer\n    passages: retrieve.passages\n", "  outputs: {}\n"),
     "rag-qa.yaml:34: spec.outputs: a workflow needs at least one output"),
    ("no stages", BASE[:BASE.index("  stages:")] + "  stages: []\n  outputs:\n    q: inputs.question\n",
     "rag-qa.yaml:9: spec.stages: a workflow needs at least one stage"),
    ("accuracy out of range", edit("      task: chat\n", "      task: chat\n      constraints: {min_accuracy: 1.5}\n"),
     "rag-qa.yaml:31: spec.stages[4].constraints.min_accuracy: expected a number between 0 and 1, got 1.5"),
    ("accuracy not a number", edit("      task: chat\n", "      task: chat\n      constraints:\n"
                                                         "        min_accuracy: high\n"),
     "rag-qa.yaml:32: spec.stages[4].constraints.min_accuracy: expected a number between 0 and 1, got text 'high'"),
    ("bad pinned executor", edit("      task: chat\n", "      task: chat\n      constraints: {executor: Big GPU}\n"),
     "rag-qa.yaml:31: spec.stages[4].constraints.executor: 'Big GPU' is not an executor name"),
    ("unknown constraint", edit("      task: chat\n", "      task: chat\n      constraints: {max_latency_s: 2}\n"),
     "rag-qa.yaml:31: spec.stages[4].constraints.max_latency_s: unknown key 'max_latency_s' (allowed: executor, "
     "min_accuracy)"),
    ("malformed reference", edit("text: load.texts", "text: load_texts"),
     "rag-qa.yaml:22: spec.stages[2].inputs.text: expected a reference 'inputs.NAME' or 'STAGE.OUTPUT', got "
     "'load_texts'"),
    ("reference not text", edit("text: load.texts", "text: [load.texts]"),
     "rag-qa.yaml:22: spec.stages[2].inputs.text: expected a reference 'inputs.NAME' or 'STAGE.OUTPUT', got a list"),
    ("yaml syntax", edit("    - name: answer\n", "    - name: answer: final\n"),
     "rag-qa.yaml:29: invalid YAML: mapping values are not allowed here"),
    ("yaml tab indentation", edit("      task: chat\n", "\ttask: chat\n"),
     "rag-qa.yaml:30: invalid YAML: found character '\\t' that cannot start any token"),
    ("duplicate yaml key", edit("      task: chat\n", "      task: chat\n      task: embed\n"),
     "rag-qa.yaml:31: spec.stages[4].task: key 'task' appears twice in one mapping (first on line 30)"),
    ("empty document", "# nothing here\n", "rag-qa.yaml:1: the document is empty"),
    ("two documents", BASE + "---\nkind: Workflow\n", "rag-qa.yaml:37: invalid YAML: expected a single document"),
    ("not a mapping", "- a\n- b\n", "rag-qa.yaml:1: expected a Workflow document (a mapping with apiVersion, kind, "
                                    "metadata, spec), got a list"),
    ("unknown top-level key", edit("kind: Workflow\n", "kind: Workflow\nstatus: {}\n"),
     "rag-qa.yaml:3: status: unknown key 'status' (allowed: apiVersion, kind, metadata, spec)"),
    ("stages not a list", BASE[:BASE.index("  stages:")] + "  stages: {load: x}\n  outputs: {q: inputs.question}\n",
     "rag-qa.yaml:9: spec.stages: expected a list of stages, got a mapping"),
    ("optional input feeds a required one", edit("question: {type: text}", "question: {type: text, required: no}"),
     "rag-qa.yaml:17: spec.stages[1].inputs.text: optional workflow input 'question' feeds required input 'text' "
     "of task embed; declare it required: true"),
    ("required not a boolean", edit("question: {type: text}", "question: {type: text, required: maybe}"),
     "rag-qa.yaml:7: spec.inputs.question.required: expected true or false, got text 'maybe'"),
    ("missing task", edit("      task: load-documents\n", ""),
     "rag-qa.yaml:10: spec.stages[0].task: missing required key 'task'"),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in BROKEN_WORKFLOWS], ids=[c[0] for c in BROKEN_WORKFLOWS])
def test_broken_workflow_is_rejected_with_located_message(text: str, expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_workflow(text, "rag-qa.yaml")
    lines = str(caught.value).splitlines()
    assert any(line.startswith(expected) for line in lines), f"wanted {expected!r} in:\n{caught.value}"
    assert len(lines) == len(caught.value.issues)
    for issue in caught.value.issues:
        assert issue.source == "rag-qa.yaml" and issue.line is not None and issue.line >= 1, issue


def test_the_base_of_the_table_is_valid() -> None:
    spec = load_workflow(BASE, "rag-qa.yaml")
    assert WorkflowSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["spec"] == load_workflow_file(EXAMPLES / "rag-qa.yaml").to_dict()["spec"] | {
        "inputs": {"question": {"type": "text"}, "corpus": {"type": "file"}}}


def test_all_problems_are_reported_together_in_line_order() -> None:
    text = edit("text: load.texts", "text: lod.texts").replace("context: retrieve.texts", "context: retrieve.text")
    text = text.replace("task: retrieve", "task: retrieve\n      extra: 1")
    with pytest.raises(SpecError) as caught:
        load_workflow(text, "w.yaml")
    # Structural problems stop before cross-references are checked, so fix the key first.
    assert [i.field for i in caught.value.issues] == ["spec.stages[3].extra"]
    text = text.replace("\n      extra: 1", "")
    with pytest.raises(SpecError) as caught:
        load_workflow(text, "w.yaml")
    assert [(i.line, i.field) for i in caught.value.issues] == [
        (22, "spec.stages[2].inputs.text"), (33, "spec.stages[4].inputs.context")]


def test_every_line_of_the_error_names_file_line_and_field() -> None:
    err = SpecError([SpecIssue("a.yaml", 3, "spec.stages[0].task", "unknown task 'x'"),
                     SpecIssue("a.yaml", None, "", "invalid YAML: oops")])
    assert str(err) == "a.yaml:3: spec.stages[0].task: unknown task 'x'\na.yaml: invalid YAML: oops"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_workflows_load_and_round_trip(path: Path) -> None:
    spec = load_workflow_file(path)
    doc = spec.to_dict()
    assert WorkflowSpec.from_dict(doc) == spec
    assert load_workflow(yaml.safe_dump(doc, sort_keys=False), "dumped.yaml") == spec
    assert validate_workflow(spec) == []
    order = spec.topological_order()
    assert sorted(order) == sorted(s.name for s in spec.stages)
    for stage in spec.stages:
        assert all(order.index(up) < order.index(stage.name) for up in stage.upstream())


def test_reference_workflows_have_the_briefed_shape() -> None:
    rag = load_workflow_file(EXAMPLES / "rag-qa.yaml")
    assert rag.input_types() == {"question": "text", "corpus": "file"}
    assert rag.output_types() == {"answer": "text", "passages": "list[passage]"}
    assert rag.output_type(Ref("embed_passages", "embedding")) == "list[vector]"  # fan-out makes a list
    assert rag.stage("retrieve").inputs["embeddings"] == Ref("embed_passages", "embedding")  # fan-in
    video = load_workflow_file(EXAMPLES / "video-qa.yaml")
    assert [s.task for s in video.stages] == ["scene-detection", "frame-extraction", "object-detection",
                                              "speech-to-text", "chat"]
    assert video.downstream()["transcript"] == ["answer"]
    debate = load_workflow_file(EXAMPLES / "code-debate.yaml")
    assert debate.stage("check").map_over == "code"
    assert debate.output_type(Ref("check", "result")) == "list[test_result]"
    assert debate.topological_order() == ["debate", "check", "rank"]


def test_topological_order_keeps_declaration_order_for_independent_stages() -> None:
    video = load_workflow_file(EXAMPLES / "video-qa.yaml")
    assert video.topological_order() == ["scenes", "transcript", "frames", "objects", "answer"]


def test_short_input_form_and_canonical_types() -> None:
    text = edit("question: {type: text}", "question: text").replace("corpus: {type: file}",
                                                                     "corpus: {type: ' file ', description: c}")
    spec = load_workflow(text, "w.yaml")
    assert spec.inputs["question"] == WorkflowInput("text")
    assert spec.to_dict()["spec"]["inputs"] == {"question": {"type": "text"},
                                                "corpus": {"type": "file", "description": "c"}}


def test_constraints_and_optional_inputs_round_trip() -> None:
    text = edit("      task: chat\n", "      task: chat\n      constraints: {executor: tiny-llama-chat-cpu, "
                                       "min_accuracy: 0.5}\n")
    text = text.replace("    corpus: {type: file}\n", "    corpus: {type: file}\n    style: {type: text, "
                                                         "required: false}\n")
    text = text.replace("context: retrieve.texts", "context: retrieve.texts\n        background: inputs.style")
    spec = load_workflow(text, "w.yaml")
    assert spec.stage("answer").constraints == StageConstraints("tiny-llama-chat-cpu", 0.5)
    assert spec.to_dict()["spec"]["inputs"]["style"] == {"type": "text", "required": False}
    assert WorkflowSpec.from_dict(spec.to_dict()) == spec


def test_from_dict_reports_problems_without_lines() -> None:
    doc = load_workflow(BASE, "w.yaml").to_dict()
    doc["spec"]["stages"][3]["task"] = "nope"
    with pytest.raises(SpecError) as caught:
        WorkflowSpec.from_dict(doc, source="stored:rag-qa")
    assert str(caught.value).startswith("stored:rag-qa: spec.stages[3].task: unknown task 'nope'")


def test_job_inputs_are_checked_against_declared_types() -> None:
    spec = load_workflow(BASE, "w.yaml")
    blob = {"name": "c.jsonl", "media_type": "application/jsonl", "data": b"{}"}
    assert spec.check_job_inputs({"question": "why?", "corpus": blob}) == []
    problems = spec.check_job_inputs({"question": 3, "extra": 1})
    assert "inputs.extra: workflow 'rag-qa' has no input 'extra' (inputs: question, corpus)" in problems
    assert "inputs.corpus: missing required input (file)" in problems
    assert "inputs.question: expected text, got number 3" in problems


def test_ref_text_form() -> None:
    assert Ref.parse("inputs.question") == Ref(None, "question")
    assert Ref.parse("load.texts") == Ref("load", "texts")
    assert str(Ref("load", "texts")) == "load.texts" and str(Ref(None, "q")) == "inputs.q"
    for bad in ("load", "a.b.c", ".x", "x.", 3):
        with pytest.raises(ValueError):
            Ref.parse(bad)


def test_yaml_anchors_and_merge_keys_are_expanded() -> None:
    text = edit("    - name: embed_question\n      task: embed\n",
                "    - &embed\n      name: embed_question\n      task: embed\n")
    assert load_workflow(text, "w.yaml") == load_workflow(BASE, "w.yaml")


def test_alias_bombs_and_recursion_are_refused() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    with pytest.raises(SpecError, match="more than 100000 values"):
        load_workflow(bomb, "bomb.yaml")
    with pytest.raises(SpecError, match="recursive alias"):
        load_workflow("a: &a\n  b: *a\n", "loop.yaml")


def test_oversized_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="the limit is"):
        load_workflow("#" * (MAX_DOCUMENT_BYTES + 1), "big.yaml")
    with pytest.raises(SpecError, match="cannot read the file"):
        load_workflow_file(tmp_path / "missing.yaml")


# --- the SDK -----------------------------------------------------------------------------


def test_sdk_rag_qa_equals_the_yaml_rag_qa() -> None:
    module = runpy.run_path(str(EXAMPLES / "rag_qa_sdk.py"))
    built = module["build"]()
    from_yaml = load_workflow_file(EXAMPLES / "rag-qa.yaml")
    assert built.to_dict() == from_yaml.to_dict()
    assert built == from_yaml


def test_sdk_video_qa_and_code_debate_equal_their_yaml() -> None:
    with Workflow("video-qa", description="Answer a question about a video from the objects seen in it and the "
                                          "words spoken.") as wf:
        video = wf.input("video", "video", description="The video file (any container OpenCV can read).")
        question = wf.input("question", "text", description="The question to answer.")
        scenes = tasks.scene_detection(video, name="scenes")
        frames = tasks.frame_extraction(video=video, scenes=scenes, name="frames")
        objects = tasks.object_detection(frames, name="objects")
        transcript = tasks.speech_to_text(video, name="transcript")
        answer = tasks.chat(question, context=objects, background=transcript, name="answer")
        wf.output("answer", answer)
        wf.output("objects", objects.objects)
        wf.output("transcript", transcript.transcript)
    assert wf.build().to_dict() == load_workflow_file(EXAMPLES / "video-qa.yaml").to_dict()

    with Workflow("code-debate", description="Propose programs by LLM debate, test every candidate in a sandbox, "
                                             "return the best.") as wf:
        problem = wf.input("problem", "text", description="The programming problem, including the function "
                                                          "signature to implement.")
        tests = wf.input("tests", "text", description="Python test code (assert statements) run against each "
                                                      "candidate.")
        debate = tasks.code_generation(problem, name="debate")
        check = tasks.code_execution(code=debate, tests=tests, map="code", name="check")  # fan-out
        rank = tasks.rank_candidates(candidates=debate, results=check, name="rank")  # fan-in
        wf.output("best", rank.best)
        wf.output("ranking", rank.ranking)
    spec = wf.build()
    assert spec.to_dict() == load_workflow_file(EXAMPLES / "code-debate.yaml").to_dict()
    assert spec.output_type(check.result) == "list[test_result]"


def test_sdk_default_stage_names_number_repeats() -> None:
    with Workflow("names") as wf:
        q = wf.input("q", "text")
        first, second = tasks.embed(q), tasks.embed(q)
        third = tasks.embed(q, name="embed_3")
        fourth = tasks.embed(q)
        wf.output("v", first.embedding)
    assert [h.name for h in (first, second, third, fourth)] == ["embed", "embed_2", "embed_3", "embed_4"]
    assert [s.name for s in wf.build().stages] == ["embed", "embed_2", "embed_3", "embed_4"]


def test_sdk_handles_expose_outputs_and_explain_unknown_ones() -> None:
    with Workflow("h") as wf:
        docs = tasks.load_documents(wf.input("corpus", "file"))
    assert isinstance(docs, StageHandle) and docs.task == "load-documents"
    assert docs.texts == Ref("load_documents", "texts")
    assert docs.outputs == {"documents": Ref("load_documents", "documents"), "texts": Ref("load_documents", "texts")}
    with pytest.raises(AttributeError, match=r"stage 'load_documents' \(task load-documents\) has no output "
                                             r"'text' \(outputs: documents, texts\)"):
        docs.text
    with pytest.raises(AttributeError, match="no task 'embedd'.*did you mean 'embed'"):
        tasks.embedd


def test_sdk_call_shape_errors_are_immediate() -> None:
    with pytest.raises(RuntimeError, match=r"inside `with Workflow"):
        tasks.embed(Ref(None, "q"))
    with Workflow("w") as wf:
        q = wf.input("q", "text")
        vid = wf.input("v", "video")
        with pytest.raises(TypeError, match=r"tasks.frame_extraction\(\) takes its inputs by keyword"):
            tasks.frame_extraction(vid)
        with pytest.raises(TypeError, match="both by position and by keyword"):
            tasks.embed(q, text=q)
        with pytest.raises(TypeError, match="stages are wired, not given constants"):
            tasks.embed("hello")
        docs = tasks.load_documents(wf.input("c", "file"))
        with pytest.raises(TypeError, match="has outputs documents, texts; pass one of them"):
            tasks.embed(docs)
        with pytest.raises(ValueError, match="input 'q' is declared twice"):
            wf.input("q", "text")
    with Workflow("other") as other:
        foreign = tasks.embed(other.input("x", "text"))
    with wf, pytest.raises(TypeError, match="belongs to workflow 'other'"):
        tasks.retrieve(query=foreign, embeddings=q, documents=docs.documents)


def test_sdk_build_errors_name_the_stage_and_the_line_of_the_call() -> None:
    with Workflow("bad") as wf:
        q = wf.input("question", "text")
        docs = tasks.load_documents(q)
        line = inspect.currentframe().f_lineno + 1
        tasks.embed(text=docs.texts, name="embed_all")
        wf.output("docs", docs.documents)
    with pytest.raises(SpecError) as caught:
        wf.build()
    here = Path(__file__).name
    messages = [str(i) for i in caught.value.issues]
    assert any(m.endswith(f"{here}:{line - 2}: stage 'load_documents': inputs.corpus: inputs.question is text, "
                          "but input 'corpus' of task load-documents expects file") for m in messages), messages
    assert any(m.endswith(f"{here}:{line}: stage 'embed_all': inputs.text: load_documents.texts is list[text], but "
                          "input 'text' of task embed expects text; add `map: text` to run the stage once per "
                          "element") for m in messages), messages


def test_sdk_runs_the_same_validation_as_yaml() -> None:
    with Workflow("cyc") as wf:
        q = wf.input("q", "text")
        a = tasks.chat(question=q, background=Ref("b", "answer"), name="a")
        tasks.chat(question=q, background=a, name="b")
        wf.output("x", a)
        wf.input("kind", "colour")
        tasks.embed(q, name="e", executor="x", min_accuracy=2.0)
    with pytest.raises(SpecError) as caught:
        wf.build()
    text = str(caught.value)
    assert "stage 'a': inputs.background: stages form a cycle: a -> b -> a" in text
    assert "inputs.kind.type: unknown type 'colour'" in text
    assert "stage 'e': constraints.min_accuracy: expected a number between 0 and 1, got 2.0" in text
    assert len(caught.value.issues) == 3


def test_sdk_constraints_and_map_reach_the_spec() -> None:
    with Workflow("pinned") as wf:
        corpus = wf.input("corpus", "file")
        docs = tasks.load_documents(corpus)
        vectors = tasks.embed(docs.texts, map="text", executor="minilm-embed-cpu", min_accuracy=0.4)
        wf.output("vectors", vectors)
    spec = wf.build()
    stage = spec.stage("embed")
    assert stage.map_over == "text" and stage.constraints == StageConstraints("minilm-embed-cpu", 0.4)
    assert spec.output_types() == {"vectors": "list[vector]"}
    assert spec.to_dict()["spec"]["stages"][1] == {
        "name": "embed", "task": "embed", "inputs": {"text": "load_documents.texts"}, "map": "text",
        "constraints": {"executor": "minilm-embed-cpu", "min_accuracy": 0.4}}


def test_sdk_reserved_names_do_not_collide_with_tasks() -> None:
    for task in TASKS.values():
        assert not set(task.inputs) & set(RESERVED_KWARGS), task.name
        assert not set(task.outputs) & {"name", "task", "outputs"}, task.name
        assert callable(getattr(tasks, task.name.replace("-", "_")))


def test_sdk_rejects_wrongly_typed_arguments_at_the_call() -> None:
    with Workflow("w") as wf:
        q = wf.input("q", "text")
        with pytest.raises(TypeError, match="min_accuracy must be a number"):
            tasks.embed(q, min_accuracy="high")
        with pytest.raises(TypeError, match="map must be"):
            tasks.embed(q, map=1)
        with pytest.raises(TypeError, match="type must be str"):
            wf.input("n", 3)


def test_from_dict_survives_odd_plain_data() -> None:
    doc = load_workflow(BASE, "w.yaml").to_dict()
    doc["spec"]["outputs"] = {1: "answer.answer"}
    with pytest.raises(SpecError, match=r"spec.outputs.1: 1 is not a valid workflow output name"):
        WorkflowSpec.from_dict(doc)
    with pytest.raises(SpecError, match="expected a Workflow document"):
        WorkflowSpec.from_dict(None)
