"""The autopilot on an in-process cluster over loopback ZeroMQ: a make-before-break move under steady load,
a cooling failure (injected with the fault drill) that moves a component off its hot GPU, and a budget cut
that brings measured GPU power under the budget. Every wait is bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from agent.components.engines.base import EngineError
from common.protocol import (
    DrainNode, GetPlan, InjectDeviceFault, ListEvents, SetNodePowerLimit, SetPowerBudget, SubmitJob,
)
from tests.integration.cluster import InProcessCluster, in_process_cluster, wait_until
from tests.integration.test_workflow_jobs import call, setup, slow_chat_workflow, wait_job

LATENCY_S = 0.2
STARTUP_S = 2.0  # long enough that jobs arrive while a replacement starts


def chat_executor(startup_s: float = STARTUP_S) -> dict[str, Any]:
    return {"name": "sim-slow-chat", "task": "chat", "engine": "sim",
            "sim": {"latency_s": LATENCY_S, "utilization": 0.9, "memory_bytes": 20_000_000_000,
                    "startup_s": startup_s, "max_concurrency": 8},
            "resources": {"device": "gpu", "gpu_memory_bytes": 20_000_000_000}}


def where(cluster: InProcessCluster) -> set[tuple[str, tuple[int, ...]]]:
    """Where the chat executor's components are desired now."""
    return {(c.node, c.device_indexes) for c in cluster.controller.workloads.plan.components
            if c.executor == "sim-slow-chat"}


def ready_on(cluster: InProcessCluster) -> set[tuple[str, tuple[int, ...]]]:
    return {(name, tuple(r.device_indexes)) for name, agent in cluster.agents.items()
            for r in agent.components.reports() if r.executor == "sim-slow-chat" and r.state == "ready"}


async def events(cluster: InProcessCluster) -> list[dict[str, Any]]:
    return list((await call(cluster, ListEvents(1000))).events)


async def first_job(cluster: InProcessCluster) -> None:
    await setup(cluster, ("slow-chat.yaml", slow_chat_workflow()), extra=[chat_executor()])
    accepted = await call(cluster, SubmitJob("slow-chat", {"question": "warm up?"}))
    job = await wait_job(cluster, accepted.job_id, 30)
    assert job.state == "succeeded", job.reason


def test_a_move_under_steady_load_loses_and_fails_nothing(tmp_path: Path) -> None:
    """Draining the node that serves every job: the replacement starts elsewhere while the old component
    keeps serving; no invocation fails or is retried, and no job waits for the replacement to start."""
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0) as cluster:
            await first_job(cluster)
            ((old_node, _),) = where(cluster)
            new_node = "node-1" if old_node == "node-0" else "node-0"
            accepted: list[str] = []
            drained_at = None
            for k in range(40):  # 8 jobs/s for 5 s, the drain one second in
                accepted.append((await call(cluster, SubmitJob("slow-chat", {"question": f"q{k}?"}))).job_id)
                if k == 8:
                    await call(cluster, DrainNode(old_node, "move under load"))
                    drained_at = time.monotonic()
                await asyncio.sleep(0.125)
            jobs = [await wait_job(cluster, job_id, 30) for job_id in accepted]
            assert [j.state for j in jobs] == ["succeeded"] * len(jobs), [j.reason for j in jobs]
            invocations = [i for j in jobs for i in j.invocations]
            assert all(i.state == "succeeded" and i.attempt == 1 for i in invocations), invocations
            latencies = [j.ended_at_unix_s - j.submitted_at_unix_s for j in jobs]
            assert max(latencies) < STARTUP_S, latencies  # nobody waited for the replacement's start
            assert {i.node for i in invocations} == {old_node, new_node}  # served by both, in turn
            await wait_until(lambda: where(cluster) == ready_on(cluster) == {(new_node, (0,))}, timeout_s=15,
                             what="the old component to be stopped after the switch")
            kinds = [e["kind"] for e in await events(cluster)]
            assert "replace" in kinds and "rollout-switched" in kinds, kinds
            assert drained_at is not None

    asyncio.run(scenario())


def test_a_cooling_failure_moves_the_component_off_the_hot_gpu(tmp_path: Path) -> None:
    """The GPU serving the chat component loses its cooling: its cap comes down at once, and when it is still
    hot ``heat_migrate_after_s`` later its component moves to the other node's GPU, make before break.
    (Placement keeps new instances off every GPU of a node with a hot one, so the cool GPU is on another node.)"""
    async def scenario() -> None:
        settings = {"heat_migrate_after_s": 2.0}
        async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0,
                                      controller_settings=settings) as cluster:
            await first_job(cluster)
            ((node, (index,)),) = where(cluster)
            other_node = "node-1" if node == "node-0" else "node-0"
            device = cluster.agents[node].devices[index]
            device.temperature_c = 86.0  # as after minutes of load; the drill takes the rest of its cooling
            await call(cluster, InjectDeviceFault(node, index, "cooling-failure", None))
            started = time.monotonic()

            def capped() -> bool:
                limit = cluster.controller.workloads.power_limits.get((node, index))
                return limit is not None and limit < device.spec.power_limit_default_w - 1

            await wait_until(capped, timeout_s=10, what="a lower cap on the hot GPU")
            relieved_s = time.monotonic() - started
            assert relieved_s < 10.0
            await wait_until(lambda: where(cluster) == ready_on(cluster) == {(other_node, (0,))}, timeout_s=20,
                             what="the component to move to the cool GPU")
            kinds = [e["kind"] for e in await events(cluster)]
            assert "heat" in kinds and "heat-migrate" in kinds and "rollout-switched" in kinds, \
                [(e["kind"], e["reason"], e["details"]) for e in await events(cluster)]
            plan = (await call(cluster, GetPlan())).explanation
            assert plan["planner"] == "murakkab"
            assert any(h["node"] == node and h["device"] == index and h["evacuated"]
                       for h in plan["power"]["hot_gpus"]), plan["power"]
            accepted = await call(cluster, SubmitJob("slow-chat", {"question": "after the move?"}))
            job = await wait_job(cluster, accepted.job_id, 30)
            assert job.state == "succeeded" and {i.node for i in job.invocations} == {other_node}

    asyncio.run(scenario())


