"""First-fit planner: executor and knob choice per SLO tier, constraints, and placement rules."""

from __future__ import annotations

import random
from typing import Any

import pytest

from common.workflow.catalog import ExecutorSpec
from common.workflow.spec import StageConstraints, StageSpec, WorkflowSpec
from policies.first_fit import plan
from policies.plan import Demand, DeviceSlot, NodeSnapshot, PlacedComponent, Plan

GIB = 1 << 30


# --- builders ----------------------------------------------------------------------------


def executor(name: str, task: str = "chat", engine: str = "sim", device: str = "gpu", gpu_gib: float = 10,
             gpu_count: int = 1, gpu_models: tuple[str, ...] = (), cpu_cores: float = 1.0, memory_gib: float = 0,
             quality: tuple[tuple[float, dict[str, Any]], ...] = (), workflow: str = "wf",
             latency_s: float | None = None, knobs: dict[str, Any] | None = None,
             factors: dict[str, dict[str, float]] | None = None, replicas: int = 1) -> ExecutorSpec:
    data: dict[str, Any] = {
        "name": name, "task": task, "engine": engine, "replicas": replicas,
        "resources": {"device": device, "gpu_count": gpu_count, "gpu_memory_bytes": int(gpu_gib * GIB),
                      "gpu_models": list(gpu_models), "cpu_cores": cpu_cores, "memory_bytes": int(memory_gib * GIB)},
        "quality": [{"workflow": workflow, "accuracy": acc, "knobs": k} for acc, k in quality],
        "knobs": knobs or {},
    }
    if engine == "sim":
        data["sim"] = {"latency_s": latency_s or 1.0, "knob_latency_factors": factors or {}}
    else:
        data["expected_latency_s"] = latency_s
        if engine == "vllm":
            data["vllm"] = {"model": "/models/x"}
        else:
            data["tool"] = {"entry_point": "agent.tools.x:run"}
    return ExecutorSpec.model_validate(data)


def catalog(*executors: ExecutorSpec) -> dict[str, ExecutorSpec]:
    return {e.name: e for e in executors}


def workflow(name: str = "wf", *stages: StageSpec) -> WorkflowSpec:
    stages = stages or (stage("answer", "chat"),)
    return WorkflowSpec(name=name, description="", inputs={}, stages=tuple(stages), outputs={})


def stage(name: str, task: str, pin: str | None = None, min_accuracy: float | None = None) -> StageSpec:
    return StageSpec(name=name, task=task, inputs={}, constraints=StageConstraints(pin, min_accuracy))


def gpu_node(name: str, gpus: int = 1, gpu_gib: float = 80, simulated: bool = True,
             model: str = "H100 (simulated)", schedulable: bool = True, cpu_cores: int = 16) -> NodeSnapshot:
    devices = tuple(DeviceSlot(i, "gpu", model, simulated, int(gpu_gib * GIB)) for i in range(gpus))
    return NodeSnapshot(name, schedulable, devices, cpu_cores, 256 * GIB)


def cpu_node(name: str, cpu_cores: int = 2, cpu_device: bool = True, memory_gib: float = 8,
             schedulable: bool = True) -> NodeSnapshot:
    devices = (DeviceSlot(0, "cpu", "x86_64", False, int(memory_gib * GIB)),) if cpu_device else ()
    return NodeSnapshot(name, schedulable, devices, cpu_cores, int(memory_gib * GIB))


def demand(slo: dict[str, str] | None = None, wf: str = "wf") -> Demand:
    return Demand.of(wf, slo or {})


def chosen(result: Plan, d: Demand, stage_name: str = "answer") -> str:
    assert d in result.choices, result.unsatisfiable
    return result.choices[d][stage_name].executor


# --- choosing ------------------------------------------------------------------------------


ACCURACY_LADDER = catalog(
    executor("chat-big", gpu_gib=60, quality=((0.92, {}),)),
    executor("chat-mid", gpu_gib=30, quality=((0.88, {}),)),
    executor("chat-small", gpu_gib=10, quality=((0.80, {}),)),
    executor("chat-tiny", gpu_gib=5, quality=((0.50, {}),)),
)


@pytest.mark.parametrize("tier, expected", [
    ("best", "chat-big"),     # highest accuracy
    ("good", "chat-mid"),     # cheapest with accuracy >= 0.95 * 0.92 = 0.874
    ("fair", "chat-small"),   # cheapest with accuracy >= 0.85 * 0.92 = 0.782
    ("basic", "chat-tiny"),   # cheapest
])
def test_accuracy_tiers_choose_differently(tier: str, expected: str) -> None:
    d = demand({"accuracy": tier})
    result = plan({"wf": workflow()}, ACCURACY_LADDER, [d], [gpu_node("n1")])
    assert chosen(result, d) == expected
    assert [c.executor for c in result.components] == [expected]


