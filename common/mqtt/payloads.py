"""Strict decoding of MQTT payloads, and the node topics' payload models.

``decode_json(raw, Model)`` refuses a payload that is too big, not UTF-8 JSON (a key given twice included), not
an object, or not exactly the
model's schema (pydantic strict mode, unknown keys forbidden, NaN and infinities refused), raising
``PayloadError(reason, message)`` with ``reason`` one of ``too_large``, ``not_json``, ``schema``. A daemon counts
it, logs it once per topic and interval with ``RateLimitedLog``, and ignores it.

Node topics (``PREFIX/nodes/NODE/...``), published by each agent:

- ``telemetry`` (QoS 0, per heartbeat): ``NodeTelemetry``.
- ``status`` (QoS 1, retained): ``NodeStatus``; the agent's last will is ``{"state": "offline", ...}``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.transport import RateLimitedLog

__all__ = ["PayloadError", "decode_json", "RateLimitedLog", "NodeTelemetry", "DeviceTelemetry", "NodeStatus",
           "MAX_PAYLOAD_BYTES", "NODE_TOPIC_KINDS"]

MAX_PAYLOAD_BYTES = 16384
MAX_NODE_PAYLOAD_BYTES = 65536  # a telemetry message of a host with many devices
NODE_TOPIC_KINDS = ("telemetry", "status")


class PayloadError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys repeat is refused: which of two budgets a reader takes is a parser's accident."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key {key[:64]!r} appears twice")
        data[key] = value
    return data


def decode_json(raw: bytes, model: type[BaseModel], max_bytes: int = MAX_PAYLOAD_BYTES) -> Any:
    """The payload as an instance of ``model``, or PayloadError."""
    if len(raw) > max_bytes:
        raise PayloadError("too_large", f"{len(raw)} bytes, more than the {max_bytes} allowed")
    try:
        data = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant,
                          object_pairs_hook=_refuse_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError("not_json", f"not UTF-8 JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise PayloadError("schema", f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                           for e in exc.errors()[:5])
        raise PayloadError("schema", errors[:500]) from None


def _strict(frozen: bool = True) -> ConfigDict:
    return ConfigDict(extra="forbid", strict=True, frozen=frozen, allow_inf_nan=False)


class DeviceTelemetry(BaseModel):
    """One device of a node at the heartbeat: watts, joules (cumulative since the agent started reading it),
    degrees Celsius, percent, bytes. ``None`` where the device does not report it."""

    model_config = _strict()

    index: int = Field(..., ge=0)
    kind: str  # "gpu" or "cpu"
    model: str = ""
    power_w: float | None = Field(None, ge=0)
    energy_j: float | None = Field(None, ge=0)
    temperature_c: float | None = None
    power_limit_w: float | None = Field(None, ge=0)
    utilization_pct: float | None = Field(None, ge=0, le=100)
    memory_used_bytes: int | None = Field(None, ge=0)
    throttle_reasons: list[str] = Field(default_factory=list)


class NodeTelemetry(BaseModel):
    """``nodes/NODE/telemetry``."""

    model_config = _strict()

    node: str
    sent_at_unix_s: float
    devices: list[DeviceTelemetry] = Field(default_factory=list, max_length=1024)


class NodeStatus(BaseModel):
    """``nodes/NODE/status`` (retained): ``online`` while the agent's link is up; its last will says ``offline``."""

    model_config = _strict()

    state: Literal["online", "offline"]
    node: str
    at_unix_s: float
