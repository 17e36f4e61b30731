"""Admin messages beyond the cluster's core: profile runs, fault drills on simulated GPUs, power budgets,
pins and the autopilot's events. Registered like every message; ``common.protocol.messages`` holds the
core ones, and ``common.protocol`` exports both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr

from common.protocol.codec import message

__all__: list[str] = []

# --- admin CLI -> controller: profiles ---------------------------------------------------


@message("start_profile", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class StartProfile:
    """Profile an executor on one node's device (the first of ``gpu_count`` consecutive GPUs for
    tensor-parallel executors). ``sweep`` overrides axes of the default sweep (see
    policies/profiles.py ``Sweep``); the run goes on in the controller after the reply."""

    executor: StrictStr
    node: StrictStr
    device_index: StrictInt
    sweep: dict[StrictStr, Any] = field(default_factory=dict)


@message("profile_started", kind="reply")
@dataclass(frozen=True)
class ProfileStarted:
    run_id: StrictStr
    points: StrictInt  # measurement points, TTFT probes included
    sweep: dict[StrictStr, Any] = field(default_factory=dict)  # the effective sweep


@message("get_profile_run", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetProfileRun:
    run_id: StrictStr
    include_samples: StrictBool = True


@message("profile_run_status", kind="reply")
@dataclass(frozen=True)
class ProfileRunStatus:
    """``state`` is starting | running | stopping | succeeded | failed | cancelled; ``samples`` are
    ProfileSample dicts (policies/profiles.py) stored so far."""

    run_id: StrictStr
    executor: StrictStr
    node: StrictStr
    device_index: StrictInt
    state: StrictStr
    done_points: StrictInt
    total_points: StrictInt
    message: StrictStr
    samples: tuple[dict[StrictStr, Any], ...]
    started_at_unix_s: StrictFloat
    ended_at_unix_s: StrictFloat | None = None


@message("list_profiles", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ListProfiles:
    """Stored samples (oldest first, at most ``limit``); with ``fit`` also each predictor's held-out error."""

    executor: StrictStr = ""
    hardware: StrictStr = ""
    fit: StrictBool = False
    limit: StrictInt = 1000
    run_id: StrictStr = ""  # only the samples of one profile run


@dataclass(frozen=True)
class PredictorFit:
    """Held-out error of one (executor, hardware) predictor pair; MAPEs are fractions (0.1 = 10 %),
    None where there are too few samples to hold any out. ``modeled_*_mape``: how far the
    catalog's model (policies/perf_model.py) is from the measured samples, where both exist."""

    executor: StrictStr
    hardware: StrictStr
    source: StrictStr  # the samples it learned from: measured | modeled
    samples: StrictInt
    latency_model: StrictStr
    energy_model: StrictStr | None
    latency_mape: StrictFloat | None
    energy_mape: StrictFloat | None
    modeled_latency_mape: StrictFloat | None = None
    modeled_energy_mape: StrictFloat | None = None


@message("profile_list", kind="reply")
@dataclass(frozen=True)
class ProfileList:
    samples: tuple[dict[StrictStr, Any], ...]
    total: StrictInt  # samples matching the filter, including any beyond ``limit``
    fits: tuple[PredictorFit, ...] = ()


__all__ += [
    "StartProfile",
    "ProfileStarted",
    "GetProfileRun",
    "ProfileRunStatus",
    "ListProfiles",
    "PredictorFit",
    "ProfileList",
]


# --- admin CLI -> controller -> agents: fault drills ----------------------------------------

FAULT_DRILL_KINDS: tuple[str, ...] = ("cooling-failure", "xid", "fall-off-bus", "clear")
DEFAULT_DRILL_XID = 48  # double-bit ECC: the GPU keeps running but the operator must act
MAX_XID = 1023


@message("inject_device_fault", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class InjectDeviceFault:
    """A fault drill on a simulated GPU of a live cluster, to rehearse how the autopilot and operators react.

    ``fault`` is one of FAULT_DRILL_KINDS; ``xid`` is for kind ``xid`` only (None: DEFAULT_DRILL_XID).
    ``clear`` ends a cooling failure; an Xid or a fall off the bus lasts until the agent restarts.
    """

    name: StrictStr
    device_index: StrictInt
    fault: StrictStr
    xid: StrictInt | None = None


@message("device_fault_drill", kind="request", served_by="agent")
@dataclass(frozen=True)
class DeviceFaultDrill:
    """The agent command for InjectDeviceFault; agents apply it to simulated GPUs only and answer a CommandResult."""

    command_id: StrictStr
    controller_epoch: StrictInt
    node_generation: StrictInt
    device_index: StrictInt
    fault: StrictStr
    xid: StrictInt | None = None


@message("fault_drill_result", kind="reply")
@dataclass(frozen=True)
class FaultDrillResult:
    """What a drill did, in the agent's words (``message``)."""

    name: StrictStr
    device_index: StrictInt
    fault: StrictStr
    xid: StrictInt | None
    message: StrictStr


# --- admin CLI -> controller: power budgets, pins, autopilot events -------------------------

MAX_EVENTS = 10_000


@message("set_power_budget", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class SetPowerBudget:
    """Set (watts) or clear (None) the cluster's (``rack`` None) or one rack's GPU power budget; the
    autopilot caps devices to hold it and plans within it."""

    rack: StrictStr | None
    power_budget_w: StrictFloat | None


@message("get_power_budget", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetPowerBudget:
    pass


@message("power_budget_detail", kind="reply")
@dataclass(frozen=True)
class PowerBudgetDetail:
    """The autopilot's budget view: ``budgets`` (scope, rack, power_budget_w, measured_power_w, floor_w,
    feasible, over, source, caps_w), ``hot_gpus`` and ``pins``, as plain data."""

    view: dict[StrictStr, Any]


@message("list_events", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ListEvents:
    """The newest ``limit`` (1..MAX_EVENTS) autopilot events: budgets, caps, heat, pins, plans."""

    limit: StrictInt = 100


@message("event_list", kind="reply")
@dataclass(frozen=True)
class EventList:
    """Events oldest first, each {seq, at_unix_s, kind, subject, reason, details}; ``omitted`` counts the
    oldest of the requested events left out to keep the reply within one frame."""

    events: tuple[dict[StrictStr, Any], ...]
    omitted: StrictInt = 0


@message("unpin_power_limit", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class UnpinPowerLimit:
    """Release an operator's pinned power limit so the autopilot sets that device's limit again."""

    name: StrictStr
    device_index: StrictInt


@message("power_limit_unpinned", kind="reply")
@dataclass(frozen=True)
class PowerLimitUnpinned:
    name: StrictStr
    device_index: StrictInt
    previous_power_limit_w: StrictFloat | None
    message: StrictStr


__all__ += [
    "FAULT_DRILL_KINDS",
    "DEFAULT_DRILL_XID",
    "MAX_XID",
    "InjectDeviceFault",
    "DeviceFaultDrill",
    "FaultDrillResult",
    "MAX_EVENTS",
    "SetPowerBudget",
    "GetPowerBudget",
    "PowerBudgetDetail",
    "ListEvents",
    "EventList",
    "UnpinPowerLimit",
    "PowerLimitUnpinned",
]
