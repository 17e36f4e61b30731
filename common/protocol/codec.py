"""Message registry and strict msgpack codec.

Every wire message is a frozen dataclass registered here under an ``op`` name,
the endpoint that serves it and whether it is a request or a reply. A frame is a
msgpack map ``{"v": version, "op": name, "id": request_id, "body": {...}}``.
Decoding is strict: a size limit, no ext types, exact envelope keys, and field
types checked by pydantic (no coercion of "1" to 1 or of True to 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import msgpack
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
MAX_REQUEST_ID = (1 << 63) - 1

Endpoint = Literal["controller.agents", "controller.admin", "agent"]
Kind = Literal["request", "reply"]


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``code`` names the reason for metrics and replies."""

    def __init__(self, code: str, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclasses.dataclass(frozen=True)
class MessageSpec:
    op: str
    cls: type
    kind: Kind
    served_by: Endpoint | None
    adapter: TypeAdapter[Any]


_BY_OP: dict[str, MessageSpec] = {}
_BY_CLASS: dict[type, MessageSpec] = {}

M = TypeVar("M")


def message(op: str, *, kind: Kind, served_by: Endpoint | None = None) -> Callable[[type[M]], type[M]]:
    """Register a frozen dataclass as a wire message (requests name the endpoint serving them)."""
    if kind == "request" and served_by is None:
        raise TypeError(f"request {op!r} must name the endpoint that serves it")

    def register(cls: type[M]) -> type[M]:
        if op in _BY_OP:
            raise TypeError(f"op {op!r} registered twice ({_BY_OP[op].cls.__name__}, {cls.__name__})")
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        cls = with_config(ConfigDict(extra="forbid", allow_inf_nan=False))(cls)
        cls.op = op  # type: ignore[attr-defined]
        spec = MessageSpec(op, cls, kind, served_by, TypeAdapter(cls))
        _BY_OP[op] = spec
        _BY_CLASS[cls] = spec
        return cls

    return register


def spec_for(op_or_cls: str | type) -> MessageSpec:
    return _BY_OP[op_or_cls] if isinstance(op_or_cls, str) else _BY_CLASS[op_or_cls]


def registered_ops() -> Mapping[str, MessageSpec]:
    return dict(_BY_OP)


def ops_served_by(endpoint: Endpoint) -> set[str]:
    return {s.op for s in _BY_OP.values() if s.kind == "request" and s.served_by == endpoint}


H = TypeVar("H")


def build_dispatch(endpoint: Endpoint, handlers: Mapping[type, H]) -> dict[str, H]:
    """Dispatch table for one endpoint: exactly one handler for every request it serves."""
    table: dict[str, H] = {}
    for cls, handler in handlers.items():
        spec = _BY_CLASS.get(cls)
        if spec is None:
            raise TypeError(f"{cls!r} is not a registered message")
        if spec.kind != "request" or spec.served_by != endpoint:
            raise TypeError(f"{spec.op!r} is not a request served by {endpoint}")
        table[spec.op] = handler
    missing = ops_served_by(endpoint) - table.keys()
    if missing:
        raise TypeError(f"{endpoint} has no handler for: {', '.join(sorted(missing))}")
    return table


@dataclasses.dataclass(frozen=True)
class Frame:
    """A decoded frame: the message and the request id it carries."""

    request_id: int
    message: Any

    @property
    def spec(self) -> MessageSpec:
        return _BY_CLASS[type(self.message)]


def encode(msg: Any, request_id: int) -> bytes:
    spec = _BY_CLASS.get(type(msg))
    if spec is None:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    body = spec.adapter.dump_python(msg)
    frame = msgpack.packb({"v": PROTOCOL_VERSION, "op": spec.op, "id": request_id, "body": body})
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("frame_too_large", f"{spec.op} encodes to {len(frame)} bytes (max {MAX_FRAME_BYTES})")
    return frame


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


_ENVELOPE_KEYS = frozenset({"v", "op", "id", "body"})


def decode(frame: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Decode and validate one frame, or raise ProtocolError saying exactly what is wrong."""
    if len(frame) > max_frame_bytes:
        raise ProtocolError("frame_too_large", f"frame of {len(frame)} bytes exceeds the {max_frame_bytes}-byte limit")
    try:
        envelope = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, ext_hook=_reject_ext, timestamp=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input; all mean the same here
        raise ProtocolError("malformed_frame", f"not a msgpack frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(envelope, dict):
        raise ProtocolError("malformed_frame", f"frame must be a map, got {type(envelope).__name__}")
    request_id = envelope.get("id")
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolError("malformed_frame", "envelope field 'id' must be a non-negative integer")
    if envelope.keys() != _ENVELOPE_KEYS:
        extra = sorted(map(str, envelope.keys() - _ENVELOPE_KEYS))
        missing = sorted(_ENVELOPE_KEYS - envelope.keys())
        raise ProtocolError("malformed_frame", f"envelope keys wrong: missing {missing}, unexpected {extra}", request_id)
    version = envelope["v"]
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError("unsupported_version", f"protocol version {version!r} not supported (speaks {PROTOCOL_VERSION})", request_id)
    op = envelope["op"]
    spec = _BY_OP.get(op) if isinstance(op, str) else None
    if spec is None:
        raise ProtocolError("unknown_op", f"unknown op {op!r}", request_id)
    body = envelope["body"]
    if not isinstance(body, dict):
        raise ProtocolError("invalid_message", f"{op}: body must be a map", request_id)
    try:
        msg = spec.adapter.validate_python(body)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", f"{op}: {_summarize(exc)}", request_id) from None
    return Frame(request_id, msg)


def _summarize(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")

