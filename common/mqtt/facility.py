"""Facility and controller-event topics: their names and strict payload models.

Inbound (a facility's BMS / DCIM publishes, the controller subscribes):

- ``PREFIX/facility/racks/RACK/power_budget_w`` (retained): ``{"power_budget_w": W}``, W in watts, positive and at
  most 1e9, or ``null`` to clear the rack's budget. A zero-length payload (how MQTT deletes a retained message) also
  clears it.
- ``PREFIX/facility/racks/RACK/cooling``: ``{"state": "ok" | "degraded" | "failed", "inlet_c": T}``, the rack's
  cooling state and its inlet air temperature in degrees Celsius (``null`` or absent when unknown).
- ``PREFIX/facility/grid``: ``{"price_usd_per_mwh": P, "carbon_g_per_kwh": C}``, the utility's energy price (not
  negative) and the grid's carbon intensity, both required.

Outbound (the controller publishes):

- ``PREFIX/controller/events``: one ``ControllerEvent`` per autopilot decision, as ``murakkabctl events`` lists it.
- ``PREFIX/controller/status`` (retained): ``ControllerStatus`` while the controller runs; the broker replaces it
  with the plain text ``offline`` (the last will) when the controller's connection dies.

RACK is one topic level, validated as a node label value is: 1-253 characters of letters, digits, ``.``, ``_``
and ``-``, starting with a letter or digit.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_BUDGET_W = 1e9
MAX_RACK_CHARS = 253
RACK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Payload size limits (bytes) for decode_json: facility messages are small; anything bigger is refused unread.
MAX_FACILITY_PAYLOAD_BYTES = 4096

COOLING_STATES = ("ok", "degraded", "failed")

# topic kinds, the label murakkab_facility_messages_total{topic_kind} carries
POWER_BUDGET = "power_budget"
COOLING = "cooling"
GRID = "grid"
TOPIC_KINDS = (POWER_BUDGET, COOLING, GRID)

OFFLINE = b"offline"


def _strict() -> ConfigDict:
    return ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class RackPowerBudget(BaseModel):
    """``facility/racks/RACK/power_budget_w``: the key is required; ``null`` clears the budget."""

    model_config = _strict()

    power_budget_w: float | None = Field(..., gt=0, le=MAX_BUDGET_W)


class RackCooling(BaseModel):
    """``facility/racks/RACK/cooling``."""

    model_config = _strict()

    state: Literal["ok", "degraded", "failed"]
    inlet_c: float | None = Field(None, ge=-50.0, le=150.0)


class GridSignal(BaseModel):
    """``facility/grid``: the energy price and the grid's carbon intensity, both (the autopilot takes no negative
    price, so a negative spot price is refused here as the schema's)."""

    model_config = _strict()

    price_usd_per_mwh: float = Field(..., ge=0.0, le=100_000.0)
    carbon_g_per_kwh: float = Field(..., ge=0.0, le=10_000.0)


class ControllerEvent(BaseModel):
    """``controller/events``: one autopilot decision, the row ``murakkabctl events`` shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int
    at_unix_s: float
    kind: str  # e.g. budget-set, budget, heat, plan, reactive, rollout-switched
    subject: str  # what it is about: "cluster", "rack r1", a node, an executor
    reason: str
    details: dict[str, Any] = Field(default_factory=dict)
    epoch: int  # the controller epoch that decided it


class ControllerStatus(BaseModel):
    """``controller/status`` (retained) while the controller runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: Literal["online"] = "online"
    epoch: int
    started_at_unix_s: float
    agent_endpoint: str
    admin_endpoint: str


def valid_rack(rack: str) -> bool:
    return 1 <= len(rack) <= MAX_RACK_CHARS and RACK_PATTERN.fullmatch(rack) is not None


def rack_filter(kind: str) -> tuple[str, ...]:
    """Topic parts (under the prefix) of the filter for one rack topic kind."""
    return ("facility", "racks", "+", "power_budget_w" if kind == POWER_BUDGET else "cooling")


GRID_TOPIC = ("facility", "grid")
EVENTS_TOPIC = ("controller", "events")
STATUS_TOPIC = ("controller", "status")


def parse_facility_topic(topic: str, prefix: str) -> tuple[str, str | None] | None:
    """``(kind, rack)`` of a facility topic under ``prefix`` (rack None for the grid), or None for any other topic.

    The rack is returned as it appears; check it with ``valid_rack``.
    """
    prefix = prefix.rstrip("/")
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1:].split("/")
    if parts == list(GRID_TOPIC):
        return GRID, None
    if len(parts) == 4 and parts[:2] == ["facility", "racks"]:
        if parts[3] == "power_budget_w":
            return POWER_BUDGET, parts[2]
        if parts[3] == "cooling":
            return COOLING, parts[2]
    return None
