"""Placement: puts an optimizer solution's instances onto concrete nodes and devices, within
memory, rack power budgets and thermal headroom, and says which power limit each device gets.

The optimizer decides how many instances of each ``InstanceConfig(executor, hardware, tp,
power_cap_w)`` to run; ``place`` decides where. Pure: nodes, telemetry and limits in, a
``PlacementResult`` out; no clocks, sockets or files, and the same inputs give the same result.
The fleet-state types, ``PlacementLimits`` and ``PlacementResult`` live in ``policies.fleet`` (re-exported
here, ``__all__``); the placer's working types (needs, devices, fits) in ``policies.placement_types``.

Rules, in the order they are applied:

- Eligible nodes: ``schedulable``, liveness ``ready`` and admin ``active``. Suspect, lost,
  draining and drained nodes take nothing, and nothing stays on them. A *hot* node (some GPU
  whose temperature, extrapolated over the thermal horizon at its present load, is at or above
  its limit) takes no new instances; what already runs there is judged device by device.
  Devices whose health is not ``ok`` (Xid, lost) take nothing.
- Hardware: a GPU config goes only to GPUs whose ``hardware`` key equals ``config.hardware``
  (``hardware_key`` derives "h100" from "NVIDIA H100 80GB HBM3"), that the executor's
  ``gpu_models`` allow (case-insensitive substring, as in first fit), and that match its engine:
  ``sim`` executors on simulated GPUs, ``vllm`` on real ones (the agent refuses the others).
  A config of the ``cpu`` hardware type runs on host cores (``tool``: a quarter of
  ``cpu_cores``, since tools mostly wait; others in full) plus the node's cpu device when it has
  one (``vllm`` on cpu needs it); every instance also charges ``resources.memory_bytes`` of host
  memory. ``tp`` GPUs of one instance are distinct GPUs of one node.
- Memory, per GPU: an instance needs ``Perf.memory_bytes_per_device`` when a perf model is given,
  else ``max(gpu_memory_bytes, sim.memory_bytes) / tp`` rounded up. A GPU holds what this
  placement puts on it plus, when no component of ``current`` is on it, the memory it reports as
  used (something outside the plan holds it); on GPUs with current components the reported use
  is not subtracted, because it includes those components, which the ledger already charges.
  Several small instances may share one GPU when its memory allows, but only as a fallback:
  empty GPUs are preferred, because the optimizer's capacity model gives an instance its devices
  to itself (``PlacementLimits.allow_sharing`` turns sharing off). One GPU has one power limit,
  so only instances with the same power limit share it.
- Power: an instance's busy draw per GPU is ``Perf.busy_power_w / tp`` at the config's cap when
  a perf model is given, else the power limit it applies (the cap; uncapped: the device's
  default limit), the worst case. A GPU's predicted draw is its idle power with an engine loaded
  (``HardwareType.instance_idle_power_w``) plus the dynamic part (busy minus idle) of each instance
  on it, held to its power limit unless the perf model says an instance draws more at that cap
  (bandwidth-bound work under a deep cap: an H100 with a decode-shaped load draws 301 W at a 200 W
  limit); an empty GPU draws idle power. A cpu instance draws ``Perf.busy_power_w``, else its share of
  the cpu HardwareType's ``max_power_w`` by its ``cpu_cores`` (of the type's ``cores``, else the node's). A rack's predicted draw (every GPU of its
  nodes, empty ones at idle, plus its cpu instances) must stay within ``rack_power_budget_w[rack]``;
  if it would not,
  the next node is tried (first with the GPUs that add the least power), then the instance is
  reported unplaced. Racks without a budget and nodes without the rack label are unbounded.
- Thermal: a GPU's predicted steady temperature at its new draw P is ``ambient + P * R`` (R the
  gpu_specs thermal resistance); with telemetry it is also ``T_now + trend * horizon + (P -
  P_now) * R`` (the first-order model's asymptote at the present load, shifted by the change of
  load), and the larger of the two counts. It must stay at or below the limit:
  ``max_temperature_c``, else the GPU model's max operating temperature minus
  ``temperature_margin_c``. GPUs without a spec or telemetry are not checked (a note says so).
- Power limits: a GPU hosting instances gets its config's ``power_cap_w`` (it must lie within
  the device's min..max limit), or the device's default limit when uncapped; empty GPUs are left
  as they are. ``PlacedComponent.power_limit_w`` carries the same value.
- Sticky: with ``sticky`` (the default) a component of ``current`` stays on its node and devices
  when a config in the solution matches it (executor, hardware, tp; same power limit first, then
  any cap, in which case it keeps its id and only its power limit changes) and it still fits under
  every rule above; components that no longer fit are not kept, and their instance is placed anew.
- Co-location: ``colocate`` (``Solution.colocate``) names groups of configs (one instance each) to run
  on the same GPUs (``policies.colocation``). A grouped instance goes to GPUs that hold only its
  group's instances when they fit, before any other preference. With ``colocate`` given (even empty),
  a kept GPU component shares its GPUs only with components of its group (others move), and a
  grouped component alone on its GPUs moves to its group's GPUs when they have room for it.
- Avoided: ``PlacementLimits.avoid`` names (executor, node) pairs not to use for now (the
  controller's list of executors that keep failing to start on a node); such a component is not
  kept and no new instance of that executor goes there.
- New instances, configs in order of size (tp, GPU memory, then names), one at a time: among
  nodes that can take one, with ``spread`` the fewest instances of the same config in the rack,
  then on the node; then not sharing a GPU; then the coolest predicted GPU; then the node name.
  CPU instances prefer nodes without GPUs, keeping GPU hosts' cores for GPU components.
- Component ids: ``f"{executor}-{node}-g{first_device}-{n}"`` (cpu: ``-cpu-``), ``n`` the
  smallest number that makes the id unique, never reusing an id from ``current``.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Mapping, Sequence

from common.devices.gpu_specs import GPU_SPECS
from common.workflow.catalog import ExecutorSpec
from policies.fleet import (
    DeviceKey, DeviceState, NodeState, PlacementLimits, PlacementResult, device_state, temperature_trend_c_per_s,
)
from policies.model import HardwareType, InstanceConfig, Perf, PerfModel
from policies.perf_model import hardware_key
from policies.placement_types import _GIB, _Dev, _DevFit, _Fit, _Need
from policies.plan import TOOL_CPU_OVERSUBSCRIPTION, PlacedComponent

__all__ = [
    "DeviceKey", "DeviceState", "NodeState", "PlacementLimits", "PlacementResult", "component_config", "device_state",
    "hardware_key", "place", "temperature_trend_c_per_s",
]

FALLBACK_MAX_OPERATING_TEMPERATURE_C = 85.0  # GPUs without a spec: a typical datacenter part's limit
FALLBACK_THERMAL_HORIZON_S = 60.0  # GPUs without a spec: about one thermal time constant
_EPS = 1e-6


# --- the placer ---------------------------------------------------------------------------------


class _Placer:
    def __init__(self, nodes: Sequence[NodeState], catalog: Mapping[str, ExecutorSpec],
                 current: Sequence[PlacedComponent], limits: PlacementLimits, perf: PerfModel | None,
                 hardware: Mapping[str, HardwareType] | None,
                 colocate: Sequence[Sequence[InstanceConfig]] | None = None) -> None:
        self.limits, self.catalog, self.perf_model = limits, catalog, perf
        self.colocating = colocate is not None
        self.partners: dict[InstanceConfig, frozenset[InstanceConfig]] = {}
        for group in colocate or ():
            members = frozenset(group)
            for config in members:
                self.partners[config] = self.partners.get(config, frozenset()) | members
        self.hardware = dict(hardware or {})
        self.nodes = {n.name: n for n in sorted(nodes, key=lambda n: n.name)}
        if len(self.nodes) != len(nodes):
            dup = [k for k, v in Counter(n.name for n in nodes).items() if v > 1]
            raise ValueError(f"node names must be unique; repeated: {', '.join(sorted(dup))}")
        self.notes: list[str] = []
        self._noted: set[str] = set()
        occupied = {(c.node, i) for c in current for i in c.device_indexes}
        self.devs: dict[str, dict[int, _Dev]] = {}
        self.rack_w: dict[str, float] = {}
        self.rack_of: dict[str, str | None] = {}
        for node in self.nodes.values():
            rack = node.labels.get(limits.rack_label)
            self.rack_of[node.name] = rack
            by_index: dict[int, _Dev] = {}
            for d in node.devices:
                if d.index in by_index:
                    raise ValueError(f"node {node.name}: device index {d.index} appears twice")
                by_index[d.index] = self._make_dev(node, d, rack, (node.name, d.index) in occupied)
            self.devs[node.name] = by_index
            if rack is not None:
                self.rack_w.setdefault(rack, 0.0)
                self.rack_w[rack] += sum(d.idle_w for d in by_index.values() if d.state.kind == "gpu")
        self.host_cores: dict[str, float] = {n: 0.0 for n in self.nodes}
        self.host_bytes: dict[str, int] = {n: 0 for n in self.nodes}
        self.ineligible = {n.name: why for n in self.nodes.values() if (why := self._ineligible(n)) is not None}
        self.hot = {n.name: why for n in self.nodes.values() if (why := self._hot(n)) is not None}
        self.on_node: Counter[tuple[InstanceConfig, str]] = Counter()
        self.on_rack: Counter[tuple[InstanceConfig, str]] = Counter()
        self.placed: list[PlacedComponent] = []
        self.placed_count: Counter[InstanceConfig] = Counter()
        self.taken_ids = {c.component_id for c in current}
        self._perf_cache: dict[InstanceConfig, Perf | None] = {}

    # --- per-device facts ---

    def _make_dev(self, node: NodeState, d: DeviceState, rack: str | None, occupied: bool) -> _Dev:
        spec = GPU_SPECS.get(d.hardware) if d.kind == "gpu" else None
        hw = self.hardware.get(d.hardware)
        idle_w = hw.idle_power_w if hw is not None else spec.idle_power_w if spec is not None else 0.0
        loaded_idle_w = hw.instance_idle_power_w if hw is not None else spec.busy_idle_power_w if spec is not None \
            else 0.0
        default_w = (d.power_limit_default_w or d.power_limit_max_w or (spec.power_limit_default_w if spec else None)
                     or (hw.max_power_w if hw is not None else None))
        if self.limits.max_temperature_c is not None:
            limit_c = self.limits.max_temperature_c
        else:
            base = spec.max_operating_temperature_c if spec is not None else FALLBACK_MAX_OPERATING_TEMPERATURE_C
            limit_c = base - self.limits.temperature_margin_c
        foreign = d.memory_used_bytes if self.limits.count_foreign_memory and not occupied else 0
        return _Dev(node.name, d, rack, spec, idle_w, default_w, limit_c, foreign, loaded_idle_w=loaded_idle_w)

    def heading_c(self, dev: _Dev) -> float | None:
        """Where telemetry says the GPU is heading at its present load: now + trend * horizon."""
        s, spec = dev.state, dev.spec
        if s.temperature_c is None:
            return None
        horizon_s = self.limits.thermal_horizon_s
        if horizon_s is None:
            horizon_s = (spec.thermal_resistance_k_per_w * spec.heat_capacity_j_per_k if spec is not None
                         else FALLBACK_THERMAL_HORIZON_S)
        return s.temperature_c + (s.temperature_trend_c_per_s or 0.0) * horizon_s

    def temperature_c(self, dev: _Dev, power_w: float) -> float | None:
        """Predicted steady temperature at ``power_w``: the larger of the model's and telemetry's view."""
        s, spec = dev.state, dev.spec
        model = self.limits.ambient_c + power_w * spec.thermal_resistance_k_per_w if spec is not None else None
        seen = self.heading_c(dev)
        if seen is None:
            return model
        if spec is not None and s.power_w is not None:
            seen += (power_w - s.power_w) * spec.thermal_resistance_k_per_w
        return seen if model is None else max(model, seen)

    def _ineligible(self, node: NodeState) -> str | None:
        if node.liveness != "ready":
            return node.liveness
        if node.admin != "active":
            return node.admin
        if not node.schedulable:
            return "not schedulable"
        return None

    def _hot(self, node: NodeState) -> str | None:
        for dev in self.devs[node.name].values():
            heading_c = self.heading_c(dev) if dev.state.kind == "gpu" else None
            if heading_c is not None and heading_c >= dev.limit_c - _EPS:
                return (f"GPU {dev.state.index} at {dev.state.temperature_c:.1f} C heading to {heading_c:.1f} C, "
                        f"limit {dev.limit_c:.1f} C")
        return None

    def note_once(self, key: str, text: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.notes.append(text)

    # --- needs ---

    def hardware_kind(self, name: str) -> str:
        hw = self.hardware.get(name)
        return hw.kind if hw is not None else "cpu" if name == "cpu" else "gpu"

    def perf(self, exe: ExecutorSpec, config: InstanceConfig) -> Perf | None:
        if self.perf_model is None:
            return None
        if config not in self._perf_cache:
            self._perf_cache[config] = self.perf_model.perf(exe, config, exe.knob_defaults())
        return self._perf_cache[config]

    def need(self, config: InstanceConfig) -> _Need | str:
        exe = self.catalog.get(config.executor)
        if exe is None:
            return f"executor {config.executor!r} is not in the catalog"
        res = exe.resources
        perf = self.perf(exe, config)
        if self.hardware_kind(config.hardware) == "gpu":
            if exe.engine == "tool" or res.device != "gpu":
                return f"executor {exe.name} runs on cpu, not on {config.hardware} GPUs"
            if perf is not None:
                memory = perf.memory_bytes_per_device
                busy, idle = perf.busy_power_w / config.tp, perf.idle_power_w / config.tp
            else:
                sim_bytes = exe.sim.memory_bytes if exe.sim is not None else 0
                memory = math.ceil(max(res.gpu_memory_bytes, sim_bytes) / config.tp)
                busy = idle = None
            return _Need(config, exe, True, memory, res.memory_bytes, 0.0, False, busy, idle, None)
        if config.tp != 1:
            return f"tp {config.tp} on {config.hardware}: cpu instances take one host"
        if config.power_cap_w is not None:
            return f"power cap {config.power_cap_w:g} W on {config.hardware}: cpu instances are not capped"
        weight = res.cpu_cores / TOOL_CPU_OVERSUBSCRIPTION if exe.engine == "tool" else res.cpu_cores
        return _Need(config, exe, False, 0, res.memory_bytes, weight, exe.engine == "vllm", None, None,
                     perf.busy_power_w if perf is not None else None)

    # --- fitting ---

    def host_misfit(self, need: _Need, node: NodeState) -> str | None:
        cores = self.host_cores[node.name]
        if need.cpu_weight and cores + need.cpu_weight > node.cpu_cores + _EPS:
            return f"{node.cpu_cores - cores:g} of {node.cpu_cores} cpu core(s) left"
        used = self.host_bytes[node.name]
        if need.host_memory_bytes and used + need.host_memory_bytes > node.memory_total_bytes:
            return f"{(node.memory_total_bytes - used) / _GIB:.1f} GiB host memory left"
        return None

    def resolved_limit_w(self, need: _Need, dev: _Dev) -> float | str | None:
        """The power limit this instance puts on ``dev``, or why the device cannot take its cap."""
        cap = need.config.power_cap_w
        if cap is None:
            return dev.default_limit_w
        s = dev.state
        low = s.power_limit_min_w if s.power_limit_min_w is not None else (
            dev.spec.power_limit_min_w if dev.spec is not None else None)
        high = s.power_limit_max_w if s.power_limit_max_w is not None else (
            dev.spec.tdp_w if dev.spec is not None else None)
        if low is None or high is None:
            return "its power limit cannot be set"
        if not low - _EPS <= cap <= high + _EPS:
            return f"cap {cap:g} W outside its {low:g}..{high:g} W range"
        return cap

    def dyn_w(self, need: _Need, dev: _Dev, limit_w: float | None) -> float:
        if need.busy_w_per_device is not None:
            return max(0.0, need.busy_w_per_device - (need.idle_w_per_device or 0.0))
        if limit_w is None:
            self.note_once(f"nopower:{dev.state.hardware}", f"no power figures for {dev.state.hardware} GPUs; "
                                                            "their instances count as 0 W")
            return 0.0
        return max(0.0, limit_w - dev.idle_w)

    def device_fit(self, need: _Need, dev: _Dev) -> _DevFit | tuple[str, str]:
        """The GPU's limit, power and temperature with one more instance, or (category, detail) of why not."""
        s, exe = dev.state, need.executor
        if s.kind != "gpu" or s.hardware != need.config.hardware:
            return "hardware", f"GPU {s.index} is {s.hardware}, not {need.config.hardware}"
        if s.health != "ok":
            return "device health", f"GPU {s.index} health {s.health}"
        if s.simulated != (exe.engine == "sim"):
            return "engine", f"GPU {s.index} is {'' if s.simulated else 'not '}simulated; engine {exe.engine}"
        models = exe.resources.gpu_models
        if models and not any(m.lower() in s.model.lower() for m in models):
            return "gpu model", f"GPU {s.index} ({s.model}) is not one of {'/'.join(models)}"
        if dev.instances and not self.limits.allow_sharing:
            return "sharing", f"GPU {s.index} already holds an instance"
        if need.memory_bytes_per_device > dev.free_bytes:
            return "memory", f"GPU {s.index} has {dev.free_bytes / _GIB:.1f} GiB free"
        limit = self.resolved_limit_w(need, dev)
        if isinstance(limit, str):
            return "power cap", f"GPU {s.index}: {limit}"
        if dev.instances and dev.limit_w != limit:
            return "power limit", f"GPU {s.index} runs at {dev.limit_w:g} W for other instances"
        power = dev.power_w(dev.instances + 1, dev.dyn_w + self.dyn_w(need, dev, limit), limit,
                            max(dev.floor_w, need.busy_w_per_device or 0.0))
        temperature = self.temperature_c(dev, power)
        if temperature is None:
            self.note_once(f"nothermal:{s.hardware}", f"no thermal model or telemetry for {s.hardware} GPUs; "
                                                      "their temperature is not checked")
        elif temperature > dev.limit_c + _EPS:
            return "thermal", f"GPU {s.index} would reach {temperature:.1f} C, limit {dev.limit_c:.1f} C"
        return _DevFit(limit, power, temperature)

    def rack_misfit(self, node: str, delta_w: float) -> str | None:
        rack = self.rack_of[node]
        budget = self.limits.rack_power_budget_w.get(rack) if rack is not None else None
        if budget is None or self.rack_w[rack] + delta_w <= budget + _EPS:
            return None
        return f"rack {rack} at {self.rack_w[rack]:.0f} of {budget:.0f} W, needs {delta_w:.0f} W more"

    def gpu_fit(self, need: _Need, node: str, devices: tuple[int, ...]) -> _Fit | tuple[str, str]:
        """The exact devices' fit (rack power included), or the first reason they do not fit."""
        by_index = self.devs[node]
        if len(set(devices)) != len(devices) or len(devices) != need.config.tp:
            return "devices", f"{list(devices)} is not {need.config.tp} distinct GPU(s)"
        caps: set[float | None] = set()
        hottest_c, delta_w = -math.inf, 0.0
        for i in devices:
            dev = by_index.get(i)
            if dev is None:
                return "devices", f"no device {i}"
            got = self.device_fit(need, dev)
            if not isinstance(got, _DevFit):
                return got
            caps.add(got.limit_w)
            hottest_c = max(hottest_c, got.temperature_c if got.temperature_c is not None else -math.inf)
            delta_w += got.power_w - dev.power_w(dev.instances, dev.dyn_w, dev.limit_w)
        if len(caps) > 1:
            return "power limit", "its GPUs would need different power limits"
        why = self.rack_misfit(node, delta_w)
        if why is not None:
            return "rack power budget", why
        group = self.partners.get(need.config, frozenset())
        with_partner = bool(group) and all(by_index[i].configs and set(by_index[i].configs) <= group for i in devices)
        return _Fit(devices, caps.pop(), delta_w, hottest_c, any(by_index[i].instances for i in devices),
                    with_partner)

    def cpu_fit(self, need: _Need, node: NodeState, devices: tuple[int, ...] | None = None,
                ) -> _Fit | tuple[str, str]:
        cpu_devices = [d.state.index for d in self.devs[node.name].values() if d.state.kind == "cpu"]
        if devices is None:
            devices = tuple(sorted(cpu_devices)[:1])
        elif any(i not in cpu_devices for i in devices) or len(devices) > 1:
            return "devices", f"{list(devices)} are not a cpu device of {node.name}"
        if need.needs_cpu_device and not devices:
            return "no cpu device", f"{node.name} has no cpu device"
        why = self.host_misfit(need, node)
        if why is not None:
            return "host resources", f"{node.name}: {why}"
        delta_w = self.cpu_power_w(need, node)
        why = self.rack_misfit(node.name, delta_w)
        if why is not None:
            return "rack power budget", f"{node.name}: {why}"
        return _Fit(devices, None, delta_w, -math.inf, False)

    def cpu_power_w(self, need: _Need, node: NodeState) -> float:
        if need.cpu_power_w is not None:
            return need.cpu_power_w
        hw = self.hardware.get(need.config.hardware)
        cores = (hw.cores or node.cpu_cores) if hw is not None else 0
        if hw is None or cores <= 0:
            self.note_once(f"nopower:{need.config.hardware}", f"no power figures for {need.config.hardware} "
                                                              "instances; they count as 0 W")
            return 0.0
        return hw.max_power_w * min(1.0, need.executor.resources.cpu_cores / cores)  # busy: all its cores

    def node_fit(self, need: _Need, node: NodeState) -> _Fit | tuple[str, str]:
        """The best way to put one new instance on ``node``, or the category and detail of why not."""
        if node.name in self.ineligible:
            return f"node {self.ineligible[node.name]}", node.name
        avoided = self.limits.avoid.get((need.executor.name, node.name))
        if avoided is not None:
            return "avoided", f"{node.name}: {avoided}"
        if node.name in self.hot:
            return "hot node", f"{node.name}: {self.hot[node.name]}"
        if not need.on_gpu:
            return self.cpu_fit(need, node)
        why = self.host_misfit(need, node)
        if why is not None:
            return "host resources", f"{node.name}: {why}"
        ok: list[tuple[_Dev, float, float]] = []  # device, temperature after, power added
        misses: Counter[str] = Counter()
        details: dict[str, str] = {}
        for dev in self.devs[node.name].values():
            got = self.device_fit(need, dev)
            if not isinstance(got, _DevFit):
                misses[got[0]] += 1
                details.setdefault(*got)
                continue
            added_w = got.power_w - dev.power_w(dev.instances, dev.dyn_w, dev.limit_w)
            ok.append((dev, got.temperature_c if got.temperature_c is not None else -math.inf, added_w))
        tp = need.config.tp
        if len(ok) < tp:
            fitting = f"{len(ok)} of {tp} GPU(s) fit"
            misses.pop("hardware", None)  # the node's other devices; what stopped the matching ones says more
            if not misses:
                return (f"no {need.config.hardware} GPU", node.name) if not ok else ("too few GPUs",
                                                                                    f"{node.name}: {fitting}")
            category = max(sorted(misses), key=lambda c: misses[c])
            return category, f"{node.name}: {details[category]}" + (f" ({fitting})" if ok else "")
        coolest = sorted(ok, key=lambda x: (x[0].instances > 0, x[1], x[0].state.index))[:tp]
        frugal = sorted(ok, key=lambda x: (x[2], x[0].instances > 0, x[0].state.index))[:tp]
        tries = (tuple(sorted(x[0].state.index for x in coolest)), tuple(sorted(x[0].state.index for x in frugal)))
        group = self.partners.get(need.config)
        if group:  # its co-location partners' GPUs first
            partnered = sorted((x for x in ok if x[0].configs and set(x[0].configs) <= group),
                               key=lambda x: (x[1], x[0].state.index))[:tp]
            if len(partnered) == tp:
                tries = (tuple(sorted(x[0].state.index for x in partnered)), *tries)
        first: _Fit | tuple[str, str] | None = None
        for devices in dict.fromkeys(tries):
            got_fit = self.gpu_fit(need, node.name, devices)
            if isinstance(got_fit, _Fit):
                return got_fit
            first = first or got_fit
        assert first is not None
        return first[0], f"{node.name}: {first[1]}"

    # --- committing ---

    def commit(self, need: _Need, node: NodeState, fit: _Fit, kept: PlacedComponent | None = None,
               ) -> PlacedComponent:
        config = need.config
        for i in fit.devices if need.on_gpu else ():
            dev = self.devs[node.name][i]
            before = dev.power_w(dev.instances, dev.dyn_w, dev.limit_w)
            dev.used_bytes += need.memory_bytes_per_device
            dev.dyn_w += self.dyn_w(need, dev, fit.limit_w)
            dev.limit_w = fit.limit_w
            dev.floor_w = max(dev.floor_w, need.busy_w_per_device or 0.0)
            dev.configs.append(config)
            if dev.rack is not None:
                self.rack_w[dev.rack] += dev.power_w(dev.instances, dev.dyn_w, dev.limit_w) - before
        if not need.on_gpu and self.rack_of[node.name] is not None:
            self.rack_w[self.rack_of[node.name]] += fit.delta_w  # type: ignore[index]
        self.host_cores[node.name] += need.cpu_weight
        self.host_bytes[node.name] += need.host_memory_bytes
        self.on_node[(config, node.name)] += 1
        self.on_rack[(config, self._spread_rack(node.name))] += 1
        self.placed_count[config] += 1
        component_id = kept.component_id if kept is not None else self.new_id(config, node.name, fit.devices,
                                                                              need.on_gpu)
        comp = PlacedComponent(component_id, config.executor, node.name, fit.devices,
                               fit.limit_w if need.on_gpu else None)
        self.taken_ids.add(comp.component_id)
        self.placed.append(comp)
        return comp

    def _spread_rack(self, node: str) -> str:
        rack = self.rack_of[node]
        return rack if rack is not None else f"node:{node}"

    def new_id(self, config: InstanceConfig, node: str, devices: tuple[int, ...], on_gpu: bool) -> str:
        where = f"g{devices[0]}" if on_gpu else "cpu"
        n = 0
        while f"{config.executor}-{node}-{where}-{n}" in self.taken_ids:
            n += 1
        return f"{config.executor}-{node}-{where}-{n}"

    # --- sticky ---

    def matches(self, comp: PlacedComponent, need: _Need, exact: bool) -> bool:
        config = need.config
        node_devs = self.devs.get(comp.node)
        if comp.executor != config.executor or node_devs is None:
            return False
        devices = tuple(comp.device_indexes)
        if not need.on_gpu:
            return all(i in node_devs and node_devs[i].state.kind == "cpu" for i in devices)
        if len(devices) != config.tp or not devices or any(
                i not in node_devs or node_devs[i].state.hardware != config.hardware for i in devices):
            return False
        if not exact:
            return True
        limit = self.resolved_limit_w(need, node_devs[devices[0]])
        if comp.power_limit_w is None:
            return config.power_cap_w is None
        return isinstance(limit, float | int) and abs(comp.power_limit_w - limit) <= _EPS

    def keep_current(self, current: Sequence[PlacedComponent], needs: dict[InstanceConfig, _Need],
                     wanted: Mapping[InstanceConfig, int]) -> None:
        pending = []
        seen: set[str] = set()
        for comp in sorted(current, key=lambda c: c.component_id):
            if comp.component_id not in seen:
                seen.add(comp.component_id)
                pending.append(comp)
        for exact in (True, False):
            later = []
            for comp in pending:
                options = [n for c, n in needs.items() if self.placed_count[c] < wanted[c] and
                           self.matches(comp, n, exact)]
                if not options:
                    later.append(comp)
                    continue
                why = ""
                for need in options:
                    got = self.sticky_fit(comp, need)
                    if isinstance(got, _Fit):
                        self.commit(need, self.nodes[comp.node], got, kept=comp)
                        if not exact:
                            self.notes.append(f"component {comp.component_id} kept, power limit "
                                              f"{comp.power_limit_w} -> {got.limit_w} W")
                        break
                    why = why or got
                else:
                    self.notes.append(f"component {comp.component_id} not kept: {why}")
            pending = later
        unneeded = [c.component_id for c in pending]
        if unneeded:
            shown = ", ".join(unneeded[:5]) + (f" and {len(unneeded) - 5} more" if len(unneeded) > 5 else "")
            self.notes.append(f"{len(unneeded)} component(s) not needed any more (their configuration is not in "
                              f"the solution, or has its instances): {shown}")

    def sticky_fit(self, comp: PlacedComponent, need: _Need) -> _Fit | str:
        avoided = self.limits.avoid.get((comp.executor, comp.node))
        if avoided is not None:
            return f"{comp.executor} is avoided on {comp.node}: {avoided}"
        node = self.nodes[comp.node]
        if node.name in self.ineligible:
            return f"node {node.name} is {self.ineligible[node.name]}"
        if need.on_gpu and self.colocating:
            why = self.colocation_misfit(comp, need)
            if why is not None:
                return why
        got = (self.gpu_fit(need, node.name, tuple(comp.device_indexes)) if need.on_gpu
               else self.cpu_fit(need, node, tuple(comp.device_indexes)))
        if isinstance(got, _Fit):
            return got
        return f"{got[0]} on {node.name}: {got[1]}"

    def colocation_misfit(self, comp: PlacedComponent, need: _Need) -> str | None:
        """With co-location planned, a kept GPU component shares its devices only with its group, and a
        group's members gather: one kept elsewhere than the member kept first moves to it."""
        group = self.partners.get(need.config, frozenset())
        by_index = self.devs[comp.node]
        for i in comp.device_indexes:
            others = by_index[i].configs if i in by_index else []
            strangers = sorted({str(c.executor) for c in others if c not in group})
            if strangers:
                return f"GPU {i} of {comp.node} holds {', '.join(strangers)}, not of its co-location group"
        if group and not any(by_index[i].configs for i in comp.device_indexes if i in by_index):
            for node, devs in self.devs.items():
                room = [d for d in devs.values() if d.configs and set(d.configs) <= group
                        and d.free_bytes >= need.memory_bytes_per_device and node not in self.ineligible]
                if len(room) >= need.config.tp:
                    return f"its co-location group runs on GPUs of {node}; it joins them"
        return None

    # --- new instances ---

    def place_new(self, need: _Need, count: int) -> str | None:
        """Places up to ``count`` more instances; why the rest found no node, or None."""
        config = need.config
        candidates = [n for n in self.nodes.values()
                      if not need.on_gpu or any(d.hardware == config.hardware for d in n.devices)]
        if not candidates:
            return f"needs {need.describe()}; no node has {config.hardware} devices"
        by_name = {n.name: n for n in candidates}
        fits: dict[str, _Fit | tuple[str, str]] = {n.name: self.node_fit(need, n) for n in candidates}
        gpu_host = {n.name: any(d.kind == "gpu" for d in n.devices) and not need.on_gpu for n in candidates}

        def rank(name: str) -> tuple | None:
            """The node's preference now (smaller first), or None when it can take no more of these."""
            fit = fits[name]
            if isinstance(fit, _Fit) and self.rack_misfit(name, fit.delta_w) is not None:
                fit = fits[name] = self.node_fit(need, by_name[name])  # the rack filled up since
            if not isinstance(fit, _Fit):
                return None
            spread = ((self.on_rack[(config, self._spread_rack(name))], self.on_node[(config, name)])
                      if self.limits.spread else ())
            return (not fit.with_partner, *spread, fit.shares, gpu_host[name], fit.temperature_after_c, name)

        # Ranks only grow as instances land (counts rise, GPUs fill and warm, racks fill), so a heap
        # with lazy re-ranking finds the best node without scanning the fleet for every instance.
        heap = [r for name in by_name if (r := rank(name)) is not None]
        heapq.heapify(heap)
        for _ in range(count):
            while heap:
                stored = heapq.heappop(heap)
                now = rank(stored[-1])
                if now == stored:
                    break
                if now is not None:
                    heapq.heappush(heap, now)
            else:
                return self.why_nowhere(need, fits)
            node = by_name[stored[-1]]
            fit = fits[node.name]
            assert isinstance(fit, _Fit)
            comp = self.commit(need, node, fit)
            if fit.shares:
                self.notes.append(f"component {comp.component_id} shares GPU(s) {list(fit.devices)} of {node.name}")
            fits[node.name] = self.node_fit(need, node)
            if (again := rank(node.name)) is not None:
                heapq.heappush(heap, again)
        return None

    def why_nowhere(self, need: _Need, fits: Mapping[str, _Fit | tuple[str, str]]) -> str:
        by_category: dict[str, list[str]] = {}
        for fit in fits.values():
            if not isinstance(fit, _Fit):
                by_category.setdefault(fit[0], []).append(fit[1])
        parts = []
        for category in sorted(by_category, key=lambda c: (-len(by_category[c]), c)):
            details = by_category[category]
            more = f"; and {len(details) - 2} more" if len(details) > 2 else ""
            parts.append(f"{category}: {len(details)} node(s) ({'; '.join(details[:2])}{more})")
        return f"needs {need.describe()}; " + ("; ".join(parts) or "no node left")