LATENCY_LADDER = catalog(
    executor("chat-fast", gpu_count=2, gpu_gib=40, latency_s=0.10),
    executor("chat-quick", gpu_gib=40, latency_s=0.14),
    executor("chat-slow", gpu_gib=20, latency_s=0.25),
    executor("chat-slowest", gpu_gib=5, latency_s=1.0),
    executor("chat-tool", engine="tool", device="cpu", latency_s=None),  # no latency hint: never "fast"
)


@pytest.mark.parametrize("tier, expected", [
    ("best", "chat-fast"),     # lowest latency, even at two GPUs
    ("good", "chat-quick"),    # cheapest within 1.5x of 0.10 s
    ("fair", "chat-slow"),     # cheapest within 3x
    ("basic", "chat-tool"),    # cheapest of all: no GPU
])
def test_latency_tiers_choose_differently(tier: str, expected: str) -> None:
    d = demand({"latency": tier})
    result = plan({"wf": workflow()}, LATENCY_LADDER, [d], [gpu_node("n1", gpus=2)])
    assert chosen(result, d) == expected


FRAMES = {"frames": {"values": [4, 8, 16], "default": 8}}
KNOBBED = catalog(executor(
    "od-sim", task="object-detection", knobs=FRAMES, latency_s=2.0,
    factors={"frames": {"4": 0.5, "16": 2.0}},
    quality=((0.6, {"frames": 4}), (0.7, {"frames": 8}), (0.8, {"frames": 16})),
))


@pytest.mark.parametrize("slo, frames", [
    ({"accuracy": "best"}, 16),
    ({"latency": "best"}, 4),
    ({}, 8),  # no SLO: the executor's defaults
    ({"accuracy": "basic"}, 4),  # cheapest; same executor, so the least work
])
def test_knob_settings_follow_the_tier(slo: dict[str, str], frames: int) -> None:
    wf = workflow("wf", stage("objects", "object-detection"))
    d = demand(slo)
    result = plan({"wf": wf}, KNOBBED, [d], [gpu_node("n1")])
    assert result.choices[d]["objects"].knobs == {"frames": frames}


def test_no_slo_takes_the_cheapest_executor_at_defaults() -> None:
    cat = catalog(executor("chat-a", gpu_gib=30, knobs={"max_tokens": {"values": [64, 256], "default": 64}},
                           quality=((0.9, {"max_tokens": 256}),)),
                  executor("chat-b", gpu_gib=20, knobs={"max_tokens": {"values": [64, 256], "default": 256}}))
    d = demand()
    result = plan({"wf": workflow()}, cat, [d], [gpu_node("n1")])
    assert result.choices[d]["answer"].executor == "chat-b"
    assert result.choices[d]["answer"].knobs == {"max_tokens": 256}


def test_cheapest_prefers_fewer_gpus_then_less_memory_then_fewer_cores_then_name() -> None:
    cat = catalog(executor("a-two-gpus", gpu_count=2, gpu_gib=1),
                  executor("b-more-memory", gpu_gib=20),
                  executor("c-more-cores", gpu_gib=10, cpu_cores=4),
                  executor("d-winner", gpu_gib=10, cpu_cores=1),
                  executor("e-same-as-d", gpu_gib=10, cpu_cores=1))
    d = demand({"accuracy": "basic"})
    assert chosen(plan({"wf": workflow()}, cat, [d], [gpu_node("n1", gpus=2)]), d) == "d-winner"


def test_pinned_executor_is_used_even_when_the_tier_prefers_another() -> None:
    wf = workflow("wf", stage("answer", "chat", pin="chat-big"))
    d = demand({"accuracy": "basic"})
    assert chosen(plan({"wf": wf}, ACCURACY_LADDER, [d], [gpu_node("n1")]), d) == "chat-big"


