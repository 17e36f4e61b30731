"""Admin API served to murakkabctl: node listing, drain, labels, power limits, status."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common import __version__
from common.protocol import (
    ApplyCatalog, ApplyWorkflow, CancelJob, GetPlan, PlanDetail, ClusterStatus, DeleteWorkflow, DrainNode, ErrorReply, GetJob, GetNode,
    GetProfileRun, GetStatus, GetWorkflow, LabelNode, ListComponents, ListExecutors, ListJobs, ListNodes, ListProfiles,
    ListWorkflows, NodeDetail, NodeList, NodeView, SetNodePowerLimit, StartProfile, SubmitJob, UndrainNode,
    build_dispatch,
)
from controller.registry import (
    Accepted, DrainRequested, LabelsChanged, Liveness, NodeRecord, Rejected, UndrainRequested,
)

if TYPE_CHECKING:
    from controller.daemon import Controller

MAX_LABEL_CHARS = 253
MAX_PAGE_NODES = 200  # a page of nodes with 8 GPUs each stays well under the 1 MiB frame limit


class AdminApi:
    def __init__(self, controller: "Controller") -> None:
        self.controller = controller
        self.dispatch = build_dispatch("controller.admin", {
            ListNodes: self.list_nodes, GetNode: self.get_node, DrainNode: self.drain, UndrainNode: self.undrain,
            LabelNode: self.label, SetNodePowerLimit: self.set_power_limit, GetStatus: self.status,
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
            SubmitJob: lambda peer, m: w.submit(m),
            ListJobs: lambda peer, m: w.list_jobs(m.limit, m.state, m.workflow),
            GetJob: lambda peer, m: w.get_job(m.job_id, m.wait_s, m.include_outputs),
            CancelJob: lambda peer, m: w.cancel(m.job_id, m.reason),
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
        )

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

    async def set_power_limit(self, peer: bytes, msg: SetNodePowerLimit) -> Any:
        node = self._node(msg.name)
        if isinstance(node, ErrorReply):
            return node
        if node.liveness is not Liveness.READY:
            return ErrorReply("node_not_ready", f"node {msg.name} is {node.state}; commands go to ready nodes only")
        device = next((d for d in node.devices if d.index == msg.device_index), None)
        if device is None:
            indexes = ", ".join(str(d.index) for d in node.devices) or "none"
            return ErrorReply("unknown_device", f"node {msg.name} has no device {msg.device_index} (devices: {indexes})")
        low, high = device.power_limit_min_w, device.power_limit_max_w
        if low is None or high is None:
            return ErrorReply("unsupported", f"device {msg.device_index} on {msg.name} ({device.model}) "
                                             "has no settable power limit")
        if not low <= msg.power_limit_w <= high:
            return ErrorReply("out_of_range", f"{msg.power_limit_w:g} W is outside {device.model}'s "
                                              f"power-limit range {low:g}-{high:g} W")
        return await self.controller.set_power_limit(node, msg.device_index, msg.power_limit_w)

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
