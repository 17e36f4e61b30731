"""The DAG job executor as a pure state machine, driven with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.workflow.spec import Ref, StageSpec, WorkflowInput, WorkflowSpec, validate_workflow
from common.workflow.tasks import TASKS
from controller.jobs.executor import (
    Abandon, CancelRequested, ComponentsChanged, Dispatch, ExecutorConfig, InvocationFailed, InvocationQueued,
    InvocationSucceeded, JobExecutor, JobFinished, JobStarted, JobSubmitted, ReadyComponent, StageCompleted, Tick,
)
from policies.plan import StageChoice

CONFIG = ExecutorConfig(invocation_timeout_s=120.0, max_attempts=3, queue_timeout_s=600.0, job_timeout_s=1800.0,
                        failed_component_avoid_s=10.0)


def stage(name: str, task: str, map_over: str | None = None, **inputs: str) -> StageSpec:
    return StageSpec(name, task, {param: Ref.parse(text) for param, text in inputs.items()}, map_over)


def workflow(name: str, inputs: dict[str, str], stages: list[StageSpec], outputs: dict[str, str],
             optional: tuple[str, ...] = ()) -> WorkflowSpec:
    spec = WorkflowSpec(name, "", {k: WorkflowInput(t, required=k not in optional) for k, t in inputs.items()},
                        tuple(stages), {k: Ref.parse(v) for k, v in outputs.items()})
    assert validate_workflow(spec) == [], validate_workflow(spec)  # the test workflows are well formed
    return spec


RAG = workflow("rag-qa", {"question": "text", "corpus": "file"}, [
    stage("load", "load-documents", corpus="inputs.corpus"),
    stage("embed_question", "embed", text="inputs.question"),
    stage("embed_passages", "embed", map_over="text", text="load.texts"),
    stage("retrieve", "retrieve", query="embed_question.embedding", embeddings="embed_passages.embedding",
          documents="load.documents"),
    stage("answer", "chat", question="inputs.question", context="retrieve.texts"),
], {"answer": "answer.answer", "passages": "retrieve.passages"})

CHAIN = workflow("chain", {"video": "video"}, [
    stage("scenes", "scene-detection", video="inputs.video"),
    stage("frames", "frame-extraction", video="inputs.video", scenes="scenes.scenes"),
    stage("objects", "object-detection", frames="frames.frames"),
], {"objects": "objects.objects"})

DEBATE = workflow("code-debate", {"problem": "text", "tests": "text"}, [
    stage("debate", "code-generation", problem="inputs.problem"),
    stage("check", "code-execution", map_over="code", code="debate.candidates", tests="inputs.tests"),
    stage("rank", "rank-candidates", candidates="debate.candidates", results="check.result"),
], {"best": "rank.best", "ranking": "rank.ranking"})

ASK = workflow("ask", {"question": "text", "background": "text"}, [
    stage("answer", "chat", question="inputs.question", background="inputs.background"),
], {"answer": "answer.answer"}, optional=("background",))

ONE_EMBED = workflow("one-embed", {"t": "text"}, [stage("e", "embed", text="inputs.t")], {"v": "e.embedding"})


def choices(spec: WorkflowSpec, **knobs: dict[str, Any]) -> dict[str, StageChoice]:
    """Each stage runs on the executor named after its task (``x-<task>``)."""
    return {s.name: StageChoice(f"x-{s.task}", knobs.get(s.name, {})) for s in spec.stages}


def comp(cid: str, executor: str, capacity: int = 1, node: str = "n1") -> ReadyComponent:
    return ReadyComponent(cid, node, executor, capacity, (0,))


def all_executors(capacity: int = 4) -> tuple[ReadyComponent, ...]:
    return tuple(comp(f"c-{task}", f"x-{task}", capacity) for task in TASKS)


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def one(actions: list, kind: type):
    found = of(actions, kind)
    assert len(found) == 1, actions
    return found[0]


def submit(ex: JobExecutor, spec: WorkflowSpec, inputs: dict[str, Any], now: float = 0.0, job_id: str = "j1",
           restored: dict | None = None, **knobs: dict[str, Any]) -> list:
    return ex.handle(JobSubmitted(job_id, spec, inputs, choices(spec, **knobs), now, restored or {}))


def ok(ex: JobExecutor, d: Dispatch, now: float = 1.0, **outputs: Any) -> list:
    return ex.handle(InvocationSucceeded(d.invocation_id, outputs, now))


def fail(ex: JobExecutor, d: Dispatch, retryable: bool = True, now: float = 1.0, code: str = "engine_failed",
         message: str = "boom") -> list:
    return ex.handle(InvocationFailed(d.invocation_id, code, message, retryable, now))


@pytest.fixture
def ex() -> JobExecutor:
    ex = JobExecutor(CONFIG)
    assert ex.handle(ComponentsChanged(all_executors(), 0.0)) == []
    return ex


def test_linear_chain_passes_outputs_downstream(ex: JobExecutor) -> None:
    actions = submit(ex, CHAIN, {"video": "V"}, frames={"frames": 4})
    assert actions[0] == JobStarted("j1", 0.0)
    d = one(actions, Dispatch)
    assert (d.invocation_id, d.stage, d.item, d.attempt) == ("j1.scenes.0.1", "scenes", None, 1)
    assert d.task == "scene-detection"
    assert (d.component_id, d.node, d.executor, d.inputs, d.timeout_s) == ("c-scene-detection", "n1",
                                                                            "x-scene-detection", {"video": "V"}, 120.0)
    actions = ok(ex, d, scenes=["s1", "s2"])
    assert actions[0] == StageCompleted("j1", "scenes", {"scenes": ["s1", "s2"]})
    d = one(actions, Dispatch)
    assert (d.stage, d.inputs, d.knobs) == ("frames", {"video": "V", "scenes": ["s1", "s2"]}, {"frames": 4})
    d = one(ok(ex, d, frames=["f1"]), Dispatch)
    assert d.inputs == {"frames": ["f1"]}
    actions = ok(ex, d, objects=["cat"])
    assert of(actions, JobStarted) == []  # only once per job
    assert actions[-1] == JobFinished("j1", "succeeded", "", {"objects": ["cat"]})
    assert ex.job_state("j1") is None and ex.job_ids() == ()  # forgotten once finished
    assert ex.queued_count == ex.inflight_count == 0


def test_fan_out_fan_in_with_map_keeps_item_order(ex: JobExecutor) -> None:
    actions = submit(ex, RAG, {"question": "Q", "corpus": "C"})
    load, question = of(actions, Dispatch)  # independent stages go out together
    assert (load.stage, question.stage) == ("load", "embed_question")
    assert question.inputs == {"text": "Q"}
    assert of(ok(ex, question, embedding=[1.0]), Dispatch) == []  # retrieve still waits for the passages
    actions = ok(ex, load, documents=["d0", "d1", "d2"], texts=["t0", "t1", "t2"])
    items = of(actions, Dispatch)
    assert [(d.invocation_id, d.item, d.inputs) for d in items] == [
        ("j1.embed_passages.0.1", 0, {"text": "t0"}), ("j1.embed_passages.1.1", 1, {"text": "t1"}),
        ("j1.embed_passages.2.1", 2, {"text": "t2"})]
    view = ex.job_state("j1")
    assert view is not None and view.state == "running"
    passages = next(s for s in view.stages if s.name == "embed_passages")
    assert (passages.state, passages.items_total, passages.items_done, passages.inflight) == ("running", 3, 0, 3)
    assert ok(ex, items[2], embedding=[2.0]) == []  # results in any order
    assert ok(ex, items[0], embedding=[0.0]) == []
    actions = ok(ex, items[1], embedding=[1.5])
    assert StageCompleted("j1", "embed_passages", {"embedding": [[0.0], [1.5], [2.0]]}) in actions
    retrieve = one(actions, Dispatch)
    assert retrieve.inputs == {"query": [1.0], "embeddings": [[0.0], [1.5], [2.0]], "documents": ["d0", "d1", "d2"]}
    answer = one(ok(ex, retrieve, passages=[{"id": "d1", "score": 0.9}], texts=["t1"]), Dispatch)
    assert answer.inputs == {"question": "Q", "context": ["t1"]}
    actions = ok(ex, answer, answer="A")
    assert actions[-1] == JobFinished("j1", "succeeded", "", {"answer": "A", "passages": [{"id": "d1", "score": 0.9}]})


def test_mapped_items_get_the_other_inputs_whole(ex: JobExecutor) -> None:
    debate = one(submit(ex, DEBATE, {"problem": "P", "tests": "T"}), Dispatch)
    checks = of(ok(ex, debate, candidates=["a", "b"]), Dispatch)
    assert [d.inputs for d in checks] == [{"code": "a", "tests": "T"}, {"code": "b", "tests": "T"}]
    ok(ex, checks[0], result={"passed": 1})
    rank = one(ok(ex, checks[1], result={"passed": 0}), Dispatch)
    assert rank.inputs == {"candidates": ["a", "b"], "results": [{"passed": 1}, {"passed": 0}]}


def test_empty_map_completes_the_stage_at_once(ex: JobExecutor) -> None:
    load, question = of(submit(ex, RAG, {"question": "Q", "corpus": "C"}), Dispatch)
    ok(ex, question, embedding=[1.0])
    actions = ok(ex, load, documents=[], texts=[])
    assert StageCompleted("j1", "embed_passages", {"embedding": []}) in actions
    retrieve = one(actions, Dispatch)
    assert retrieve.stage == "retrieve" and retrieve.inputs["embeddings"] == []


def test_unbound_optional_input_is_absent(ex: JobExecutor) -> None:
    d = one(submit(ex, ASK, {"question": "Q"}), Dispatch)
    assert d.inputs == {"question": "Q"}


def test_least_loaded_component_and_capacity_limits() -> None:
    ex = JobExecutor(CONFIG)
    ex.handle(ComponentsChanged(tuple(c for c in all_executors() if c.executor != "x-code-execution")
                                + (comp("b", "x-code-execution", 1, node="n2"), comp("a", "x-code-execution", 2)),
                                0.0))
    debate = one(submit(ex, DEBATE, {"problem": "P", "tests": "T"}), Dispatch)
    actions = ok(ex, debate, candidates=["c0", "c1", "c2", "c3", "c4"])
    sent = of(actions, Dispatch)
    # loads: a 0/2 = b 0/1 -> a (id order); a 1/2 < b 0/1? no: b 0 -> b; then a 1/2 -> a; both full.
    assert [(d.item, d.component_id, d.node) for d in sent] == [(0, "a", "n1"), (1, "b", "n2"), (2, "a", "n1")]
    assert [q.invocation_id for q in of(actions, InvocationQueued)] == ["j1.check.3.1", "j1.check.4.1"]
    assert ex.inflight_for("a") == ("j1.check.0.1", "j1.check.2.1") and ex.inflight_for("b") == ("j1.check.1.1",)
    assert (ex.queued_count, ex.inflight_count) == (2, 3)
    nxt = one(ok(ex, sent[1], result={}), Dispatch)  # capacity frees on b: the oldest queued item goes there
    assert (nxt.item, nxt.component_id) == (3, "b")
    # A new component appearing takes the rest at once.
    actions = ex.handle(ComponentsChanged(tuple(c for c in all_executors() if c.executor != "x-code-execution")
                                          + (comp("b", "x-code-execution", 1, node="n2"),
                                             comp("a", "x-code-execution", 2), comp("c", "x-code-execution", 1)),
                                          2.0))
    assert [(d.item, d.component_id) for d in of(actions, Dispatch)] == [(4, "c")]
    assert ex.queued_count == 0


def test_queue_is_fifo_across_jobs() -> None:
    ex = JobExecutor(CONFIG)
    ex.handle(ComponentsChanged((comp("e", "x-embed", 1),), 0.0))
    first = one(ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "1"}, {"e": StageChoice("x-embed")}, 0.0)), Dispatch)
    queued = [ex.handle(JobSubmitted(f"j{i}", ONE_EMBED, {"t": str(i)}, {"e": StageChoice("x-embed")}, float(i)))
              for i in (2, 3)]
    assert [one(q, InvocationQueued).job_id for q in queued] == ["j2", "j3"]
    assert one(ok(ex, first, embedding=[1]), Dispatch).job_id == "j2"


def test_retryable_failure_retries_on_another_replica() -> None:
    ex = JobExecutor(CONFIG)
    ex.handle(ComponentsChanged((comp("e1", "x-embed", 1), comp("e2", "x-embed", 1, node="n2")), 0.0))
    d1 = one(ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 0.0)), Dispatch)
    assert d1.component_id == "e1"
    d2 = one(fail(ex, d1, now=1.0), Dispatch)
    assert (d2.invocation_id, d2.attempt, d2.component_id, d2.node) == ("j1.e.0.2", 2, "e2", "n2")
    assert ok(ex, d1, now=1.5, embedding=[9]) == []  # the failed attempt's late result is ignored
    assert ok(ex, d2, now=2.0, embedding=[1])[-1] == JobFinished("j1", "succeeded", "", {"v": [1]})


def test_retry_waits_for_a_restarted_replica_or_the_avoid_window() -> None:
    ex = JobExecutor(CONFIG)
    only = (comp("e1", "x-embed", 1),)
    ex.handle(ComponentsChanged(only, 0.0))
    d1 = one(ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 0.0)), Dispatch)
    actions = fail(ex, d1, now=1.0)
    assert of(actions, Dispatch) == [] and one(actions, InvocationQueued).invocation_id == "j1.e.0.2"
    assert ex.handle(Tick(5.0)) == []  # e1 just failed this item and has not restarted: wait
    ex.handle(ComponentsChanged((), 6.0))  # e1 restarts: gone from the ready set ...
    d2 = one(ex.handle(ComponentsChanged(only, 7.0)), Dispatch)  # ... and back: a fresh incarnation
    assert (d2.attempt, d2.component_id) == (2, "e1")
    # Without a restart, the same replica is tried again once the avoid window has passed.
    assert of(fail(ex, d2, now=8.0), Dispatch) == []
    assert ex.handle(Tick(17.9)) == []
    d3 = one(ex.handle(Tick(18.0)), Dispatch)
    assert (d3.invocation_id, d3.component_id) == ("j1.e.0.3", "e1")


def test_non_retryable_failure_fails_the_job_and_abandons_the_rest(ex: JobExecutor) -> None:
    load, question = of(submit(ex, RAG, {"question": "Q", "corpus": "C"}), Dispatch)
    actions = fail(ex, load, retryable=False, code="tool_error", message="line 3 is not JSON")
    assert actions == [Abandon(question.invocation_id, "job failed: stage load failed: tool_error: line 3 is not JSON",
                               "j1"),
                       JobFinished("j1", "failed", "stage load failed: tool_error: line 3 is not JSON", {})]
    assert ok(ex, question, embedding=[1]) == []
    assert (ex.queued_count, ex.inflight_count, ex.inflight_for("c-embed")) == (0, 0, ())


def test_max_attempts_fails_with_a_reason_naming_stage_and_item() -> None:
    ex = JobExecutor(CONFIG)
    ex.handle(ComponentsChanged(all_executors(capacity=8), 0.0))
    load, question = of(submit(ex, RAG, {"question": "Q", "corpus": "C"}), Dispatch)
    items = of(ok(ex, load, documents=["d"] * 4, texts=["a", "b", "c", "d"]), Dispatch)
    d = items[3]
    for attempt, now in ((2, 1.0), (3, 20.0)):
        assert of(fail(ex, d, now=now), Dispatch) == []  # the only replica failed it: wait out the avoid window
        d = one(ex.handle(Tick(now + 10.0)), Dispatch)
        assert (d.attempt, d.invocation_id, d.item) == (attempt, f"j1.embed_passages.3.{attempt}", 3)
    actions = fail(ex, d, now=40.0, message="engine exited with code -9")
    reason = "stage embed_passages item 3 failed after 3 attempts: engine_failed: engine exited with code -9"
    assert actions[-1] == JobFinished("j1", "failed", reason, {})
    assert {a.invocation_id for a in of(actions, Abandon)} == {question.invocation_id} | {
        x.invocation_id for x in items[:3]}


def test_component_loss_mid_call_retries_elsewhere_at_once() -> None:
    ex = JobExecutor(CONFIG)
    both = (comp("e1", "x-embed", 1), comp("e2", "x-embed", 1, node="n2"))
    ex.handle(ComponentsChanged(both, 0.0))
    d1 = one(ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 0.0)), Dispatch)
    actions = ex.handle(ComponentsChanged(both[1:], 3.0))
    assert actions[0] == Abandon("j1.e.0.1", "component e1 on node n1 went away", "j1")
    d2 = one(actions, Dispatch)
    assert (d2.invocation_id, d2.component_id) == ("j1.e.0.2", "e2")
    assert ex.handle(InvocationFailed(d1.invocation_id, "engine_failed", "x", True, 3.5)) == []  # already handled


def test_component_changing_node_counts_as_gone() -> None:
    ex = JobExecutor(CONFIG)
    ex.handle(ComponentsChanged((comp("e1", "x-embed", 1),), 0.0))
    ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 0.0))
    actions = ex.handle(ComponentsChanged((comp("e1", "x-embed", 1, node="n9"),), 1.0))
    assert of(actions, Abandon)[0].reason == "component e1 on node n1 went away"
    d = one(actions, Dispatch)  # the new incarnation is not avoided
    assert (d.attempt, d.node) == (2, "n9")


def test_invocation_timeout_abandons_and_retries() -> None:
    ex = JobExecutor(CONFIG)
    ex.handle(ComponentsChanged((comp("e1", "x-embed", 1), comp("e2", "x-embed", 1)), 0.0))
    d1 = one(ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 10.0)), Dispatch)
    assert ex.handle(Tick(129.9)) == []
    actions = ex.handle(Tick(130.0))
    assert actions[0] == Abandon("j1.e.0.1", "timeout: no result within 120 s from component e1 on node n1", "j1")
    assert one(actions, Dispatch).component_id == "e2"
    assert ok(ex, d1, now=131.0, embedding=[1]) == []


def test_repeated_timeouts_end_in_failure_not_a_hang() -> None:
    ex = JobExecutor(CONFIG)
    ex.handle(ComponentsChanged((comp("e1", "x-embed", 1), comp("e2", "x-embed", 1)), 0.0))
    ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 0.0))
    finished = [a for now in (120.0, 240.0, 360.0) for a in of(ex.handle(Tick(now)), JobFinished)]
    assert finished == [JobFinished("j1", "failed", "stage e failed after 3 attempts: timeout: no result within "
                                                    "120 s from component e1 on node n1", {})]


def test_queue_timeout_without_components_names_executor_and_stage() -> None:
    ex = JobExecutor(CONFIG)
    actions = ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 5.0))
    assert actions == [InvocationQueued("j1.e.0.1", "j1", "e", None, 1, "x-embed")]
    view = ex.job_state("j1")
    assert view is not None and view.state == "queued" and view.stages[0].queued == 1
    assert ex.handle(Tick(604.9)) == []
    assert ex.handle(Tick(605.0)) == [
        JobFinished("j1", "failed", "stage e waited 600 s for a ready component of executor x-embed", {})]
    assert ex.queued_count == 0


def test_queue_timeout_counts_from_when_the_executor_lost_its_components() -> None:
    ex = JobExecutor(ExecutorConfig(invocation_timeout_s=5000.0, queue_timeout_s=600.0))
    ex.handle(ComponentsChanged((comp("e1", "x-embed", 1),), 0.0))
    ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 0.0))
    ex.handle(JobSubmitted("j2", ONE_EMBED, {"t": "y"}, {"e": StageChoice("x-embed")}, 0.0))
    assert of(ex.handle(Tick(900.0)), JobFinished) == []  # j2 waits for capacity, not for a component
    actions = ex.handle(ComponentsChanged((), 1000.0))  # e1 goes: j1 retries, both wait for a component
    assert of(actions, JobFinished) == [] and ex.queued_count == 2
    assert of(ex.handle(Tick(1599.0)), JobFinished) == []
    assert [f.job_id for f in of(ex.handle(Tick(1600.0)), JobFinished)] == ["j1", "j2"]


def test_job_timeout_while_waiting_for_capacity() -> None:
    ex = JobExecutor(ExecutorConfig(invocation_timeout_s=5000.0, job_timeout_s=1800.0))
    ex.handle(ComponentsChanged((comp("e1", "x-embed", 1),), 0.0))
    ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 0.0))
    ex.handle(JobSubmitted("j2", ONE_EMBED, {"t": "y"}, {"e": StageChoice("x-embed")}, 100.0))
    actions = ex.handle(Tick(1800.0))  # j1 holds the only slot; j2 is still queued and not yet out of time
    assert [f.job_id for f in of(actions, JobFinished)] == ["j1"]
    assert one(actions, Dispatch).job_id == "j2"  # the freed slot goes to the queued job
    assert ex.handle(Tick(1900.0))[-1] == JobFinished("j2", "failed", "job exceeded 1800 s", {})
    assert (ex.queued_count, ex.inflight_count) == (0, 0)


def test_job_timeout_abandons_in_flight_work() -> None:
    ex = JobExecutor(ExecutorConfig(invocation_timeout_s=5000.0, job_timeout_s=1800.0))
    ex.handle(ComponentsChanged((comp("e1", "x-embed", 1),), 0.0))
    d = one(ex.handle(JobSubmitted("j1", ONE_EMBED, {"t": "x"}, {"e": StageChoice("x-embed")}, 0.0)), Dispatch)
    assert ex.handle(Tick(1799.0)) == []
    assert ex.handle(Tick(1800.0)) == [Abandon(d.invocation_id, "job failed: job exceeded 1800 s", "j1"),
                                       JobFinished("j1", "failed", "job exceeded 1800 s", {})]


def test_cancellation_abandons_in_flight_drops_queued_and_ignores_late_results() -> None:
    ex = JobExecutor(CONFIG)
    ex.handle(ComponentsChanged((comp("e1", "x-embed", 1),), 0.0))
    d = one(ex.handle(JobSubmitted("j1", RAG_EMBED_ONLY, {"a": "x", "b": "y"}, RAG_EMBED_CHOICES, 0.0)), Dispatch)
    assert ex.queued_count == 1
    actions = ex.handle(CancelRequested("j1", "user asked", 1.0))
    assert actions == [Abandon(d.invocation_id, "job cancelled: user asked", "j1"),
                       JobFinished("j1", "cancelled", "user asked", {})]
    assert (ex.queued_count, ex.inflight_count) == (0, 0)
    assert ok(ex, d, now=2.0, embedding=[1]) == []
    assert ex.handle(InvocationFailed(d.invocation_id, "x", "y", True, 2.0)) == []
    assert ex.handle(CancelRequested("j1", "again", 3.0)) == []  # cancel of a finished job is a no-op
    assert ex.handle(CancelRequested("nope", "", 3.0)) == []


RAG_EMBED_ONLY = workflow("two-embeds", {"a": "text", "b": "text"}, [
    stage("ea", "embed", text="inputs.a"), stage("eb", "embed", text="inputs.b")], {"a": "ea.embedding"})
RAG_EMBED_CHOICES = {"ea": StageChoice("x-embed"), "eb": StageChoice("x-embed")}


def test_resume_with_restored_stage_outputs(ex: JobExecutor) -> None:
    restored = {"load": {"documents": ["d0"], "texts": ["t0"]}, "embed_passages": {"embedding": [[0.5]]}}
    actions = submit(ex, RAG, {"question": "Q", "corpus": "C"}, restored=restored)
    assert of(actions, StageCompleted) == []  # already persisted
    d = one(actions, Dispatch)
    assert d.stage == "embed_question"
    retrieve = one(ok(ex, d, embedding=[1.0]), Dispatch)
    assert retrieve.inputs == {"query": [1.0], "embeddings": [[0.5]], "documents": ["d0"]}


def test_resume_with_every_stage_restored_finishes_at_once(ex: JobExecutor) -> None:
    restored = {"debate": {"candidates": []}, "check": {"result": []}, "rank": {"best": "b", "ranking": []}}
    actions = submit(ex, DEBATE, {"problem": "P", "tests": "T"}, restored=restored)
    assert actions == [JobFinished("j1", "succeeded", "", {"best": "b", "ranking": []})]


def test_bad_jobs_fail_at_submit_with_a_reason(ex: JobExecutor) -> None:
    actions = ex.handle(JobSubmitted("j1", CHAIN, {"video": "V"}, {"scenes": StageChoice("x")}, 0.0))
    assert actions == [JobFinished("j1", "failed", "no executor chosen for stage frames", {})]
    cyclic = WorkflowSpec("loop", "", {}, (stage("a", "embed", text="b.answer"), stage("b", "chat", question="a.x")),
                          {})
    actions = ex.handle(JobSubmitted("j2", cyclic, {}, choices(cyclic), 0.0))
    assert actions == [JobFinished("j2", "failed", "workflow loop has a cycle through stages a, b", {})]


def test_map_over_a_non_list_fails_the_job(ex: JobExecutor) -> None:
    load, _ = of(submit(ex, RAG, {"question": "Q", "corpus": "C"}), Dispatch)
    actions = ok(ex, load, documents=[], texts="not a list")
    assert actions[-1] == JobFinished("j1", "failed", "stage embed_passages maps over text but got str, not a list",
                                      {})


def test_missing_upstream_output_fails_the_job(ex: JobExecutor) -> None:
    d = one(submit(ex, CHAIN, {"video": "V"}), Dispatch)
    actions = ok(ex, d, wrong=[])
    assert actions[-1] == JobFinished("j1", "failed", "stage frames input scenes: stage scenes produced no output "
                                                      "'scenes'", {})


def test_duplicate_and_unknown_events_are_harmless(ex: JobExecutor) -> None:
    d = one(submit(ex, CHAIN, {"video": "V"}), Dispatch)
    assert submit(ex, CHAIN, {"video": "other"}) == []  # same job id: ignored
    assert ex.handle(InvocationSucceeded("nope.scenes.0.1", {}, 1.0)) == []
    assert ex.handle(InvocationFailed("nope", "x", "y", False, 1.0)) == []
    ok(ex, d, scenes=[])
    assert ok(ex, d, scenes=["again"]) == []  # duplicate result
    with pytest.raises(TypeError):
        ex.handle("not an event")  # type: ignore[arg-type]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        ExecutorConfig(max_attempts=0)
    with pytest.raises(ValueError, match="queue_timeout_s"):
        ExecutorConfig(queue_timeout_s=0)


# --- randomized interleavings: every job ends exactly once ---------------------------------------

PROP_CONFIG = ExecutorConfig(invocation_timeout_s=5.0, max_attempts=3, queue_timeout_s=20.0, job_timeout_s=100.0,
                             failed_component_avoid_s=3.0)
WORKFLOWS = (RAG, CHAIN, DEBATE, ASK)
INPUTS = {"rag-qa": {"question": "Q", "corpus": "C"}, "chain": {"video": "V"},
          "code-debate": {"problem": "P", "tests": "T"}, "ask": {"question": "Q"}}
# Pool of components: per executor up to two replicas, on two nodes, with capacities 1 and 2.
POOL = tuple(comp(f"{task}-{r}", f"x-{task}", 1 + r, node=f"n{r}") for task in TASKS for r in range(2))
# Weighted by repetition: mostly submissions and results, with failures, churn, cancels and time passing.
OPS = ("submit", "submit", "succeed", "succeed", "succeed", "succeed", "fail", "fail", "fail_hard", "components",
       "cancel", "tick", "tick", "late", "restore")


def fake_outputs(task: str, pick: int) -> dict[str, Any]:
    return {name: ([f"v{i}" for i in range(pick % 4)] if kind.startswith("list[") else f"{name}-{pick}")
            for name, kind in TASKS[task].outputs.items()}


class Driver:
    """Feeds the executor, plays the daemon's part, and checks the invariants after every event."""

    def __init__(self) -> None:
        self.ex = JobExecutor(PROP_CONFIG)
        self.now = 0.0
        self.log: list = []
        self.submitted: list[str] = []
        self.finished: dict[str, int] = {}
        self.outstanding: dict[str, Dispatch] = {}  # dispatched, neither answered nor abandoned
        self.answered: list[str] = []
        self.seen_ids: set[str] = set()
        self.components = {c.component_id: c for c in POOL}
        self.feed(ComponentsChanged(POOL, self.now))

    def feed(self, event) -> list:
        actions = self.ex.handle(event)
        self.log.append((event, actions))
        for a in actions:
            if isinstance(a, Dispatch):
                assert a.invocation_id not in self.seen_ids, f"invocation id reused: {a.invocation_id}"
                assert a.job_id in self.submitted and a.job_id not in self.finished
                c = self.components.get(a.component_id)
                assert c is not None and c.executor == a.executor, f"dispatch to a component not ready: {a}"
                on = sum(1 for d in self.outstanding.values() if d.component_id == a.component_id)
                assert on < c.capacity, f"capacity exceeded on {a.component_id}"
                assert a.attempt <= PROP_CONFIG.max_attempts
                self.seen_ids.add(a.invocation_id)
                self.outstanding[a.invocation_id] = a
            elif isinstance(a, Abandon):
                assert self.outstanding.pop(a.invocation_id, None) is not None, f"abandoned unknown {a}"
            elif isinstance(a, JobFinished):
                assert a.job_id in self.submitted, f"finished a job never submitted: {a}"
                self.finished[a.job_id] = self.finished.get(a.job_id, 0) + 1
                assert self.finished[a.job_id] == 1, f"job finished twice: {a}"
                assert not any(d.job_id == a.job_id for d in self.outstanding.values()), "work left in flight"
                assert a.state in ("succeeded", "failed", "cancelled") and (a.state == "succeeded" or a.reason)
        assert self.ex.inflight_count == len(self.outstanding)
        return actions

    def step(self, op: str, pick: int) -> None:
        self.now += (pick % 7) * 0.5
        if op in ("submit", "restore"):
            spec = WORKFLOWS[pick % len(WORKFLOWS)]
            job_id = f"j{len(self.submitted)}"
            self.submitted.append(job_id)
            restored = {}
            if op == "restore":
                first = spec.stages[0]
                restored = {first.name: fake_outputs(first.task, pick)}
            self.feed(JobSubmitted(job_id, spec, INPUTS[spec.name], choices(spec), self.now, restored))
        elif op in ("succeed", "fail", "fail_hard") and self.outstanding:
            d = list(self.outstanding.values())[pick % len(self.outstanding)]
            del self.outstanding[d.invocation_id]
            self.answered.append(d.invocation_id)
            if op == "succeed":
                self.feed(InvocationSucceeded(d.invocation_id, fake_outputs(d.task, pick), self.now))
            else:
                self.feed(InvocationFailed(d.invocation_id, "engine_failed", "boom", op == "fail", self.now))
        elif op == "components":
            chosen = tuple(c for i, c in enumerate(POOL) if (pick >> (i % 12)) & 1 or i % 3 == pick % 3)
            self.components = {c.component_id: c for c in chosen}
            self.feed(ComponentsChanged(chosen, self.now))
        elif op == "cancel" and self.submitted:
            self.feed(CancelRequested(self.submitted[pick % len(self.submitted)], "stop", self.now))
        elif op == "tick":
            self.now += pick % 30
            self.feed(Tick(self.now))
        elif op == "late" and self.answered:  # a duplicate or late result for an id already resolved
            inv_id = self.answered[pick % len(self.answered)]
            assert self.feed(InvocationSucceeded(inv_id, {}, self.now)) == []


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1 << 12)), max_size=80))
def test_random_interleavings_end_every_job_exactly_once(ops: list[tuple[str, int]]) -> None:
    driver = Driver()
    for op, pick in ops:
        driver.step(op, pick)
    # Heal the cluster and answer everything: jobs must end without waiting for the job timeout ...
    driver.components = {c.component_id: c for c in POOL}
    driver.feed(ComponentsChanged(POOL, driver.now))
    for _ in range(500):
        if not driver.outstanding:
            driver.now += PROP_CONFIG.failed_component_avoid_s  # let avoided replicas be tried again
            driver.feed(Tick(driver.now))
            if not driver.outstanding:
                break
        d = next(iter(driver.outstanding.values()))
        del driver.outstanding[d.invocation_id]
        driver.feed(InvocationSucceeded(d.invocation_id, fake_outputs(d.task, 1), driver.now))
    assert sorted(driver.finished) == sorted(driver.submitted), "a job is stuck on a healthy cluster"
    # ... and after the job timeout nothing at all may be left.
    driver.feed(Tick(driver.now + PROP_CONFIG.job_timeout_s))
    assert sorted(driver.finished) == sorted(driver.submitted)
    assert all(n == 1 for n in driver.finished.values())
    assert driver.ex.job_ids() == () and driver.ex.queued_count == 0 and driver.ex.inflight_count == 0
    assert all(driver.ex.inflight_for(c.component_id) == () for c in POOL)


def test_same_events_give_the_same_actions() -> None:
    runs = []
    for _ in range(2):
        driver = Driver()
        for i in range(200):
            driver.step(OPS[(i * 7) % len(OPS)], (i * 2654435761) % 4096)
        runs.append([actions for _, actions in driver.log])
    assert runs[0] == runs[1]
