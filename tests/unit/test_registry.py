"""Node registry as a pure state machine, driven with a fake clock."""

from __future__ import annotations

import pytest

from common.protocol import DeviceInfo, DeviceTelemetry, HostInfo, HostTelemetry
from controller.registry import (
    Accepted, DrainRequested, HeartbeatReceived, LabelsChanged, NodeRegistered, NodeRegistry, PersistNode,
    RegistryConfig, Rejected, StateChanged, Tick, UndrainRequested,
)

CONFIG = RegistryConfig(suspect_after_s=3.0, lost_after_s=10.0, telemetry_history=4)
HOST_INFO = HostInfo(cpu_count=2, memory_total_bytes=1 << 30, os="Linux", python_version="3.11")
HOST = HostTelemetry(cpu_utilization_pct=5.0, memory_used_bytes=1, memory_total_bytes=2, load_avg_1m=0.1)
DEVICE = DeviceInfo(index=0, kind="gpu", model="H100 (simulated)", uuid="SIM-0", backend="sim", simulated=True,
                    memory_total_bytes=80 << 30, power_limit_min_w=200.0, power_limit_max_w=700.0,
                    power_limit_default_w=700.0)


def sample(power_w: float = 100.0) -> DeviceTelemetry:
    return DeviceTelemetry(index=0, power_w=power_w, energy_j=1.0, temperature_c=40.0, memory_used_bytes=0,
                           memory_total_bytes=80 << 30, utilization_pct=0.0, sm_clock_mhz=1980, power_limit_w=700.0)


def register(reg: NodeRegistry, now: float, name: str = "n1", generation: int = 1, labels=None) -> list:
    return reg.handle(NodeRegistered(name, "host1", generation, (DEVICE,), HOST_INFO, labels or {}, now))


def beat(reg: NodeRegistry, now: float, name: str = "n1", generation: int = 1, running: int = 0,
         power_w: float = 100.0) -> list:
    return reg.handle(HeartbeatReceived(name, generation, (sample(power_w),), HOST, running, now))


def transitions(actions: list) -> list[tuple[str, str]]:
    return [(a.old, a.new) for a in actions if isinstance(a, StateChanged)]


def answer(actions: list):
    found = [a for a in actions if isinstance(a, (Accepted, Rejected))]
    assert len(found) == 1, actions
    return found[0]


@pytest.fixture
def reg() -> NodeRegistry:
    return NodeRegistry(CONFIG)


def test_register_then_first_heartbeat_makes_ready(reg: NodeRegistry) -> None:
    actions = register(reg, 0.0)
    assert transitions(actions) == [("new", "joining")]
    assert answer(actions) == Accepted("n1", "joining")
    assert any(isinstance(a, PersistNode) for a in actions)
    actions = beat(reg, 0.5)
    assert transitions(actions) == [("joining", "ready")]
    assert answer(actions) == Accepted("n1", "ready")


def test_missed_heartbeats_suspect_then_lost_then_reregister(reg: NodeRegistry) -> None:
    register(reg, 0.0)
    beat(reg, 1.0)
    assert transitions(reg.handle(Tick(3.9))) == []
    assert transitions(reg.handle(Tick(4.0))) == [("ready", "suspect")]
    assert transitions(reg.handle(Tick(10.9))) == []
    assert transitions(reg.handle(Tick(11.0))) == [("suspect", "lost")]
    assert transitions(reg.handle(Tick(20.0))) == []  # lost stays lost, no repeated transitions
    refused = answer(beat(reg, 21.0))
    assert isinstance(refused, Rejected) and refused.code == "reregister"
    assert transitions(register(reg, 22.0)) == [("lost", "joining")]
    assert transitions(beat(reg, 22.5)) == [("joining", "ready")]


def test_suspect_recovers_when_heartbeats_resume(reg: NodeRegistry) -> None:
    register(reg, 0.0)
    beat(reg, 0.0)
    assert transitions(reg.handle(Tick(3.5))) == [("ready", "suspect")]
    actions = beat(reg, 4.0)
    assert transitions(actions) == [("suspect", "ready")]
    assert reg.nodes["n1"].state == "ready"


def test_joining_node_that_never_heartbeats_is_lost(reg: NodeRegistry) -> None:
    register(reg, 0.0)
    assert transitions(reg.handle(Tick(5.0))) == []  # joining does not become suspect
    assert transitions(reg.handle(Tick(10.0))) == [("joining", "lost")]


def test_heartbeat_from_unknown_node_is_told_to_reregister(reg: NodeRegistry) -> None:
    refused = answer(beat(reg, 0.0, name="ghost"))
    assert isinstance(refused, Rejected) and refused.code == "reregister"
    assert "ghost" not in reg.nodes


