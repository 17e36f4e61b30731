"""The component lifecycle as a pure state machine, driven with a fake clock; plus the runtime's pure helpers."""

from __future__ import annotations

import socket

import pytest

from agent.components.lifecycle import (
    CRASH_CLEANUP_GRACE_S, FAILED_PROBES_BEFORE_FAILURE, PROBE_INTERVAL_READY_S, PROBE_INTERVAL_STARTING_S,
    STOP_GRACE_S, ComponentLifecycle, EngineExited, EngineStarted, EngineStartFailed, FailInflight,
    InvocationEnded, InvocationStarted, LaunchEngine, ProbeEngine, ProbeResult, RefuseInvocation, StartRequested,
    StopEngine, StopRequested, Tick, Transition,
)
from agent.components.ports import PortAllocator
from agent.components.runtime import check_outputs, startup_timeout_s, validate_invocation
from common.protocol import Invoke
from common.workflow.catalog import ExecutorSpec

LOG = "/var/lib/murakkab/agent/components/c1/engine.log"


def kinds(actions: list) -> list[str]:
    return [type(a).__name__ for a in actions]


def transitions(actions: list) -> list[tuple[str, str]]:
    return [(a.old, a.new) for a in actions if isinstance(a, Transition)]


def ready_component(timeout_s: float = 30.0) -> ComponentLifecycle:
    lc = ComponentLifecycle("c1", startup_timeout_s=timeout_s, log_path=LOG)
    lc.handle(StartRequested(0.0))
    lc.handle(EngineStarted(1.0, 1))
    lc.handle(ProbeResult(1.2, 1, True))
    assert lc.state == "ready"
    return lc


def test_start_launches_probes_and_becomes_ready() -> None:
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0, log_path=LOG)
    assert lc.state == "pending"
    actions = lc.handle(StartRequested(10.0))
    assert transitions(actions) == [("pending", "starting")] and actions[-1] == LaunchEngine(1)
    assert lc.handle(Tick(10.4)) == []  # no probe before the engine has started
    assert lc.handle(EngineStarted(11.0, 1)) == [ProbeEngine(1)]
    assert lc.handle(Tick(11.2)) == []  # a probe is outstanding
    assert lc.handle(ProbeResult(11.3, 1, False)) == []
    assert lc.handle(Tick(11.3 + PROBE_INTERVAL_STARTING_S - 0.01)) == []
    assert lc.handle(Tick(11.3 + PROBE_INTERVAL_STARTING_S)) == [ProbeEngine(1)]
    actions = lc.handle(ProbeResult(12.0, 1, True))
    assert transitions(actions) == [("starting", "ready")]
    assert lc.state == "ready" and lc.reason == "engine ready after 2.0 s" and lc.state_since_s == 12.0
    # Ready: probes every 5 s.
    assert lc.handle(Tick(12.0 + PROBE_INTERVAL_READY_S - 0.1)) == []
    assert lc.handle(Tick(12.0 + PROBE_INTERVAL_READY_S)) == [ProbeEngine(1)]
    assert lc.handle(ProbeResult(17.1, 1, True)) == []
    assert [t.new for t in lc.history] == ["starting", "ready"]


def test_start_is_idempotent_while_starting_or_ready() -> None:
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0)
    lc.handle(StartRequested(0.0))
    assert lc.handle(StartRequested(0.5)) == []
    lc.handle(EngineStarted(1.0, 1))
    lc.handle(ProbeResult(1.1, 1, True))
    assert lc.handle(StartRequested(2.0)) == []
    assert lc.state == "ready" and lc.restarts == 0 and lc.attempt == 1


def test_startup_timeout_fails_with_the_limit_and_the_log() -> None:
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0, log_path=LOG)
    lc.handle(StartRequested(100.0))
    lc.handle(EngineStarted(101.0, 1))
    lc.handle(ProbeResult(101.5, 1, False))
    assert lc.handle(Tick(129.0)) == [ProbeEngine(1)]  # a due probe, not yet a timeout
    lc.handle(ProbeResult(129.8, 1, False))
    assert lc.handle(Tick(130.0)) == [] and lc.state == "starting"  # exactly at the limit: still starting
    actions = lc.handle(Tick(130.01))
    assert transitions(actions) == [("starting", "failed")]
    assert lc.reason == f"did not become ready within 30 s (see log {LOG})"
    assert actions[-1] == StopEngine(1, CRASH_CLEANUP_GRACE_S)
    # A late probe answer from that engine changes nothing.
    assert lc.handle(ProbeResult(131.0, 1, True)) == [] and lc.state == "failed"


