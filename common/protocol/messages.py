"""Every message the controller, the agents and the admin CLI exchange.

Field types use pydantic's strict scalars so a decoded message has exactly the
types declared (an int where a float is declared is accepted and widened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr

from common.protocol.codec import message

# --- shared shapes (not messages themselves) -------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is; sent at registration and unchanged while the agent runs."""

    index: StrictInt
    kind: StrictStr  # "gpu" | "cpu"
    model: StrictStr
    uuid: StrictStr
    backend: StrictStr  # "nvml" | "sim" | "cpu"
    simulated: StrictBool
    memory_total_bytes: StrictInt
    power_limit_min_w: StrictFloat | None = None
    power_limit_max_w: StrictFloat | None = None
    power_limit_default_w: StrictFloat | None = None


class DeviceTelemetry(NamedTuple):
    """One sample of one device. ``None`` means the backend cannot measure that field.

    A named tuple, not a dataclass: heartbeats carry one per device, on the wire as an
    array in field order (under half the bytes of a map), and validating named tuples
    costs a third of validating dataclasses, which matters at a thousand nodes.
    """

    index: StrictInt
    power_w: StrictFloat
    energy_j: StrictFloat
    temperature_c: StrictFloat | None
    memory_used_bytes: StrictInt
    memory_total_bytes: StrictInt
    utilization_pct: StrictFloat
    sm_clock_mhz: StrictInt | None
    power_limit_w: StrictFloat | None
    throttle_reasons: tuple[StrictStr, ...] = ()
    health: StrictStr = "ok"  # "ok" | "xid" | "lost"
    last_xid: StrictInt | None = None


@dataclass(frozen=True)
class HostInfo:
    cpu_count: StrictInt
    memory_total_bytes: StrictInt
    os: StrictStr
    python_version: StrictStr


@dataclass(frozen=True)
class HostTelemetry:
    cpu_utilization_pct: StrictFloat
    memory_used_bytes: StrictInt
    memory_total_bytes: StrictInt
    load_avg_1m: StrictFloat


@dataclass(frozen=True)
class PinnedPowerLimit:
    """A power limit an operator pinned on one device (msgpack map keys must be strings, so not a dict)."""

    device_index: StrictInt
    power_limit_w: StrictFloat


@dataclass(frozen=True)
class NodeView:
    """The controller's view of one node, as the admin API returns it."""

    name: StrictStr
    hostname: StrictStr
    state: StrictStr
    liveness: StrictStr
    admin_state: StrictStr
    drain_reason: StrictStr | None
    generation: StrictInt
    labels: dict[StrictStr, StrictStr]
    registered_at_unix_s: StrictFloat | None
    last_seen_unix_s: StrictFloat | None
    state_since_unix_s: StrictFloat
    devices: tuple[DeviceInfo, ...]
    telemetry: tuple[DeviceTelemetry, ...]
    host: HostTelemetry | None
    pinned_power_limits: tuple[PinnedPowerLimit, ...] = ()  # operator pins the autopilot plans around



class ComponentReport(NamedTuple):
    """The actual state of one component on an agent, sent in every heartbeat.

    ``state`` is pending | starting | ready | draining | stopped | failed; ``reason`` says
    why it is failed or stopped. ``inflight`` counts invocations being served now.
    """

    component_id: StrictStr
    executor: StrictStr
    state: StrictStr
    device_indexes: tuple[StrictInt, ...]
    inflight: StrictInt
    restarts: StrictInt
    reason: StrictStr
    simulated: StrictBool
    port: StrictInt | None = None
    pid: StrictInt | None = None


# --- agents -> controller --------------------------------------------------------------


@message("register", kind="request", served_by="controller.agents")
@dataclass(frozen=True)
class Register:
    node_name: StrictStr
    hostname: StrictStr
    generation: StrictInt
    agent_version: StrictStr
    devices: tuple[DeviceInfo, ...]
    host: HostInfo
    labels: dict[StrictStr, StrictStr] = field(default_factory=dict)


@message("register_accepted", kind="reply")
@dataclass(frozen=True)
class RegisterAccepted:
    controller_epoch: StrictInt
    heartbeat_interval_s: StrictFloat
    state: StrictStr


@message("heartbeat", kind="request", served_by="controller.agents")
@dataclass(frozen=True)
class Heartbeat:
    node_name: StrictStr
    generation: StrictInt
    seq: StrictInt
    sent_at_unix_s: StrictFloat
    devices: tuple[DeviceTelemetry, ...]
    host: HostTelemetry
    running_components: StrictInt = 0
    components: tuple["ComponentReport", ...] = ()