@pytest.mark.parametrize("pin, nodes, reason", [
    ("chat-huge", [gpu_node("n1")], "pinned executor 'chat-huge' is not in the catalog"),
    ("embed-x", [gpu_node("n1")], "pinned executor 'embed-x' implements task 'embed', not 'chat'"),
    ("chat-real", [gpu_node("n1")], "chat-real cannot be placed: needs 1 non-simulated GPU(s)"),
])
def test_bad_pins_make_the_demand_unsatisfiable(pin: str, nodes: list[NodeSnapshot], reason: str) -> None:
    cat = {**ACCURACY_LADDER, **catalog(executor("embed-x", task="embed"),
                                        executor("chat-real", engine="vllm", gpu_gib=10))}
    wf = workflow("wf", stage("answer", "chat", pin=pin))
    d = demand({"accuracy": "best"})
    result = plan({"wf": wf}, cat, [d], nodes)
    assert d not in result.choices and result.components == ()
    assert result.unsatisfiable[d].startswith("stage 'answer' (task chat): ")
    assert reason in result.unsatisfiable[d]


def test_min_accuracy_filters_and_unknown_accuracy_passes_only_without_it() -> None:
    cat = {**ACCURACY_LADDER, **catalog(executor("chat-unrated", gpu_gib=1))}  # no quality entry: cheapest
    d = demand({"accuracy": "basic"})
    strict = workflow("wf", stage("answer", "chat", min_accuracy=0.85))
    assert chosen(plan({"wf": strict}, cat, [d], [gpu_node("n1")]), d) == "chat-mid"
    loose = workflow("wf", stage("answer", "chat"))
    assert chosen(plan({"wf": loose}, cat, [d], [gpu_node("n1")]), d) == "chat-unrated"
    impossible = workflow("wf", stage("answer", "chat", min_accuracy=0.95))
    result = plan({"wf": impossible}, cat, [d], [gpu_node("n1")])
    reason = result.unsatisfiable[d]
    assert "no executor qualifies" in reason
    assert "chat-big: best accuracy 0.92, below min_accuracy 0.95" in reason
    assert "chat-unrated: no accuracy known for workflow 'wf'" in reason


def test_min_accuracy_can_pick_a_non_default_knob_setting() -> None:
    wf = workflow("wf", stage("objects", "object-detection", min_accuracy=0.75))
    d = demand()
    assert plan({"wf": wf}, KNOBBED, [d], [gpu_node("n1")]).choices[d]["objects"].knobs == {"frames": 16}


def test_accuracy_of_a_setting_without_its_own_entry_is_unknown_not_the_best() -> None:
    # Only frames=16 is rated; the default (8) must not borrow 16's accuracy under min_accuracy.
    cat = catalog(executor("od", task="object-detection", knobs=FRAMES, quality=((0.9, {"frames": 16}),)))
    wf = workflow("wf", stage("objects", "object-detection", min_accuracy=0.5))
    d = demand({"latency": "best"})
    assert plan({"wf": wf}, cat, [d], [gpu_node("n1")]).choices[d]["objects"].knobs == {"frames": 16}


@pytest.mark.parametrize("wf_name, slo, stages, reason", [
    ("nope", {}, None, "workflow 'nope' is not defined (defined: wf)"),
    ("wf", {"cost": "best"}, None, "unknown SLO dimension 'cost'"),
    ("wf", {"accuracy": "great"}, None, "unknown SLO tier 'great' for accuracy"),
    ("wf", {}, (stage("s", "speech-to-text"),), "stage 's' (task speech-to-text): no executor in the catalog"),
])
def test_unsatisfiable_demands_say_why(wf_name: str, slo: dict[str, str], stages: tuple | None, reason: str) -> None:
    wf = workflow("wf", *(stages or ()))
    d = demand(slo, wf=wf_name)
    result = plan({"wf": wf}, ACCURACY_LADDER, [d], [gpu_node("n1")])
    assert reason in result.unsatisfiable[d]
    assert result.choices == {} and result.components == ()


# --- placing ---------------------------------------------------------------------------------


def test_engines_go_to_the_devices_they_need() -> None:
    cat = catalog(executor("sim-chat", task="chat", gpu_gib=10),
                  executor("real-embed", task="embed", engine="vllm", gpu_gib=10),
                  executor("cpu-chat", task="speech-to-text", engine="vllm", device="cpu", cpu_cores=1),
                  executor("retrieve-tool", task="retrieve", engine="tool", device="cpu"))
    wf = workflow("wf", stage("answer", "chat"), stage("embed", "embed"), stage("stt", "speech-to-text"),
                  stage("retrieve", "retrieve"))
    nodes = [gpu_node("b-real", simulated=False, model="NVIDIA H100 80GB HBM3"), gpu_node("c-sim"),
             cpu_node("a-cpu", cpu_device=True), cpu_node("d-bare", cpu_device=False)]
    result = plan({"wf": wf}, cat, [demand()], nodes)
    placed = {c.executor: (c.node, c.device_indexes) for c in result.components}
    assert placed == {"sim-chat": ("c-sim", (0,)), "real-embed": ("b-real", (0,)),
                      "cpu-chat": ("a-cpu", (0,)), "retrieve-tool": ("a-cpu", (0,))}  # cpu device: energy
    assert result.unsatisfiable == {} and result.notes == ()


