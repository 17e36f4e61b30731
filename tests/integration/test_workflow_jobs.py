"""Workflows and jobs through the admin endpoint, on an in-process cluster of sim-GPU nodes.

The real Controller and real Agents run in one event loop over loopback ZeroMQ; the test talks
to the controller's admin endpoint exactly as murakkabctl does (AdminClient, in a thread). The
catalog is examples/catalog/sim.yaml with shorter modeled start-up and latency (so the file runs
in seconds) plus the tool executors of examples/catalog/cpu.yaml (OpenCV, sandbox, rank): sim
stages are simulated, tool stages run for real on the host.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.tools.testdata import DEFAULT_SCENE_COLORS, file_blob, make_test_video
from agent.components.engines.base import EngineError
from common.protocol import (
    ApplyCatalog, ApplyWorkflow, CancelJob, DeleteWorkflow, DrainNode, GetJob, GetWorkflow, ListComponents,
    ListExecutors, ListJobs, ListWorkflows, SubmitJob,
)
from controller.cli.client import AdminClient, ClientError
from tests.integration.cluster import InProcessCluster, in_process_cluster, wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TERMINAL = ("succeeded", "failed", "cancelled")
SIM_SPEEDUP = 0.1  # modeled latencies are scaled by this; start-up takes STARTUP_S
STARTUP_S = 0.3
SCENE_COLORS = (*DEFAULT_SCENE_COLORS, (230, 220, 40))  # four scenes: red, green, blue, yellow


# --- catalog and workflow documents ------------------------------------------------------


def _executors(path: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["spec"]["executors"]


def catalog_yaml(extra: Sequence[dict[str, Any]] = ()) -> str:
    """sim.yaml (faster) + the tool executors of cpu.yaml + ``extra``; vLLM executors left out."""
    executors = []
    for spec in _executors(EXAMPLES / "catalog" / "sim.yaml"):
        spec = copy.deepcopy(spec)
        spec["sim"]["startup_s"] = STARTUP_S
        spec["sim"]["latency_s"] = round(spec["sim"]["latency_s"] * SIM_SPEEDUP, 6)
        if "latency_per_item_s" in spec["sim"]:
            spec["sim"]["latency_per_item_s"] = round(spec["sim"]["latency_per_item_s"] * SIM_SPEEDUP, 6)
        executors.append(spec)
    executors += [spec for spec in _executors(EXAMPLES / "catalog" / "cpu.yaml") if spec["engine"] == "tool"]
    executors += list(extra)
    return yaml.safe_dump({"apiVersion": "murakkab.dev/v1", "kind": "ExecutorCatalog",
                           "metadata": {"name": "test"}, "spec": {"executors": executors}}, sort_keys=False)


def slow_chat_executor(latency_s: float, max_concurrency: int = 1) -> dict[str, Any]:
    """A sim chat model slow enough to catch a job mid-invocation; only workflows that pin it use it."""
    return {"name": "sim-slow-chat", "task": "chat", "engine": "sim",
            "sim": {"latency_s": latency_s, "utilization": 0.5, "memory_bytes": 70_000_000_000,
                    "startup_s": STARTUP_S, "max_concurrency": max_concurrency},
            "resources": {"device": "gpu", "gpu_memory_bytes": 70_000_000_000}}


def slow_chat_workflow() -> str:
    return """\
apiVersion: murakkab.dev/v1
kind: Workflow
metadata:
  name: slow-chat
spec:
  inputs:
    question: {type: text}
  stages:
    - name: answer
      task: chat
      constraints: {executor: sim-slow-chat}
      inputs:
        question: inputs.question
  outputs:
    answer: answer.answer
