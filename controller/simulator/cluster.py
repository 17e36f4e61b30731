"""Simulated nodes and agents: components with start-up delays, device allocation and power caps.

Each node runs a tiny agent that answers the reconciler's commands the way the real agent's
component runtime does, in virtual time:

- ``SendStart``: the component enters ``starting`` and holds its devices at once; it becomes
  ``ready`` after its start-up delay (model engines load weights, so scaling up is not free).
  Devices may be shared, as on the real agent, but a start whose model does not fit in what the
  device's other live components leave free is refused (the engine would fail to load).
- ``SendStop``: the component enters ``draining``, stops taking requests, and lets go of its
  devices ``drain_s`` later (then it is no longer reported).
- Every change is reported to the reconciler at once (a heartbeat on change), so the event count
  follows plan changes, not the number of nodes times the heartbeat rate.

Power caps travel with the planned component (``PlacedComponent.power_limit_w``): the agent
sets them on the component's devices when it starts it, and changes them in place when a new
plan keeps the component but moves its cap (what SetPowerLimit does on a real agent).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from common.devices.gpu_specs import GPU_SPECS
from common.protocol.messages import ComponentReport
from common.workflow.catalog import ExecutorSpec
from controller.simulator.scenario import ScenarioSpecModel
from policies.model import InstanceConfig
from policies.placement import component_config
from policies.plan import PlacedComponent

GB = 1e9


@dataclass(frozen=True)
class SimNode:
    name: str
    group: str
    hardware: str  # "h100" | "a100" | "l4" | "cpu"
    devices: int
    cpu_cores: int
    memory_bytes: int
    rack: str | None
    rack_power_budget_w: float | None


@dataclass
class SimComponent:
    component_id: str
    executor: str
    node: str
    device_indexes: tuple[int, ...]
    config: InstanceConfig
    state: str  # starting | ready | draining
    since_s: float
    memory_bytes_per_device: int = 0
    generation: int = 0  # bumps on every state change, so stale timer events are ignored

    def report(self) -> ComponentReport:
        return ComponentReport(component_id=self.component_id, executor=self.executor, state=self.state,
                               device_indexes=self.device_indexes, inflight=0, restarts=0, reason="",
                               simulated=True)


@dataclass(frozen=True)
class Timer:
    """A component state change due later: ``ready`` after start-up, ``gone`` after draining."""

    at_s: float
    kind: str  # "ready" | "gone"
    node: str
    component_id: str
    generation: int


def build_nodes(spec: ScenarioSpecModel) -> list[SimNode]:
    """Nodes in group order, named ``{group}-{n:04d}``, each in its group's rack for it."""
    budgets = rack_budgets(spec)
    nodes: list[SimNode] = []
    for group in spec.cluster.node_groups:
        for n in range(group.count):
            rack = group.rack_of(n)
            nodes.append(SimNode(name=f"{group.name}-{n:04d}", group=group.name, hardware=group.hardware,
                                 devices=group.devices_per_node, cpu_cores=group.cpu_cores,
                                 memory_bytes=group.memory_bytes, rack=rack,
                                 rack_power_budget_w=budgets.get(rack) if rack else None))
    return nodes


def rack_budgets(spec: ScenarioSpecModel) -> dict[str, float | None]:
    """Power budget per rack: declared racks and the racks node groups fill on their own."""
    budgets: dict[str, float | None] = {r.name: r.power_budget_w for r in spec.cluster.racks}
    for group in spec.cluster.node_groups:
        if group.rack_size is not None:
            for n in range(0, group.count, group.rack_size):
                budgets[group.rack_of(n)] = group.rack_power_budget_w  # type: ignore[index]
    return budgets


def startup_s(spec: ScenarioSpecModel, executor: ExecutorSpec) -> float:
    """Start-up delay: tools start in ``tool_s``; engines take ``base_s`` plus loading their weights."""
    startup = spec.control.startup
    if executor.engine == "tool" or executor.resources.device == "cpu":
        return startup.tool_s
    memory = max(executor.resources.gpu_memory_bytes, executor.sim.memory_bytes if executor.sim else 0)
    return startup.base_s + startup.per_gb_s * memory / GB


def config_of(component: PlacedComponent, node: SimNode, executor: ExecutorSpec) -> InstanceConfig:
    """The instance configuration a placed component runs (``policies.placement.component_config``)."""
    if executor.resources.device == "gpu":
        spec = GPU_SPECS.get(node.hardware)
        return component_config(component, node.hardware, True, spec.power_limit_default_w if spec else None)
    return component_config(component, "cpu", False, None)