def test_engine_that_cannot_start_fails_with_its_reason() -> None:
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0)
    lc.handle(StartRequested(0.0))
    actions = lc.handle(EngineStartFailed(0.1, 1, "cannot import tool x:y: ModuleNotFoundError: No module named 'x'"))
    assert transitions(actions) == [("starting", "failed")]
    assert lc.reason == "engine failed to start: cannot import tool x:y: ModuleNotFoundError: No module named 'x'"
    assert isinstance(actions[-1], StopEngine)


def test_engine_exit_while_starting_or_ready_fails_and_fails_inflight() -> None:
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0, log_path=LOG)
    lc.handle(StartRequested(0.0))
    actions = lc.handle(EngineExited(0.5, 1, 1))
    assert transitions(actions) == [("starting", "failed")]
    assert lc.reason == f"engine exited with code 1 (see log {LOG})"

    lc = ready_component()
    lc.handle(InvocationStarted(2.0, "i1"))
    lc.handle(InvocationStarted(2.1, "i2"))
    actions = lc.handle(EngineExited(3.0, 1, -9))
    assert kinds(actions) == ["Transition", "FailInflight", "StopEngine"]
    fail = actions[1]
    assert isinstance(fail, FailInflight) and fail.invocation_ids == ("i1", "i2")
    assert "engine exited with code -9" in fail.reason and LOG in fail.reason
    assert lc.state == "failed" and lc.inflight == set()


def test_exit_of_a_stopped_or_replaced_engine_is_ignored() -> None:
    lc = ready_component()
    lc.handle(StopRequested(5.0, 10.0))
    assert lc.state == "stopped"
    assert lc.handle(EngineExited(5.5, 1, -15)) == [] and lc.state == "stopped"
    lc.handle(StartRequested(6.0))  # attempt 2
    assert lc.handle(EngineExited(6.1, 1, -15)) == [] and lc.state == "starting"
    assert lc.handle(ProbeResult(6.2, 1, True)) == [] and lc.state == "starting"


def test_failed_probes_while_ready_fail_the_component_after_a_streak() -> None:
    lc = ready_component()
    for i in range(FAILED_PROBES_BEFORE_FAILURE - 1):
        assert lc.handle(ProbeResult(10.0 + i, 1, False)) == []
    assert lc.handle(ProbeResult(20.0, 1, True)) == []  # a success resets the streak
    for i in range(FAILED_PROBES_BEFORE_FAILURE - 1):
        lc.handle(ProbeResult(30.0 + i, 1, False))
    actions = lc.handle(ProbeResult(40.0, 1, False))
    assert transitions(actions) == [("ready", "failed")]
    assert lc.reason.startswith(f"health probe failed {FAILED_PROBES_BEFORE_FAILURE} times in a row")


def test_stop_while_idle_stops_at_once() -> None:
    lc = ready_component()
    actions = lc.handle(StopRequested(5.0, 30.0))
    assert transitions(actions) == [("ready", "stopped")] and actions[-1] == StopEngine(1, STOP_GRACE_S)
    assert lc.handle(StopRequested(6.0, 30.0)) == []  # idempotent


def test_stop_before_start_and_while_starting() -> None:
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0)
    assert transitions(lc.handle(StopRequested(0.0, 1.0))) == [("pending", "stopped")]
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0)
    lc.handle(StartRequested(0.0))
    actions = lc.handle(StopRequested(0.5, 1.0))
    assert transitions(actions) == [("starting", "stopped")] and isinstance(actions[-1], StopEngine)


