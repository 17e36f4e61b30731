"""Reconciler as a pure state machine: desired vs. reported components, driven with a fake clock."""

from __future__ import annotations

import pytest

from common.protocol.messages import ComponentReport, ComponentView
from controller.reconciler import (
    CommandDone, DesiredChanged, NodeReport, Reconciler, ReconcilerConfig, SendStart, SendStop, Tick,
)
from policies.plan import PlacedComponent

CONFIG = ReconcilerConfig(command_timeout_s=10.0, drain_timeout_s=5.0)
CHAT = PlacedComponent("chat-n1-0", "chat", "n1", (0,))


def report(component: PlacedComponent, state: str, reason: str = "", executor: str | None = None,
           devices: tuple[int, ...] | None = None) -> ComponentReport:
    return ComponentReport(component_id=component.component_id, executor=executor or component.executor,
                           state=state, device_indexes=component.device_indexes if devices is None else devices,
                           inflight=0, restarts=0, reason=reason, simulated=True)


def beat(rec: Reconciler, now: float, node: str = "n1", *reports: ComponentReport, ready: bool = True) -> list:
    return rec.handle(NodeReport(node, ready, tuple(reports), now))


def starts(actions: list) -> list[tuple[str, str]]:
    return [(a.node, a.component_id) for a in actions if isinstance(a, SendStart)]


def stops(actions: list) -> list[tuple[str, str]]:
    return [(a.node, a.component_id) for a in actions if isinstance(a, SendStop)]


def running(now: float = 0.0, *components: PlacedComponent) -> Reconciler:
    """A reconciler whose components were started and are reported ready on their nodes."""
    rec = Reconciler(CONFIG)
    components = components or (CHAT,)
    rec.handle(DesiredChanged(tuple(components), now))
    for node in sorted({c.node for c in components}):
        for action in beat(rec, now, node):
            rec.handle(CommandDone(action.command_id, True, "", now))
        beat(rec, now, node, *(report(c, "ready") for c in components if c.node == node))
    return rec


def test_starts_a_desired_component_once_its_node_is_ready() -> None:
    rec = Reconciler(CONFIG)
    assert rec.handle(DesiredChanged((CHAT,), 0.0)) == []  # node not heard from yet
    actions = beat(rec, 1.0)
    assert actions == [SendStart("cmd-1", "n1", "chat-n1-0", "chat", (0,))]
    assert rec.status("chat-n1-0").pending_command == "start"
    assert rec.status("chat-n1-0").actual_state == "absent"


def test_no_duplicate_commands_while_one_is_pending() -> None:
    rec = Reconciler(CONFIG)
    rec.handle(DesiredChanged((CHAT,), 0.0))
    first = beat(rec, 0.0)
    assert len(first) == 1
    for now in (1.0, 2.0, 3.0):
        assert beat(rec, now) == []
        assert rec.handle(Tick(now + 0.5)) == []
        assert rec.handle(DesiredChanged((CHAT,), now + 0.6)) == []
    rec.handle(CommandDone(first[0].command_id, True, "", 4.0))
    for state in ("pending", "starting", "ready"):
        assert beat(rec, 5.0, "n1", report(CHAT, state)) == []
    assert rec.pending_commands() == 0
    status = rec.status("chat-n1-0")
    assert (status.actual_state, status.desired, status.restarts, status.pending_command) == ("ready", True, 0, None)


