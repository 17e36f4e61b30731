"""Facility signals over a real Mosquitto (issue 15): the controller's MQTT shell in the in-process cluster.

Rack budgets (retained, applied at start; a cut followed by the caps within 15 s), bad payloads counted and ignored,
autopilot events on the events topic, and the broker stopped and restarted under a running controller. Skipped
when mosquitto is not installed, unless MURAKKAB_REQUIRE_MQTT=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
    if os.environ.get("MURAKKAB_REQUIRE_MQTT") == "1":
        raise RuntimeError("MURAKKAB_REQUIRE_MQTT=1 but mosquitto is not installed (apt-get install mosquitto)")
    pytest.skip("mosquitto is not installed (apt-get install mosquitto); MURAKKAB_REQUIRE_MQTT=1 makes this fail",
                allow_module_level=True)

try:  # the shared MQTT layer (common.mqtt's link and settings, the test broker) and its client library
    import aiomqtt
    from common.mqtt.settings import MqttSettings
    from tests.mqtt_broker import running_broker
except ImportError as exc:
    if os.environ.get("MURAKKAB_REQUIRE_MQTT") == "1":
        raise
    pytest.skip(f"the MQTT layer is not importable ({exc}); MURAKKAB_REQUIRE_MQTT=1 makes this fail",
                allow_module_level=True)

from common.protocol import GetPowerBudget, ListNodes  # noqa: E402
from tests.integration.cluster import InProcessCluster, in_process_cluster, wait_until  # noqa: E402
from tests.integration.test_workflow_jobs import call  # noqa: E402

PREFIX = "murakkab/v1"
USERS = {"controller": "controller-secret", "facility": "facility-secret", "reader": "reader-secret"}
ACL = f"""
user controller
topic read {PREFIX}/#
topic write {PREFIX}/controller/#

user facility
topic write {PREFIX}/facility/#