def test_drain_waits_for_inflight_then_stops() -> None:
    lc = ready_component()
    lc.handle(InvocationStarted(2.0, "i1"))
    lc.handle(InvocationStarted(2.0, "i2"))
    actions = lc.handle(StopRequested(3.0, 30.0))
    assert transitions(actions) == [("ready", "draining")]
    assert "draining 2 invocation(s) for up to 30 s" in lc.reason
    # No new work while draining.
    assert lc.handle(InvocationStarted(3.5, "i3")) == [RefuseInvocation("i3", f"component c1 is draining ({lc.reason})")]
    assert lc.handle(InvocationEnded(4.0, "i1")) == [] and lc.state == "draining"
    actions = lc.handle(InvocationEnded(5.0, "i2"))
    assert transitions(actions) == [("draining", "stopped")] and actions[-1] == StopEngine(1, STOP_GRACE_S)
    assert lc.reason == "drained: no invocations left in flight"


def test_drain_timeout_stops_and_fails_what_is_left() -> None:
    lc = ready_component()
    lc.handle(InvocationStarted(2.0, "slow"))
    lc.handle(StopRequested(3.0, 10.0))
    assert lc.handle(Tick(12.9)) == [] and lc.state == "draining"
    actions = lc.handle(StopRequested(4.0, 5.0))  # a repeated stop may shorten the drain
    assert actions == []
    actions = lc.handle(Tick(9.0))
    assert kinds(actions) == ["Transition", "FailInflight", "StopEngine"]
    assert lc.state == "stopped" and "drain timeout passed with 1 invocation(s) in flight" in lc.reason
    assert actions[1].invocation_ids == ("slow",)


def test_start_while_draining_serves_again() -> None:
    lc = ready_component()
    lc.handle(InvocationStarted(2.0, "i1"))
    lc.handle(StopRequested(3.0, 10.0))
    actions = lc.handle(StartRequested(4.0))
    assert transitions(actions) == [("draining", "ready")] and not any(isinstance(a, LaunchEngine) for a in actions)
    assert lc.handle(Tick(20.0)) == [ProbeEngine(1)]  # no drain timeout any more, just the periodic probe
    assert lc.state == "ready" and lc.inflight == {"i1"}


def test_start_after_failure_or_stop_is_a_restart() -> None:
    lc = ready_component()
    lc.handle(EngineExited(3.0, 1, 137))
    actions = lc.handle(StartRequested(4.0))
    assert transitions(actions) == [("failed", "starting")] and actions[-1] == LaunchEngine(2)
    assert lc.restarts == 1 and lc.attempt == 2
    assert lc.reason.startswith("restart 1 requested (was failed: engine exited with code 137")
    lc.handle(EngineStarted(5.0, 2))
    lc.handle(ProbeResult(5.5, 2, True))
    lc.handle(StopRequested(6.0, 0.0))
    lc.handle(StartRequested(7.0))
    assert lc.state == "starting" and lc.restarts == 2 and lc.attempt == 3
    # The startup timeout counts from the restart.
    assert lc.handle(Tick(7.0 + 29.0)) == []


def test_stop_of_a_failed_component_marks_it_stopped() -> None:
    lc = ready_component()
    lc.handle(EngineExited(3.0, 1, 1))
    actions = lc.handle(StopRequested(4.0, 1.0))
    assert transitions(actions) == [("failed", "stopped")] and kinds(actions) == ["Transition"]
    assert "had failed: engine exited with code 1" in lc.reason


def test_invocations_are_refused_unless_ready() -> None:
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0)
    lc.handle(StartRequested(0.0))
    refused = lc.handle(InvocationStarted(0.1, "i1"))
    assert isinstance(refused[0], RefuseInvocation) and "starting" in refused[0].reason
    assert lc.inflight == set()


def test_history_is_bounded() -> None:
    lc = ComponentLifecycle("c1", startup_timeout_s=30.0, history_limit=4)
    for i in range(10):
        lc.handle(StartRequested(float(i)))
        lc.handle(StopRequested(float(i) + 0.5, 0.0))
    assert len(lc.history) == 4 and lc.history[-1].new == "stopped"


# --- the runtime's pure helpers ------------------------------------------------------------

TOOL = ExecutorSpec.model_validate({
    "name": "retrieve-cosine", "task": "retrieve", "engine": "tool",
    "tool": {"entry_point": "agent.tools.retrieve:retrieve"},
    "knobs": {"top_k": {"values": [1, 3, 5], "default": 3}}})


def invoke(**overrides) -> Invoke:
    fields = dict(invocation_id="i1", controller_epoch=1, component_id="c1", task="retrieve",
                  inputs={"query": [1.0, 0.0], "embeddings": [[1.0, 0.0]], "documents": [{"id": "a", "text": "x"}]},
                  knobs={}, timeout_s=5.0)
    fields.update(overrides)
    return Invoke(**fields)