def test_failed_component_restarts_with_doubling_backoff_that_resets_after_staying_ready() -> None:
    rec = running()
    now = 10.0
    waits = []
    for _ in range(8):
        failed_at = now
        actions = beat(rec, now, "n1", report(CHAT, "failed", reason="engine exited with code 1"))
        while not actions:  # heartbeats keep saying failed until the restart goes out
            now += 0.25
            actions = beat(rec, now, "n1", report(CHAT, "failed", reason="engine exited with code 1"))
        assert starts(actions) == [("n1", "chat-n1-0")]
        waits.append(now - failed_at)
        rec.handle(CommandDone(actions[0].command_id, True, "", now))
        beat(rec, now, "n1", report(CHAT, "starting"))
        now += 1.0
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    status = rec.status("chat-n1-0")
    assert status.restarts == 8 and status.failures_since_ready == 8
    assert status.last_error == "engine exited with code 1"
    # Ready for 60 s: the next failure waits 1 s again.
    for t in range(0, 61, 5):
        beat(rec, now + t, "n1", report(CHAT, "ready"))
    assert rec.status("chat-n1-0").failures_since_ready == 0  # counted since it was last ready
    now += 61.0
    beat(rec, now, "n1", report(CHAT, "failed", reason="oom"))
    assert rec.handle(Tick(now + 0.9)) == []
    assert starts(rec.handle(Tick(now + 1.0))) == [("n1", "chat-n1-0")]


def test_ready_for_less_than_the_reset_time_keeps_the_backoff() -> None:
    rec = running()
    beat(rec, 1.0, "n1", report(CHAT, "failed"))
    (start,) = rec.handle(Tick(2.0))
    rec.handle(CommandDone(start.command_id, True, "", 2.0))
    beat(rec, 3.0, "n1", report(CHAT, "ready"))
    beat(rec, 30.0, "n1", report(CHAT, "ready"))
    beat(rec, 31.0, "n1", report(CHAT, "failed"))
    assert rec.handle(Tick(32.9)) == []
    assert starts(rec.handle(Tick(33.0))) == [("n1", "chat-n1-0")]
    assert rec.status("chat-n1-0").last_error == "failed (no reason reported)"


def test_an_acknowledged_start_waits_for_a_fresh_report() -> None:
    rec = Reconciler(CONFIG)
    rec.handle(DesiredChanged((CHAT,), 0.0))
    (start,) = beat(rec, 0.0)
    # Acknowledged: the reports held (no component) predate it, so nothing is resent.
    assert rec.handle(CommandDone(start.command_id, True, "", 0.5)) == []
    assert rec.handle(Tick(1.0)) == []
    # A heartbeat after the acknowledgement still without it: the agent lost it, start again.
    assert starts(beat(rec, 2.0)) == [("n1", "chat-n1-0")]


def test_a_failed_report_while_a_start_is_in_flight_is_not_a_new_failure() -> None:
    rec = running()
    beat(rec, 1.0, "n1", report(CHAT, "failed"))
    (start,) = rec.handle(Tick(2.0))
    beat(rec, 2.1, "n1", report(CHAT, "failed"))  # sent before the agent saw the start
    rec.handle(CommandDone(start.command_id, True, "", 2.2))
    beat(rec, 2.3, "n1", report(CHAT, "starting"))
    assert rec.status("chat-n1-0").restarts == 1
    beat(rec, 3.0, "n1", report(CHAT, "failed"))
    assert rec.handle(Tick(4.9)) == []  # second failure: 2 s, not 4 s
    assert starts(rec.handle(Tick(5.0))) == [("n1", "chat-n1-0")]


def test_a_stopped_desired_component_is_started_again_without_backoff() -> None:
    rec = running()
    assert starts(beat(rec, 5.0, "n1", report(CHAT, "stopped"))) == [("n1", "chat-n1-0")]
    assert rec.status("chat-n1-0").restarts == 1


def test_undesired_components_are_stopped_once() -> None:
    rec = running()
    actions = rec.handle(DesiredChanged((), 5.0))
    assert actions == [SendStop(actions[0].command_id, "n1", "chat-n1-0", 5.0)]
    assert beat(rec, 6.0, "n1", report(CHAT, "ready")) == []  # stop in flight
    rec.handle(CommandDone(actions[0].command_id, True, "", 6.5))
    assert beat(rec, 7.0, "n1", report(CHAT, "ready")) == []  # acknowledged: not sent again
    assert beat(rec, 8.0, "n1", report(CHAT, "draining")) == []
    assert beat(rec, 9.0, "n1", report(CHAT, "stopped")) == []
    assert rec.status("chat-n1-0").desired is False
    beat(rec, 10.0, "n1")
    assert rec.status("chat-n1-0") is None and rec.statuses() == []