def _config_key(c: InstanceConfig) -> tuple:
    return c.executor, c.hardware, c.tp, c.power_cap_w is None, c.power_cap_w or 0.0


def _order(need: _Need) -> tuple:
    """Bigger instances first: they are the hardest to fit once the small ones are spread around."""
    return (not need.on_gpu, -need.config.tp, -need.memory_bytes_per_device, -need.cpu_weight,
            *_config_key(need.config))


def component_config(comp: PlacedComponent, hardware: str, on_gpu: bool,
                     default_limit_w: float | None) -> InstanceConfig:
    """The instance configuration a placed component runs: executor, hardware, tp and cap. Placement writes
    the device's default limit for uncapped configs; that is ``power_cap_w=None`` here."""
    if not on_gpu:
        return InstanceConfig(comp.executor, hardware, 1, None)
    cap = comp.power_limit_w
    if cap is not None and default_limit_w is not None and abs(cap - default_limit_w) < 1e-6:
        cap = None
    return InstanceConfig(comp.executor, hardware, max(1, len(comp.device_indexes)), cap)


def place(solution_instances: Mapping[InstanceConfig, int], nodes: Sequence[NodeState],
          catalog: Mapping[str, ExecutorSpec], current: Sequence[PlacedComponent] = (),
          limits: PlacementLimits | None = None, *, perf: PerfModel | None = None,
          hardware: Mapping[str, HardwareType] | None = None,
          colocate: Sequence[Sequence[InstanceConfig]] | None = None) -> PlacementResult:
    """Place ``solution_instances`` (config -> instance count) on ``nodes``; see the module docstring.

    ``perf`` (optional) gives each config's busy power and memory per device at its cap (configs it
    has no prediction for fall back to the catalog's memory and the worst-case power); ``hardware``
    (optional) gives idle and max power per hardware type, and the cpu type's power for cpu instances.
    ``colocate`` (optional, ``Solution.colocate``) lists groups of configs whose instances share GPUs; when
    given (even empty), kept GPU components share devices only within their group (see the module doc).
    Invalid input (negative counts, tp < 1, repeated node names or device indexes) raises ValueError.
    """
    limits = limits or PlacementLimits()
    for config, count in solution_instances.items():
        if count < 0 or int(count) != count:
            raise ValueError(f"instance count for {config} must be a whole number >= 0, got {count}")
        if config.tp < 1:
            raise ValueError(f"{config}: tp must be >= 1")
    placer = _Placer(nodes, catalog, current, limits, perf, hardware, colocate)
    wanted = {c: int(n) for c, n in solution_instances.items() if n > 0}
    needs: dict[InstanceConfig, _Need] = {}
    reasons: dict[InstanceConfig, str] = {}
    for config in sorted(wanted, key=_config_key):
        got = placer.need(config)
        if isinstance(got, str):
            reasons[config] = got
        else:
            needs[config] = got
    if limits.sticky:
        placer.keep_current(current, needs, wanted)
    for need in sorted(needs.values(), key=_order):
        missing = wanted[need.config] - placer.placed_count[need.config]
        if missing > 0:
            why = placer.place_new(need, missing)
            if why is not None:
                reasons[need.config] = why
    unplaced = {c: wanted[c] - placer.placed_count[c] for c in sorted(wanted, key=_config_key)
                if placer.placed_count[c] < wanted[c]}
    notes = list(placer.notes)
    for config in unplaced:
        notes.append(f"{config.executor} on {config.tp}x {config.hardware}"
                     f"{f' at {config.power_cap_w:g} W' if config.power_cap_w is not None else ''}: "
                     f"placed {placer.placed_count[config]} of {wanted[config]}: {reasons[config]}")
    power_limits: dict[DeviceKey, float] = {}
    device_power: dict[DeviceKey, float] = {}
    device_temperature: dict[DeviceKey, float] = {}
    for node in placer.nodes:
        for index in sorted(placer.devs[node]):
            dev = placer.devs[node][index]
            if dev.instances == 0 or dev.state.kind != "gpu":
                continue
            if dev.limit_w is not None:
                power_limits[dev.key] = float(dev.limit_w)
            device_power[dev.key] = dev.power_w(dev.instances, dev.dyn_w, dev.limit_w)
            temperature = placer.temperature_c(dev, device_power[dev.key])
            if temperature is not None:
                device_temperature[dev.key] = temperature
    return PlacementResult(
        components=tuple(sorted(placer.placed, key=lambda c: c.component_id)), power_limits=power_limits,
        unplaced=unplaced, notes=tuple(notes), reasons={c: reasons[c] for c in unplaced},
        device_power_w=device_power, device_temperature_c=device_temperature,
        rack_power_w=dict(sorted(placer.rack_w.items())))