def test_reregistration_is_idempotent_and_keeps_identity_and_admin_state(reg: NodeRegistry) -> None:
    register(reg, 0.0, labels={"rack": "r1"})
    beat(reg, 0.1)
    reg.handle(LabelsChanged("n1", {"team": "infra"}, 0.2))
    reg.handle(DrainRequested("n1", "bad fan", 0.3))
    assert reg.nodes["n1"].state == "drained"
    for now in (1.0, 2.0):
        actions = register(reg, now)
        assert answer(actions) == Accepted("n1", "drained")
    node = reg.nodes["n1"]
    assert len(reg.nodes) == 1
    assert node.drain_reason == "bad fan"
    assert node.labels == {"rack": "r1", "team": "infra"}
    assert transitions(beat(reg, 2.5)) == []  # joining is hidden behind drained; stays drained


def test_new_generation_replaces_old_and_old_heartbeats_are_stale(reg: NodeRegistry) -> None:
    register(reg, 0.0, generation=1)
    beat(reg, 0.1, generation=1)
    register(reg, 1.0, generation=2)
    refused = answer(beat(reg, 1.1, generation=1))
    assert isinstance(refused, Rejected) and refused.code == "stale_generation"
    refused = answer(register(reg, 1.2, generation=1))
    assert isinstance(refused, Rejected) and refused.code == "stale_generation"
    assert reg.nodes["n1"].generation == 2
    assert answer(beat(reg, 1.3, generation=2)) == Accepted("n1", "ready")


def test_heartbeat_with_newer_generation_than_registered_asks_to_reregister(reg: NodeRegistry) -> None:
    register(reg, 0.0, generation=1)
    refused = answer(beat(reg, 0.1, generation=5))
    assert isinstance(refused, Rejected) and refused.code == "reregister"


def test_drain_waits_for_components_then_drained_and_undrain(reg: NodeRegistry) -> None:
    register(reg, 0.0)
    beat(reg, 0.1, running=2)
    actions = reg.handle(DrainRequested("n1", "maintenance", 0.2))
    assert transitions(actions) == [("ready", "draining")]
    assert reg.nodes["n1"].drain_reason == "maintenance"
    assert transitions(beat(reg, 1.0, running=1)) == []
    assert transitions(beat(reg, 2.0, running=0)) == [("draining", "drained")]
    assert not reg.nodes["n1"].schedulable()
    actions = reg.handle(UndrainRequested("n1", 3.0))
    assert transitions(actions) == [("drained", "ready")]
    assert reg.nodes["n1"].drain_reason is None
    assert reg.nodes["n1"].schedulable()


def test_drain_needs_reason_and_known_node(reg: NodeRegistry) -> None:
    refused = answer(reg.handle(DrainRequested("nope", "x", 0.0)))
    assert isinstance(refused, Rejected) and refused.code == "unknown_node"
    register(reg, 0.0)
    refused = answer(reg.handle(DrainRequested("n1", "  ", 0.0)))
    assert isinstance(refused, Rejected) and refused.code == "invalid_argument"


def test_drained_node_that_goes_silent_shows_liveness(reg: NodeRegistry) -> None:
    register(reg, 0.0)
    beat(reg, 0.0)
    reg.handle(DrainRequested("n1", "swap PSU", 0.1))
    assert transitions(reg.handle(Tick(3.5))) == [("drained", "suspect")]
    assert transitions(beat(reg, 4.0)) == [("suspect", "drained")]


def test_restored_node_waits_for_registration_and_keeps_drain(reg: NodeRegistry) -> None:
    reg.restore("n1", "host1", 3, "drained", "bad fan", {"rack": "r1"}, now_s=100.0)
    assert reg.nodes["n1"].state == "drained"
    refused = answer(beat(reg, 100.5, generation=3))
    assert isinstance(refused, Rejected) and refused.code == "reregister"
    actions = register(reg, 101.0, generation=3)
    assert answer(actions) == Accepted("n1", "drained")
    beat(reg, 101.5, generation=3)
    assert reg.nodes["n1"].drain_reason == "bad fan"
    assert reg.nodes["n1"].liveness.value == "ready"


def test_telemetry_history_is_bounded_ring(reg: NodeRegistry) -> None:
    register(reg, 0.0)
    for i in range(10):
        beat(reg, float(i), power_w=float(i))
    ring = reg.nodes["n1"].history[0]
    assert len(ring) == CONFIG.telemetry_history
    assert [s.power_w for _, s in ring] == [6.0, 7.0, 8.0, 9.0]
    assert reg.nodes["n1"].latest_telemetry()[0].power_w == 9.0


def test_config_rejects_unordered_timeouts() -> None:
    with pytest.raises(ValueError):
        RegistryConfig(suspect_after_s=10.0, lost_after_s=5.0)
