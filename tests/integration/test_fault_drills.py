"""Fault drills, power budgets and pins on an in-process cluster over loopback ZeroMQ.

The drills go the whole way: admin request, controller checks, agent command, the simulated GPU's physics,
the telemetry the controller then reports. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.devices.base import Device
from agent.devices.cpu import CpuDevice
from agent.devices.sim import SimGpu
from common.protocol import (
    DeviceFaultDrill, DeviceInfo, DeviceTelemetry, FaultDrillResult, GetNode, GetPowerBudget,
    InjectDeviceFault, LabelNode, ListEvents, PinnedPowerLimit, SetNodePowerLimit, SetPowerBudget, UnpinPowerLimit,
)
from common.transport import RemoteError
from controller.cli.client import AdminClient, ClientError
from controller.cli.main import main
from tests.integration.cluster import FAST, InProcessCluster, agent_key_settings, in_process_cluster, wait_until

REAL_GPU_MODEL = "NVIDIA H100 80GB HBM3"


def admin_call(address: str, msg: Any, timeout_s: float = 10.0) -> Any:
    with AdminClient(address, timeout_s) as client:
        return client.call(msg)


async def call(cluster: InProcessCluster, msg: Any) -> Any:
    return await asyncio.to_thread(admin_call, cluster.admin_address, msg)


async def refused(cluster: InProcessCluster, msg: Any, code: str) -> str:
    """The one-line error the CLI would print for ``msg``; fails unless the controller refused with ``code``."""
    with pytest.raises(ClientError) as err:
        await call(cluster, msg)
    assert str(err.value).startswith(f"{code}: "), str(err.value)
    return str(err.value)


def gpu(cluster: InProcessCluster, node: str, index: int) -> SimGpu:
    device = cluster.agents[node].devices[index]
    assert isinstance(device, SimGpu)
    return device


def telemetry(cluster: InProcessCluster, node: str, index: int) -> DeviceTelemetry:
    """What the controller last heard about a device (what ``node show`` prints)."""
    return next(t for t in cluster.controller.registry.nodes[node].latest_telemetry() if t.index == index)


class FakeRealGpu(Device):
    """Stands in for an NVML GPU: not a SimGpu, so no drill may touch it."""

    def __init__(self, index: int) -> None:
        self.info = DeviceInfo(index=index, kind="gpu", model=REAL_GPU_MODEL, uuid=f"GPU-fake-{index}",
                               backend="nvml", simulated=False, memory_total_bytes=80 << 30,
                               power_limit_min_w=200.0, power_limit_max_w=700.0, power_limit_default_w=700.0)
        self.power_limit_w = 700.0

    def sample(self, now_s: float) -> DeviceTelemetry:
        return DeviceTelemetry(index=self.info.index, power_w=120.0, energy_j=0.0, temperature_c=40.0,
                               memory_used_bytes=0, memory_total_bytes=self.info.memory_total_bytes,
                               utilization_pct=0.0, sm_clock_mhz=1980, power_limit_w=self.power_limit_w)

    def set_power_limit(self, power_limit_w: float) -> float:
        self.power_limit_w = power_limit_w
        return power_limit_w


@asynccontextmanager
async def real_hardware_agent(cluster: InProcessCluster, tmp_path: Path) -> AsyncIterator[Agent]:
    """One more agent, ``real-0``, with a (fake) real GPU and the host CPU, registered and ready."""
    settings = AgentSettings(
        node_name="real-0", controller=cluster.controller.agent_endpoint, state_dir=tmp_path / "real-0",
        heartbeat_interval_s=FAST["heartbeat_interval_s"], sample_interval_s=0.05, request_timeout_s=0.5,
        reconnect_base_s=0.05, reconnect_cap_s=0.5, metrics_enabled=False,
        **agent_key_settings(cluster.keys, "real-0"))
    cpu = CpuDevice(1, tdp_w=100.0, idle_w=10.0, start_s=time.monotonic(), utilization_reader=lambda: 5.0,
                    node_name="real-0")
    ctx = zmq.Context()
    agent = Agent(settings, [FakeRealGpu(0), cpu], ctx=ctx)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        nodes = cluster.controller.registry.nodes
        await wait_until(lambda: "real-0" in nodes and nodes["real-0"].state == "ready", what="real-0 ready")
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


def test_cooling_failure_heats_and_throttles_the_sim_gpu_and_clear_cools_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2, utilization=1.0) as cluster:
            drilled = gpu(cluster, "node-0", 0)
            # Start it near its throttle point (87 C) so the drill takes seconds, not the half minute an H100 at
            # 65 C needs; without the fault it would cool back towards 65 C, like its twin, device 1.
            drilled.advance(time.monotonic())
            drilled.temperature_c = 84.0
            reply = await call(cluster, InjectDeviceFault("node-0", 0, "cooling-failure"))
            assert isinstance(reply, FaultDrillResult) and (reply.name, reply.fault, reply.xid) == (
                "node-0", "cooling-failure", None)
            assert reply.message.startswith("device 0 on node-0: cooling failure injected")
            await wait_until(lambda: telemetry(cluster, "node-0", 0).temperature_c > 85.5
                             and "sw_thermal_slowdown" in telemetry(cluster, "node-0", 0).throttle_reasons,
                             timeout_s=30, what="the drilled GPU to heat up and throttle")
            node = (await call(cluster, GetNode("node-0"))).node
            hot, twin = sorted(node.telemetry, key=lambda t: t.index)
            assert "sw_thermal_slowdown" in hot.throttle_reasons and hot.health == "ok"
            assert twin.temperature_c < 70 and not set(twin.throttle_reasons) & {"sw_thermal_slowdown",
                                                                                 "hw_thermal_slowdown"}
            assert hot.sm_clock_mhz < twin.sm_clock_mhz  # the throttle slows it

            peak_c = telemetry(cluster, "node-0", 0).temperature_c
            cleared = await call(cluster, InjectDeviceFault("node-0", 0, "clear"))
            assert cleared.message == "device 0 on node-0: cooling restored"
            await wait_until(lambda: telemetry(cluster, "node-0", 0).temperature_c < peak_c - 1.0
                             and "sw_thermal_slowdown" not in telemetry(cluster, "node-0", 0).throttle_reasons,
                             timeout_s=30, what="the GPU to cool and stop throttling")
            again = await call(cluster, InjectDeviceFault("node-0", 0, "clear"))
            assert again.message == "device 0 on node-0: no cooling failure was active"

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_xid_and_fall_off_bus_show_in_health_and_clear_says_what_stays(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2) as cluster:
            address = cluster.admin_address
            code = await asyncio.to_thread(main, ["--controller", address, "node", "fault", "node-0", "1", "xid"])
            assert code == 0
            assert capsys.readouterr().out == ("device 1 on node-0: Xid 48 injected; health is xid (the GPU keeps "
                                               "working) until the agent restarts\n")
            await wait_until(lambda: telemetry(cluster, "node-0", 1).health == "xid", what="xid in telemetry")
            assert telemetry(cluster, "node-0", 1).last_xid == 48
            reply = await call(cluster, InjectDeviceFault("node-0", 1, "xid", 13))
            assert reply.xid == 13
            await wait_until(lambda: telemetry(cluster, "node-0", 1).last_xid == 13, what="the second Xid")
            cleared = await call(cluster, InjectDeviceFault("node-0", 1, "clear"))
            assert cleared.message.endswith("health stays xid (Xid 13) until the agent restarts")

            gone = await call(cluster, InjectDeviceFault("node-0", 1, "fall-off-bus"))
            assert "fell off the bus (Xid 79)" in gone.message
            await wait_until(lambda: telemetry(cluster, "node-0", 1).health == "lost", what="lost in telemetry")
            lost = telemetry(cluster, "node-0", 1)
            assert lost.last_xid == 79 and lost.temperature_c is None and lost.power_w == 0.0
            cleared = await call(cluster, InjectDeviceFault("node-0", 1, "clear"))
            assert "stays fallen off the bus" in cleared.message
            assert telemetry(cluster, "node-0", 1).health == "lost"
            await refused(cluster, InjectDeviceFault("node-0", 1, "xid"), "device_lost")
            assert telemetry(cluster, "node-0", 0).health == "ok"  # its neighbour is untouched

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_drills_are_refused_with_explicit_errors(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            sim = gpu(cluster, "node-0", 0)
            resistance = sim.thermal_resistance_k_per_w
            assert "known: node-0" in await refused(cluster, InjectDeviceFault("nope", 0, "xid"), "unknown_node")
            assert "(devices: 0)" in await refused(cluster, InjectDeviceFault("node-0", 5, "xid"), "unknown_device")
            text = await refused(cluster, InjectDeviceFault("node-0", 0, "melt"), "invalid_argument")
            assert "cooling-failure, xid, fall-off-bus, clear" in text
            await refused(cluster, InjectDeviceFault("node-0", 0, "clear", 13), "invalid_argument")
            await refused(cluster, InjectDeviceFault("node-0", 0, "xid", 5000), "invalid_argument")

            async with real_hardware_agent(cluster, tmp_path) as agent:
                text = await refused(cluster, InjectDeviceFault("real-0", 0, "cooling-failure"), "unsupported")
                assert text == (f"unsupported: device 0 on real-0 is {REAL_GPU_MODEL} (real hardware); "
                                "fault drills drive simulated GPUs only")
                text = await refused(cluster, InjectDeviceFault("real-0", 1, "xid"), "unsupported")
                assert "(the host CPU); fault drills drive simulated GPUs only" in text
                # The agent checks for itself, whatever a controller believes about its devices.
                controller = cluster.controller
                for index, what in ((0, "(real hardware)"), (1, "(the host CPU)")):
                    command = DeviceFaultDrill(f"drill-{index}", controller.epoch, agent.generation, index, "xid", 48)
                    with pytest.raises(RemoteError) as err:
                        await controller.agents.request(command, peer=b"real-0", timeout_s=5)
                    assert err.value.code == "unsupported" and what in err.value.message
                assert agent.devices[0].sample(time.monotonic()).health == "ok"

                record = cluster.controller.registry.nodes["real-0"]
            # real-0 has stopped heartbeating: no commands for it until it is ready again.
            await wait_until(lambda: record.state != "ready", timeout_s=10, what="real-0 to leave ready")
            await refused(cluster, InjectDeviceFault("real-0", 0, "xid"), "node_not_ready")

            agent = cluster.agents["node-0"]
            controller = cluster.controller
            for epoch, generation in ((controller.epoch - 1, agent.generation),
                                      (controller.epoch, agent.generation - 1)):
                stale = DeviceFaultDrill(f"stale-{epoch}-{generation}", epoch, generation, 0, "cooling-failure")
                with pytest.raises(RemoteError) as err:
                    await controller.agents.request(stale, peer=b"node-0", timeout_s=5)
                assert err.value.code == "stale_command"
            assert sim.thermal_resistance_k_per_w == resistance  # nothing refused reached the GPU

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_budgets_pins_and_events_through_the_admin_api(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=2) as cluster:
            assert getattr(cluster.controller.workloads, "autopilot", None) is not None  # the default planner runs one
            view = (await call(cluster, SetPowerBudget(None, 5000.0))).view
            cluster_budget = next(b for b in view["budgets"] if b["scope"] == "cluster")
            assert cluster_budget["power_budget_w"] == 5000.0 and cluster_budget["rack"] is None
            await refused(cluster, SetPowerBudget("r1", 2000.0), "invalid_budget")  # no node is in rack r1 yet
            with pytest.raises(ClientError, match="invalid_argument"):
                await call(cluster, SetPowerBudget(None, -5.0))

            await call(cluster, LabelNode("node-1", {"rack": "r1"}))

            async def rack_budget() -> dict[str, Any]:
                deadline = time.monotonic() + 10
                while True:  # the autopilot learns racks from the fleet it observes, within a tick or two
                    try:
                        return (await call(cluster, SetPowerBudget("r1", 2000.0))).view
                    except ClientError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)

            view = await rack_budget()
            assert any(b["scope"] == "rack" and b["rack"] == "r1" and b["power_budget_w"] == 2000.0
                       for b in view["budgets"])
            shown = (await call(cluster, GetPowerBudget())).view
            assert {(b["scope"], b["rack"]) for b in shown["budgets"]} == {("cluster", None), ("rack", "r1")}

            result = await call(cluster, SetNodePowerLimit("node-0", 1, 300.0))
            assert result.ok and result.applied_power_limit_w == 300.0 and "pinned" in result.message
            node = (await call(cluster, GetNode("node-0"))).node
            assert node.pinned_power_limits == (PinnedPowerLimit(1, 300.0),)
            assert (await call(cluster, GetNode("node-1"))).node.pinned_power_limits == ()
            pins = (await call(cluster, GetPowerBudget())).view["pins"]
            assert pins == [{"node": "node-0", "device": 1, "power_limit_w": 300.0}]

            unpinned = await call(cluster, UnpinPowerLimit("node-0", 1))
            assert unpinned.previous_power_limit_w == 300.0 and "unpinned (was 300 W)" in unpinned.message
            assert (await call(cluster, GetNode("node-0"))).node.pinned_power_limits == ()
            await refused(cluster, UnpinPowerLimit("node-0", 1), "not_pinned")

            cleared = (await call(cluster, SetPowerBudget(None, None))).view
            assert [b["rack"] for b in cleared["budgets"]] == ["r1"]

            events = (await call(cluster, ListEvents(100))).events
            assert events and all({"seq", "at_unix_s", "kind", "subject", "reason", "details"} <= e.keys()
                                  for e in events)
            assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)  # newest last
            assert any(e["subject"] == "cluster" for e in events)
            assert any("node-0" in e["subject"] for e in events)
            assert len((await call(cluster, ListEvents(1))).events) == 1
            await refused(cluster, ListEvents(0), "invalid_argument")

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_without_an_autopilot_limits_are_set_unpinned_and_budgets_are_unavailable(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1,
                                      controller_settings={"planner": "first-fit"}) as cluster:
            assert getattr(cluster.controller.workloads, "autopilot", None) is None
            result = await call(cluster, SetNodePowerLimit("node-0", 0, 300.0))
            assert result.ok and result.message == "device 0 power limit set to 300 W"
            assert (await call(cluster, GetNode("node-0"))).node.pinned_power_limits == ()
            for msg in (GetPowerBudget(), SetPowerBudget(None, 100.0), ListEvents(10), UnpinPowerLimit("node-0", 0)):
                assert "no power autopilot" in await refused(cluster, msg, "unavailable")

    asyncio.run(asyncio.wait_for(scenario(), 60))

