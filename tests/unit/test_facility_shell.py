"""The controller's MQTT shell without a broker: what it does with each facility message it is handed.

A recording link stands in for ``MqttLink`` (the broker itself is exercised in tests/integration/test_mqtt_*.py);
the autopilot is a recorder that refuses a rack until told the rack has a node, as the real one does.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from common.mqtt.payloads import PayloadError, decode_json
from common.mqtt.facility import RackPowerBudget
from common.mqtt.settings import MqttSettings
from controller.facility import FacilityShell

PREFIX = "murakkab/v1"
BUDGET_A = f"{PREFIX}/facility/racks/rack-a/power_budget_w"


class RecordingLink:
    def __init__(self, settings: MqttSettings, client_id: str, *, will: Any = None, on_connected: Any = None) -> None:
        self.settings, self.client_id, self.will, self.on_connected = settings, client_id, will, on_connected
        self.subscriptions: list[str] = []
        self.published: list[tuple[str, Any]] = []
        self.connected = True

    def topic(self, *parts: str) -> str:
        return "/".join((self.settings.topic_prefix, *parts))

    def subscribe(self, topic_filter: str, handler: Any) -> None:
        self.subscriptions.append(topic_filter)

    def publish(self, topic: str, payload: Any, **_: Any) -> bool:
        self.published.append((topic, payload))
        return True


class RecordingAutopilot:
    def __init__(self) -> None:
        self.known_racks: set[str] = set()
        self.budgets: list[tuple[str | None, float | None, str]] = []
        self.event_observers: list[Any] = []

    def set_budget(self, rack: str | None, watts: float | None, source: str = "operator") -> Any:
        if rack is not None and rack not in self.known_racks:
            return SimpleNamespace(message=f"no node of rack {rack} is known")
        self.budgets.append((rack, watts, source))
        return None


def make_shell() -> tuple[FacilityShell, RecordingAutopilot, CollectorRegistry]:
    registry = CollectorRegistry()
    counter = Counter("murakkab_facility_messages", "test", ["topic_kind", "result"], registry=registry)
    autopilot = RecordingAutopilot()
    controller = SimpleNamespace(metrics=SimpleNamespace(facility_messages=counter),
                                 workloads=SimpleNamespace(autopilot=autopilot),
                                 settings=SimpleNamespace(planner="murakkab"), epoch=1)
    shell = FacilityShell(controller, MqttSettings(enabled=True), link_factory=RecordingLink)
    return shell, autopilot, registry


def count(registry: CollectorRegistry, kind: str, result: str) -> float:
    return registry.get_sample_value("murakkab_facility_messages_total",
                                     {"topic_kind": kind, "result": result}) or 0.0


def budget(watts: float) -> bytes:
    return json.dumps({"power_budget_w": watts}).encode()


def test_a_budget_applies_and_the_same_retained_one_resent_at_reconnect_is_not_applied_again() -> None:
    shell, autopilot, registry = make_shell()
    autopilot.known_racks.add("rack-a")
    shell.on_message(BUDGET_A, budget(1000))
    shell.on_message(BUDGET_A, budget(1000))  # the broker re-sends retained messages on every (re)connect
    assert autopilot.budgets == [("rack-a", 1000.0, "facility (MQTT)")]
    assert count(registry, "power_budget", "applied") == 1
    assert count(registry, "power_budget", "unchanged") == 1
    shell.on_message(BUDGET_A, budget(800))  # a different one is a new decision
    shell.on_message(BUDGET_A, b"")  # and so is a cleared one
    assert [b[1] for b in autopilot.budgets] == [1000.0, 800.0, None]


def test_a_budget_for_a_rack_without_nodes_is_held_then_applied_once_counted_as_applied() -> None:
    shell, autopilot, registry = make_shell()
    shell.on_message(BUDGET_A, budget(900))
    assert autopilot.budgets == [] and count(registry, "power_budget", "held") == 1
    shell.retry_held()
    assert autopilot.budgets == [] and ("power_budget", "rack-a") in shell.held
    autopilot.known_racks.add("rack-a")
    shell.retry_held()
    assert autopilot.budgets == [("rack-a", 900.0, "facility (MQTT)")]
    assert not shell.held and count(registry, "power_budget", "applied") == 1
    shell.on_message(BUDGET_A, budget(900))  # re-sent at a reconnect after it applied: nothing new
    assert len(autopilot.budgets) == 1 and count(registry, "power_budget", "unchanged") == 1


def test_a_newer_message_replaces_one_held_for_the_rack() -> None:
    shell, autopilot, _ = make_shell()
    shell.on_message(BUDGET_A, budget(900))
    shell.on_message(BUDGET_A, budget(700))
    autopilot.known_racks.add("rack-a")
    shell.retry_held()
    assert autopilot.budgets == [("rack-a", 700.0, "facility (MQTT)")]


def test_a_bad_payload_after_a_good_one_changes_nothing_and_is_counted() -> None:
    shell, autopilot, registry = make_shell()
    autopilot.known_racks.add("rack-a")
    shell.on_message(BUDGET_A, budget(1000))
    shell.on_message(BUDGET_A, b'{"power_budget_w": 5, "power_budget_w": 100000}')
    shell.on_message(BUDGET_A, b'{"power_budget_w": "1000"}')
    assert autopilot.budgets == [("rack-a", 1000.0, "facility (MQTT)")]
    assert count(registry, "power_budget", "not_json") == 1 and count(registry, "power_budget", "schema") == 1


def test_decoding_refuses_a_key_given_twice() -> None:
    with pytest.raises(PayloadError) as caught:
        decode_json(b'{"power_budget_w": 1, "power_budget_w": 2}', RackPowerBudget)
    assert caught.value.reason == "not_json" and "twice" in caught.value.message
    assert decode_json(b'{"power_budget_w": 2}', RackPowerBudget).power_budget_w == 2.0
