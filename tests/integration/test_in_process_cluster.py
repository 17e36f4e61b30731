"""Controller and agents with simulated GPUs in one process, over real loopback ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from common.protocol import (
    ErrorReply, GetNode, Heartbeat, HostTelemetry, ListNodes, ReregisterRequired, SetNodePowerLimit, SetPowerLimit,
    decode, encode,
)
from common.transport import RemoteError
from controller.cli.client import AdminClient, ClientError
from tests.keys import curve_dealer
from tests.integration.cluster import in_process_cluster, wait_until

TELEMETRY_FIELDS = ("power_w", "energy_j", "temperature_c", "memory_used_bytes", "memory_total_bytes",
                    "utilization_pct", "sm_clock_mhz", "power_limit_w", "throttle_reasons")


def admin_call(address: str, msg, timeout_s: float = 5.0):
    with AdminClient(address, timeout_s) as client:
        return client.call(msg)


def test_telemetry_flows_from_every_sim_gpu_to_the_controller(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=3, gpus=2) as cluster:
            await asyncio.sleep(0.5)
            nodes = (await asyncio.to_thread(admin_call, cluster.admin_address, ListNodes())).nodes
            assert [n.name for n in nodes] == ["node-0", "node-1", "node-2"]
            for node in nodes:
                assert node.state == "ready"
                assert [d.index for d in node.devices] == [0, 1]
                assert all(d.simulated and d.backend == "sim" for d in node.devices)
                assert len(node.telemetry) == 2
                for sample in node.telemetry:
                    for name in TELEMETRY_FIELDS:
                        assert getattr(sample, name) is not None, name
                    assert sample.power_w > 300  # full simulated load on an H100
                    assert sample.energy_j > 0
                assert node.host is not None and node.host.memory_total_bytes > 0
            # History accumulates in the controller's ring buffers, energy only grows.
            ring = cluster.controller.registry.nodes["node-0"].history[0]
            energies = [s.energy_j for _, s in ring]
            assert len(energies) >= 3 and energies == sorted(energies)

    asyncio.run(scenario())


def test_power_limit_reaches_the_sim_gpu_and_power_and_temperature_respond(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=1.0) as cluster:
            registry = cluster.controller.registry
            await asyncio.sleep(1.0)
            before = registry.nodes["node-0"].latest_telemetry()[0]
            assert before.power_limit_w == 700.0 and before.power_w > 400
            result = await asyncio.to_thread(admin_call, cluster.admin_address, SetNodePowerLimit("node-0", 0, 250.0))
            assert result.ok and result.applied_power_limit_w == 250.0
            t_cap = time.monotonic()
            await wait_until(lambda: registry.nodes["node-0"].latest_telemetry()[0].power_limit_w == 250.0,
                             what="new limit in telemetry")
            await asyncio.sleep(2.0)
            after = registry.nodes["node-0"].latest_telemetry()
            assert after[0].power_w <= 250.0 * 1.03
            assert after[0].sm_clock_mhz < before.sm_clock_mhz
            assert "sw_power_cap" in after[0].throttle_reasons
            assert after[0].temperature_c < before.temperature_c - 0.5, (before, after[0], time.monotonic() - t_cap)
            # Side by side with its uncapped twin under the same load: cooler, slower, lower power.
            assert after[1].power_limit_w == 700.0 and after[1].power_w > 600
            assert after[0].temperature_c < after[1].temperature_c - 0.5
            assert after[0].sm_clock_mhz < after[1].sm_clock_mhz

    asyncio.run(scenario())


def test_node_list_pages_in_name_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=3, gpus=1) as cluster:
            first = await asyncio.to_thread(admin_call, cluster.admin_address, ListNodes(limit=2))
            assert [n.name for n in first.nodes] == ["node-0", "node-1"] and first.next_after == "node-1"
            last = await asyncio.to_thread(admin_call, cluster.admin_address, ListNodes(after="node-1", limit=2))
            assert [n.name for n in last.nodes] == ["node-2"] and last.next_after is None
            with AdminClient(cluster.admin_address) as client:
                everything = await asyncio.to_thread(client.list_nodes, 1)
            assert [n.name for n in everything] == ["node-0", "node-1", "node-2"]
            with pytest.raises(ClientError, match="invalid_argument"):
                await asyncio.to_thread(admin_call, cluster.admin_address, ListNodes(limit=100_000))

    asyncio.run(scenario())


def test_admin_errors_are_explicit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            address = cluster.admin_address
            cases = [
                (GetNode("nope"), "unknown_node"),
                (SetNodePowerLimit("nope", 0, 300.0), "unknown_node"),
                (SetNodePowerLimit("node-0", 7, 300.0), "unknown_device"),
                (SetNodePowerLimit("node-0", 0, 5000.0), "out_of_range"),
            ]
            for msg, code in cases:
                with pytest.raises(ClientError, match=code):
                    await asyncio.to_thread(admin_call, address, msg)

    asyncio.run(scenario())


def test_stale_commands_are_refused_by_the_agent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            controller = cluster.controller
            agent = cluster.agents["node-0"]
            peer = b"node-0"
            stale_epoch = SetPowerLimit("c1", controller.epoch - 1, agent.generation, 0, 300.0)
            stale_generation = SetPowerLimit("c2", controller.epoch, agent.generation - 1, 0, 300.0)
            for command in (stale_epoch, stale_generation):
                with pytest.raises(RemoteError) as err:
                    await controller.agents.request(command, peer=peer, timeout_s=2)
                assert err.value.code == "stale_command"
            assert agent.devices[0].sample(time.monotonic()).power_limit_w == 700.0
            fresh = SetPowerLimit("c3", controller.epoch, agent.generation, 0, 300.0)
            first = await controller.agents.request(fresh, peer=peer, timeout_s=2)
            again = await controller.agents.request(fresh, peer=peer, timeout_s=2)
            assert first.ok and again == first  # a repeated command id replays its result

    asyncio.run(scenario())


def test_heartbeat_from_unknown_node_gets_reregister_reply(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            ctx = zmq.asyncio.Context()
            assert cluster.keys is not None
            cluster.keys.add_node("stranger")  # enrolled, but never registered
            assert cluster.controller.auth is not None and cluster.controller.auth.reload_if_changed()
            sock = curve_dealer(ctx, cluster.controller.agent_endpoint, b"stranger", cluster.keys.node("stranger"))
            beat = Heartbeat(node_name="stranger", generation=1, seq=1, sent_at_unix_s=time.time(), devices=(),
                             host=HostTelemetry(cpu_utilization_pct=0.0, memory_used_bytes=0, memory_total_bytes=1,
                                                load_avg_1m=0.0))
            await sock.send(encode(beat, 11))
            reply = decode(await asyncio.wait_for(sock.recv(), 3))
            assert reply.request_id == 11 and isinstance(reply.message, ReregisterRequired)
            # Claiming another node's name through a different socket identity is refused.
            await sock.send(encode(Heartbeat(**{**beat.__dict__, "node_name": "node-0"}), 12))
            reply = decode(await asyncio.wait_for(sock.recv(), 3))
            assert isinstance(reply.message, ErrorReply) and reply.message.code == "identity_mismatch"
            sock.close(0)
            ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_metrics_use_dcgm_names_with_node_and_gpu_labels(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2) as cluster:
            url = f"http://127.0.0.1:{cluster.controller.metrics_port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            for name in ("DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_FB_USED",
                         "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_GPU_UTIL"):
                assert f'{name}{{UUID="' in text or f"{name}{{" in text, name
            assert 'node="node-0"' in text and 'gpu="1"' in text and 'simulated="true"' in text
            assert "murakkab_heartbeats_total" in text

    asyncio.run(scenario())


def test_unreachable_controller_is_a_one_line_error_within_the_timeout() -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "controller.cli.main", "--controller", "tcp://127.0.0.1:9", "--insecure",
                           "--timeout", "1", "nodes"], capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tcp://127.0.0.1:9" in lines[0] and "cannot reach" in lines[0]
    assert elapsed < 10  # interpreter start-up plus the 1 s timeout


def test_agent_serves_its_own_device_metrics(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2) as cluster:
            agent = cluster.agents["node-0"]
            url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            assert "DCGM_FI_DEV_POWER_USAGE{" in text and 'gpu="1"' in text
            assert 'murakkab_agent_heartbeats_total{result="ok"}' in text

    asyncio.run(scenario())