"""


def video_qa_yaml() -> str:
    """examples/workflows/video-qa.yaml, also returning the scenes and frames so the test can check them."""
    text = (EXAMPLES / "workflows" / "video-qa.yaml").read_text()
    assert text.rstrip().endswith("transcript: transcript.transcript")
    return text.rstrip() + "\n    scenes: scenes.scenes\n    frames: frames.frames\n"


# --- admin calls -------------------------------------------------------------------------


def _call(address: str, msg: Any, timeout_s: float) -> Any:
    with AdminClient(address, timeout_s) as client:
        return client.call(msg)


async def call(cluster: InProcessCluster, msg: Any, timeout_s: float = 10.0) -> Any:
    return await asyncio.to_thread(_call, cluster.admin_address, msg, timeout_s)


async def refused(cluster: InProcessCluster, msg: Any) -> tuple[str, str]:
    """(code, message) of the error reply ``msg`` gets; fails the test if it is accepted."""
    try:
        reply = await call(cluster, msg)
    except ClientError as exc:
        code, _, message = str(exc).partition(": ")
        return code, message
    raise AssertionError(f"{type(msg).__name__} was accepted: {reply}")


async def wait_job(cluster: InProcessCluster, job_id: str, timeout_s: float = 30.0) -> Any:
    """The job once it is terminal; GetJob(wait_s) in slices, bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        job = (await call(cluster, GetJob(job_id, wait_s=max(0.0, min(left, 10.0))), timeout_s=15.0)).job
        if job.state in TERMINAL:
            return job
        if left <= 0:
            raise AssertionError(f"job {job_id} still {job.state} after {timeout_s:g}s: {job}")


async def wait_until_job(cluster: InProcessCluster, job_id: str, predicate: Any, what: str,
                         timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await call(cluster, GetJob(job_id))).job
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}: {job}")
        await asyncio.sleep(0.05)


async def setup(cluster: InProcessCluster, *workflows: tuple[str, str],
                extra: Sequence[dict[str, Any]] = ()) -> None:
    await call(cluster, ApplyCatalog("test-catalog.yaml", catalog_yaml(extra)))
    for source, text in workflows:
        await call(cluster, ApplyWorkflow(source, text))


def db_count(cluster: InProcessCluster, table: str) -> int:
    return cluster.controller.store.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def running_invocation(job: Any) -> bool:
    return any(inv.state == "running" for inv in job.invocations)


# --- catalog and workflows ---------------------------------------------------------------


def test_apply_catalog_and_workflows_versions_list_show_delete(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=0.0) as cluster:
            applied = await call(cluster, ApplyCatalog("test-catalog.yaml", catalog_yaml()))
            assert applied.version == 1
            assert {"sim-llama-8b-chat", "opencv-scenes", "python-sandbox"} <= set(applied.executors)
            assert not any("vllm" in e or e.endswith("-cpu") for e in applied.executors)
            again = await call(cluster, ApplyCatalog("test-catalog.yaml", catalog_yaml()))
            assert again.version == 2  # every catalog apply is a new version
            executors = {e.name: e for e in (await call(cluster, ListExecutors())).executors}
            assert executors["sim-llama-8b-chat"].version == 2 and executors["sim-llama-8b-chat"].engine == "sim"
            assert executors["opencv-frames"].knobs == {"frames": (4, 8, 16)}

            first = await call(cluster, ApplyWorkflow("video-qa.yaml", video_qa_yaml()))
            assert (first.name, first.version, first.unchanged, first.warnings) == ("video-qa", 1, False, ())
            same = await call(cluster, ApplyWorkflow("video-qa.yaml", video_qa_yaml()))
            assert (same.version, same.unchanged) == (1, True)
            changed_text = video_qa_yaml().replace("Answer a question about a video", "Describe a video")
            changed = await call(cluster, ApplyWorkflow("video-qa.yaml", changed_text))
            assert (changed.version, changed.unchanged) == (2, False)
            debate = await call(cluster, ApplyWorkflow("code-debate.yaml",
                                                       (EXAMPLES / "workflows" / "code-debate.yaml").read_text()))
            assert debate.version == 1

            listed = {w.name: w for w in (await call(cluster, ListWorkflows())).workflows}
            assert set(listed) == {"video-qa", "code-debate"}
            assert listed["video-qa"].version == 2 and listed["video-qa"].stages == 5
            assert listed["video-qa"].inputs == {"video": "video", "question": "text"}
            shown = await call(cluster, GetWorkflow("video-qa"))
            assert shown.yaml_text == changed_text and shown.summary.description.startswith("Describe a video")
            assert [s["name"] for s in shown.spec["spec"]["stages"]] == ["scenes", "frames", "objects",
                                                                           "transcript", "answer"]

            deleted = await call(cluster, DeleteWorkflow("video-qa"))
            assert (deleted.name, deleted.versions) == ("video-qa", 2)
            assert [w.name for w in (await call(cluster, ListWorkflows())).workflows] == ["code-debate"]
            code, message = await refused(cluster, GetWorkflow("video-qa"))
            assert code == "unknown_workflow" and "code-debate" in message
            assert (await refused(cluster, DeleteWorkflow("video-qa")))[0] == "unknown_workflow"
            again = await call(cluster, ApplyWorkflow("video-qa.yaml", video_qa_yaml()))
            assert (again.version, again.unchanged) == (3, False)  # versions go on after a delete

            broken = video_qa_yaml().replace("context: objects.objects", "context: objectz.objects")
            code, message = await refused(cluster, ApplyWorkflow("broken.yaml", broken))
            line = broken.splitlines().index("        context: objectz.objects") + 1
            assert code == "invalid_workflow"
            assert message.startswith(f"broken.yaml:{line}: spec.stages[4].inputs.context:"), message
            assert "objectz" in message
            code, message = await refused(cluster, ApplyWorkflow("tabs.yaml", "kind: Workflow\n\tspec: {}\n"))
            assert code == "invalid_workflow" and message.startswith("tabs.yaml:2:"), message
            code, message = await refused(cluster, ApplyCatalog("bad-catalog.yaml", "kind: ExecutorCatalog\n"))
            assert code == "invalid_catalog" and "bad-catalog.yaml" in message
            # nothing of the refused documents was stored
            assert [w.name for w in (await call(cluster, ListWorkflows())).workflows] == ["code-debate", "video-qa"]
            assert (await call(cluster, GetWorkflow("video-qa"))).summary.version == 3

    asyncio.run(scenario())