user reader
topic read {PREFIX}/#
"""
RACKS = {"node-0": {"rack": "r1"}, "node-1": {"rack": "r2"}}


def budget_topic(rack: str) -> str:
    return f"{PREFIX}/facility/racks/{rack}/power_budget_w"


def mqtt_settings(broker: Any) -> MqttSettings:
    return MqttSettings(enabled=True, host=broker.host, port=broker.port, username="controller",
                        password_file=broker.password_files["controller"], reconnect_base_s=0.1, reconnect_cap_s=1.0)


async def publish(broker: Any, topic: str, payload: bytes, *, retain: bool = False, user: str = "facility") -> None:
    async with aiomqtt.Client(broker.host, broker.port, username=user, password=USERS[user]) as client:
        await client.publish(topic, payload, qos=1, retain=retain)


@asynccontextmanager
async def subscribed(broker: Any, topic_filter: str) -> AsyncIterator[list[tuple[str, bytes]]]:
    """Messages on ``topic_filter`` as the read-all user sees them, while the block runs."""
    got: list[tuple[str, bytes]] = []
    ready = asyncio.Event()

    async def listen() -> None:
        async with aiomqtt.Client(broker.host, broker.port, username="reader", password=USERS["reader"]) as client:
            await client.subscribe(topic_filter, qos=1)
            ready.set()
            async for message in client.messages:
                got.append((str(message.topic), bytes(message.payload)))

    task = asyncio.create_task(listen())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield got
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def facility_count(cluster: InProcessCluster, kind: str, result: str) -> float:
    value = cluster.controller.metrics_registry.get_sample_value(
        "murakkab_facility_messages_total", {"topic_kind": kind, "result": result})
    return value or 0.0


def ignored(cluster: InProcessCluster, kind: str) -> float:
    """Messages of ``kind`` counted as anything but applied, held or unchanged (a retained one re-sent)."""
    total = 0.0
    for metric in cluster.controller.metrics_registry.collect():
        if metric.name != "murakkab_facility_messages":
            continue
        for sample in metric.samples:
            if (sample.name.endswith("_total") and sample.labels.get("topic_kind") == kind
                    and sample.labels.get("result") not in ("applied", "held", "unchanged")):
                total += sample.value
    return total


def rack_budget(cluster: InProcessCluster, rack: str) -> dict[str, Any] | None:
    view = cluster.controller.workloads.autopilot.budget_view()
    return next((b for b in view["budgets"] if b.get("rack") == rack), None)


def rack_power_w(cluster: InProcessCluster, rack: str) -> float:
    return sum(t.power_w for node in cluster.controller.registry.nodes.values() if node.labels.get("rack") == rack
               for t in node.latest_telemetry())


def test_a_retained_budget_applies_at_start_and_a_cut_is_followed_by_the_caps(tmp_path: Path) -> None:
    async def scenario() -> None:
        with running_broker(tmp_path / "broker", USERS, ACL) as broker:
            # published before the controller exists: it arrives on subscribe, before any node of r1 registered
            await publish(broker, budget_topic("r1"), json.dumps({"power_budget_w": 5000.0}).encode(), retain=True)
            async with in_process_cluster(tmp_path, nodes=2, gpus=2, utilization=1.0, mqtt=mqtt_settings(broker),
                                          node_labels=RACKS) as cluster:
                await wait_until(lambda: (rack_budget(cluster, "r1") or {}).get("power_budget_w") == 5000.0,
                                 timeout_s=10, what="the retained budget of r1 applied")
                assert "facility" in str(rack_budget(cluster, "r1")["source"])
                assert rack_budget(cluster, "r2") is None

                await wait_until(lambda: rack_power_w(cluster, "r1") > 1200.0, timeout_s=10,
                                 what="r1's two GPUs at full power")
                async with subscribed(broker, f"{PREFIX}/controller/events") as events:
                    budget_w = 900.0
                    await publish(broker, budget_topic("r1"), json.dumps({"power_budget_w": budget_w}).encode(),
                                  retain=True)
                    started = time.monotonic()
                    await wait_until(lambda: rack_power_w(cluster, "r1") <= budget_w, timeout_s=15,
                                     what="r1's measured GPU power under its budget")
                    assert time.monotonic() - started < 15.0
                    assert rack_budget(cluster, "r1")["power_budget_w"] == budget_w
                    assert rack_power_w(cluster, "r2") > 1200.0  # the other rack is not capped
                    await wait_until(lambda: any(json.loads(p)["kind"] == "budget" for _, p in events),
                                     timeout_s=10, what="the budget reaction on the events topic")
                decoded = [json.loads(p) for _, p in events]
                budget_set = [e for e in decoded if e["kind"] == "budget-set" and e["subject"] == "rack r1"]
                assert budget_set and "facility" in budget_set[0]["reason"] and "900 W" in budget_set[0]["reason"]
                assert all({"seq", "at_unix_s", "kind", "subject", "reason", "details", "epoch"} <= set(e)
                           for e in decoded)
                # the same events murakkabctl events lists
                listed = {e["seq"] for e in cluster.controller.workloads.autopilot.events(1000)}
                assert {e["seq"] for e in decoded} <= listed

                # a zero-length retained message (the retained budget deleted) clears the rack's budget
                await publish(broker, budget_topic("r1"), b"", retain=True)
                await wait_until(lambda: rack_budget(cluster, "r1") is None, timeout_s=10, what="r1's budget cleared")

    asyncio.run(scenario())


def test_bad_payloads_are_counted_and_ignored_and_the_controller_keeps_serving(tmp_path: Path) -> None:
    bad_budgets = [
        (budget_topic("r1"), b"not json at all"),
        (budget_topic("r1"), b'{"watts": 500}'),  # wrong schema
        (budget_topic("r1"), b'{"power_budget_w": 500, "extra": 1}'),  # unknown field
        (budget_topic("r1"), b'{"power_budget_w": "500"}'),  # a string, not a number
        (budget_topic("r1"), b'{"power_budget_w": -500}'),  # negative watts
        (budget_topic("r1"), b'{"power_budget_w": 2e9}'),  # over 1e9 W
        (budget_topic("r1"), b'{"power_budget_w": 500' + b" " * 20_000 + b"}"),  # too large
        (budget_topic("bad rack!"), b'{"power_budget_w": 500}'),  # rack name characters
        (budget_topic("r\u00e4ck"), b'{"power_budget_w": 500}'),
    ]
    bad_cooling = [(f"{PREFIX}/facility/racks/r1/cooling", b'{"state": "on fire"}'),
                   (f"{PREFIX}/facility/racks/r1/cooling", b'{"state": "failed", "inlet_c": 1000}')]
    bad_grid = [(f"{PREFIX}/facility/grid", b'{"price_usd_per_mwh": "cheap", "carbon_g_per_kwh": 300}'),
                (f"{PREFIX}/facility/grid", b'{"price_usd_per_mwh": -5, "carbon_g_per_kwh": 300}'),
                (f"{PREFIX}/facility/grid", b"[1, 2]")]

    async def scenario() -> None:
        with running_broker(tmp_path / "broker", USERS, ACL) as broker:
            async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0, mqtt=mqtt_settings(broker),
                                          node_labels=RACKS) as cluster:
                await wait_until(lambda: cluster.controller.facility.link.connected, timeout_s=10,
                                 what="the controller connected to the broker")
                async with aiomqtt.Client(broker.host, broker.port, username="facility",
                                          password=USERS["facility"]) as client:
                    for topic, payload in bad_budgets + bad_cooling + bad_grid:
                        await client.publish(topic, payload, qos=1)
                await wait_until(lambda: (ignored(cluster, "power_budget"), ignored(cluster, "cooling"),
                                          ignored(cluster, "grid")) == (len(bad_budgets), len(bad_cooling),
                                                                        len(bad_grid)),
                                 timeout_s=10, what="every bad message counted")
                assert facility_count(cluster, "power_budget", "applied") == 0
                assert rack_budget(cluster, "r1") is None
                # the controller keeps serving, and the subscription still takes good messages
                assert {n.name for n in (await call(cluster, ListNodes())).nodes} == {"node-0", "node-1"}
                await call(cluster, GetPowerBudget())
                async with aiomqtt.Client(broker.host, broker.port, username="facility",
                                          password=USERS["facility"]) as client:
                    await client.publish(budget_topic("r1"), b'{"power_budget_w": 800}', qos=1)
                    await client.publish(f"{PREFIX}/facility/racks/r2/cooling",
                                         b'{"state": "degraded", "inlet_c": 35.5}', qos=1)
                    await client.publish(f"{PREFIX}/facility/grid",
                                         b'{"price_usd_per_mwh": 42.5, "carbon_g_per_kwh": 210}', qos=1)
                await wait_until(lambda: (rack_budget(cluster, "r1") or {}).get("power_budget_w") == 800.0,
                                 timeout_s=10, what="the good budget applied")
                await wait_until(lambda: facility_count(cluster, "cooling", "applied") == 1
                                 and facility_count(cluster, "grid", "applied") == 1, timeout_s=10,
                                 what="the good cooling and grid messages applied")
                cooling = cluster.controller.workloads.autopilot.budget_view().get("cooling") or []
                assert [(c["rack"], c["state"]) for c in cooling] == [("r2", "degraded")]
                assert all(cluster.controller.registry.nodes[n].state == "ready" for n in ("node-0", "node-1"))

    asyncio.run(scenario())


def test_the_broker_going_away_changes_nothing_for_the_control_plane_and_a_restart_resubscribes(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        with running_broker(tmp_path / "broker", USERS, ACL) as broker:
            async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0, mqtt=mqtt_settings(broker),
                                          node_labels=RACKS) as cluster:
                link = cluster.controller.facility.link
                await wait_until(lambda: link.connected, timeout_s=10, what="the controller connected")
                broker.stop()
                await wait_until(lambda: not link.connected, timeout_s=10, what="the link to notice")
                started = time.monotonic()
                for _ in range(5):  # admin requests answered as before, without waiting on MQTT
                    assert len((await call(cluster, ListNodes())).nodes) == 2
                    await asyncio.sleep(0.3)
                assert time.monotonic() - started < 5.0
                assert all(cluster.controller.registry.nodes[n].state == "ready" for n in ("node-0", "node-1"))
                # a budget set by the operator still takes effect, and its events are only not published
                assert cluster.controller.workloads.autopilot.set_budget("r2", 3000.0) is None

                broker.start()
                await wait_until(lambda: link.connected, timeout_s=15, what="the link reconnected")
                await publish(broker, budget_topic("r1"), b'{"power_budget_w": 1234}', retain=True)
                await wait_until(lambda: (rack_budget(cluster, "r1") or {}).get("power_budget_w") == 1234.0,
                                 timeout_s=10, what="a budget after the broker restarted")
                assert all(cluster.controller.registry.nodes[n].state == "ready" for n in ("node-0", "node-1"))

    asyncio.run(scenario())


def test_the_controller_status_is_retained_and_says_offline_at_shutdown(tmp_path: Path) -> None:
    async def scenario() -> None:
        with running_broker(tmp_path / "broker", USERS, ACL) as broker:
            async with subscribed(broker, f"{PREFIX}/controller/status") as status:
                async with in_process_cluster(tmp_path, nodes=1, gpus=1, utilization=0.0,
                                              mqtt=mqtt_settings(broker)) as cluster:
                    await wait_until(lambda: bool(status), timeout_s=10, what="the controller's status")
                    online = json.loads(status[-1][1])
                    assert online["state"] == "online" and online["epoch"] == cluster.controller.epoch
                await wait_until(lambda: status[-1][1] == b"offline", timeout_s=10, what="offline at shutdown")

    asyncio.run(scenario())


def test_a_rack_cooling_failure_moves_its_components_out_and_ok_lets_them_back(tmp_path: Path) -> None:
    """The facility reports rack r-x's cooling failed: the GPUs there are capped and evacuated, the chat
    component moves to the other rack before the old one stops, and the reaction is on the events topic."""
    from tests.integration.test_autopilot_cluster import first_job, where

    async def scenario() -> None:
        with running_broker(tmp_path / "broker", USERS, ACL) as broker:
            async with in_process_cluster(tmp_path, nodes=2, gpus=1, utilization=0.0, mqtt=mqtt_settings(broker),
                                          node_labels=RACKS) as cluster:
                await wait_until(lambda: cluster.controller.facility.link.connected, timeout_s=10,
                                 what="the controller connected to the broker")
                await first_job(cluster)
                ((node, _),) = where(cluster)
                rack, other = RACKS[node]["rack"], next(n for n in RACKS if n != node)
                async with subscribed(broker, f"{PREFIX}/controller/events") as events:
                    await publish(broker, f"{PREFIX}/facility/racks/{rack}/cooling",
                                  json.dumps({"state": "failed", "inlet_c": 41.0}).encode())
                    await wait_until(lambda: {n for n, _ in where(cluster)} == {other}, timeout_s=20,
                                     what=f"the chat component out of rack {rack}")
                    await wait_until(lambda: any(json.loads(p)["kind"] == "cooling" for _, p in events),
                                     timeout_s=10, what="the cooling reaction on the events topic")
                view = cluster.controller.workloads.autopilot.budget_view()
                assert [(c["rack"], c["state"]) for c in view["cooling"]] == [(rack, "failed")]
                limit = cluster.controller.workloads.autopilot.power_limits.get((node, 0))
                assert limit is not None and limit < 700.0  # the failed rack's GPU is capped
                await publish(broker, f"{PREFIX}/facility/racks/{rack}/cooling",
                              json.dumps({"state": "ok", "inlet_c": 24.0}).encode())
                await wait_until(lambda: not cluster.controller.workloads.autopilot.budget_view()["cooling"],
                                 timeout_s=10, what="the rack's cooling back to ok")

    asyncio.run(scenario())