def test_invocation_validation_names_what_is_wrong() -> None:
    assert validate_invocation(TOOL, invoke()) is None
    assert validate_invocation(TOOL, invoke(knobs={"top_k": 5})) is None
    assert "not 'chat'" in validate_invocation(TOOL, invoke(task="chat"))
    inputs = invoke().inputs
    assert "needs input 'query' (vector)" in validate_invocation(
        TOOL, invoke(inputs={k: v for k, v in inputs.items() if k != "query"}))
    assert "no input(s) ['extra']" in validate_invocation(TOOL, invoke(inputs={**inputs, "extra": 1}))
    assert validate_invocation(TOOL, invoke(inputs={**inputs, "query": "text"})).startswith("inputs.query:")
    assert "inputs.documents[0]" in validate_invocation(TOOL, invoke(inputs={**inputs, "documents": [{"id": "a"}]}))
    assert "no knob 'frames'" in validate_invocation(TOOL, invoke(knobs={"frames": 4}))
    assert "top_k=4 is not one of [1, 3, 5]" in validate_invocation(TOOL, invoke(knobs={"top_k": 4}))
    assert "top_k=True" in validate_invocation(TOOL, invoke(knobs={"top_k": True}))  # True == 1, but not a count
    assert "timeout_s" in validate_invocation(TOOL, invoke(timeout_s=0.0))


def test_output_checks() -> None:
    good = {"passages": [{"id": "a", "score": 0.5}], "texts": ["x"]}
    assert check_outputs("retrieve", good, 1000) is None
    assert check_outputs("retrieve", {"passages": []}, 1000)[0] == "engine_failed"
    code, message, retryable = check_outputs("retrieve", {**good, "texts": [1]}, 1000)
    assert code == "engine_failed" and "outputs.texts[0]" in message and not retryable
    assert check_outputs("retrieve", {**good, "texts": ["x" * 2000]}, 1000)[0] == "output_too_large"
    assert check_outputs("retrieve", [good], 1000)[0] == "engine_failed"
    bad_json = {"best": "x", "ranking": [{1: "int keys do not survive strict decoding"}]}
    assert "cannot be sent" in check_outputs("rank-candidates", bad_json, 10_000)[1]


def test_startup_timeouts_per_engine() -> None:
    sim = ExecutorSpec.model_validate({"name": "s", "task": "chat", "engine": "sim",
                                       "sim": {"latency_s": 0.1, "startup_s": 4.0}})
    vllm = ExecutorSpec.model_validate({"name": "v", "task": "chat", "engine": "vllm",
                                        "vllm": {"model": "/m", "startup_timeout_s": 120}})
    assert startup_timeout_s(sim) == 14.0 and startup_timeout_s(vllm) == 120.0
    assert 0 < startup_timeout_s(TOOL) <= 120


def test_port_allocator_skips_busy_and_handed_out_ports() -> None:
    busy = {20001}
    ports = PortAllocator("127.0.0.1", 20000, 20004, is_free=lambda host, port: port not in busy)
    assert ports.allocate("a") == 20000
    assert ports.allocate("b") == 20002  # 20001 is bound by someone else
    assert ports.allocate("c") == 20003
    with pytest.raises(RuntimeError, match="no free port in 20000..20003"):
        ports.allocate("d")
    ports.release(20002)
    assert ports.allocate("e") == 20002
    assert ports.owners == {20000: "a", 20002: "e", 20003: "c"}


def test_port_allocator_from_the_os_never_repeats_a_held_port() -> None:
    offers = iter([30000, 30000, 30001])
    ports = PortAllocator(os_pick=lambda host: next(offers))
    assert ports.allocate("a") == 30000
    assert ports.allocate("b") == 30001


def test_real_ports_are_bindable_and_distinct() -> None:
    ports = PortAllocator()
    got = {ports.allocate(f"c{i}") for i in range(5)}
    assert len(got) == 5
    for port in got:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_invalid_port_range_is_refused() -> None:
    with pytest.raises(ValueError):
        PortAllocator(low=5000)
    with pytest.raises(ValueError):
        PortAllocator(low=70000, high=70010)