def test_gpu_memory_is_shared_across_components_first_fit() -> None:
    cat = catalog(executor("a", task="chat", gpu_gib=30), executor("b", task="embed", gpu_gib=30),
                  executor("c", task="retrieve", gpu_gib=30), executor("d", task="speech-to-text", gpu_gib=50))
    wf = workflow("wf", stage("a", "chat"), stage("b", "embed"), stage("c", "retrieve"), stage("d", "speech-to-text"))
    result = plan({"wf": wf}, cat, [demand()], [gpu_node("n1", gpus=2, gpu_gib=80)])
    devices = {c.executor: c.device_indexes for c in result.components}
    # Largest first: d (50) on GPU 0; a (30) fits beside it; b, c on GPU 1 (30 + 30 <= 80).
    assert devices == {"d": (0,), "a": (0,), "b": (1,), "c": (1,)}


def test_memory_exhaustion_drops_an_executor_and_its_stage_falls_back() -> None:
    cat = catalog(executor("chat-big", task="chat", gpu_gib=30, quality=((0.9, {}),)),
                  executor("embed-big", task="embed", gpu_gib=30, quality=((0.9, {}),)),
                  executor("embed-tool", task="embed", engine="tool", device="cpu", quality=((0.7, {}),)))
    wf = workflow("wf", stage("answer", "chat"), stage("embed", "embed"))
    d = demand({"accuracy": "best"})
    result = plan({"wf": wf}, cat, [d], [gpu_node("n1", gpu_gib=40)])
    assert result.choices[d]["answer"].executor == "chat-big"
    assert result.choices[d]["embed"].executor == "embed-tool"
    assert any(n.startswith("executor embed-big left out: no room left beside the rest of the plan")
               for n in result.notes)


def test_gpu_models_filter_matches_model_substrings() -> None:
    cat = catalog(executor("chat-h100", gpu_models=("H100",)))
    nodes = [gpu_node("a-a100", model="A100 (simulated)"), gpu_node("b-h100", model="H100 (simulated)")]
    result = plan({"wf": workflow()}, cat, [demand()], nodes)
    assert [(c.node, c.device_indexes) for c in result.components] == [("b-h100", (0,))]
    d = demand()
    only_a100 = plan({"wf": workflow()}, cat, [d], nodes[:1])
    assert "needs 1 simulated GPU(s) of model H100" in only_a100.unsatisfiable[d]


def test_multi_gpu_instances_need_enough_devices_on_one_node() -> None:
    cat = catalog(executor("chat-tp4", gpu_count=4, gpu_gib=20))
    result = plan({"wf": workflow()}, cat, [demand()], [gpu_node("a", gpus=2), gpu_node("b", gpus=4)])
    assert [(c.node, c.device_indexes) for c in result.components] == [("b", (0, 1, 2, 3))]


def test_unschedulable_nodes_are_never_used() -> None:
    cat = catalog(executor("chat-sim"))
    nodes = [gpu_node("a-drained", schedulable=False), gpu_node("b-ok")]
    assert [c.node for c in plan({"wf": workflow()}, cat, [demand()], nodes).components] == ["b-ok"]
    d = demand()
    result = plan({"wf": workflow()}, cat, [d], nodes[:1])
    assert "chat-sim cannot be placed: no schedulable node" in result.unsatisfiable[d]
    assert "executor chat-sim cannot be placed: no schedulable node" in result.notes


def test_replicas_spread_over_nodes_and_then_share() -> None:
    cat = catalog(executor("chat", gpu_gib=10, replicas=3))
    result = plan({"wf": workflow()}, cat, [demand()], [gpu_node("n2"), gpu_node("n1")])
    assert [(c.component_id, c.node) for c in result.components] == [
        ("chat-n1-0", "n1"), ("chat-n1-2", "n1"), ("chat-n2-1", "n2")]


