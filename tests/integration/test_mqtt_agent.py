"""The agent's MQTT side against a real Mosquitto: telemetry, retained status and the last will, the broker's ACL,
and a broker restart that the ZeroMQ control path does not notice. Each test runs its ``_scenario`` coroutine
under ``asyncio.run``, as the other integration tests do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

import aiomqtt
import pytest

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.devices.sim import open_sim_devices
from common.mqtt.link import MqttLink
from common.mqtt.payloads import NodeStatus, NodeTelemetry, decode_json
from controller.cli.broker import acl_text
from tests.integration.cluster import FAST, agent_key_settings, in_process_cluster, wait_until
from tests.mqtt_broker import Broker, running_broker

pytestmark = pytest.mark.timeout(90)

NODE = "node-m"
OTHER = "node-x"
USERS = {"controller": "pw-controller", "facility": "pw-facility", NODE: "pw-node-m", OTHER: "pw-node-x"}
PREFIX = "murakkab/v1"


class Recorder:
    """A read-everything subscriber (the controller's rights) that keeps what it saw."""

    def __init__(self, broker: Broker, topic_filter: str = f"{PREFIX}/#") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.link = MqttLink(broker.settings("controller"), f"recorder-{time.monotonic_ns()}")
        self.link.subscribe(topic_filter, lambda topic, raw: self.messages.append((topic, raw)))
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Recorder:
        self.task = asyncio.create_task(self.link.run())
        await wait_until(lambda: self.link.connected, 10, "the recorder to connect")
        await asyncio.sleep(0.1)  # the subscription is acknowledged
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def on(self, topic: str) -> list[bytes]:
        return [raw for t, raw in self.messages if t == topic]


def _broker(tmp_path: Path):
    return running_broker(tmp_path, USERS, acl_text([NODE, OTHER], PREFIX))


@contextlib.asynccontextmanager
async def mqtt_agent(tmp_path: Path, cluster, broker: Broker):
    settings = AgentSettings(
        node_name=NODE, controller=cluster.controller.agent_endpoint, state_dir=tmp_path / NODE,
        heartbeat_interval_s=FAST["heartbeat_interval_s"], sample_interval_s=0.05, request_timeout_s=0.5,
        reconnect_base_s=0.05, reconnect_cap_s=0.5, metrics_enabled=False, engine_user="root",
        **agent_key_settings(cluster.keys, NODE))
    devices = open_sim_devices(node_name=NODE, model="h100", count=2, seed=7, utilization=0.5, ambient_c=25.0,
                               start_s=time.monotonic())
    agent = Agent(settings, devices, mqtt=broker.settings(NODE))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_until(lambda: (n := cluster.controller.registry.nodes.get(NODE)) is not None and n.state == "ready",
                         15, "the MQTT agent to be ready")
        yield agent
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)


def _topic(kind: str, node: str = NODE) -> str:
    return f"{PREFIX}/nodes/{node}/{kind}"


async def _scenario_agent_publishes_telemetry_and_retained_status_and_its_last_will_says_offline(tmp_path: Path) -> None:
    with _broker(tmp_path) as broker:
        async with in_process_cluster(tmp_path, nodes=0) as cluster, Recorder(broker) as live, \
                mqtt_agent(tmp_path, cluster, broker) as agent:
            await wait_until(lambda: len(live.on(_topic("telemetry"))) >= 3, 10, "telemetry messages")
            telemetry = decode_json(live.on(_topic("telemetry"))[-1], NodeTelemetry, 65536)
            assert telemetry.node == NODE and abs(telemetry.sent_at_unix_s - time.time()) < 10
            gpus = [d for d in telemetry.devices if d.kind == "gpu"]
            assert [d.index for d in gpus] == [0, 1]
            assert all(d.power_w is not None and d.power_w > 0 and d.energy_j is not None and d.temperature_c
                       and d.memory_used_bytes is not None for d in gpus)
            raw = json.loads(live.on(_topic("telemetry"))[-1])
            assert set(raw["devices"][0]) >= {"power_w", "energy_j", "temperature_c", "power_limit_w",
                                              "utilization_pct", "memory_used_bytes", "throttle_reasons"}
            status = decode_json(live.on(_topic("status"))[0], NodeStatus)
            assert (status.state, status.node) == ("online", NODE)

            # retained: a client subscribing later gets the status at once
            async with Recorder(broker, _topic("status")) as late:
                await wait_until(lambda: late.on(_topic("status")), 5, "the retained status")
                assert decode_json(late.on(_topic("status"))[0], NodeStatus).state == "online"

            # the agent's connection dies without a DISCONNECT: the broker publishes its last will
            agent.facility.link.abort()
            await wait_until(lambda: any(decode_json(r, NodeStatus).state == "offline"
                                         for r in live.on(_topic("status"))), 10, "the last will")
            # MQTT gone, the control path is not: the node is still ready
            await asyncio.sleep(0.5)
            assert cluster.controller.registry.nodes[NODE].state == "ready"
            async with Recorder(broker, _topic("status")) as late:
                await wait_until(lambda: late.on(_topic("status")), 5, "the retained will")
                assert decode_json(late.on(_topic("status"))[-1], NodeStatus).state == "offline"