# --- refused submissions -----------------------------------------------------------------


def test_bad_submissions_are_refused_with_explicit_codes_and_nothing_is_created(tmp_path: Path) -> None:
    video = file_blob(make_test_video(tmp_path / "clip.mp4", SCENE_COLORS[:2], seconds_per_scene=0.5))
    frames_workflow = """\
apiVersion: murakkab.dev/v1
kind: Workflow
metadata:
  name: frames-of
spec:
  inputs:
    video: {type: video}
    scenes: {type: "list[scene]"}
  stages:
    - name: frames
      task: frame-extraction
      inputs: {video: inputs.video, scenes: inputs.scenes}
  outputs:
    frames: frames.frames
"""
    pinned_workflow = """\
apiVersion: murakkab.dev/v1
kind: Workflow
metadata:
  name: pinned-huge
spec:
  inputs:
    question: {type: text}
  stages:
    - name: answer
      task: chat
      constraints: {executor: sim-chat-640gb}
      inputs: {question: inputs.question}
  outputs:
    answer: answer.answer
"""
    huge = {"name": "sim-chat-640gb", "task": "chat", "engine": "sim",
            "sim": {"latency_s": 1.0, "memory_bytes": 80_000_000_000, "startup_s": STARTUP_S},
            "resources": {"device": "gpu", "gpu_count": 8, "gpu_memory_bytes": 80_000_000_000}}

    async def scenario() -> None:
        # First fit: one node with two GPUs is too small for the autopilot's MILP, which gives every pool
        # devices of its own (video-qa alone needs three GPU pools); first fit shares GPUs by memory.
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=0.0,
                                      controller_settings={"planner": "first-fit"}) as cluster:
            await setup(cluster, ("video-qa.yaml", video_qa_yaml()), ("frames.yaml", frames_workflow),
                        ("pinned.yaml", pinned_workflow), extra=[huge])
            good = {"video": video, "question": "What is shown?"}
            cases: list[tuple[str, SubmitJob, str, tuple[str, ...]]] = [
                ("unknown workflow", SubmitJob("video-qq", good), "unknown_workflow", ("video-qq", "video-qa")),
                ("missing input", SubmitJob("video-qa", {"video": video}), "invalid_input",
                 ("missing required input(s) question",)),
                ("unknown input", SubmitJob("video-qa", {**good, "audio": "x"}), "invalid_input",
                 ("unknown input(s) audio", "video (video)", "question (text)")),
                ("text for a file", SubmitJob("video-qa", {**good, "video": "clip.mp4"}), "invalid_input",
                 ("input video", "expected a video", "got text")),
                ("bytes for text", SubmitJob("video-qa", {**good, "question": b"What is shown?"}), "invalid_input",
                 ("input question", "expected text")),
                ("record missing fields", SubmitJob("frames-of", {"video": video, "scenes": [
                    {"index": 0, "start_s": 0.0, "end_s": 0.5}, {"index": 1, "start_s": 0.5}]}), "invalid_input",
                 ("input scenes[1]", "missing ['end_s']")),
                ("oversized input", SubmitJob("video-qa", {**good, "video": {
                    **video, "data": b"\0" * (780 * 1024)}}), "input_too_large", ("786432 bytes",)),
                ("bad SLO dimension", SubmitJob("video-qa", good, slo={"cost": "best"}), "invalid_slo",
                 ("unknown SLO dimension 'cost'", "accuracy, latency")),
                ("bad SLO tier", SubmitJob("video-qa", good, slo={"accuracy": "perfect"}), "invalid_slo",
                 ("unknown accuracy tier 'perfect'", "best, good, fair, basic")),
                ("unplaceable pin", SubmitJob("pinned-huge", {"question": "hi"}), "unsatisfiable",
                 ("pinned-huge", "sim-chat-640gb")),
                ("unplaceable pin at an SLO", SubmitJob("pinned-huge", {"question": "hi"},
                                                        slo={"latency": "best"}), "unsatisfiable",
                 ("sim-chat-640gb",)),
            ]
            for what, msg, want_code, fragments in cases:
                code, message = await refused(cluster, msg)
                assert code == want_code, (what, code, message)
                for fragment in fragments:
                    assert fragment in message, (what, fragment, message)
            # a key on a refused submission does not reserve anything either
            code, _ = await refused(cluster, SubmitJob("video-qa", {"video": video}, idempotency_key="k-1"))
            assert code == "invalid_input"
            assert (await call(cluster, ListJobs())).jobs == ()
            assert db_count(cluster, "jobs") == 0 and db_count(cluster, "invocations") == 0
            accepted = await call(cluster, SubmitJob("video-qa", good, idempotency_key="k-1"))
            assert [j.job_id for j in (await call(cluster, ListJobs())).jobs] == [accepted.job_id]
            await call(cluster, CancelJob(accepted.job_id, "test over"))
            assert (await refused(cluster, GetJob("j-nope")))[0] == "unknown_job"
            assert (await refused(cluster, CancelJob("j-nope")))[0] == "unknown_job"
            assert (await refused(cluster, ListJobs(limit=0)))[0] == "invalid_argument"

    asyncio.run(scenario())