def test_partial_replicas_are_noted() -> None:
    cat = catalog(executor("chat", gpu_gib=50, replicas=3))
    result = plan({"wf": workflow()}, cat, [demand()], [gpu_node("n1"), gpu_node("n2")])
    assert len(result.components) == 2
    assert any(n.startswith("executor chat: placed 2 of 3 replica(s): needs 1 simulated GPU(s)")
               for n in result.notes)


def test_tools_oversubscribe_cpu_fourfold_but_cpu_engines_do_not() -> None:
    cat = catalog(executor("tool", task="retrieve", engine="tool", device="cpu", cpu_cores=2, replicas=5))
    wf = workflow("wf", stage("r", "retrieve"))
    result = plan({"wf": wf}, cat, [demand()], [cpu_node("n1", cpu_cores=2)])
    assert len(result.components) == 4  # 4 x 2 cores / 4 = 2 cores
    assert "executor tool: placed 4 of 5 replica(s)" in result.notes[0]
    engines = catalog(executor("chat-cpu", engine="vllm", device="cpu", cpu_cores=2),
                      executor("embed-cpu", task="embed", engine="vllm", device="cpu", cpu_cores=2))
    workflows = {"qa": workflow("qa", stage("answer", "chat")), "search": workflow("search", stage("e", "embed"))}
    qa, search = demand(wf="qa"), demand(wf="search")
    crowded = plan(workflows, engines, [qa, search], [cpu_node("n1", cpu_cores=2)])
    assert [c.executor for c in crowded.components] == ["chat-cpu"]
    assert qa in crowded.choices
    assert "embed-cpu cannot be placed: no room left beside the rest of the plan" in crowded.unsatisfiable[search]


def test_an_unsatisfiable_demand_places_nothing() -> None:
    cat = catalog(executor("chat", gpu_gib=10))
    wf = workflow("wf", stage("answer", "chat"), stage("stt", "speech-to-text"))
    d = demand()
    result = plan({"wf": wf}, cat, [d], [gpu_node("n1")])
    assert result.components == () and result.choices == {}
    assert "no executor in the catalog implements this task" in result.unsatisfiable[d]


def test_host_memory_is_counted() -> None:
    cat = catalog(executor("chat-cpu", engine="vllm", device="cpu", memory_gib=6),
                  executor("embed-cpu", task="embed", engine="vllm", device="cpu", memory_gib=6))
    wf = workflow("wf", stage("answer", "chat"), stage("embed", "embed"))
    result = plan({"wf": wf}, cat, [demand()], [cpu_node("a", cpu_cores=8, memory_gib=8),
                                                 cpu_node("b", cpu_cores=8, memory_gib=8)])
    assert sorted((c.executor, c.node) for c in result.components) == [("chat-cpu", "a"), ("embed-cpu", "b")]


def test_shared_executor_runs_once_for_all_demands() -> None:
    other = workflow("other", stage("answer", "chat"))
    d1, d2 = demand({"accuracy": "best"}), demand({"accuracy": "best"}, wf="other")
    cat = catalog(executor("chat", quality=((0.9, {}),), workflow="wf"))
    result = plan({"wf": workflow(), "other": other}, cat, [d1, d2], [gpu_node("n1")])
    assert [c.component_id for c in result.components] == ["chat-n1-0"]
    assert chosen(result, d1) == chosen(result, d2) == "chat"


# --- re-planning ------------------------------------------------------------------------------


def test_placement_is_sticky_across_replans() -> None:
    cat = catalog(executor("chat", gpu_gib=10, replicas=2), executor("embed", task="embed", gpu_gib=10))
    wf = workflow("wf", stage("answer", "chat"), stage("embed", "embed"))
    first = plan({"wf": wf}, cat, [demand()], [gpu_node("m"), gpu_node("n")])
    # A new node sorts first and has room: nothing moves.
    again = plan({"wf": wf}, cat, [demand()], [gpu_node("a"), gpu_node("m"), gpu_node("n")], first.components)
    assert again.components == first.components
    assert again.notes == ()


def test_components_on_a_drained_node_move_with_fresh_ids() -> None:
    cat = catalog(executor("chat", gpu_gib=10))
    first = plan({"wf": workflow()}, cat, [demand()], [gpu_node("a"), gpu_node("b")])
    assert [c.component_id for c in first.components] == ["chat-a-0"]
    moved = plan({"wf": workflow()}, cat, [demand()], [gpu_node("a", schedulable=False), gpu_node("b")],
                 first.components)
    assert [(c.component_id, c.node) for c in moved.components] == [("chat-b-0", "b")]
    assert "component chat-a-0 not kept: node a is not schedulable" in moved.notes


