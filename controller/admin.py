"""Admin API served to murakkabctl: node listing, drain, labels, power limits and pins, power budgets,
autopilot events, fault drills, status."""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from typing import Any

import msgpack

from common import __version__
from common.protocol import (
    DEFAULT_DRILL_XID, FAULT_DRILL_KINDS, MAX_EVENTS, MAX_XID, ApplyCatalog, ApplyWorkflow, CancelJob, ClusterStatus,
    CommandResult, DeleteWorkflow, DeviceFaultDrill, DeviceInfo, DrainNode, ErrorReply, EventList, FaultDrillResult,
    GetJob, GetNode, GetPlan, GetPowerBudget, GetProfileRun, GetStatus, GetWorkflow, InjectDeviceFault, LabelNode,
    ListComponents, ListEvents, ListExecutors, ListJobs, ListNodes, ListProfiles, ListWorkflows, NodeDetail, NodeList,
    NodeView, PinnedPowerLimit, PlanDetail, PowerBudgetDetail, PowerLimitUnpinned, SetNodePowerLimit, SetPowerBudget,
    StartProfile, SubmitJob, UndrainNode, UnpinPowerLimit, build_dispatch,
)
from common.transport import PeerUnreachable, RemoteError, RequestTimeout, current_caller
from controller.context import ControllerContext
from controller.registry import (
    Accepted, DrainRequested, LabelsChanged, Liveness, NodeRecord, Rejected, UndrainRequested,
)
from controller.security.auth import INSECURE_CALLER, Caller


log = logging.getLogger("murakkab.controller.admin")

MAX_LABEL_CHARS = 253
MAX_PAGE_NODES = 200  # a page of nodes with 8 GPUs each stays well under the 1 MiB frame limit
MAX_EVENT_REPLY_BYTES = 900 * 1024  # events per reply stop here, leaving the envelope room under 1 MiB
NO_AUTOPILOT = ErrorReply("unavailable", "this controller runs no power autopilot; power budgets, pins and "
                                         "events need it")


def caller() -> Caller:
    """Who sent the request being served (without authentication: an anonymous admin)."""
    found = current_caller.get()
    return found if isinstance(found, Caller) else INSECURE_CALLER


def jobs_visible_to() -> str | None:
    """None when the caller sees every job; else the owner whose jobs it may see (a submitter's own)."""
    who = caller()
    return None if who.sees_all_jobs else who.name


