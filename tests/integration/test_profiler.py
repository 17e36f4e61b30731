"""Profile runs end to end through the admin API, on an in-process cluster of sim-GPU nodes.

The real Controller and Agents run in one event loop over loopback ZeroMQ; the test talks to
the admin endpoint exactly as murakkabctl does (AdminClient, in a thread). A fast sim chat
executor is profiled on a simulated H100 over concurrency, max_tokens and two power caps;
samples are stored, labeled modeled (sim engine, sim GPU), and the power limit is restored.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.protocol import ApplyCatalog, GetNode, GetProfileRun, ListComponents, ListProfiles, StartProfile
from controller.cli.client import AdminClient, ClientError
from policies.profiles import ProfileSample, samples_from_jsonl
from tests.integration.cluster import InProcessCluster, in_process_cluster, wait_until

LATENCY_S = 0.02
CATALOG = {
    "apiVersion": "murakkab.dev/v1", "kind": "ExecutorCatalog", "metadata": {"name": "profile-test"},
    "spec": {"executors": [
        {"name": "sim-fast-chat", "task": "chat", "engine": "sim",
         "sim": {"latency_s": LATENCY_S, "knob_latency_factors": {"max_tokens": {"128": 0.5, "256": 1.0}},
                 "utilization": 0.8, "memory_bytes": 10_000_000_000, "startup_s": 0.2, "max_concurrency": 8},
         "knobs": {"max_tokens": {"values": [128, 256], "default": 256}},
         "resources": {"device": "gpu", "gpu_memory_bytes": 10_000_000_000}},
        {"name": "cpu-tool", "task": "rank-candidates", "engine": "tool",
         "tool": {"entry_point": "agent.tools.rank:rank_candidates"}, "resources": {"device": "cpu"}},
    ]},
}
SWEEP = {"concurrency": [1, 2], "knobs": {"max_tokens": [128, 256]}, "power_caps_w": [700, 350],
         "requests_per_client": 2, "warmup_requests": 1, "passes": 2}


def _call(address: str, msg: Any, timeout_s: float) -> Any:
    with AdminClient(address, timeout_s) as client:
        return client.call(msg)


async def call(cluster: InProcessCluster, msg: Any, timeout_s: float = 10.0) -> Any:
    return await asyncio.to_thread(_call, cluster.admin_address, msg, timeout_s)


async def wait_run(cluster: InProcessCluster, run_id: str, timeout_s: float = 30.0) -> Any:
    seen_progress: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        status = await call(cluster, GetProfileRun(run_id))
        seen_progress.append(status.done_points)
        if status.state in ("succeeded", "failed", "cancelled"):
            assert seen_progress == sorted(seen_progress), "progress never goes backwards"
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"profile run {run_id} did not end within {timeout_s}s")


def test_profile_run_stores_modeled_samples_and_restores_the_power_limit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=0.05) as cluster:
            await call(cluster, ApplyCatalog("test", yaml.safe_dump(CATALOG)))
            limit_before = (await call(cluster, GetNode("node-0"))).node.telemetry[0].power_limit_w
            started = await call(cluster, StartProfile("sim-fast-chat", "node-0", 0, SWEEP))
            assert started.points == 16  # 2 caps x 2 concurrency x 2 max_tokens x 2 passes (no TTFT probes: sim engine)
            # The profiler's own component is not an unplanned one: the reconciler leaves it alone.
            await wait_until(lambda: cluster.controller.profiler.runs.get(started.run_id) is not None
                             and cluster.controller.profiler.runs[started.run_id].state == "running",
                             timeout_s=10, what="the run to measure")
            components = await call(cluster, ListComponents())
            assert not [c for c in components.components if c.component_id.startswith("profile-")]
            status = await wait_run(cluster, started.run_id)
            assert status.state == "succeeded", status.message
            assert status.done_points == status.total_points == 16
            samples = [ProfileSample.from_dict(s) for s in status.samples]
            assert len(samples) == 8
            for s in samples:
                assert s.source == "modeled" and s.hardware == "h100" and s.backend == "sim"
                assert s.node == "node-0" and s.run_id == started.run_id
                assert s.samples == 2 * s.concurrency * 2  # pooled over both passes
                assert s.energy_j_per_request and s.energy_j_per_request > 0
                assert s.software["controller"] and s.software["agent"] != "unknown"
                assert s.ttft_s is None and s.tpot_s is None
            by_point = {(s.power_cap_w, s.concurrency, s.knobs["max_tokens"]): s for s in samples}
            # The sim engine halves latency at max_tokens 128; a 350 W cap slows the sim GPU's clock.
            assert by_point[(700.0, 1, 128)].latency_s < by_point[(700.0, 1, 256)].latency_s
            assert by_point[(350.0, 1, 256)].latency_s > by_point[(700.0, 1, 256)].latency_s * 1.02
            assert by_point[(700.0, 1, 256)].latency_s == pytest.approx(LATENCY_S, rel=0.5)
            await wait_until(lambda: (cluster.controller.registry.nodes["node-0"].latest_telemetry()[0].power_limit_w
                                      == limit_before), timeout_s=5, what="the original power limit back")
            listed = await call(cluster, ListProfiles(executor="sim-fast-chat", fit=True))
            assert listed.total == 8 and len(listed.samples) == 8
            assert [(f.executor, f.hardware, f.source) for f in listed.fits] == [("sim-fast-chat", "h100", "modeled")]
            await cluster.controller.profiler.refit_done()
            assert cluster.controller.profiler.predictors.group("sim-fast-chat", "h100") is not None
            # The component is stopped once the run ends.
            await wait_until(lambda: all(r.state == "stopped" for r in cluster.controller.workloads.reports["node-0"]
                                         if r.component_id.startswith("profile-")), timeout_s=5,
                             what="the profile component to stop")

    asyncio.run(scenario())


def test_profile_requests_are_checked(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1, utilization=0.05) as cluster:
            await call(cluster, ApplyCatalog("test", yaml.safe_dump(CATALOG)))
            cases = [
                (StartProfile("nope", "node-0", 0), "unknown_executor"),
                (StartProfile("sim-fast-chat", "node-9", 0), "unknown_node"),
                (StartProfile("sim-fast-chat", "node-0", 7), "unknown_device"),
                (StartProfile("cpu-tool", "node-0", 0), "device_kind_mismatch"),
                (StartProfile("sim-fast-chat", "node-0", 0, {"concurrency": [64]}), "invalid_sweep"),
                (StartProfile("sim-fast-chat", "node-0", 0, {"knobs": {"max_tokens": [100]}, "bogus": 1}),
                 "invalid_sweep"),
                (StartProfile("sim-fast-chat", "node-0", 0, {"power_caps_w": [9000]}), "invalid_sweep"),
            ]
            for msg, code in cases:
                with pytest.raises(ClientError, match=code):
                    await call(cluster, msg)
            with pytest.raises(ClientError, match="unknown_profile_run"):
                await call(cluster, GetProfileRun("p-missing"))

    asyncio.run(scenario())


def test_a_run_interrupted_by_a_controller_restart_ends_failed_and_leaves_nothing_running(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1, utilization=0.05) as cluster:
            await call(cluster, ApplyCatalog("test", yaml.safe_dump(CATALOG)))
            slow = {**SWEEP, "requests_per_client": 20, "passes": 5}
            started = await call(cluster, StartProfile("sim-fast-chat", "node-0", 0, slow))
            node = cluster.controller.registry.nodes["node-0"]
            await wait_until(lambda: node.latest_telemetry()[0].power_limit_w == 350.0, timeout_s=10,
                             what="the run to reach its 350 W points")
            await cluster.restart_controller()
            status = await call(cluster, GetProfileRun(started.run_id))
            assert status.state == "failed" and "shut down" in status.message
            assert 0 < status.done_points < status.total_points
            assert all(ProfileSample.from_dict(s).run_id == started.run_id for s in status.samples)
            # Its clean-up restored the device's power limit before the old controller went away.
            def limit_w() -> float | None:
                node = cluster.controller.registry.nodes.get("node-0")
                telemetry = node.latest_telemetry() if node is not None else ()
                return telemetry[0].power_limit_w if telemetry else None

            await wait_until(lambda: limit_w() == 700.0, timeout_s=5, what="the default power limit back")
            agent = cluster.agents["node-0"]
            # The old controller stopped its component; if it had not, the new one's reconciler would (unplanned).
            await wait_until(lambda: all(r.state == "stopped" for r in agent.components.reports()
                                         if r.component_id.startswith("profile-")), timeout_s=10,
                             what="the profile component to stop")

    asyncio.run(scenario())


def test_murakkabctl_profile_and_profiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.cli.main import main

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"sweep": {"concurrency": [1, 2], "knobs": {"max_tokens": [128, 256]},
                                                    "requests_per_client": 2, "passes": 2, "power_caps_w": [None]}}))

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1, utilization=0.05) as cluster:
            await call(cluster, ApplyCatalog("test", yaml.safe_dump(CATALOG)))
            base = ["--controller", cluster.admin_address]
            code = await asyncio.to_thread(main, [*base, "profile", "sim-fast-chat", "--node", "node-0", "--device",
                                                  "0", "--sweep", str(sweep_file), "-o", "json"])
            run = json.loads(capsys.readouterr().out)
            assert code == 0 and run["state"] == "succeeded" and run["done_points"] == run["total_points"] == 8
            assert len(run["samples"]) == 4 and {s["concurrency"] for s in run["samples"]} == {1, 2}
            code = await asyncio.to_thread(main, [*base, "profiles", "--run", run["run_id"], "--fit", "-o", "json"])
            listed = json.loads(capsys.readouterr().out)
            assert code == 0 and listed["total"] == 4 and listed["fits"][0]["executor"] == "sim-fast-chat"
            code = await asyncio.to_thread(main, [*base, "profiles", "--executor", "sim-fast-chat"])
            table = capsys.readouterr().out
            assert code == 0 and table.count("sim-fast-chat") == 4 and "modeled" in table
            code = await asyncio.to_thread(main, [*base, "profile", "sim-fast-chat", "--node", "node-0", "--device",
                                                  "3"])
            assert code == 1 and "unknown_device" in capsys.readouterr().err

    asyncio.run(scenario())


def test_stored_measurements_are_listed_with_predictor_and_catalog_model_errors(tmp_path: Path) -> None:
    """Samples stored in the controller (here the real CPU profiles kept with the tests) are what
    predictors refit from at start-up; ``--fit`` reports their held-out error and how far the
    catalog's model is from the measurements."""
    data = Path(__file__).resolve().parents[1] / "data" / "profiles"
    measured = samples_from_jsonl((data / "cpu-tiny-llama.jsonl").read_text())

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1, utilization=0.05) as cluster:
            root = Path(__file__).resolve().parents[2]
            await call(cluster, ApplyCatalog("cpu.yaml", (root / "examples" / "catalog" / "cpu.yaml").read_text()))
            cluster.controller.profiler.store.add_samples(measured)
            listed = await call(cluster, ListProfiles(executor="tiny-llama-chat-cpu", fit=True), timeout_s=60)
            assert listed.total == len(measured) == len(listed.samples)
            (fit_,) = listed.fits
            assert (fit_.executor, fit_.hardware, fit_.source, fit_.samples) == \
                ("tiny-llama-chat-cpu", "cpu", "measured", len(measured))
            assert fit_.latency_mape is not None and fit_.latency_mape <= 0.10
            # The catalog's hint (expected_latency_s 0.5 s on a server-class CPU) is far from this 2-core VM.
            assert fit_.modeled_latency_mape is not None and fit_.modeled_latency_mape > 1.0
            restarted = await cluster.restart_controller()
            await restarted.profiler.refit_done()
            assert restarted.profiler.predictors.group("tiny-llama-chat-cpu", "cpu") is not None

    asyncio.run(scenario())