def test_ids_of_dropped_components_are_not_reused() -> None:
    cat = catalog(executor("chat", gpu_gib=30))
    # The old instance sat on GPU 1 which no longer exists; it is re-placed on GPU 0 of the same node.
    old = PlacedComponent("chat-n1-0", "chat", "n1", (1,))
    result = plan({"wf": workflow()}, cat, [demand()], [gpu_node("n1", gpus=1)], [old])
    assert [(c.component_id, c.device_indexes) for c in result.components] == [("chat-n1-1", (0,))]


def test_sticky_components_claim_their_memory_before_new_ones() -> None:
    cat = catalog(executor("chat", gpu_gib=50), executor("embed", task="embed", gpu_gib=50))
    wf = workflow("wf", stage("answer", "chat"), stage("embed", "embed"))
    current = [PlacedComponent("embed-n1-0", "embed", "n1", (1,))]
    result = plan({"wf": wf}, cat, [demand()], [gpu_node("n1", gpus=2)], current)
    assert {c.component_id: c.device_indexes for c in result.components} == {"embed-n1-0": (1,), "chat-n1-0": (0,)}


def test_extra_current_replicas_and_unchosen_executors_are_dropped() -> None:
    cat = catalog(executor("chat", gpu_gib=10), executor("old", task="embed"))
    current = [PlacedComponent("chat-n1-0", "chat", "n1", (0,)), PlacedComponent("chat-n1-1", "chat", "n1", (0,)),
               PlacedComponent("old-n1-0", "old", "n1", (0,))]
    result = plan({"wf": workflow()}, cat, [demand()], [gpu_node("n1")], current)
    assert [c.component_id for c in result.components] == ["chat-n1-0"]


def test_plans_are_deterministic() -> None:
    cat = {**ACCURACY_LADDER, **LATENCY_LADDER,
           **catalog(executor("embed", task="embed", replicas=3), executor("tool", task="retrieve", engine="tool",
                                                                            device="cpu", replicas=2))}
    wf = workflow("wf", stage("answer", "chat"), stage("embed", "embed"), stage("retrieve", "retrieve"))
    nodes = [gpu_node(f"g{i}", gpus=2, gpu_gib=48) for i in range(4)] + [cpu_node(f"c{i}") for i in range(3)]
    demands = [demand({"accuracy": t}) for t in ("best", "good", "fair")] + [demand({"latency": "best"})]
    reference = plan({"wf": wf}, cat, demands, nodes)
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(nodes)
        rng.shuffle(demands)
        assert plan({"wf": wf}, cat, demands, nodes) == reference
    ids = [c.component_id for c in reference.components]
    assert len(ids) == len(set(ids))


def test_an_avoided_node_is_not_used_for_that_executor_and_the_reason_says_why() -> None:
    cat = catalog(executor("chat-a", gpu_gib=30), executor("chat-b", gpu_gib=40))
    d = demand()
    nodes = [gpu_node("n1"), gpu_node("n2")]
    why = "failed 3 times in a row there (last: model weights not found)"
    first = plan({"wf": workflow()}, cat, [d], nodes)
    assert chosen(first, d) == "chat-a" and [c.node for c in first.components] == ["n1"]
    moved = plan({"wf": workflow()}, cat, [d], nodes, first.components, avoid={("chat-a", "n1"): why})
    assert chosen(moved, d) == "chat-a" and [c.node for c in moved.components] == ["n2"]
    assert any("not kept" in n and "avoided on n1" in n for n in moved.notes), moved.notes
    # Avoided everywhere: the next executor for the task takes over, and the notes say why.
    other = plan({"wf": workflow()}, cat, [d], nodes, avoid={("chat-a", "n1"): why, ("chat-a", "n2"): why})
    assert chosen(other, d) == "chat-b"
    assert any("chat-a cannot be placed" in n and "n1 avoided" in n and "n2 avoided" in n for n in other.notes)


def test_executors_of_unfinished_jobs_stay_placed_when_no_demand_chooses_them() -> None:
    cat = catalog(executor("chat-a", gpu_gib=30), executor("chat-b", gpu_gib=40))
    d = demand()
    result = plan({"wf": workflow()}, cat, [d], [gpu_node("n1", gpus=2)], keep_executors=["chat-b", "chat-gone"])
    assert chosen(result, d) == "chat-a"
    assert sorted(c.executor for c in result.components) == ["chat-a", "chat-b"]
    assert any("chat-gone" in n and "no longer in the catalog" in n for n in result.notes), result.notes