# --- workflows end to end ----------------------------------------------------------------


def test_video_qa_end_to_end_on_sim_nodes_and_tiers_pick_different_executors(tmp_path: Path) -> None:
    video = file_blob(make_test_video(tmp_path / "four-scenes.mp4", SCENE_COLORS, seconds_per_scene=1.0))

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=3, gpus=2, utilization=0.0,
                                      controller_settings={"planner": "first-fit"}) as cluster:
            await setup(cluster, ("video-qa.yaml", video_qa_yaml()))
            inputs = {"video": video, "question": "What colors appear?"}
            best = await call(cluster, SubmitJob("video-qa", inputs, slo={"accuracy": "best"}))
            basic = await call(cluster, SubmitJob("video-qa", inputs, slo={"accuracy": "basic"}))
            jobs = {"best": await wait_job(cluster, best.job_id, 40), "basic": await wait_job(cluster, basic.job_id, 40)}
            chosen: dict[str, dict[str, str]] = {}
            for tier, job in jobs.items():
                assert job.state == "succeeded", (tier, job.reason, job.invocations)
                assert job.slo == {"accuracy": tier} and job.reason == ""
                out = job.outputs
                assert set(out) == {"answer", "objects", "transcript", "scenes", "frames"}
                # the real OpenCV tool found the generated cuts
                assert len(out["scenes"]) == len(SCENE_COLORS), out["scenes"]
                assert [s["index"] for s in out["scenes"]] == list(range(len(SCENE_COLORS)))
                assert out["scenes"][0]["start_s"] == 0.0
                for before, after in zip(out["scenes"], out["scenes"][1:]):
                    assert abs(before["end_s"] - after["start_s"]) < 1e-6
                    assert 0.8 <= after["start_s"] - before["start_s"] <= 1.2, out["scenes"]
                assert out["frames"] and all(f["media_type"] == "image/jpeg" and f["data"][:2] == b"\xff\xd8"
                                             for f in out["frames"])
                assert isinstance(out["answer"], str) and "[simulated" in out["answer"]
                assert isinstance(out["transcript"], str) and "[simulated" in out["transcript"]
                assert out["objects"] and all(isinstance(o, str) for o in out["objects"])
                done = [i for i in job.invocations if i.state == "succeeded"]
                assert {i.stage for i in done} == {"scenes", "frames", "objects", "transcript", "answer"}
                chosen[tier] = {i.stage: i.executor for i in done}
                for inv in done:
                    assert inv.node in cluster.agents and inv.component_id, inv
                    assert inv.latency_s is not None and inv.latency_s > 0, inv
                    assert inv.started_at_unix_s <= inv.ended_at_unix_s, inv
                    if inv.stage in ("scenes", "frames"):
                        assert not inv.simulated and inv.executor.startswith("opencv-"), inv
                    else:
                        assert inv.simulated and inv.executor.startswith("sim-"), inv
                        assert inv.device_indexes, inv  # the sim GPUs it ran on
                        assert inv.energy_j is not None and inv.energy_j > 0, inv
                assert job.submitted_at_unix_s <= job.started_at_unix_s <= job.ended_at_unix_s
            assert chosen["best"]["answer"] == "sim-llama-70b-chat"
            assert chosen["basic"]["answer"] == "sim-llama-8b-chat"
            assert chosen["best"]["objects"] == "sim-vlm-32b-detect"
            assert chosen["basic"]["objects"] == "sim-vlm-3b-detect"
            listed = {j.job_id: j for j in (await call(cluster, ListJobs(workflow="video-qa"))).jobs}
            assert set(listed) == {best.job_id, basic.job_id}
            for summary in listed.values():
                assert summary.state == "succeeded" and summary.energy_j > 0 and summary.latency_s > 0

    asyncio.run(scenario())