def test_a_budget_cut_brings_measured_gpu_power_under_the_budget(tmp_path: Path) -> None:
    """Four busy simulated H100s draw about 2.8 kW; a 1.8 kW cluster budget brings the sum of their measured
    power under it within 15 s, and lifting it lets the caps rise again."""
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=2, utilization=1.0) as cluster:
            def measured_w() -> float:
                return sum(t.power_w for node in cluster.controller.registry.nodes.values()
                           for t in node.latest_telemetry())

            await wait_until(lambda: measured_w() > 2400.0, timeout_s=10, what="the GPUs to draw full power")
            budget_w = 1800.0
            await call(cluster, SetPowerBudget(None, budget_w))
            started = time.monotonic()
            await wait_until(lambda: measured_w() <= budget_w, timeout_s=15, what="measured power under the budget")
            assert time.monotonic() - started < 15.0
            await asyncio.sleep(1.0)
            assert measured_w() <= budget_w * 1.01  # it stays there
            kinds = [e["kind"] for e in await events(cluster)]
            assert "budget-set" in kinds and "budget" in kinds, kinds
            await call(cluster, SetPowerBudget(None, None))
            await wait_until(lambda: measured_w() > 2400.0, timeout_s=30, what="the caps to rise again")

    asyncio.run(scenario())


def test_budgets_pins_and_the_avoid_list_survive_a_controller_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0) as cluster:
            await call(cluster, SetPowerBudget(None, 5000.0))
            await call(cluster, SetNodePowerLimit("node-0", 0, 400.0))
            workloads = cluster.controller.workloads
            workloads._avoid[("sim-slow-chat", "node-1")] = (cluster.controller.clock() + 600.0, "drill")
            workloads.autopilot.save_state()
            restarted = await cluster.restart_controller()
            shell = restarted.workloads.autopilot
            assert shell.budget_view()["budgets"][0]["power_budget_w"] == 5000.0
            assert shell.pins_for("node-0") == {0: 400.0}
            assert restarted.workloads.avoided() == {("sim-slow-chat", "node-1"): "drill"}
            kinds = [e["kind"] for e in await events(cluster)]  # the log is stored too
            assert "budget-set" in kinds and "pin" in kinds, kinds

    asyncio.run(scenario())


def test_work_for_an_executor_no_node_can_serve_fails_within_a_minute_with_the_reason(tmp_path: Path) -> None:
    """Every engine for the stage fails to start: after the failures on each node the executor avoids every
    node, and the queued job fails with that reason instead of waiting out the 900 s queue timeout."""
    async def scenario() -> None:
        settings = {"start_failure_limit": 2}
        async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0,
                                      controller_settings=settings) as cluster:
            for agent in cluster.agents.values():
                healthy = agent.components.engine_factory

                def broken(ctx, *, clock, healthy=healthy):  # type: ignore[no-untyped-def]
                    if ctx.executor.name == "sim-slow-chat":
                        raise EngineError("engine_failed", "weights corrupted", retryable=True)
                    return healthy(ctx, clock=clock)

                agent.components.engine_factory = broken
            await setup(cluster, ("slow-chat.yaml", slow_chat_workflow()), extra=[chat_executor(0.1)])
            started = time.monotonic()
            accepted = await call(cluster, SubmitJob("slow-chat", {"question": "anyone?"}))
            job = await wait_job(cluster, accepted.job_id, 75)
            assert job.state == "failed" and "cannot be served" in job.reason, job.reason
            assert "sim-slow-chat" in job.reason
            assert time.monotonic() - started < 60.0

    asyncio.run(scenario())


def test_a_replacement_that_never_gets_ready_is_abandoned_and_the_old_component_serves_on(tmp_path: Path) -> None:
    """Draining the node that serves the chat executor while its engine cannot start anywhere else: after
    ``switch_timeout_s`` the replacement is abandoned, the old component keeps serving, and jobs succeed."""
    async def scenario() -> None:
        settings = {"switch_timeout_s": 3.0, "start_failure_limit": 100}
        async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0,
                                      controller_settings=settings) as cluster:
            await first_job(cluster)
            ((old_node, _),) = where(cluster)
            other = "node-1" if old_node == "node-0" else "node-0"
            healthy = cluster.agents[other].components.engine_factory

            def never_starts(ctx, *, clock):  # type: ignore[no-untyped-def]
                if ctx.executor.name == "sim-slow-chat":
                    raise EngineError("engine_failed", "no weights on this node", retryable=True)
                return healthy(ctx, clock=clock)

            cluster.agents[other].components.engine_factory = never_starts
            await call(cluster, DrainNode(old_node, "move that cannot happen"))

            async def kinds() -> list[str]:
                return [e["kind"] for e in await events(cluster)]

            deadline = time.monotonic() + 20
            while "rollout-abandoned" not in await kinds():
                assert time.monotonic() < deadline, await events(cluster)
                await asyncio.sleep(0.2)
            assert (old_node, (0,)) in ready_on(cluster)  # the old one serves on
            accepted = await call(cluster, SubmitJob("slow-chat", {"question": "still served?"}))
            job = await wait_job(cluster, accepted.job_id, 30)
            assert job.state == "succeeded" and {i.node for i in job.invocations} == {old_node}, job

    asyncio.run(scenario())
