"""Power budgets, pins, autopilot events and fault drills: the new messages on the wire, the admin handlers'
frame cap, and ``murakkabctl power|events|node set-power-limit|node fault`` against a fake admin endpoint."""

from __future__ import annotations

import dataclasses
import io
import json
import types
from typing import Any

import msgpack
import pytest
from rich.console import Console

from common.protocol import (
    MAX_FRAME_BYTES, CommandResult, DeviceFaultDrill, DeviceInfo, ErrorReply, EventList, FaultDrillResult, GetNode,
    GetPowerBudget, InjectDeviceFault, ListEvents, NodeDetail, NodeView, PinnedPowerLimit, PowerBudgetDetail,
    PowerLimitUnpinned, ProtocolError, SetNodePowerLimit, SetPowerBudget, UnpinPowerLimit, decode, encode,
)
from controller.admin import MAX_EVENT_REPLY_BYTES, AdminApi, plain
from controller.cli import power
from controller.cli.main import main
from tests.unit.test_cli_workflows import FakeController, controller  # noqa: F401  (the fixture)


@pytest.fixture(autouse=True)
def _plaintext_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake controllers here are plaintext ROUTERs: murakkabctl talks to them with --insecure."""
    monkeypatch.setenv("MURAKKAB_INSECURE", "1")
    for name in ("MURAKKAB_KEY", "MURAKKAB_SERVER_KEY"):
        monkeypatch.delenv(name, raising=False)


T0 = 1_700_000_000.0
VIEW = {
    "budgets": [
        {"scope": "cluster", "rack": None, "power_budget_w": 5000.0, "measured_power_w": 4210.4, "floor_w": 1800.0,
         "feasible": True, "over": False, "source": "operator", "caps_w": {}},
        {"scope": "rack", "rack": "r1", "power_budget_w": 900.0, "measured_power_w": 1105.0, "floor_w": 1200.0,
         "feasible": False, "over": True, "source": "mqtt",
         "caps_w": {f"node-{i}/0": 200.0 + i for i in range(6)}},
    ],
    "hot_gpus": [{"node": "node-1", "device": 3, "since_s": 12.0, "since_unix_s": T0 - 42.0,
                  "reason": "sw_thermal_slowdown", "evacuated": True, "power_limit_w": 560.0}],
    "pins": [{"node": "node-0", "device": 0, "power_limit_w": 250.0}],
}
EVENTS = [
    {"seq": 1, "at_unix_s": T0, "kind": "budget-set", "subject": "cluster", "reason": "operator: budget set to 5000 W",
     "details": {}},
    {"seq": 2, "at_unix_s": T0 + 3, "kind": "cap", "subject": "node-0/gpu1", "reason": "over the cluster budget",
     "details": {"power_limit_w": 400.0}},
]


# --- the wire ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [
    InjectDeviceFault("node-0", 1, "xid", 48),
    InjectDeviceFault("node-0", 0, "cooling-failure"),
    DeviceFaultDrill("c1", 3, 2, 0, "fall-off-bus", None),
    FaultDrillResult("node-0", 0, "clear", None, "device 0 on node-0: cooling restored"),
    SetPowerBudget(None, 5000.0),
    SetPowerBudget("r1", None),
    GetPowerBudget(),
    PowerBudgetDetail(VIEW),
    ListEvents(10_000),
    EventList(tuple(EVENTS), omitted=3),
    UnpinPowerLimit("node-0", 0),
    PowerLimitUnpinned("node-0", 0, 250.0, "unpinned"),
    NodeDetail(NodeView("n", "h", "ready", "ready", "active", None, 1, {}, T0, T0, T0, (), (), None,
                        (PinnedPowerLimit(0, 250.0), PinnedPowerLimit(3, 300.0)))),
])
def test_new_messages_round_trip(msg: Any) -> None:
    assert decode(encode(msg, 5)).message == msg


@pytest.mark.parametrize("op, body, field", [
    ("inject_device_fault", {"name": "n", "device_index": "0", "fault": "xid", "xid": None}, "device_index"),
    ("inject_device_fault", {"name": "n", "device_index": 0, "fault": "xid", "xid": 48.0}, "xid"),
    ("inject_device_fault", {"name": "n", "device_index": 0, "fault": "xid", "xid": True}, "xid"),
    ("inject_device_fault", {"name": "n", "device_index": 0, "fault": "xid", "extra": 1}, "extra"),
    ("device_fault_drill", {"command_id": "c", "controller_epoch": 1, "node_generation": 1, "device_index": 0},
     "fault"),
    ("set_power_budget", {"rack": None, "power_budget_w": float("nan")}, "power_budget_w"),
    ("set_power_budget", {"rack": None, "power_budget_w": float("inf")}, "power_budget_w"),
    ("set_power_budget", {"rack": 7, "power_budget_w": 100.0}, "rack"),
    ("set_power_budget", {"power_budget_w": 100.0}, "rack"),
    ("list_events", {"limit": "5"}, "limit"),
    ("unpin_power_limit", {"name": "n", "device_index": 0.0}, "device_index"),
])
def test_new_messages_decode_strictly(op: str, body: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(msgpack.packb({"v": 1, "op": op, "id": 1, "body": body}))
    assert err.value.code == "invalid_message" and field in err.value.message


def test_maps_with_non_string_keys_are_refused_in_any_payload() -> None:
    frame = msgpack.packb({"v": 1, "op": "event_list", "id": 1, "body": {"events": [{"details": {1: 2}}]}})
    with pytest.raises(ProtocolError) as err:
        decode(frame)
    assert err.value.code == "malformed_frame"


def test_a_node_view_from_an_older_controller_decodes_without_pins() -> None:
    node = NodeView("n", "h", "ready", "ready", "active", None, 1, {}, None, None, T0, (), (), None)
    body = msgpack.unpackb(encode(NodeDetail(node), 1))["body"]
    del body["node"]["pinned_power_limits"]
    decoded = decode(msgpack.packb({"v": 1, "op": "node_detail", "id": 1, "body": body})).message
    assert decoded.node.pinned_power_limits == ()


# --- admin handlers without sockets ---------------------------------------------------------------------


class FakeAutopilot:
    """The AutopilotShell interface the admin API calls, recording calls."""

    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._events = events or []
        self.pins: dict[tuple[str, int], float] = {}

    def set_budget(self, rack: str | None, power_budget_w: float | None) -> ErrorReply | None:
        self.calls.append(("set_budget", rack, power_budget_w))
        return ErrorReply("invalid_budget", f"no node is in rack {rack!r}") if rack == "nowhere" else None

    def budget_view(self) -> dict[str, Any]:
        return {**VIEW, "caps_w_by_index": {1: 2.0}, "odd": float("nan"), "obj": object.__name__}

    def events(self, limit: int) -> list[dict[str, Any]]:
        return self._events[-limit:]

    def pin(self, node: str, device_index: int, power_limit_w: float) -> ErrorReply | None:
        self.pins[(node, device_index)] = power_limit_w
        return None

    def unpin(self, node: str, device_index: int) -> ErrorReply | None:
        if self.pins.pop((node, device_index), None) is None:
            return ErrorReply("not_pinned", f"device {device_index} on {node} has no pinned power limit")
        return None

    def pins_for(self, node: str) -> dict[int, float]:
        return {i: w for (n, i), w in self.pins.items() if n == node}


def admin_with(autopilot: Any) -> AdminApi:
    workloads = types.SimpleNamespace() if autopilot is None else types.SimpleNamespace(autopilot=autopilot)
    controller = types.SimpleNamespace(workloads=workloads, profiler=object(), to_unix=lambda s: s + T0)
    return AdminApi(controller)  # type: ignore[arg-type]


def test_events_reply_is_capped_below_the_frame_limit_newest_kept() -> None:
    big = [{"seq": i, "at_unix_s": T0 + i, "kind": "cap", "subject": f"node-{i}/gpu0", "reason": "x" * 300,
            "details": {"text": "y" * 200}} for i in range(10_000)]
    reply = admin_with(FakeAutopilot(big)).events(b"", ListEvents(10_000))
    assert isinstance(reply, EventList) and reply.omitted > 0
    assert len(reply.events) + reply.omitted == 10_000
    assert reply.events[-1]["seq"] == 9_999 and reply.events[0]["seq"] == reply.omitted  # oldest ones give way
    assert len(encode(reply, 1)) <= MAX_EVENT_REPLY_BYTES + 1024 < MAX_FRAME_BYTES
    small = admin_with(FakeAutopilot(EVENTS)).events(b"", ListEvents(1))
    assert small == EventList((EVENTS[-1],), 0)


@pytest.mark.parametrize("limit", [0, -1, 10_001])
def test_events_limit_is_checked(limit: int) -> None:
    reply = admin_with(FakeAutopilot(EVENTS)).events(b"", ListEvents(limit))
    assert isinstance(reply, ErrorReply) and reply.code == "invalid_argument" and "1-10000" in reply.message


def test_without_an_autopilot_power_requests_say_so() -> None:
    api = admin_with(None)
    for reply in (api.get_power_budget(b"", GetPowerBudget()), api.set_power_budget(b"", SetPowerBudget(None, 1.0)),
                  api.events(b"", ListEvents(5)), api.unpin_power_limit(b"", UnpinPowerLimit("n", 0))):
        assert isinstance(reply, ErrorReply) and reply.code == "unavailable", reply
    assert api._pins_for("n") == {}


def test_budget_requests_reach_the_autopilot_and_its_view_is_made_wire_safe() -> None:
    autopilot = FakeAutopilot()
    api = admin_with(autopilot)
    reply = api.set_power_budget(b"", SetPowerBudget("r1", 900.0))
    assert autopilot.calls == [("set_budget", "r1", 900.0)]
    assert isinstance(reply, PowerBudgetDetail)
    assert reply.view["caps_w_by_index"] == {"1": 2.0} and reply.view["odd"] is None
    assert reply.view["hot_gpus"][0]["since_unix_s"] == T0 + 12.0  # the controller's clock, as unix time
    assert decode(encode(reply, 1)).message == reply
    refused = api.set_power_budget(b"", SetPowerBudget("nowhere", 900.0))
    assert refused == ErrorReply("invalid_budget", "no node is in rack 'nowhere'")
    for bad in (SetPowerBudget(None, -5.0), SetPowerBudget(None, 0.0), SetPowerBudget("", 5.0)):
        assert api.set_power_budget(b"", bad).code == "invalid_argument"
    assert len(autopilot.calls) == 2  # the bad ones never reached the autopilot
    assert api.unpin_power_limit(b"", UnpinPowerLimit("n", 0)).code == "not_pinned"
    autopilot.pins[("n", 0)] = 250.0
    unpinned = api.unpin_power_limit(b"", UnpinPowerLimit("n", 0))
    assert unpinned == PowerLimitUnpinned("n", 0, 250.0, "device 0 on n: power limit unpinned (was 250 W); "
                                                         "the autopilot sets it again")


def test_plain_makes_any_value_encodable() -> None:
    value = {1: (1.5, float("inf"), {2: b"x"}), "big": 1 << 70, "set": {1}, "ok": [True, None, "s"]}
    assert plain(value) == {"1": [1.5, None, {"2": b"x"}], "big": str(1 << 70), "set": "{1}",
                            "ok": [True, None, "s"]}


# --- rendering (pure) -------------------------------------------------------------------------------


def render(renderables: list[Any]) -> str:
    console = Console(file=io.StringIO(), width=220, soft_wrap=False)
    for item in renderables:
        console.print(item, highlight=False)
    return console.file.getvalue()  # type: ignore[attr-defined]


def row_of(text: str, *needles: str) -> str:
    rows = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert len(rows) == 1, (needles, text)
    return rows[0]


def test_budget_show_renders_budgets_hot_gpus_and_pins() -> None:
    text = render(power.budget_renderables(VIEW, now_unix_s=T0))
    cluster = row_of(text, "cluster")
    for cell in ("5000", "4210", "1800", "yes", "operator"):
        assert cell in cluster
    rack = row_of(text, "rack r1")
    for cell in ("900", "1105", "1200", "NO", "OVER", "mqtt", "6: node-0/0 200 W", "+2 more"):
        assert cell in rack
    assert "node-5/0" not in rack
    hot = row_of(text, "node-1", "sw_thermal_slowdown")
    assert "yes" in hot and "560" in hot and " 42 " in hot  # hot for 42 s
    assert "250" in row_of(text, "node-0 ", "250")
    empty = render(power.budget_renderables({"budgets": [], "hot_gpus": [], "pins": []}))
    assert empty.splitlines() == ["power budgets: none set", "hot GPUs: none", "pinned power limits: none"]


def test_budget_lines_and_the_infeasible_warning() -> None:
    assert power.budget_line(VIEW, None, 5000.0) == ("cluster power budget set to 5000 W "
                                                     "(measured 4210 W, floor 1800 W)")
    assert power.budget_line(VIEW, "r1", None) == "rack r1 power budget cleared"
    assert power.budget_warning(VIEW, None) is None
    warning = power.budget_warning(VIEW, "r1")
    assert warning is not None and "below its floor of 1200 W" in warning
    assert power.caps_text({}) == "-"


def test_events_table_shows_time_kind_subject_reason() -> None:
    text = render([power.events_table(EVENTS)])
    row = row_of(text, "node-0/gpu1")
    assert "cap" in row and "over the cluster budget" in row and power.event_time(T0 + 3) in row
    assert power.event_time(None) == "-" and power.event_time(float("nan")) == "-"


# --- commands against a fake admin endpoint ----------------------------------------------------------


NODE = NodeView("node-0", "host-0", "ready", "ready", "active", None, 2, {}, T0, T0, T0,
                (DeviceInfo(0, "gpu", "H100 (simulated)", "SIM-0", "sim", True, 80 << 30, 200.0, 700.0, 700.0),),
                (), None, (PinnedPowerLimit(0, 250.0),))


def handler(msg: Any) -> Any:
    if isinstance(msg, (SetPowerBudget, GetPowerBudget)):
        return PowerBudgetDetail(VIEW)
    if isinstance(msg, ListEvents):
        return EventList(tuple(EVENTS[-msg.limit:]), omitted=1 if msg.limit == 1 else 0)
    if isinstance(msg, SetNodePowerLimit):
        if msg.name != "node-0":
            return ErrorReply("unknown_node", f"no node named {msg.name!r} (known: node-0)")
        return CommandResult("c1", msg.device_index == 0, f"device {msg.device_index} power limit set to "
                                                          f"{msg.power_limit_w:g} W; pinned", msg.power_limit_w)
    if isinstance(msg, UnpinPowerLimit):
        return PowerLimitUnpinned(msg.name, msg.device_index, 250.0, "device 0 on node-0: power limit unpinned")
    if isinstance(msg, InjectDeviceFault):
        return FaultDrillResult(msg.name, msg.device_index, msg.fault, msg.xid if msg.fault != "xid" else msg.xid or 48,
                                f"device {msg.device_index} on {msg.name}: {msg.fault} done")
    if isinstance(msg, GetNode):
        return NodeDetail(NODE)
    return ErrorReply("unsupported", type(msg).__name__)


def test_power_budget_set_clear_show(controller: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = controller(handler)
    base = ["--controller", fake.address, "power", "budget"]
    assert main([*base, "set", "--cluster", "5000"]) == 0
    assert capsys.readouterr() == ("cluster power budget set to 5000 W (measured 4210 W, floor 1800 W)\n", "")
    assert fake.requests[-1] == SetPowerBudget(None, 5000.0)
    assert main([*base, "set", "--rack", "r1", "900"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("rack r1 power budget set to 900 W") and "warning: the rack r1 budget is below" in err
    assert fake.requests[-1] == SetPowerBudget("r1", 900.0)
    assert main([*base, "clear", "--rack", "r1"]) == 0
    assert capsys.readouterr().out == "rack r1 power budget cleared\n"
    assert fake.requests[-1] == SetPowerBudget("r1", None)
    assert main([*base, "clear", "--cluster", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == VIEW
    assert main([*base, "show"]) == 0
    assert "rack r1" in capsys.readouterr().out
    assert main([*base, "show", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == VIEW
    assert fake.requests[-1] == GetPowerBudget()


@pytest.mark.parametrize("argv, message", [
    (["power", "budget", "set", "--cluster", "-5"], "a power budget must be a positive number of watts, got -5"),
    (["power", "budget", "set", "--cluster", "nan"], "a power budget must be a positive number of watts, got nan"),
    (["power", "budget", "set", "--rack", "r1", "inf"], "a power budget must be a positive number of watts, got inf"),
    (["power", "budget", "set", "--rack", " ", "10"], "--rack needs a rack name (the node label 'rack')"),
    (["events", "--limit", "0"], "--limit must be 1-10000, got 0"),
    (["events", "--limit", "10001"], "--limit must be 1-10000, got 10001"),
    (["node", "set-power-limit", "node-0", "0", "-1"], "a power limit must be a positive number of watts, got -1"),
    (["node", "set-power-limit", "node-0", "0", "nan"], "a power limit must be a positive number of watts, got nan"),
    (["node", "set-power-limit", "node-0", "0"], "give either WATTS (set and pin the limit) or --unpin"),
    (["node", "set-power-limit", "node-0", "0", "250", "--unpin"], "give either WATTS"),
    (["node", "fault", "node-0", "0", "clear", "--xid", "13"], "--xid goes with fault xid only, not clear"),
])
def test_bad_arguments_are_one_line_errors_before_sending(controller: Any, capsys: pytest.CaptureFixture[str],
                                                          argv: list[str], message: str) -> None:
    fake = controller(handler)
    assert main(["--controller", fake.address, *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"murakkabctl: {message}") and err.count("\n") == 1, err
    assert fake.requests == []


@pytest.mark.parametrize("argv", [
    ["power", "budget", "set", "5000"],  # neither --cluster nor --rack
    ["power", "budget", "set", "--cluster", "--rack", "r1", "5000"],
    ["power", "budget", "clear"],
    ["node", "fault", "node-0", "0", "melt"],
    ["node", "fault", "node-0", "x", "xid"],
])
def test_malformed_commands_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--controller", "tcp://127.0.0.1:9", *argv])
    assert exc.value.code == 2


def test_events_table_json_and_the_omitted_note(controller: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = controller(handler)
    base = ["--controller", fake.address, "events"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "budget-set" in out and "node-0/gpu1" in out
    assert fake.requests[-1] == ListEvents(50)
    assert main([*base, "-o", "json", "--limit", "1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == EVENTS[-1:]
    assert err == "murakkabctl: 1 older events did not fit in one reply; ask for fewer with --limit\n"
    assert fake.requests[-1] == ListEvents(1)


def test_set_power_limit_pins_and_unpin_releases(controller: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = controller(handler)
    base = ["--controller", fake.address, "node", "set-power-limit"]
    assert main([*base, "node-0", "0", "250"]) == 0
    assert capsys.readouterr().out == "device 0 power limit set to 250 W; pinned\n"
    assert fake.requests[-1] == SetNodePowerLimit("node-0", 0, 250.0)
    assert main([*base, "node-0", "0", "--unpin"]) == 0
    assert capsys.readouterr().out == "device 0 on node-0: power limit unpinned\n"
    assert fake.requests[-1] == UnpinPowerLimit("node-0", 0)
    assert main([*base, "node-0", "0", "--unpin", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["previous_power_limit_w"] == 250.0
    assert main([*base, "node-0", "1", "300"]) == 1  # the agent refused
    assert capsys.readouterr().err == "murakkabctl: agent refused: device 1 power limit set to 300 W; pinned\n"
    assert main([*base, "nope", "0", "300"]) == 1
    assert capsys.readouterr().err == "murakkabctl: unknown_node: no node named 'nope' (known: node-0)\n"


def test_node_fault_sends_the_drill_and_prints_one_line(controller: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = controller(handler)
    base = ["--controller", fake.address, "node", "fault", "node-0", "0"]
    assert main([*base, "cooling-failure"]) == 0
    assert capsys.readouterr().out == "device 0 on node-0: cooling-failure done\n"
    assert fake.requests[-1] == InjectDeviceFault("node-0", 0, "cooling-failure", None)
    assert main([*base, "xid", "--xid", "13", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "node-0", "device_index": 0, "fault": "xid", "xid": 13,
                                                   "message": "device 0 on node-0: xid done"}
    assert fake.requests[-1] == InjectDeviceFault("node-0", 0, "xid", 13)
    assert main([*base, "fall-off-bus"]) == 0 and main([*base, "clear"]) == 0
    assert [m.fault for m in fake.requests[-2:]] == ["fall-off-bus", "clear"]


def test_node_show_lists_pinned_limits(controller: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = controller(handler)
    assert main(["--controller", fake.address, "node", "show", "node-0"]) == 0
    assert "pinned power limits: device 0 250 W" in capsys.readouterr().out
    assert main(["--controller", fake.address, "node", "show", "node-0", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pinned_power_limits"] == [dataclasses.asdict(PinnedPowerLimit(0, 250.0))]


def test_budget_show_lists_racks_whose_cooling_is_not_ok() -> None:
    view = {**VIEW, "cooling": [{"rack": "r2", "state": "failed", "inlet_c": 41.5, "since_s": 3.0,
                                 "source": "facility", "gpus": 8, "caps_w": {"node-7/0": 420.0}}]}
    row = row_of(render(power.budget_renderables(view, now_unix_s=T0)), "r2", "failed")
    for cell in ("41.5", "8", "facility", "node-7/0 420 W"):
        assert cell in row
    assert "COOLING" not in render(power.budget_renderables(VIEW, now_unix_s=T0))