def test_code_debate_on_sim_nodes_ends_with_a_ranking(tmp_path: Path) -> None:
    problem = "Write solution(n) that returns n squared."
    tests = "assert solution(2) == 4\nassert solution(3) == 9\n"

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=2, utilization=0.0) as cluster:
            await setup(cluster, ("code-debate.yaml", (EXAMPLES / "workflows" / "code-debate.yaml").read_text()))
            accepted = await call(cluster, SubmitJob("code-debate", {"problem": problem, "tests": tests}))
            job = await wait_job(cluster, accepted.job_id, 40)
            assert job.state == "succeeded", (job.reason, job.invocations)
            done = {(i.stage, i.item): i for i in job.invocations if i.state == "succeeded"}
            debate = done[("debate", None)]
            assert debate.simulated and debate.executor == "sim-coder-7b-debate"
            candidates = debate.knobs["debaters"]
            checks = [i for (stage, _), i in done.items() if stage == "check"]
            assert sorted(i.item for i in checks) == list(range(candidates))  # fan-out, one per candidate
            assert all(i.executor == "python-sandbox" and not i.simulated for i in checks)
            assert done[("rank", None)].executor == "rank-by-tests" and not done[("rank", None)].simulated
            ranking = job.outputs["ranking"]
            assert sorted(r["index"] for r in ranking) == list(range(candidates))
            for row in ranking:  # the simulated programs return None: the real sandbox fails both tests
                assert (row["passed_tests"], row["total_tests"]) == (0, 2), row
                assert "assert" in row["error"] or "AssertionError" in row["error"], row
            assert "[simulated" in job.outputs["best"]

    asyncio.run(scenario())


# --- job control -------------------------------------------------------------------------


