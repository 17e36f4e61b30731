"""Wire protocol: round trips, strict decoding, and property-based fuzzing of the decoder."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.protocol import (
    MAX_FRAME_BYTES, PROTOCOL_VERSION, CancelInvocation, DeviceFaultDrill, DeviceTelemetry, DrainNode, GetNode,
    Heartbeat, HostTelemetry, Invoke, ProtocolError, SetPowerLimit, StartComponent, StopComponent, build_dispatch,
    decode, encode, ops_served_by, registered_ops,
)
from common.protocol.codec import message

HOST = HostTelemetry(cpu_utilization_pct=1.5, memory_used_bytes=10, memory_total_bytes=20, load_avg_1m=0.25)


def heartbeat(devices: int = 8) -> Heartbeat:
    return Heartbeat(
        node_name="gpu-01", generation=3, seq=42, sent_at_unix_s=1.7e9,
        devices=tuple(DeviceTelemetry(index=i, power_w=350.5, energy_j=1.25e6, temperature_c=61.0,
                                       memory_used_bytes=1 << 30, memory_total_bytes=80 << 30, utilization_pct=87.0,
                                       sm_clock_mhz=1755, power_limit_w=700.0, throttle_reasons=("sw_power_cap",))
                      for i in range(devices)),
        host=HOST)


def envelope(op: object = "get_node", body: object = None, v: object = PROTOCOL_VERSION, rid: object = 7) -> bytes:
    return msgpack.packb({"v": v, "op": op, "id": rid, "body": {"name": "n1"} if body is None else body})


def test_round_trip_keeps_every_field_and_type() -> None:
    msg = heartbeat()
    frame = decode(encode(msg, 99))
    assert frame.request_id == 99
    assert frame.message == msg
    assert isinstance(frame.message.devices, tuple)
    assert frame.spec.op == "heartbeat"


def test_int_is_widened_to_float_but_not_the_reverse() -> None:
    ok = decode(msgpack.packb({"v": 1, "op": "set_node_power_limit", "id": 1,
                               "body": {"name": "n", "device_index": 0, "power_limit_w": 300}}))
    assert ok.message.power_limit_w == 300.0 and isinstance(ok.message.power_limit_w, float)
    with pytest.raises(ProtocolError) as err:
        decode(msgpack.packb({"v": 1, "op": "set_node_power_limit", "id": 1,
                              "body": {"name": "n", "device_index": 0.0, "power_limit_w": 300}}))
    assert err.value.code == "invalid_message" and "device_index" in err.value.message


@pytest.mark.parametrize("frame, code, has_id", [
    (b"", "malformed_frame", False),
    (b"\xc1", "malformed_frame", False),
    (msgpack.packb([1, 2, 3]), "malformed_frame", False),
    (msgpack.packb({"v": 1, "op": "get_node", "body": {}}), "malformed_frame", False),
    (envelope(rid=-1), "malformed_frame", False),
    (envelope(rid=True), "malformed_frame", False),
    (envelope(rid="7"), "malformed_frame", False),
    (msgpack.packb({"v": 1, "op": "get_node", "id": 1, "body": {"name": "n"}, "extra": 1}), "malformed_frame", True),
    (envelope(v=2), "unsupported_version", True),
    (envelope(v="1"), "unsupported_version", True),
    (envelope(op="no_such_op"), "unknown_op", True),
    (envelope(op=5), "unknown_op", True),
    (envelope(body=[1]), "invalid_message", True),
    (envelope(body={"name": 5}), "invalid_message", True),
    (envelope(body={"name": b"n1"}), "invalid_message", True),
    (envelope(body={"name": "n1", "extra": 1}), "invalid_message", True),
    (envelope(body={}), "invalid_message", True),
    (envelope(op="drain_node", body={"name": "n1", "reason": True}), "invalid_message", True),
    (msgpack.packb({"v": 1, "op": "get_node", "id": 1, "body": {"name": msgpack.ExtType(1, b"x")}}),
     "malformed_frame", False),
    (b"\x81\xa1v" + b"\xff", "malformed_frame", False),  # invalid UTF-8 would follow; truncated map
    (msgpack.packb({1: 2}), "malformed_frame", False),  # non-string map key
])
def test_bad_frames_give_explicit_errors(frame: bytes, code: str, has_id: bool) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(frame)
    assert err.value.code == code
    assert err.value.message
    assert (err.value.request_id is not None) == has_id


def test_invalid_utf8_is_malformed() -> None:
    with pytest.raises(ProtocolError) as err:
        decode(b"\x84\xa1v\x01\xa2op\xa2\xff\xfe\xa2id\x01\xa4body\x80")
    assert err.value.code == "malformed_frame"


def test_oversized_frame_is_refused_before_parsing() -> None:
    frame = envelope(body={"name": "x" * (MAX_FRAME_BYTES + 10)})
    with pytest.raises(ProtocolError) as err:
        decode(frame)
    assert err.value.code == "frame_too_large"
    with pytest.raises(ProtocolError):
        encode(GetNode("x" * (MAX_FRAME_BYTES + 10)), 1)


def test_error_messages_name_the_field() -> None:
    with pytest.raises(ProtocolError) as err:
        decode(msgpack.packb({"v": 1, "op": "heartbeat", "id": 3, "body": {
            **dataclasses.asdict(heartbeat(1)), "devices": [[0, "lots", *heartbeat(1).devices[0][2:]]]}}))
    assert "devices.0.1" in err.value.message


def test_heartbeat_devices_are_compact_rows_checked_field_by_field() -> None:
    body = msgpack.unpackb(encode(heartbeat(2), 1))["body"]
    assert isinstance(body["devices"][0], list) and len(body["devices"][0]) == 12
    for bad_row, fragment in (([1, 2, 3], "devices.0.3"), ({"index": 0}, "devices.0.power_w"),
                              ([True, *body["devices"][0][1:]], "devices.0.0"), ("row", "devices.0"),
                              ([*body["devices"][0], "extra"], "devices.0"),
                              ([0, float("nan"), *body["devices"][0][2:]], "devices.0.1")):
        with pytest.raises(ProtocolError) as err:
            decode(msgpack.packb({"v": 1, "op": "heartbeat", "id": 3, "body": {**body, "devices": [bad_row]}}))
        assert fragment in err.value.message


def test_registry_rules_hold_at_import() -> None:
    ops = registered_ops()
    assert len({spec.cls for spec in ops.values()}) == len(ops)
    for spec in ops.values():
        assert spec.cls.op == spec.op
        if spec.kind == "request":
            assert spec.served_by is not None
    assert ops_served_by("agent") == {"set_power_limit", "start_component", "stop_component", "invoke",
                                      "cancel_invocation", "device_fault_drill"}


def test_dispatch_table_must_cover_exactly_the_endpoint() -> None:
    with pytest.raises(TypeError, match="no handler for"):
        build_dispatch("controller.admin", {GetNode: object()})
    with pytest.raises(TypeError, match="not a request served by"):
        build_dispatch("agent", {DrainNode: object(), SetPowerLimit: object()})
    with pytest.raises(TypeError, match="no handler for: cancel_invocation, device_fault_drill, invoke, "
                                        "start_component, stop_component"):
        build_dispatch("agent", {SetPowerLimit: "handler"})
    table = build_dispatch("agent", {SetPowerLimit: "a", StartComponent: "b", StopComponent: "c", Invoke: "d",
                                     CancelInvocation: "e", DeviceFaultDrill: "f"})
    assert table == {"set_power_limit": "a", "start_component": "b", "stop_component": "c", "invoke": "d",
                     "cancel_invocation": "e", "device_fault_drill": "f"}


def test_registering_an_op_twice_or_a_mutable_class_fails() -> None:
    with pytest.raises(TypeError, match="registered twice"):
        @message("heartbeat", kind="reply")
        @dataclasses.dataclass(frozen=True)
        class Dup:
            x: int
    with pytest.raises(TypeError, match="frozen"):
        @message("mutable_thing", kind="reply")
        @dataclasses.dataclass
        class Mutable:
            x: int


# --- property-based fuzzing ------------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_anything_but_protocol_error(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError as err:
        assert err.code in {"malformed_frame", "unsupported_version", "unknown_op", "invalid_message",
                            "frame_too_large"}


@settings(max_examples=400, deadline=None)
@given(op=st.sampled_from(sorted(registered_ops())) | st.text(max_size=10), body=msgpack_values,
       v=st.sampled_from([1, 1, 1, 0, 2, "1", None]), rid=st.integers(-5, 2 ** 64 - 1) | st.text(max_size=3))
def test_structured_garbage_is_refused_or_valid(op: str, body: object, v: object, rid: object) -> None:
    frame = msgpack.packb({"v": v, "op": op, "id": rid, "body": body})
    try:
        decoded = decode(frame)
    except ProtocolError as err:
        assert err.message
        return
    # Anything accepted round-trips to the same message: strict decoding invents nothing.
    assert decode(encode(decoded.message, decoded.request_id)).message == decoded.message


@settings(max_examples=200, deadline=None)
@given(st.builds(DeviceTelemetry, index=st.integers(0, 64), power_w=st.floats(0, 2000), energy_j=st.floats(0, 1e12),
                 temperature_c=st.none() | st.floats(-20, 120), memory_used_bytes=st.integers(0, 2 ** 40),
                 memory_total_bytes=st.integers(0, 2 ** 40), utilization_pct=st.floats(0, 100),
                 sm_clock_mhz=st.none() | st.integers(0, 3000), power_limit_w=st.none() | st.floats(0, 1000),
                 throttle_reasons=st.lists(st.text(max_size=12), max_size=3).map(tuple),
                 health=st.sampled_from(["ok", "xid", "lost"]), last_xid=st.none() | st.integers(0, 200)))
def test_any_valid_telemetry_round_trips(sample: DeviceTelemetry) -> None:
    msg = dataclasses.replace(heartbeat(0), devices=(sample,))
    assert decode(encode(msg, 1)).message == msg