@message("heartbeat_ack", kind="reply")
@dataclass(frozen=True)
class HeartbeatAck:
    controller_epoch: StrictInt
    state: StrictStr


@message("reregister", kind="reply")
@dataclass(frozen=True)
class ReregisterRequired:
    """Answer to a heartbeat the controller cannot place: the agent must register again."""

    reason: StrictStr
    controller_epoch: StrictInt


# --- controller -> agents --------------------------------------------------------------


@message("set_power_limit", kind="request", served_by="agent")
@dataclass(frozen=True)
class SetPowerLimit:
    command_id: StrictStr
    controller_epoch: StrictInt
    node_generation: StrictInt
    device_index: StrictInt
    power_limit_w: StrictFloat


@message("command_result", kind="reply")
@dataclass(frozen=True)
class CommandResult:
    command_id: StrictStr
    ok: StrictBool
    message: StrictStr
    applied_power_limit_w: StrictFloat | None = None


@message("start_component", kind="request", served_by="agent")
@dataclass(frozen=True)
class StartComponent:
    """Run an executor instance on the given devices. Idempotent: starting a component that is
    starting or ready does nothing; starting a failed or stopped one restarts it."""

    command_id: StrictStr
    controller_epoch: StrictInt
    node_generation: StrictInt
    component_id: StrictStr
    executor: dict[StrictStr, Any]  # an ExecutorSpec as plain data; the agent validates it
    device_indexes: tuple[StrictInt, ...]


@message("stop_component", kind="request", served_by="agent")
@dataclass(frozen=True)
class StopComponent:
    """Drain a component (no new invocations; wait up to ``drain_timeout_s`` for running ones), then stop it."""

    command_id: StrictStr
    controller_epoch: StrictInt
    node_generation: StrictInt
    component_id: StrictStr
    drain_timeout_s: StrictFloat = 30.0


@message("invoke", kind="request", served_by="agent")
@dataclass(frozen=True)
class Invoke:
    """Run one stage invocation on a component. A repeated ``invocation_id`` gets the first
    call's result (or joins it while it runs), so a retry after a lost reply is safe."""

    invocation_id: StrictStr
    controller_epoch: StrictInt
    component_id: StrictStr
    task: StrictStr
    inputs: dict[StrictStr, Any]
    knobs: dict[StrictStr, Any]
    timeout_s: StrictFloat


@message("cancel_invocation", kind="request", served_by="agent")
@dataclass(frozen=True)
class CancelInvocation:
    """Stop an invocation the controller has given up on (its job was cancelled or failed), so it frees its
    slot instead of running to its end; the invocation then answers with error ``cancelled``. An
    invocation that is not running (finished, or never seen) is left alone, and the reply says so."""

    command_id: StrictStr
    controller_epoch: StrictInt
    node_generation: StrictInt
    invocation_id: StrictStr
    reason: StrictStr


@message("invocation_result", kind="reply")
@dataclass(frozen=True)
class InvocationResult:
    """``error_code`` is empty on success; otherwise invalid_input | tool_error | engine_failed |
    component_unavailable | timeout | output_too_large | stale_command | cancelled (see ``retryable``)."""

    invocation_id: StrictStr
    ok: StrictBool
    outputs: dict[StrictStr, Any]
    error_code: StrictStr
    error: StrictStr
    retryable: StrictBool
    started_at_unix_s: StrictFloat
    ended_at_unix_s: StrictFloat
    latency_s: StrictFloat
    energy_j: StrictFloat | None
    device_indexes: tuple[StrictInt, ...]
    simulated: StrictBool


# --- admin CLI -> controller -----------------------------------------------------------