def test_cancel_idempotency_and_get_job_wait(tmp_path: Path) -> None:
    slow_s = 3.0

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=0.0) as cluster:
            await setup(cluster, ("slow-chat.yaml", slow_chat_workflow()),
                        ("chat.yaml", (EXAMPLES / "workflows" / "chat.yaml").read_text()),
                        extra=[slow_chat_executor(latency_s=slow_s, max_concurrency=4)])
            # cancellation of a running job
            slow = await call(cluster, SubmitJob("slow-chat", {"question": "Take your time."}))
            await wait_until_job(cluster, slow.job_id, running_invocation, "the slow invocation to run")
            cancelled = (await call(cluster, CancelJob(slow.job_id, "operator changed their mind"))).job
            cancelled_at = time.monotonic()
            assert cancelled.state == "cancelled" and cancelled.reason == "operator changed their mind"
            # The agent hears of it and stops the engine call: the slot is free long before the 3 s call ends.
            runtime = cluster.agents["node-0"].components
            await wait_until(lambda: not any(c.running for c in runtime.components.values()), timeout_s=5.0,
                             what="the agent to stop the cancelled invocation")
            assert time.monotonic() - cancelled_at < 1.5
            assert cancelled.ended_at_unix_s is not None and cancelled.outputs == {}
            assert not running_invocation(cancelled), cancelled.invocations
            again = (await call(cluster, CancelJob(slow.job_id, "second thoughts"))).job
            assert (again.state, again.reason, again.ended_at_unix_s) == (
                "cancelled", "operator changed their mind", cancelled.ended_at_unix_s)
            assert [j.state for j in (await call(cluster, ListJobs(workflow="slow-chat"))).jobs] == ["cancelled"]

            # GetJob(wait_s) answers as soon as the job ends, well before wait_s
            waited = await call(cluster, SubmitJob("slow-chat", {"question": "How long?"}))
            started = time.monotonic()
            job = (await call(cluster, GetJob(waited.job_id, wait_s=25.0), timeout_s=30.0)).job
            waited_s = time.monotonic() - started
            assert job.state == "succeeded", job.reason
            assert slow_s * 0.5 < waited_s < slow_s + 5.0, waited_s  # it did wait, and not for wait_s
            assert time.time() - job.ended_at_unix_s < 1.0, "the reply came long after the job ended"
            started = time.monotonic()  # a finished job answers at once, whatever wait_s says
            assert (await call(cluster, GetJob(waited.job_id, wait_s=25.0), timeout_s=30.0)).job.state == "succeeded"
            assert time.monotonic() - started < 2.0
            assert (await call(cluster, CancelJob(waited.job_id))).job.state == "succeeded"  # too late to cancel

            # idempotency: the same key gives the same job, whatever else the retry carries
            first = await call(cluster, SubmitJob("chat", {"question": "Once?"}, idempotency_key="req-42"))
            second = await call(cluster, SubmitJob("chat", {"question": "Once?"}, idempotency_key="req-42"))
            third = await call(cluster, SubmitJob("chat", {"question": "Twice?"}, idempotency_key="req-42"))
            assert first.job_id == second.job_id == third.job_id
            other = await call(cluster, SubmitJob("chat", {"question": "Once?"}, idempotency_key="req-43"))
            assert other.job_id != first.job_id
            assert len((await call(cluster, ListJobs(workflow="chat"))).jobs) == 2
            assert (await wait_job(cluster, first.job_id)).state == "succeeded"
            late = await call(cluster, SubmitJob("chat", {"question": "Once?"}, idempotency_key="req-42"))
            assert late.job_id == first.job_id  # also once the job has ended
            assert db_count(cluster, "jobs") == 4

            # the cancelled job's invocation ran to its end on the agent; its late result changed nothing
            agent = cluster.agents["node-0"]
            await wait_until(lambda: all(r.inflight == 0 for r in agent.components.reports()), 10,
                             "the abandoned invocation to end on the agent")
            later = (await call(cluster, GetJob(slow.job_id))).job
            assert (later.state, later.reason, later.ended_at_unix_s, later.outputs) == (
                "cancelled", "operator changed their mind", cancelled.ended_at_unix_s, {})
            assert not running_invocation(later)

    asyncio.run(scenario())


# --- failures ----------------------------------------------------------------------------


