"""The controller with the profile-guided planner ('murakkab') on an in-process sim-GPU cluster.

The MILP picks executors, knobs and power caps per workflow and tier, placement puts the
instances on the sim GPUs, the reconciler starts them, power limits are applied to the
devices, jobs run, and ``plan show`` explains the result.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from agent.tools.testdata import file_blob, make_test_video
from common.protocol import GetPlan, SubmitJob
from controller import autopilot_shell
from tests.integration.cluster import in_process_cluster, wait_until
from tests.integration.test_workflow_jobs import call, setup, video_qa_yaml, wait_job

SETTINGS = {"planner": "murakkab", "planning_epoch_s": 5.0}


def test_murakkab_planner_runs_jobs_applies_power_caps_and_explains_the_plan(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=4, utilization=0.0,
                                      controller_settings=SETTINGS) as cluster:
            await setup(cluster, ("video-qa.yaml", video_qa_yaml()))
            video = file_blob(make_test_video(tmp_path / "v.avi", [(200, 30, 30), (30, 200, 30)]))
            best = await call(cluster, SubmitJob("video-qa", {"video": video, "question": "what?"},
                                                 {"accuracy": "best"}))
            basic = await call(cluster, SubmitJob("video-qa", {"video": video, "question": "what?"},
                                                  {"accuracy": "basic"}))
            jobs = [await wait_job(cluster, best.job_id, 60), await wait_job(cluster, basic.job_id, 60)]
            assert [j.state for j in jobs] == ["succeeded", "succeeded"], [j.reason for j in jobs]
            assert all(i.energy_j for j in jobs for i in j.invocations if i.simulated)

            explanation = (await call(cluster, GetPlan())).explanation
            assert explanation["planner"].startswith("murakkab") and explanation["status"] in ("optimal", "feasible")
            by_tier = {tuple(sorted(d["slo"].items())): d for d in explanation["demands"] if d["workflow"] == "video-qa"}
            for tier in ((("accuracy", "best"),), (("accuracy", "basic"),)):
                predicted = by_tier[tier]["predicted"]
                assert 0 < predicted["latency_s"] <= predicted["latency_target_s"]
                assert predicted["energy_j_per_request"] > 0
            limits = {(p["node"], p["device"]): p["power_limit_w"] for p in explanation["power_limits"]}
            assert limits, explanation
            agents = cluster.agents

            def applied() -> bool:  # the agents' GPUs run at the planned limits
                return all(abs(agents[node].latest[index].power_limit_w - watts) < 1.0
                           for (node, index), watts in limits.items())

            await wait_until(applied, timeout_s=15, what="planned power limits applied on the sim GPUs")

    asyncio.run(scenario())


def test_the_milp_runs_off_the_event_loop_and_the_controller_answers_meanwhile(tmp_path: Path) -> None:
    """A solve that takes seconds must not stall heartbeats and admin requests: it runs on a worker thread."""
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=4, utilization=0.0,
                                      controller_settings=SETTINGS) as cluster:
            assert cluster.controller.workloads.autopilot is not None
            solve = autopilot_shell.solve
            threads: list[int] = []

            def slow_solve(problem):  # type: ignore[no-untyped-def]
                threads.append(threading.get_ident())
                time.sleep(1.5)
                return solve(problem)

            autopilot_shell.solve = slow_solve  # type: ignore[assignment]
            await setup(cluster, ("video-qa.yaml", video_qa_yaml()))
            video = file_blob(make_test_video(tmp_path / "v.avi", [(200, 30, 30)]))
            submit = asyncio.ensure_future(call(cluster, SubmitJob("video-qa", {"video": video, "question": "q"},
                                                                   {"accuracy": "basic"})))
            await wait_until(lambda: bool(threads), timeout_s=10, what="a solve started")
            started = time.perf_counter()
            await call(cluster, GetPlan())  # answered while the solve sleeps on its thread
            assert time.perf_counter() - started < 1.0
            accepted = await submit
            assert (await wait_job(cluster, accepted.job_id, 60)).state == "succeeded"
            assert threading.get_ident() not in threads

    asyncio.run(scenario())


def test_the_first_plan_after_a_controller_restart_is_solved_off_the_loop(tmp_path: Path) -> None:
    """After a restart the first plan waits for the nodes to re-register; its MILP runs on a worker thread
    too, the controller answers meanwhile, and the engines that were running keep running."""
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=4, utilization=0.0,
                                      controller_settings=SETTINGS) as cluster:
            await setup(cluster, ("video-qa.yaml", video_qa_yaml()))
            video = file_blob(make_test_video(tmp_path / "v.avi", [(200, 30, 30)]))
            first = await call(cluster, SubmitJob("video-qa", {"video": video, "question": "q"}, {"accuracy": "basic"}))
            assert (await wait_job(cluster, first.job_id, 60)).state == "succeeded"

            def running() -> dict[str, int]:
                return {r.component_id: r.restarts for agent in cluster.agents.values()
                        for r in agent.components.reports() if r.state == "ready"}

            before = running()
            assert before
            threads: list[int] = []
            solve = autopilot_shell.solve

            def slow_solve(problem):  # type: ignore[no-untyped-def]
                threads.append(threading.get_ident())
                time.sleep(1.5)
                return solve(problem)

            autopilot_shell.solve = slow_solve  # type: ignore[assignment]
            try:
                restarted = await cluster.restart_controller()
                await wait_until(lambda: bool(threads), timeout_s=10, what="the first solve after the restart")
                started = time.perf_counter()
                await call(cluster, GetPlan())  # answered while that solve sleeps on its thread
                assert time.perf_counter() - started < 1.0
                assert restarted.workloads.in_restart_grace(restarted.clock())  # until its plan is adopted
                await wait_until(lambda: not restarted.workloads.in_restart_grace(restarted.clock()), timeout_s=10,
                                 what="the grace period to end with the first plan")
                assert threading.get_ident() not in threads
                after = await call(cluster, SubmitJob("video-qa", {"video": video, "question": "q2"},
                                                      {"accuracy": "basic"}))
                assert (await wait_job(cluster, after.job_id, 60)).state == "succeeded"
            finally:
                autopilot_shell.solve = solve  # type: ignore[assignment]
            after_restart = running()
            assert {cid: after_restart.get(cid) for cid in before} == before  # none stopped or restarted

    asyncio.run(scenario())