@dataclass
class SimAgents:
    """Every node's components, and the answers to the reconciler's commands."""

    nodes: dict[str, SimNode]
    components: dict[str, dict[str, SimComponent]] = field(default_factory=dict)  # node -> id -> component
    executors: dict[str, ExecutorSpec] = field(default_factory=dict)
    device_memory_bytes: dict[str, int] = field(default_factory=dict)  # hardware -> memory per device
    power_limits_w: dict[tuple[str, int], float] = field(default_factory=dict)  # set caps, (node, device) -> W
    starts: int = 0
    stops: int = 0
    refused: int = 0

    def live(self) -> Iterator[SimComponent]:
        for node in self.components.values():
            yield from node.values()

    def reports(self, node: str) -> tuple[ComponentReport, ...]:
        return tuple(c.report() for _, c in sorted(self.components.get(node, {}).items()))

    def start(self, node: str, component_id: str, executor: ExecutorSpec, device_indexes: tuple[int, ...],
              config: InstanceConfig, memory_bytes_per_device: int, now_s: float,
              delay_s: float) -> tuple[bool, str, Timer | None]:
        """Start a component (idempotent while it is live); refused when its devices lack the memory."""
        on_node = self.components.setdefault(node, {})
        current = on_node.get(component_id)
        if current is not None and current.state != "draining" and current.executor == executor.name \
                and current.device_indexes == device_indexes:
            return True, "already running", None
        if current is not None:
            return False, f"component {component_id} is {current.state} with another configuration", None
        sim_node = self.nodes[node]
        bad = [i for i in device_indexes if not 0 <= i < sim_node.devices]
        if bad:
            return False, f"no device(s) {bad} on {node}", None
        if executor.resources.device == "gpu":
            total = self.device_memory_bytes.get(sim_node.hardware, 0)
            for index in device_indexes:
                used = self.memory_used_bytes(node, index)
                if used + memory_bytes_per_device > total:
                    self.refused += 1
                    return False, (f"device {index} has {(total - used) / GB:.1f} GB free, the component needs "
                                   f"{memory_bytes_per_device / GB:.1f} GB"), None
        comp = SimComponent(component_id, executor.name, node, device_indexes, config, "starting", now_s,
                            memory_bytes_per_device=memory_bytes_per_device)
        on_node[component_id] = comp
        self.starts += 1
        self.set_caps(node, device_indexes, config.power_cap_w)
        return True, "", Timer(now_s + delay_s, "ready", node, component_id, comp.generation)

    def memory_used_bytes(self, node: str, index: int) -> int:
        return sum(c.memory_bytes_per_device for c in self.components.get(node, {}).values()
                   if index in c.device_indexes)

    def stop(self, node: str, component_id: str, now_s: float, drain_s: float) -> tuple[bool, str, Timer | None]:
        comp = self.components.get(node, {}).get(component_id)
        if comp is None:
            return True, "not running", None
        if comp.state == "draining":
            return True, "already draining", None
        comp.state, comp.since_s = "draining", now_s
        comp.generation += 1
        self.stops += 1
        return True, "", Timer(now_s + drain_s, "gone", node, component_id, comp.generation)

    def fire(self, timer: Timer, now_s: float) -> bool:
        """Apply a due timer; False when it is stale (the component changed since it was set)."""
        comp = self.components.get(timer.node, {}).get(timer.component_id)
        if comp is None or comp.generation != timer.generation:
            return False
        if timer.kind == "ready":
            if comp.state != "starting":
                return False
            comp.state, comp.since_s = "ready", now_s
            comp.generation += 1
            return True
        del self.components[timer.node][timer.component_id]
        held = {i for c in self.components[timer.node].values() for i in c.device_indexes}
        for index in comp.device_indexes:
            if index not in held:  # a device another component shares keeps its limit
                self.power_limits_w.pop((timer.node, index), None)
        if not self.components[timer.node]:
            del self.components[timer.node]
        return True

    def set_caps(self, node: str, device_indexes: tuple[int, ...], cap_w: float | None) -> None:
        for index in device_indexes:
            if cap_w is None:
                self.power_limits_w.pop((node, index), None)
            else:
                self.power_limits_w[(node, index)] = cap_w

    def recap(self, desired: dict[str, PlacedComponent]) -> int:
        """Move the caps of live, kept components to what the plan now says; returns how many moved."""
        moved = 0
        for comp in self.live():
            placed = desired.get(comp.component_id)
            if placed is None or placed.node != comp.node or comp.state == "draining":
                continue
            if placed.executor != comp.executor or tuple(placed.device_indexes) != comp.device_indexes:
                continue
            executor = self.executors.get(comp.executor)
            if executor is None:
                continue
            config = config_of(placed, self.nodes[comp.node], executor)
            if config != comp.config:
                comp.config = config
                self.set_caps(comp.node, comp.device_indexes, config.power_cap_w)
                moved += 1
        return moved