class AdminApi:
    def __init__(self, controller: ControllerContext) -> None:
        self.controller = controller
        self.dispatch = build_dispatch("controller.admin", {
            ListNodes: self.list_nodes, GetNode: self.get_node, DrainNode: self.drain, UndrainNode: self.undrain,
            LabelNode: self.label, SetNodePowerLimit: self.set_power_limit, GetStatus: self.status,
            InjectDeviceFault: self.inject_fault, UnpinPowerLimit: self.unpin_power_limit,
            SetPowerBudget: self.set_power_budget, GetPowerBudget: self.get_power_budget, ListEvents: self.events,
            **self._workload_handlers(), **self._profile_handlers(),
        })

    def _workload_handlers(self) -> dict[type, Any]:
        """Catalog, workflow and job requests go straight to the workload service."""
        w = self.controller.workloads
        return {
            ApplyCatalog: lambda peer, m: w.apply_catalog(m.source_name, m.yaml_text),
            ListExecutors: lambda peer, m: w.list_executors(),
            ApplyWorkflow: lambda peer, m: w.apply_workflow(m.source_name, m.yaml_text),
            ListWorkflows: lambda peer, m: w.list_workflows(),
            GetWorkflow: lambda peer, m: w.get_workflow(m.name),
            DeleteWorkflow: lambda peer, m: w.delete_workflow(m.name),
            SubmitJob: lambda peer, m: w.submit(m, owner=caller().name),
            ListJobs: lambda peer, m: w.list_jobs(m.limit, m.state, m.workflow, owner=jobs_visible_to()),
            GetJob: lambda peer, m: w.get_job(m.job_id, m.wait_s, m.include_outputs, owner=jobs_visible_to()),
            CancelJob: lambda peer, m: w.cancel(m.job_id, m.reason, owner=jobs_visible_to()),
            ListComponents: lambda peer, m: w.list_components(),
            GetPlan: lambda peer, m: PlanDetail(w.explanation),
        }

    def _profile_handlers(self) -> dict[type, Any]:
        """Profile runs and stored profiles go to the profiler service."""
        p = self.controller.profiler
        return {
            StartProfile: lambda peer, m: p.start(m),
            GetProfileRun: lambda peer, m: p.status(m),
            ListProfiles: lambda peer, m: p.list_profiles(m),
        }

    def view(self, node: NodeRecord) -> NodeView:
        to_unix = self.controller.to_unix
        return NodeView(
            name=node.name, hostname=node.hostname, state=node.state, liveness=node.liveness.value,
            admin_state=node.admin_state.value, drain_reason=node.drain_reason, generation=node.generation,
            labels=dict(node.labels), registered_at_unix_s=to_unix(node.registered_at_s),
            last_seen_unix_s=to_unix(node.last_seen_s), state_since_unix_s=to_unix(node.state_since_s) or 0.0,
            devices=node.devices, telemetry=node.latest_telemetry(), host=node.host,
            pinned_power_limits=tuple(PinnedPowerLimit(i, float(w))
                                      for i, w in sorted(self._pins_for(node.name).items())),
        )

    # --- the autopilot (controller.workloads.autopilot), where this controller runs one ---------------

    def _autopilot(self) -> Any | None:
        """The power autopilot, looked up per request: it may start after this API, or not run at all."""
        return getattr(self.controller.workloads, "autopilot", None)

    def _pins_for(self, name: str) -> dict[int, float]:
        autopilot = self._autopilot()
        return {} if autopilot is None else dict(autopilot.pins_for(name))

    def _node(self, name: str) -> NodeRecord | ErrorReply:
        node = self.controller.registry.nodes.get(name)
        if node is None:
            known = ", ".join(sorted(self.controller.registry.nodes)[:10]) or "none"
            return ErrorReply("unknown_node", f"no node named {name!r} (known: {known})")
        return node

    def _answer(self, name: str, actions: list[Any]) -> Any:
        answer = self.controller.apply(actions)
        if isinstance(answer, Rejected):
            return ErrorReply(answer.code, answer.message)
        assert isinstance(answer, Accepted)
        return NodeDetail(self.view(self.controller.registry.nodes[name]))

    def list_nodes(self, peer: bytes, msg: ListNodes) -> Any:
        if not 1 <= msg.limit <= MAX_PAGE_NODES:
            return ErrorReply("invalid_argument", f"limit must be 1-{MAX_PAGE_NODES}, got {msg.limit}")
        nodes = self.controller.registry.nodes
        names = [name for name in sorted(nodes) if name > msg.after]
        page = names[:msg.limit]
        more = len(names) > msg.limit
        return NodeList(tuple(self.view(nodes[name]) for name in page), page[-1] if more else None)

    def get_node(self, peer: bytes, msg: GetNode) -> Any:
        node = self._node(msg.name)
        return node if isinstance(node, ErrorReply) else NodeDetail(self.view(node))

    def drain(self, peer: bytes, msg: DrainNode) -> Any:
        now = self.controller.clock()
        return self._answer(msg.name, self.controller.registry.handle(DrainRequested(msg.name, msg.reason, now)))

    def undrain(self, peer: bytes, msg: UndrainNode) -> Any:
        now = self.controller.clock()
        return self._answer(msg.name, self.controller.registry.handle(UndrainRequested(msg.name, now)))

    def label(self, peer: bytes, msg: LabelNode) -> Any:
        for key, value in msg.labels.items():
            if not key or len(key) > MAX_LABEL_CHARS or (value is not None and len(value) > MAX_LABEL_CHARS):
                return ErrorReply("invalid_argument", f"label {key!r}: keys and values are 1-{MAX_LABEL_CHARS} chars")
        now = self.controller.clock()
        return self._answer(msg.name, self.controller.registry.handle(LabelsChanged(msg.name, dict(msg.labels), now)))

    def _ready_device(self, name: str, device_index: int) -> tuple[NodeRecord, DeviceInfo] | ErrorReply:
        """A command's target: a known, ready node and one of its devices, or the reason it is not."""
        node = self._node(name)
        if isinstance(node, ErrorReply):
            return node
        if node.liveness is not Liveness.READY:
            return ErrorReply("node_not_ready", f"node {name} is {node.state}; commands go to ready nodes only")
        device = next((d for d in node.devices if d.index == device_index), None)
        if device is None:
            indexes = ", ".join(str(d.index) for d in node.devices) or "none"
            return ErrorReply("unknown_device", f"node {name} has no device {device_index} (devices: {indexes})")
        return node, device

    async def set_power_limit(self, peer: bytes, msg: SetNodePowerLimit) -> Any:
        """An operator's limit is pinned (the autopilot's heat, budget and plan caps leave it alone), then sent."""
        target = self._ready_device(msg.name, msg.device_index)
        if isinstance(target, ErrorReply):
            return target
        node, device = target
        low, high = device.power_limit_min_w, device.power_limit_max_w
        if low is None or high is None:
            return ErrorReply("unsupported", f"device {msg.device_index} on {msg.name} ({device.model}) "
                                             "has no settable power limit")
        if not low <= msg.power_limit_w <= high:
            return ErrorReply("out_of_range", f"{msg.power_limit_w:g} W is outside {device.model}'s "
                                              f"power-limit range {low:g}-{high:g} W")
        autopilot = self._autopilot()
        if autopilot is not None:
            refusal = autopilot.pin(msg.name, msg.device_index, msg.power_limit_w)
            if refusal is not None:
                return refusal
        result = await self.controller.set_power_limit(node, msg.device_index, msg.power_limit_w)
        if autopilot is None:
            return result
        kept = (f"the limit stays pinned at {msg.power_limit_w:g} W (the autopilot applies it when it can; "
                "set-power-limit --unpin releases it)")
        if isinstance(result, ErrorReply):
            return ErrorReply(result.code, f"{result.message}; {kept}")
        if isinstance(result, CommandResult):
            tail = "pinned: the autopilot plans around it until set-power-limit --unpin" if result.ok else kept
            return dataclasses.replace(result, message=f"{result.message}; {tail}")
        return result

    def unpin_power_limit(self, peer: bytes, msg: UnpinPowerLimit) -> Any:
        """Hand a device's limit back to the autopilot. The node need not be registered: pins outlive restarts."""
        autopilot = self._autopilot()
        if autopilot is None:
            return NO_AUTOPILOT
        previous = autopilot.pins_for(msg.name).get(msg.device_index)
        refusal = autopilot.unpin(msg.name, msg.device_index)
        if refusal is not None:
            return refusal
        was = f" (was {previous:g} W)" if previous is not None else ""
        log.info("power limit of device %d on %s unpinned%s", msg.device_index, msg.name, was)
        return PowerLimitUnpinned(msg.name, msg.device_index, None if previous is None else float(previous),
                                  f"device {msg.device_index} on {msg.name}: power limit unpinned{was}; "
                                  "the autopilot sets it again")

    # --- power budgets and events ---------------------------------------------------------------------

    def set_power_budget(self, peer: bytes, msg: SetPowerBudget) -> Any:
        autopilot = self._autopilot()
        if autopilot is None:
            return NO_AUTOPILOT
        if msg.rack is not None and not 1 <= len(msg.rack) <= MAX_LABEL_CHARS:
            return ErrorReply("invalid_argument", f"a rack name is 1-{MAX_LABEL_CHARS} chars (the node label 'rack')")
        watts = msg.power_budget_w
        if watts is not None and not (math.isfinite(watts) and watts > 0):
            return ErrorReply("invalid_argument", f"a power budget is a positive number of watts, got {watts:g}")
        refusal = autopilot.set_budget(msg.rack, watts)
        if refusal is not None:
            return refusal
        scope = "cluster" if msg.rack is None else f"rack {msg.rack}"
        log.info("%s power budget %s by operator", scope, "cleared" if watts is None else f"set to {watts:g} W")
        return self._budget_detail(autopilot)

    def get_power_budget(self, peer: bytes, msg: GetPowerBudget) -> Any:
        autopilot = self._autopilot()
        return NO_AUTOPILOT if autopilot is None else self._budget_detail(autopilot)

    def _budget_detail(self, autopilot: Any) -> PowerBudgetDetail:
        """The autopilot's view, wire-safe, with each hot GPU's ``since_s`` (the controller's monotonic clock,
        which the autopilot runs on) also as ``since_unix_s`` so the CLI can say how long it has been hot."""
        view = plain(autopilot.budget_view())
        to_unix = getattr(self.controller, "to_unix", None)
        for hot in view.get("hot_gpus") or []:
            since = hot.get("since_s") if isinstance(hot, dict) else None
            if to_unix is not None and isinstance(since, (int, float)) and not isinstance(since, bool):
                hot["since_unix_s"] = to_unix(float(since))
        return PowerBudgetDetail(view)

    def events(self, peer: bytes, msg: ListEvents) -> Any:
        """The newest events that fit in one frame; the oldest of the requested ones give way first."""
        if not 1 <= msg.limit <= MAX_EVENTS:
            return ErrorReply("invalid_argument", f"limit must be 1-{MAX_EVENTS}, got {msg.limit}")
        autopilot = self._autopilot()
        if autopilot is None:
            return NO_AUTOPILOT
        events = list(autopilot.events(msg.limit))[-msg.limit:]
        kept: list[dict[str, Any]] = []
        size = 0
        for event in reversed(events):
            event = plain(event)
            size += len(msgpack.packb(event))
            if size > MAX_EVENT_REPLY_BYTES:
                break
            kept.append(event)
        kept.reverse()
        return EventList(tuple(kept), len(events) - len(kept))

    # --- fault drills --------------------------------------------------------------------------------

    async def inject_fault(self, peer: bytes, msg: InjectDeviceFault) -> Any:
        """A fault drill on a simulated GPU: checked here, carried out by the agent (which checks again)."""
        if msg.fault not in FAULT_DRILL_KINDS:
            return ErrorReply("invalid_argument",
                              f"unknown fault {msg.fault!r}; use one of {', '.join(FAULT_DRILL_KINDS)}")
        if msg.xid is not None and msg.fault != "xid":
            return ErrorReply("invalid_argument", f"an Xid code goes with fault xid only, not {msg.fault}")
        xid = DEFAULT_DRILL_XID if msg.fault == "xid" and msg.xid is None else msg.xid
        if xid is not None and not 0 <= xid <= MAX_XID:
            return ErrorReply("invalid_argument", f"xid must be 0-{MAX_XID}, got {xid}")
        target = self._ready_device(msg.name, msg.device_index)
        if isinstance(target, ErrorReply):
            return target
        node, device = target
        if not device.simulated or device.backend != "sim":
            what = "real hardware" if device.kind == "gpu" else f"the host {device.kind.upper()}"
            return ErrorReply("unsupported", f"device {msg.device_index} on {msg.name} is {device.model} ({what}); "
                                             "fault drills drive simulated GPUs only")
        c = self.controller
        assert c.agents is not None
        command = DeviceFaultDrill(uuid.uuid4().hex, c.epoch, node.generation, msg.device_index, msg.fault, xid)
        drill = msg.fault + (f" {xid}" if xid is not None else "")
        log.warning("fault drill: %s on device %d of %s, by operator", drill, msg.device_index, msg.name)
        try:
            result = await c.agents.request(command, peer=node.name.encode(), timeout_s=c.settings.command_timeout_s)
        except RemoteError as exc:  # the agent's own refusal (stale command, unsupported device, ...)
            c.metrics.commands.labels("device_fault_drill", exc.code).inc()
            return ErrorReply(exc.code, exc.message)
        except (RequestTimeout, PeerUnreachable) as exc:
            c.metrics.commands.labels("device_fault_drill", type(exc).__name__).inc()
            return ErrorReply("command_failed", f"fault drill on {msg.name}: {exc}")
        c.metrics.commands.labels("device_fault_drill", "ok" if result.ok else "refused").inc()
        if not result.ok:
            return ErrorReply("command_failed", f"agent on {msg.name} refused the drill: {result.message}")
        return FaultDrillResult(msg.name, msg.device_index, msg.fault, xid, result.message)

    def status(self, peer: bytes, msg: GetStatus) -> ClusterStatus:
        c = self.controller
        by_state: dict[str, int] = {}
        devices = 0
        power_w = 0.0
        for node in c.registry.nodes.values():
            by_state[node.state] = by_state.get(node.state, 0) + 1
            devices += len(node.devices)
            if node.liveness is Liveness.READY:
                power_w += sum(t.power_w for t in node.latest_telemetry())
        rejected = (c.agents.rejected_total if c.agents else 0) + (c.admin.rejected_total if c.admin else 0)
        return ClusterStatus(
            controller_epoch=c.epoch, version=__version__, uptime_s=c.clock() - c.started_s,
            agent_endpoint=c.agent_endpoint, admin_endpoint=c.admin_endpoint, nodes_by_state=by_state,
            devices_total=devices, power_w_total=power_w, frames_rejected_total=rejected,
        )


def plain(value: Any) -> Any:
    """Wire-safe plain data: string map keys (msgpack frames allow no others), lists for tuples, None for
    non-finite floats, text for anything else, so an odd value in an autopilot view cannot break a reply."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -(1 << 63) <= value < (1 << 64) else str(value)
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    return str(value)
