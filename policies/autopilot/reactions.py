"""Reactions in seconds, between plans: hot GPUs, power budgets and operator pins.

- **Heat.** A GPU is hot when its temperature is within ``heat_margin_c`` of its slowdown
  temperature (``GpuSpec.slowdown_temperature_c``) or it reports a thermal or power-brake clocks-event
  reason. At once its power limit comes down to ``heat_cap_fraction`` of what it was (not below the
  device's minimum) and the components on it get ``heat_weight`` of their usual share of new work.
  Still hot ``heat_migrate_after_s`` later, it is *evacuated*: placement sees it as unavailable, so
  its components move (make before break) and it takes no new ones. It counts as cool again once it
  has stayed ``heat_hysteresis_c`` below the hot threshold with no such reason for ``heat_cool_after_s``.
- **Power budgets.** A cluster budget and per-rack budgets (racks from the node label ``rack``) bound
  the measured GPU power in their scope. Above a budget, caps come down within one control interval
  (``budget_interval_s``): devices that serve only the lowest SLO tiers first, then the busiest, each
  no lower than its minimum limit, until the cut covers the excess plus ``budget_margin``. Once power
  has stayed under ``budget_release_fraction`` of the budget for ``budget_release_after_s``, the budget
  caps rise again a step per interval (a cut shows at once; raising them too early would cut again). A budget below
  what its scope draws at the lowest caps is infeasible: it is reported (``BudgetView.feasible``) and
  met as far as the caps go; the next plans are made within the budget (``Problem.budgets.power_w``
  for the cluster, placement's rack budgets), which sheds the demands the MILP cannot fit.
- **Rack cooling** (a facility's report). ``degraded``: every GPU in the rack is capped at
  ``cooling_degraded_cap_fraction`` of its maximum limit and takes ``heat_weight`` of its share of new
  work. ``failed``: capped at ``cooling_failed_cap_fraction`` and evacuated at once, without waiting
  for temperatures (the room heats faster than the GPUs report it): its components move out and the
  plan is made without its GPUs, so where capacity runs short the MILP sheds demands, lowest tiers
  first. ``ok`` lifts both.
- **Pins.** An operator's power limit on a device stands until it is unpinned: heat, cooling and budget
  caps leave it alone and the plan's limits never overwrite it.

Pure: telemetry and time come in as arguments; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.devices.gpu_specs import GPU_SPECS
from policies.placement import DeviceState, NodeState

DeviceKey = tuple[str, int]
HEAT_REASONS = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"})
MAX_BUDGET_W = 1e9  # a gigawatt: anything above is a typo, not a budget


@dataclass(frozen=True)
class ReactionConfig:
    heat: bool = True  # react to hot GPUs at all (the baselines' presets do not; budgets they do follow)
    heat_margin_c: float = 5.0
    heat_cap_fraction: float = 0.8
    heat_weight: float = 0.5
    heat_migrate_after_s: float = 15.0
    heat_cool_after_s: float = 30.0
    heat_hysteresis_c: float = 3.0
    budget_interval_s: float = 3.0  # act again only after the last cut had time to show in telemetry
    budget_margin: float = 0.03
    budget_release_fraction: float = 0.9
    budget_release_after_s: float = 30.0  # measured power must stay under the release fraction this long first
    budget_release_step: float = 0.05  # of a device's max limit, per interval
    cooling_degraded_cap_fraction: float = 0.8  # of the max limit, for every GPU of a rack whose cooling degraded
    cooling_failed_cap_fraction: float = 0.6  # of the max limit, while the rack is evacuated

    def __post_init__(self) -> None:
        if not 0.0 < self.heat_cap_fraction <= 1.0 or not 0.0 <= self.heat_weight <= 1.0:
            raise ValueError("heat_cap_fraction must be within (0, 1] and heat_weight within [0, 1]")
        if min(self.heat_margin_c, self.heat_migrate_after_s, self.heat_cool_after_s, self.heat_hysteresis_c,
               self.budget_interval_s, self.budget_margin, self.budget_release_after_s) < 0:
            raise ValueError("heat and budget settings must not be negative")
        if not (0.0 < self.cooling_failed_cap_fraction <= self.cooling_degraded_cap_fraction <= 1.0):
            raise ValueError("need 0 < cooling_failed_cap_fraction <= cooling_degraded_cap_fraction <= 1")
        if not 0.0 < self.budget_release_fraction < 1.0 or not 0.0 < self.budget_release_step <= 1.0:
            raise ValueError("budget_release_fraction must be within (0, 1), budget_release_step within (0, 1]")


@dataclass
class HotDevice:
    since_s: float
    cap_w: float | None  # the lowered limit; None where the device has no settable limit
    reason: str
    evacuated: bool = False
    cool_since_s: float | None = None


@dataclass
class _Budget:
    power_budget_w: float
    source: str
    caps_w: dict[DeviceKey, float] = field(default_factory=dict)
    acted_s: float = -math.inf
    measured_w: float = 0.0
    floor_w: float = 0.0
    feasible: bool = True
    over_since_s: float | None = None
    under_since_s: float | None = None  # measured below the release fraction since


COOLING_STATES = ("ok", "degraded", "failed")


@dataclass
class RackCooling:
    state: str
    inlet_c: float | None
    since_s: float
    source: str
    caps_w: dict[DeviceKey, float] = field(default_factory=dict)
    devices: frozenset[DeviceKey] = frozenset()


@dataclass(frozen=True)
class ReactionNote:
    kind: str
    subject: str
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)


def budget_error(rack: str | None, watts: float | None, racks: Iterable[str]) -> str | None:
    """Why a budget cannot be taken, or None: a finite positive number, for a rack some node is in."""
    if watts is not None and (not math.isfinite(watts) or watts <= 0 or watts > MAX_BUDGET_W):
        return f"a power budget is a positive number of watts up to {MAX_BUDGET_W:g}, got {watts:g}"
    known = sorted(set(racks))
    if rack is not None and rack not in known:
        return (f"no node is in rack {rack!r} (racks come from the node label 'rack'; known: "
                f"{', '.join(known) or 'none'})")
    return None


def _hot_threshold_c(dev: DeviceState, margin_c: float) -> float | None:
    spec = GPU_SPECS.get(dev.hardware)
    return None if spec is None else spec.slowdown_temperature_c - margin_c


class Reactions:
    """Heat, budget and pin state; ``observe`` runs the control loops on one fleet snapshot."""

    def __init__(self, config: ReactionConfig | None = None) -> None:
        self.config = config or ReactionConfig()
        self.hot: dict[DeviceKey, HotDevice] = {}
        self.budgets: dict[str | None, _Budget] = {}  # None: the cluster
        self.pins: dict[DeviceKey, float] = {}
        self.cooling: dict[str, RackCooling] = {}  # racks whose cooling is not ok

    # --- operator input ---------------------------------------------------------------------

    def set_cooling(self, now_s: float, rack: str, state: str, inlet_c: float | None, source: str) -> bool:
        """Record a rack's cooling; True when its state changed (evacuation may start or end)."""
        before = self.cooling.get(rack)
        if state == "ok":
            return self.cooling.pop(rack, None) is not None
        if before is not None and before.state == state:
            before.inlet_c, before.source = inlet_c, source
            return False
        self.cooling[rack] = RackCooling(state, inlet_c, now_s, source)
        return True

    def set_budget(self, rack: str | None, watts: float | None, source: str) -> None:
        if watts is None:
            self.budgets.pop(rack, None)
        elif rack in self.budgets:
            self.budgets[rack].power_budget_w, self.budgets[rack].source = watts, source
            self.budgets[rack].acted_s = -math.inf
        else:
            self.budgets[rack] = _Budget(watts, source)

    # --- the control loops ------------------------------------------------------------------

    def observe(self, now_s: float, nodes: Iterable[NodeState], rank: Mapping[DeviceKey, int],
                rack_label: str = "rack") -> list[ReactionNote]:
        """Heat and budgets on one snapshot. ``rank`` orders devices for budget cuts: the higher, the sooner
        cut (devices that serve only the lowest tiers get the highest rank)."""
        notes: list[ReactionNote] = []
        devices: list[tuple[NodeState, DeviceState]] = [(n, d) for n in nodes for d in n.devices if d.kind == "gpu"]
        if self.config.heat:
            self._heat(now_s, devices, notes)
        self._cooling(devices, rack_label)
        for scope, budget in sorted(self.budgets.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")):
            in_scope = [(n, d) for n, d in devices if scope is None or n.labels.get(rack_label) == scope]
            self._budget(now_s, scope, budget, in_scope, rank, notes)
        return notes

    def _heat(self, now_s: float, devices: list[tuple[NodeState, DeviceState]], notes: list[ReactionNote]) -> None:
        c = self.config
        seen: set[DeviceKey] = set()
        for node, dev in devices:
            key = (node.name, dev.index)
            seen.add(key)
            threshold = _hot_threshold_c(dev, c.heat_margin_c)
            reasons = sorted(HEAT_REASONS & set(dev.throttle_reasons))
            temperature = dev.temperature_c
            too_hot = temperature is not None and threshold is not None and temperature >= threshold
            state = self.hot.get(key)
            if too_hot or reasons:
                why = (f"{temperature:.1f} C, within {c.heat_margin_c:g} C of slowdown" if too_hot
                       else f"throttling: {', '.join(reasons)}")
                if state is None:
                    cap = None
                    if dev.power_limit_min_w is not None and dev.power_limit_w is not None and key not in self.pins:
                        cap = max(dev.power_limit_min_w, dev.power_limit_w * c.heat_cap_fraction)
                    self.hot[key] = HotDevice(now_s, cap, why)
                    notes.append(ReactionNote("heat", f"{node.name}/gpu{dev.index}",
                                              f"{why}: load shifted, cap {cap:.0f} W" if cap is not None
                                              else f"{why}: load shifted", {"power_limit_w": cap}))
                    continue
                state.cool_since_s = None
                if not state.evacuated and now_s - state.since_s >= c.heat_migrate_after_s - 1e-9:
                    state.evacuated = True
                    notes.append(ReactionNote("heat-migrate", f"{node.name}/gpu{dev.index}",
                                              f"still hot after {now_s - state.since_s:.0f} s ({why}): components "
                                              "move away, no new ones until it cools"))
                continue
            if state is None:
                continue
            cool = temperature is None or threshold is None or temperature < threshold - c.heat_hysteresis_c
            if not cool:
                state.cool_since_s = None
                continue
            if state.cool_since_s is None:
                state.cool_since_s = now_s
            if now_s - state.cool_since_s >= c.heat_cool_after_s - 1e-9:
                del self.hot[key]
                notes.append(ReactionNote("heat-cleared", f"{node.name}/gpu{dev.index}",
                                          f"cool for {c.heat_cool_after_s:g} s: takes components again"))
        for key in [k for k in self.hot if k not in seen]:  # the node left the fleet
            del self.hot[key]

    def _cooling(self, devices: list[tuple[NodeState, DeviceState]], rack_label: str) -> None:
        """Caps (and, for a failed rack, the evacuated set) for the GPUs in racks whose cooling is not ok."""
        c = self.config
        for rack, cooling in self.cooling.items():
            fraction = c.cooling_failed_cap_fraction if cooling.state == "failed" else c.cooling_degraded_cap_fraction
            in_rack = [(n, d) for n, d in devices if n.labels.get(rack_label) == rack]
            cooling.devices = frozenset((n.name, d.index) for n, d in in_rack)
            cooling.caps_w = {}
            for node, dev in in_rack:
                key = (node.name, dev.index)
                top = dev.power_limit_max_w if dev.power_limit_max_w is not None else dev.power_limit_w
                if key in self.pins or top is None:
                    continue
                cooling.caps_w[key] = max(dev.power_limit_min_w or 0.0, top * fraction)

    def _budget(self, now_s: float, scope: str | None, budget: _Budget, devices: list[tuple[NodeState, DeviceState]],
                rank: Mapping[DeviceKey, int], notes: list[ReactionNote]) -> None:
        c = self.config
        name = "cluster" if scope is None else f"rack {scope}"
        measured = sum(d.power_w or 0.0 for _, d in devices)
        floor = sum(min(d.power_w or 0.0, d.power_limit_min_w) if d.power_limit_min_w is not None
                    else (d.power_w or 0.0) for _, d in devices)
        budget.measured_w, budget.floor_w = measured, floor
        live = {(n.name, d.index) for n, d in devices}
        budget.caps_w = {k: w for k, w in budget.caps_w.items() if k in live}
        limit = budget.power_budget_w
        if measured >= limit * c.budget_release_fraction:
            budget.under_since_s = None
        elif budget.under_since_s is None:
            budget.under_since_s = now_s
        if now_s - budget.acted_s < c.budget_interval_s - 1e-9:
            return
        if measured > limit:
            if budget.over_since_s is None:
                budget.over_since_s = now_s
            excess = measured - limit * (1.0 - c.budget_margin)
            order = sorted(devices, key=lambda nd: (-rank.get((nd[0].name, nd[1].index), 0), -(nd[1].power_w or 0.0),
                                                    nd[0].name, nd[1].index))
            cuts: dict[str, float] = {}
            for node, dev in order:
                key = (node.name, dev.index)
                if excess <= 0:
                    break
                if key in self.pins or dev.power_limit_min_w is None or dev.power_w is None:
                    continue
                present = min(budget.caps_w.get(key, math.inf), dev.power_limit_w or math.inf, dev.power_w)
                cut = min(max(0.0, present - dev.power_limit_min_w), excess)
                if cut <= 0.5:
                    continue
                budget.caps_w[key] = present - cut
                cuts[f"{node.name}/gpu{dev.index}"] = round(present - cut, 1)
                excess -= cut
            feasible = excess <= 1e-6
            if feasible != budget.feasible:
                budget.feasible = feasible
                if not feasible:
                    notes.append(ReactionNote("budget-infeasible", name, (
                        f"{measured:.0f} W measured against a {limit:.0f} W budget; the lowest caps reach about "
                        f"{floor:.0f} W: met as far as the caps go, the next plan sheds the lowest tiers"),
                        {"power_budget_w": limit, "measured_w": measured, "floor_w": floor}))
            if cuts:
                budget.acted_s = now_s
                notes.append(ReactionNote("budget", name, f"{measured:.0f} W measured against a {limit:.0f} W "
                                          f"budget: {len(cuts)} GPU cap(s) lowered", {"caps_w": cuts}))
            return
        budget.over_since_s = None
        if measured < limit * (1.0 - c.budget_margin):
            budget.feasible = budget.feasible or floor <= limit
        settled = budget.under_since_s is not None and now_s - budget.under_since_s >= c.budget_release_after_s - 1e-9
        if budget.caps_w and settled:
            raised = 0
            for node, dev in devices:
                key = (node.name, dev.index)
                if key not in budget.caps_w:
                    continue
                step = c.budget_release_step * (dev.power_limit_max_w or budget.caps_w[key])
                new = budget.caps_w[key] + step
                if dev.power_limit_max_w is not None and new >= dev.power_limit_max_w:
                    del budget.caps_w[key]
                else:
                    budget.caps_w[key] = new
                raised += 1
            if raised:
                budget.acted_s = now_s
                notes.append(ReactionNote("budget-release", name, f"{measured:.0f} W under a {limit:.0f} W budget: "
                                          f"{raised} GPU cap(s) raised"))

    # --- what the reactions change ----------------------------------------------------------

    def limits(self, planned: Mapping[DeviceKey, float]) -> dict[DeviceKey, float]:
        """The planned limits, lowered by heat and budget caps, with pins on top."""
        result = dict(planned)
        caps: dict[DeviceKey, float] = {}
        for key, hot in self.hot.items():
            if hot.cap_w is not None:
                caps[key] = hot.cap_w
        for holder in (*self.budgets.values(), *self.cooling.values()):
            for key, cap in holder.caps_w.items():
                caps[key] = min(cap, caps.get(key, math.inf))
        for key, cap in caps.items():
            result[key] = min(cap, result.get(key, math.inf))
        result.update(self.pins)
        return {k: round(v, 1) for k, v in result.items()}

    def evacuated(self) -> frozenset[DeviceKey]:
        """Hot GPUs, and those of racks whose cooling failed, placement must not use: their components move away."""
        failed = [c.devices for c in self.cooling.values() if c.state == "failed"]
        return frozenset(k for k, h in self.hot.items() if h.evacuated).union(*failed)

    def weight(self, node: str, device_indexes: Iterable[int]) -> float:
        """A component's share of new work: less on a hot GPU or in a rack whose cooling is not ok."""
        cooled = frozenset().union(*(c.devices for c in self.cooling.values()))
        hot = any((node, i) in self.hot or (node, i) in cooled for i in device_indexes)
        return self.config.heat_weight if hot else 1.0

    def budget_view(self) -> dict[str, Any]:
        """``power budget show``: each budget with its measured draw, floor and the caps it holds."""
        def view(scope: str | None, b: _Budget) -> dict[str, Any]:
            return {"scope": "cluster" if scope is None else "rack", "rack": scope,
                    "power_budget_w": b.power_budget_w, "measured_power_w": round(b.measured_w, 1),
                    "floor_w": round(b.floor_w, 1), "feasible": b.feasible and b.floor_w <= b.power_budget_w,
                    "over": b.measured_w > b.power_budget_w, "source": b.source,
                    "caps_w": {f"{n}/{i}": round(w, 1) for (n, i), w in sorted(b.caps_w.items())}}
        return {"budgets": [view(s, b) for s, b in sorted(self.budgets.items(),
                                                           key=lambda kv: (kv[0] is not None, kv[0] or ""))],
                "hot_gpus": [{"node": n, "device": i, "since_s": h.since_s, "reason": h.reason,
                              "evacuated": h.evacuated, "power_limit_w": h.cap_w}
                             for (n, i), h in sorted(self.hot.items())],
                "pins": [{"node": n, "device": i, "power_limit_w": w} for (n, i), w in sorted(self.pins.items())],
                "cooling": [{"rack": r, "state": c.state, "inlet_c": c.inlet_c, "since_s": c.since_s,
                             "source": c.source, "gpus": len(c.devices),
                             "caps_w": {f"{n}/{i}": round(w, 1) for (n, i), w in sorted(c.caps_w.items())}}
                            for r, c in sorted(self.cooling.items())]}