def test_unknown_components_reported_by_a_node_are_stopped_failed_ones_too() -> None:
    rec = Reconciler(CONFIG)
    stray = PlacedComponent("old-n1-0", "old", "n1", ())
    broken = PlacedComponent("broken-n1-0", "old", "n1", ())
    done = PlacedComponent("done-n1-0", "old", "n1", ())
    actions = beat(rec, 0.0, "n1", report(stray, "ready"), report(broken, "failed"), report(done, "stopped"))
    assert sorted(stops(actions)) == [("n1", "broken-n1-0"), ("n1", "old-n1-0")]


def test_nothing_is_sent_to_a_node_that_is_not_ready() -> None:
    rec = Reconciler(CONFIG)
    rec.handle(DesiredChanged((CHAT,), 0.0))
    stray = PlacedComponent("old-n1-0", "old", "n1", ())
    assert beat(rec, 1.0, "n1", report(stray, "ready"), ready=False) == []
    assert rec.handle(Tick(100.0)) == []
    assert rec.status("chat-n1-0").actual_state == "unknown"
    actions = beat(rec, 101.0, "n1", report(stray, "ready"))
    assert starts(actions) == [("n1", "chat-n1-0")] and stops(actions) == [("n1", "old-n1-0")]


def test_an_unanswered_command_times_out_and_is_retried_with_backoff() -> None:
    rec = Reconciler(CONFIG)
    rec.handle(DesiredChanged((CHAT,), 0.0))
    (first,) = beat(rec, 0.0)
    assert rec.handle(Tick(9.9)) == []
    assert rec.handle(Tick(10.0)) == []  # timed out now; retry after 1 s of backoff
    assert "start command failed: no reply within 10s" == rec.status("chat-n1-0").last_error
    assert rec.status("chat-n1-0").pending_command is None
    (second,) = rec.handle(Tick(11.0))
    assert isinstance(second, SendStart) and second.command_id != first.command_id
    assert rec.handle(CommandDone(first.command_id, True, "", 11.5)) == []  # late answer: ignored
    assert rec.status("chat-n1-0").pending_command == "start"


def test_a_refused_command_is_retried_with_doubling_backoff() -> None:
    rec = Reconciler(CONFIG)
    rec.handle(DesiredChanged((CHAT,), 0.0))
    (cmd,) = beat(rec, 0.0)
    times = []
    now = 0.0
    for _ in range(4):
        rec.handle(CommandDone(cmd.command_id, False, "stale_command: old generation", now))
        sent_at = now
        while not (actions := rec.handle(Tick(now))):
            now += 0.5
        (cmd,) = actions
        times.append(now - sent_at)
    assert times == [1.0, 2.0, 4.0, 8.0]
    assert rec.status("chat-n1-0").last_error == "start command failed: stale_command: old generation"
    assert rec.status("chat-n1-0").restarts == 0  # never ran: retries are not restarts
    assert rec.status("chat-n1-0").failures_since_ready == 0  # nor failures of the component


def test_a_failed_stop_is_retried() -> None:
    rec = running()
    (stop,) = rec.handle(DesiredChanged((), 1.0))
    rec.handle(CommandDone(stop.command_id, False, "agent busy", 1.0))
    assert beat(rec, 1.5, "n1", report(CHAT, "ready")) == []
    assert stops(rec.handle(Tick(2.0))) == [("n1", "chat-n1-0")]


def test_a_moved_component_starts_on_the_new_node_and_stops_on_the_old() -> None:
    moved = PlacedComponent("chat-n2-0", "chat", "n2", (1,))
    rec = running(0.0, CHAT)
    beat(rec, 0.0, "n2")
    actions = rec.handle(DesiredChanged((moved,), 1.0))
    (start,) = [a for a in actions if isinstance(a, SendStart)]
    assert start == SendStart(start.command_id, "n2", "chat-n2-0", "chat", (1,))
    assert stops(actions) == [("n1", "chat-n1-0")] and len(actions) == 2