def test_drained_node_components_move_and_jobs_still_complete(tmp_path: Path) -> None:
    video = file_blob(make_test_video(tmp_path / "clip.mp4", SCENE_COLORS[:2], seconds_per_scene=0.5))

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=3, gpus=2, utilization=0.0) as cluster:
            await setup(cluster, ("video-qa.yaml", video_qa_yaml()))
            inputs = {"video": video, "question": "What is shown?"}
            first = await call(cluster, SubmitJob("video-qa", inputs, slo={"accuracy": "basic"}))
            job = await wait_job(cluster, first.job_id, 30)
            assert job.state == "succeeded", job.reason
            used = {i.executor: i.node for i in job.invocations if i.state == "succeeded"}
            victim = used["sim-llama-8b-chat"]
            moved = {ex for ex, node in used.items() if node == victim}
            jobs = [await call(cluster, SubmitJob("video-qa", {**inputs, "question": f"Q{i}?"},
                                                  slo={"accuracy": "basic"})) for i in range(3)]
            await wait_until_job(cluster, jobs[0].job_id, running_invocation, "the next jobs to be running")
            drained = await call(cluster, DrainNode(victim, "maintenance"))
            assert drained.node.state in ("draining", "drained"), drained.node

            def moved_elsewhere() -> bool:
                views = cluster.controller.workloads.list_components().components
                on_victim = [v for v in views if v.node == victim and v.report is not None
                             and v.report.state not in ("stopped",)]
                ready_elsewhere = {v.executor for v in views if v.node != victim and v.desired
                                   and v.report is not None and v.report.state == "ready"}
                return not on_victim and moved <= ready_elsewhere

            await wait_until(moved_elsewhere, 20, f"components of {sorted(moved)} to leave {victim}")
            for accepted in jobs:
                done = await wait_job(cluster, accepted.job_id, 30)
                assert done.state == "succeeded", done.reason
            later = await call(cluster, SubmitJob("video-qa", inputs, slo={"accuracy": "basic"}))
            job = await wait_job(cluster, later.job_id, 30)
            assert job.state == "succeeded", job.reason
            assert all(i.node != victim for i in job.invocations), job.invocations
            views = (await call(cluster, ListComponents())).components
            assert not any(v.desired and v.node == victim for v in views)
            agent_components = cluster.agents[victim].components  # the agent itself stopped them
            assert all(r.state == "stopped" for r in agent_components.reports()), agent_components.reports()

    asyncio.run(scenario())


def test_jobs_survive_a_controller_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=0.0) as cluster:
            await setup(cluster, ("slow-chat.yaml", slow_chat_workflow()),
                        extra=[slow_chat_executor(latency_s=1.5, max_concurrency=1)])
            accepted = [await call(cluster, SubmitJob("slow-chat", {"question": f"Q{i}?"})) for i in range(3)]
            await wait_until_job(cluster, accepted[0].job_id, running_invocation, "the first invocation to run")
            before = [(await call(cluster, GetJob(a.job_id))).job.state for a in accepted]
            assert before == ["running", "queued", "queued"], before  # one slot: the others wait for it
            epoch = cluster.controller.epoch
            await cluster.restart_controller()
            assert cluster.controller.epoch == epoch + 1
            assert set(cluster.controller.workloads.executor.job_ids()) == {a.job_id for a in accepted}  # resumed
            jobs = [await wait_job(cluster, a.job_id, 40) for a in accepted]
            for job in jobs:
                assert job.state == "succeeded", (job.reason, job.invocations)
                assert job.outputs["answer"].startswith("[simulated answer by sim-slow-chat]")
            # stored terminal states, read from the table itself
            rows = cluster.controller.store.db.execute("SELECT state FROM jobs").fetchall()
            assert sorted(r[0] for r in rows) == ["succeeded"] * 3
            assert cluster.controller.store.db.execute(
                "SELECT COUNT(*) FROM invocations WHERE state = 'running'").fetchone()[0] == 0

    asyncio.run(scenario())


def test_controller_restart_keeps_running_components(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=0.0) as cluster:
            await setup(cluster, ("chat.yaml", (EXAMPLES / "workflows" / "chat.yaml").read_text()))
            first = await call(cluster, SubmitJob("chat", {"question": "Before?"}))
            assert (await wait_job(cluster, first.job_id)).state == "succeeded"
            agent = cluster.agents["node-0"]
            before = {r.component_id: r.restarts for r in agent.components.reports() if r.state == "ready"}
            assert before
            await cluster.restart_controller()
            await asyncio.sleep(1.0)  # several heartbeats with the new controller
            # Until the first plan after the restart is adopted (its MILP runs on a thread), submissions are
            # refused as unavailable with "retry shortly"; a client retries.
            deadline = time.monotonic() + 20.0
            while True:
                try:
                    accepted = await call(cluster, SubmitJob("chat", {"question": "After?"}))
                    break
                except ClientError as exc:
                    if not str(exc).startswith("unavailable") or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.2)
            after = await wait_job(cluster, accepted.job_id)
            assert after.state == "succeeded", after.reason
            reports = {r.component_id: r for r in agent.components.reports()}
            assert {cid: reports[cid].restarts for cid in before} == before, reports

    asyncio.run(scenario())