async def _publish_as(broker: Broker, user: str, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port, username=user,
                              password=broker.password_files[user].read_text().strip(),
                              identifier=f"{user}-{time.monotonic_ns()}") as client:
        await client.publish(topic, payload, qos=1)


async def _scenario_acl_refuses_other_nodes_topics_facility_writing_node_topics_and_anonymous_clients(
        tmp_path: Path) -> None:
    with _broker(tmp_path) as broker:
        async with Recorder(broker) as live:
            # refused: a node publishing as another node, the facility writing node topics (QoS 1 is
            # acknowledged by MQTT 3.1.1 brokers and silently dropped, so the reader must never see them)
            await _publish_as(broker, NODE, _topic("telemetry", OTHER), b'{"forged":1}')
            await _publish_as(broker, NODE, _topic("status", OTHER), b'{"forged":2}')
            await _publish_as(broker, "facility", _topic("status", NODE), b'{"forged":3}')
            await _publish_as(broker, NODE, f"{PREFIX}/facility/grid", b'{"forged":4}')
            await _publish_as(broker, NODE, f"{PREFIX}/controller/events", b'{"forged":5}')
            # allowed (the control group): each on its own topics
            await _publish_as(broker, NODE, _topic("telemetry"), b'{"ok":1}')
            await _publish_as(broker, "facility", f"{PREFIX}/facility/grid", b'{"ok":2}')
            await _publish_as(broker, "controller", f"{PREFIX}/controller/events", b'{"ok":3}')
            await wait_until(lambda: len(live.messages) >= 3, 5, "the allowed messages")
            await asyncio.sleep(0.5)
            assert sorted(raw for _, raw in live.messages) == [b'{"ok":1}', b'{"ok":2}', b'{"ok":3}']

        # anonymous and wrong-password clients are refused at CONNECT
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, identifier="anonymous", timeout=5):
                pass
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, username=NODE, password="wrong", timeout=5):
                pass


async def _scenario_broker_restart_mid_run_control_goes_on_and_the_link_reconnects_saying_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="murakkab.mqtt")
    with _broker(tmp_path) as broker:
        async with in_process_cluster(tmp_path, nodes=0) as cluster, mqtt_agent(tmp_path, cluster, broker) as agent:
            link = agent.facility.link
            await wait_until(lambda: link.connected and link.published >= 3, 10, "telemetry published")
            broker.stop()
            await wait_until(lambda: not link.connected, 10, "the link to notice")
            acks = agent.metrics.heartbeats.labels("ok")._value.get()
            await asyncio.sleep(2.0)  # the link retries (cap 0.5 s) while the agent heartbeats over ZeroMQ
            assert agent.metrics.heartbeats.labels("ok")._value.get() >= acks + 10
            assert cluster.controller.registry.nodes[NODE].state == "ready"
            mine = [r for r in caplog.records if r.name == "murakkab.mqtt" and f":{broker.port}" in r.getMessage()]
            assert sum("broker unreachable" in r.getMessage() for r in mine) == 1

            broker.start()
            async with Recorder(broker) as live:
                await wait_until(lambda: live.on(_topic("telemetry")), 10, "telemetry after the restart")
                # the reconnect published the retained status again
                assert decode_json(live.on(_topic("status"))[-1], NodeStatus).state == "online"
            mine = [r for r in caplog.records if r.name == "murakkab.mqtt" and f":{broker.port}" in r.getMessage()]
            assert sum("broker unreachable" in r.getMessage() for r in mine) == 1
            assert sum("again" in r.getMessage() for r in mine) == 1
            assert link.connects == 2
            assert cluster.controller.registry.nodes[NODE].state == "ready"


def test_agent_publishes_telemetry_and_retained_status_and_its_last_will_says_offline(tmp_path: Path) -> None:
    asyncio.run(_scenario_agent_publishes_telemetry_and_retained_status_and_its_last_will_says_offline(tmp_path))


def test_acl_refuses_other_nodes_topics_facility_writing_node_topics_and_anonymous_clients(tmp_path: Path) -> None:
    asyncio.run(_scenario_acl_refuses_other_nodes_topics_facility_writing_node_topics_and_anonymous_clients(tmp_path))


def test_broker_restart_mid_run_control_goes_on_and_the_link_reconnects_saying_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(_scenario_broker_restart_mid_run_control_goes_on_and_the_link_reconnects_saying_so_once(tmp_path, caplog))