@message("list_nodes", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ListNodes:
    """One page of nodes in name order, starting after the node named ``after``."""

    after: StrictStr = ""
    limit: StrictInt = 100


@message("node_list", kind="reply")
@dataclass(frozen=True)
class NodeList:
    nodes: tuple[NodeView, ...]
    next_after: StrictStr | None = None  # pass as ``after`` for the next page; None on the last page


@message("get_node", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetNode:
    name: StrictStr


@message("drain_node", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class DrainNode:
    name: StrictStr
    reason: StrictStr


@message("undrain_node", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class UndrainNode:
    name: StrictStr


@message("label_node", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class LabelNode:
    """Set labels (value a string) or remove them (value None)."""

    name: StrictStr
    labels: dict[StrictStr, StrictStr | None]


@message("node_detail", kind="reply")
@dataclass(frozen=True)
class NodeDetail:
    node: NodeView


@message("set_node_power_limit", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class SetNodePowerLimit:
    name: StrictStr
    device_index: StrictInt
    power_limit_w: StrictFloat


@message("get_status", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetStatus:
    pass


@message("cluster_status", kind="reply")
@dataclass(frozen=True)
class ClusterStatus:
    controller_epoch: StrictInt
    version: StrictStr
    uptime_s: StrictFloat
    agent_endpoint: StrictStr
    admin_endpoint: StrictStr
    nodes_by_state: dict[StrictStr, StrictInt]
    devices_total: StrictInt
    power_w_total: StrictFloat
    frames_rejected_total: StrictInt


# --- admin CLI -> controller: catalog, workflows, jobs -----------------------------------


@message("apply_catalog", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ApplyCatalog:
    """Add or replace the executors of a catalog file; ``source_name`` is used in error messages."""

    source_name: StrictStr
    yaml_text: StrictStr


@message("catalog_applied", kind="reply")
@dataclass(frozen=True)
class CatalogApplied:
    version: StrictInt
    executors: tuple[StrictStr, ...]
    warnings: tuple[StrictStr, ...] = ()


@message("list_executors", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ListExecutors:
    pass


@dataclass(frozen=True)
class ExecutorView:
    name: StrictStr
    task: StrictStr
    engine: StrictStr
    device: StrictStr
    version: StrictInt
    knobs: dict[StrictStr, tuple[Any, ...]]
    spec: dict[StrictStr, Any]


@message("executor_list", kind="reply")
@dataclass(frozen=True)
class ExecutorList:
    executors: tuple[ExecutorView, ...]


@message("apply_workflow", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ApplyWorkflow:
    source_name: StrictStr
    yaml_text: StrictStr


@message("workflow_applied", kind="reply")
@dataclass(frozen=True)
class WorkflowApplied:
    name: StrictStr
    version: StrictInt
    unchanged: StrictBool
    warnings: tuple[StrictStr, ...] = ()


@message("list_workflows", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ListWorkflows:
    pass


@dataclass(frozen=True)
class WorkflowSummary:
    name: StrictStr
    version: StrictInt
    description: StrictStr
    stages: StrictInt
    inputs: dict[StrictStr, StrictStr]  # name -> type
    applied_at_unix_s: StrictFloat


@message("workflow_list", kind="reply")
@dataclass(frozen=True)
class WorkflowList:
    workflows: tuple[WorkflowSummary, ...]


@message("get_workflow", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetWorkflow:
    name: StrictStr


@message("workflow_detail", kind="reply")
@dataclass(frozen=True)
class WorkflowDetail:
    summary: WorkflowSummary
    yaml_text: StrictStr
    spec: dict[StrictStr, Any]


@message("delete_workflow", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class DeleteWorkflow:
    name: StrictStr


@message("workflow_deleted", kind="reply")
@dataclass(frozen=True)
class WorkflowDeleted:
    name: StrictStr
    versions: StrictInt


@message("submit_job", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class SubmitJob:
    """Run a workflow. ``slo`` maps a dimension (accuracy | latency) to a tier (best | good |
    fair | basic). A repeated non-empty ``idempotency_key`` returns the first job's id."""

    workflow: StrictStr
    inputs: dict[StrictStr, Any]
    slo: dict[StrictStr, StrictStr] = field(default_factory=dict)
    idempotency_key: StrictStr = ""


@message("job_accepted", kind="reply")
@dataclass(frozen=True)
class JobAccepted:
    job_id: StrictStr
    workflow_version: StrictInt


@dataclass(frozen=True)
class InvocationView:
    """One stage invocation (one element of a mapped stage, one attempt)."""

    invocation_id: StrictStr
    stage: StrictStr
    item: StrictInt | None
    attempt: StrictInt
    executor: StrictStr
    knobs: dict[StrictStr, Any]
    node: StrictStr | None
    component_id: StrictStr | None
    device_indexes: tuple[StrictInt, ...]
    state: StrictStr  # queued | running | succeeded | failed | cancelled
    error: StrictStr
    started_at_unix_s: StrictFloat | None
    ended_at_unix_s: StrictFloat | None
    latency_s: StrictFloat | None
    energy_j: StrictFloat | None
    simulated: StrictBool


@dataclass(frozen=True)
class JobView:
    job_id: StrictStr
    workflow: StrictStr
    workflow_version: StrictInt
    state: StrictStr  # queued | running | succeeded | failed | cancelled
    reason: StrictStr
    slo: dict[StrictStr, StrictStr]
    submitted_at_unix_s: StrictFloat
    started_at_unix_s: StrictFloat | None
    ended_at_unix_s: StrictFloat | None
    outputs: dict[StrictStr, Any]
    invocations: tuple[InvocationView, ...]


@message("list_jobs", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ListJobs:
    limit: StrictInt = 50
    state: StrictStr = ""
    workflow: StrictStr = ""


@dataclass(frozen=True)
class JobSummary:
    job_id: StrictStr
    workflow: StrictStr
    state: StrictStr
    reason: StrictStr
    slo: dict[StrictStr, StrictStr]
    submitted_at_unix_s: StrictFloat
    ended_at_unix_s: StrictFloat | None
    latency_s: StrictFloat | None
    energy_j: StrictFloat | None


@message("job_list", kind="reply")
@dataclass(frozen=True)
class JobList:
    jobs: tuple[JobSummary, ...]


@message("get_job", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetJob:
    """One job; with ``wait_s`` > 0 the reply waits up to that long for the job to end."""

    job_id: StrictStr
    wait_s: StrictFloat = 0.0
    include_outputs: StrictBool = True


@message("job_detail", kind="reply")
@dataclass(frozen=True)
class JobDetail:
    job: JobView


@message("cancel_job", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class CancelJob:
    job_id: StrictStr
    reason: StrictStr = "cancelled by operator"


@message("list_components", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class ListComponents:
    pass


@dataclass(frozen=True)
class ComponentView:
    node: StrictStr
    desired: StrictBool  # in the current plan
    report: ComponentReport | None  # None: planned but not (yet) reported by the agent
    component_id: StrictStr
    executor: StrictStr
    device_indexes: tuple[StrictInt, ...]
    last_error: StrictStr = ""


@message("component_list", kind="reply")
@dataclass(frozen=True)
class ComponentList:
    components: tuple[ComponentView, ...]


@message("get_plan", kind="request", served_by="controller.admin")
@dataclass(frozen=True)
class GetPlan:
    pass


@message("plan_detail", kind="reply")
@dataclass(frozen=True)
class PlanDetail:
    """The current plan explained: per workflow and SLO the choices, predictions (the autopilot), instance
    pools, binding constraints, placements, power limits, budgets and hot GPUs (policies/autopilot/explain.py)."""

    explanation: dict[StrictStr, Any]


# --- either direction ------------------------------------------------------------------


@message("error", kind="reply")
@dataclass(frozen=True)
class ErrorReply:
    """An explicit refusal: ``code`` is machine-readable, ``message`` says what to do."""

    code: StrictStr
    message: StrictStr


__all__ = [
    "PinnedPowerLimit",
    "DeviceInfo",
    "DeviceTelemetry",
    "HostInfo",
    "HostTelemetry",
    "NodeView",
    "Register",
    "RegisterAccepted",
    "Heartbeat",
    "HeartbeatAck",
    "ReregisterRequired",
    "SetPowerLimit",
    "CommandResult",
    "ListNodes",
    "NodeList",
    "GetNode",
    "DrainNode",
    "UndrainNode",
    "LabelNode",
    "NodeDetail",
    "SetNodePowerLimit",
    "GetStatus",
    "ClusterStatus",
    "ErrorReply",
    "ComponentReport",
    "StartComponent",
    "StopComponent",
    "Invoke",
    "CancelInvocation",
    "InvocationResult",
    "ApplyCatalog",
    "CatalogApplied",
    "ListExecutors",
    "ExecutorView",
    "ExecutorList",
    "ApplyWorkflow",
    "WorkflowApplied",
    "ListWorkflows",
    "WorkflowSummary",
    "WorkflowList",
    "GetWorkflow",
    "WorkflowDetail",
    "DeleteWorkflow",
    "WorkflowDeleted",
    "SubmitJob",
    "JobAccepted",
    "InvocationView",
    "JobView",
    "ListJobs",
    "JobSummary",
    "JobList",
    "GetJob",
    "JobDetail",
    "CancelJob",
    "ListComponents",
    "ComponentView",
    "ComponentList",
    "GetPlan",
    "PlanDetail",
]