@pytest.mark.parametrize("planner", ["first-fit", "murakkab"])
def test_an_executor_that_keeps_failing_to_start_on_a_node_is_moved_elsewhere(tmp_path: Path, planner: str) -> None:
    """Its component fails on the first node it is placed on every time (a model missing there, say): after two
    failures in a row the executor avoids that node, the plan moves it to the other, and the job waiting for it
    succeeds."""
    async def scenario() -> None:
        settings = {"start_failure_limit": 2, "avoid_node_s": 600.0, "planner": planner}
        async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0,
                                      controller_settings=settings) as cluster:
            broken: list[str] = []  # the first node asked to start it

            def missing_model_on_first(name: str, healthy):  # type: ignore[no-untyped-def]
                def factory(ctx, *, clock):  # type: ignore[no-untyped-def]
                    if ctx.executor.name == "sim-slow-chat":
                        broken.append(broken[0] if broken else name)
                        if broken[0] == name:
                            raise EngineError("engine_failed", "model weights not found on this node",
                                              retryable=True)
                    return healthy(ctx, clock=clock)
                return factory

            for name, agent in cluster.agents.items():
                agent.components.engine_factory = missing_model_on_first(name, agent.components.engine_factory)
            await setup(cluster, ("slow-chat.yaml", slow_chat_workflow()),
                        extra=[slow_chat_executor(latency_s=0.2, max_concurrency=1)])
            accepted = await call(cluster, SubmitJob("slow-chat", {"question": "Where do you run?"}))
            job = await wait_job(cluster, accepted.job_id, 40)
            assert job.state == "succeeded", job.reason
            bad = broken[0]
            good = "node-1" if bad == "node-0" else "node-0"
            assert {i.node for i in job.invocations} == {good}
            avoided = cluster.controller.workloads.avoided()
            assert list(avoided) == [("sim-slow-chat", bad)]
            assert "failed 2 times in a row" in avoided[("sim-slow-chat", bad)]
            assert "model weights not found" in avoided[("sim-slow-chat", bad)]
            plan = cluster.controller.workloads.plan
            assert [c.node for c in plan.components if c.executor == "sim-slow-chat"] == [good]

    asyncio.run(scenario())


@pytest.mark.parametrize("planner", ["first-fit", "murakkab"])
def test_a_workflow_update_keeps_the_executors_that_unfinished_jobs_chose(tmp_path: Path, planner: str) -> None:
    """Jobs queued under the old version still run on the executor they chose; new jobs use the new one.
    First fit places the old executor; the murakkab planner keeps its running instance beside the MILP's."""
    async def scenario() -> None:
        settings = {"job_queue_timeout_s": 30.0, "planner": planner, "planning_epoch_s": 5.0}
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=0.0,
                                      controller_settings=settings) as cluster:
            other = {**slow_chat_executor(latency_s=0.1), "name": "sim-quick-chat"}
            await setup(cluster, ("slow-chat.yaml", slow_chat_workflow()),
                        extra=[slow_chat_executor(latency_s=1.0, max_concurrency=1), other])
            old = [await call(cluster, SubmitJob("slow-chat", {"question": f"Q{i}?"})) for i in range(3)]
            await wait_until_job(cluster, old[0].job_id, running_invocation, "the first invocation to run")
            await call(cluster, ApplyWorkflow("slow-chat.yaml", slow_chat_workflow().replace(
                "executor: sim-slow-chat", "executor: sim-quick-chat")))
            new = await call(cluster, SubmitJob("slow-chat", {"question": "New?"}))  # plans the new version
            if planner == "murakkab":
                assert any("sim-slow-chat: 1 instance(s) kept for unfinished jobs" in n
                           for n in cluster.controller.workloads.plan.notes), cluster.controller.workloads.plan.notes
            jobs = [await wait_job(cluster, a.job_id, 30) for a in old]
            assert [j.state for j in jobs] == ["succeeded"] * 3, [j.reason for j in jobs]
            assert all(i.executor == "sim-slow-chat" for j in jobs for i in j.invocations)
            fresh = await wait_job(cluster, new.job_id, 30)
            assert fresh.state == "succeeded" and {i.executor for i in fresh.invocations} == {"sim-quick-chat"}
            if planner == "first-fit":  # with the old jobs done, nothing keeps the old executor planned
                await wait_until(lambda: "sim-slow-chat" not in cluster.controller.workloads.live_job_executors(),
                                 timeout_s=5, what="the old jobs to release their executor")

    asyncio.run(scenario())