def test_the_same_id_desired_on_another_node_moves_too() -> None:
    rec = running(0.0, CHAT)
    beat(rec, 0.0, "n2")
    same_id_elsewhere = PlacedComponent("chat-n1-0", "chat", "n2", (0,))
    actions = rec.handle(DesiredChanged((same_id_elsewhere,), 1.0))
    assert starts(actions) == [("n2", "chat-n1-0")] and stops(actions) == [("n1", "chat-n1-0")]
    views = [(s.node, s.desired) for s in rec.statuses()]
    assert views == [("n1", False), ("n2", True)]


def test_an_instance_on_other_devices_is_replaced_after_it_stops() -> None:
    rec = running(0.0, CHAT)
    replanned = PlacedComponent("chat-n1-0", "chat", "n1", (1,))
    (stop,) = rec.handle(DesiredChanged((replanned,), 1.0))
    assert isinstance(stop, SendStop)
    rec.handle(CommandDone(stop.command_id, True, "", 1.0))
    assert beat(rec, 2.0, "n1", report(CHAT, "draining")) == []
    (start,) = beat(rec, 3.0, "n1", report(CHAT, "stopped"))
    assert start == SendStart(start.command_id, "n1", "chat-n1-0", "chat", (1,))


def test_status_views_for_the_admin_api() -> None:
    rec = running()
    beat(rec, 1.0, "n1", report(CHAT, "failed", reason="engine exited with code 137"))
    status = rec.status("chat-n1-0")
    assert status.actual_state == "failed" and status.next_attempt_s == 2.0
    rec.handle(Tick(2.0))
    assert rec.status("chat-n1-0").next_attempt_s is None and rec.status("chat-n1-0").pending_command == "start"
    view = status.view()
    assert isinstance(view, ComponentView)
    assert (view.node, view.desired, view.executor, view.device_indexes, view.last_error) == (
        "n1", True, "chat", (0,), "engine exited with code 137")
    assert view.report is not None and view.report.state == "failed"
    assert rec.status("nope") is None


def test_duplicate_ids_in_the_plan_are_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        Reconciler(CONFIG).handle(DesiredChanged((CHAT, CHAT), 0.0))


def test_command_ids_carry_the_prefix_and_are_unique() -> None:
    rec = Reconciler(CONFIG, command_prefix="e7-")
    comps = tuple(PlacedComponent(f"c{i}-n1-0", "chat", "n1", ()) for i in range(3))
    rec.handle(DesiredChanged(comps, 0.0))
    ids = [a.command_id for a in beat(rec, 0.0)]
    assert ids == ["e7-1", "e7-2", "e7-3"]


@pytest.mark.parametrize("kwargs", [{"command_timeout_s": 0}, {"backoff_initial_s": 5, "backoff_max_s": 1},
                                    {"drain_timeout_s": -1}])
def test_config_is_checked(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ReconcilerConfig(**kwargs)


def test_a_heartbeat_only_re_examines_its_own_node() -> None:
    rec = Reconciler(CONFIG)
    a, b = PlacedComponent("x-a-0", "x", "a", ()), PlacedComponent("x-b-0", "x", "b", ())
    rec.handle(DesiredChanged((a, b), 0.0))
    (start_a,) = beat(rec, 0.0, "a")
    assert starts(beat(rec, 0.0, "b")) == [("b", "x-b-0")]
    # Node a's start fails; b's heartbeat does not resend it, a's own heartbeat (after backoff) does.
    rec.handle(CommandDone(start_a.command_id, False, "refused", 1.0))
    assert beat(rec, 5.0, "b", report(b, "ready")) == []
    assert starts(beat(rec, 5.0, "a")) == [("a", "x-a-0")]


def test_failing_lists_only_components_that_failed_since_they_were_ready() -> None:
    rec = running()
    assert rec.failing() == []
    beat(rec, 10.0, "n1", report(CHAT, "failed", reason="oom"))
    assert [(s.component_id, s.failures_since_ready, s.last_error) for s in rec.failing()] == [("chat-n1-0", 1, "oom")]
    beat(rec, 20.0, "n1", report(CHAT, "ready"))
    assert rec.failing() == []
