"""Make-before-break rollouts: a new placement's components start while the old ones keep serving.

A plan that changes which pool serves some (workflow, tier, stage), or that moves a component to
other devices or nodes (co-location gathers or splits them; a drained or hot GPU loses them), is
rolled out make before break: components the new placement drops keep serving the old routing
until every component of the new placement is ready; only then does routing switch and are the
old components dropped (their agents drain them). A component that placement would move but
cannot place elsewhere stays where it is. A replacement not ready within ``switch_timeout_s`` is
abandoned: its new components that are still not ready are dropped, the old components keep
serving the old routing, and the next plan tries again. Plans that only change instance counts or
power caps apply at once (placement keeps components in place and moves caps without restarts).
Components on nodes that are no longer live are never retained: nothing can serve there.

Pure: the engine hands in placements, component states and the time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from policies.model import InstanceConfig, Solution
from policies.placement import PlacementResult
from policies.plan import Demand, PlacedComponent


def routing_of(solution: Solution) -> dict[tuple[Demand, str], tuple]:
    """Which pool and option serve each (demand, stage): what a plan change must roll out."""
    result: dict[tuple[Demand, str], tuple] = {}
    for demand, stages in solution.configs.items():
        choices = solution.choices.get(demand, {})
        for stage, config in stages.items():
            choice = choices.get(stage)
            knobs = tuple(sorted((k, repr(v)) for k, v in choice.knobs.items())) if choice else ()
            result[(demand, stage)] = (config, choice.executor if choice else None, knobs)
    return result


@dataclass
class _Pending:
    solution: Solution
    since_s: float
    old_ids: frozenset[str]  # what ran before the rollout began


@dataclass(frozen=True)
class Applied:
    """What one ``Rollout.apply`` did: ``changed`` the desired components, ``routing_changed`` the routing,
    ``retained`` how many old components serve on, ``result`` the placement that was kept."""

    changed: bool
    routing_changed: bool
    retained: int
    result: PlacementResult


class Rollout:
    """The desired components, the routed plan and the rollout in progress."""

    def __init__(self, switch_timeout_s: float) -> None:
        if switch_timeout_s <= 0:
            raise ValueError(f"switch_timeout_s must be positive, got {switch_timeout_s}")
        self.switch_timeout_s = switch_timeout_s
        self.desired: dict[str, PlacedComponent] = {}
        self.plan: tuple[PlacedComponent, ...] = ()  # the latest placement, without retained components
        self.active: Solution | None = None  # what routes requests
        self.pending: _Pending | None = None
        self.switches = 0
        self.abandoned = 0
        self.first = True

    def current(self) -> list[PlacedComponent]:
        return sorted(self.desired.values(), key=lambda c: c.component_id)

    def apply(self, solution: Solution, now_s: float, place: Callable[[list[PlacedComponent]], PlacementResult],
              config_of: Callable[[PlacedComponent], InstanceConfig], live_ids: set[str],
              node_live: Callable[[str], bool]) -> Applied:
        """Place ``solution`` (``place(current)``) and decide which dropped components keep serving."""
        current = self.current()
        result = _keep_unreplaced(place(current), current, config_of, node_live)
        routing_changed = self.active is None or routing_of(self.active) != routing_of(solution)
        retained: list[PlacedComponent] = []
        kept_ids = {c.component_id for c in result.components}
        dropped = [c for c in current if c.component_id not in kept_ids and node_live(c.node)]
        # Old components already serving a pending rollout keep serving it until it switches, whatever a plan
        # made meanwhile (a scale step, another move) does with them.
        plan_ids = {c.component_id for c in self.plan}
        serving_old = [c for c in dropped if self.pending is not None and c.component_id not in plan_ids]
        dropped = [c for c in dropped if c not in serving_old]
        if dropped and self.active is not None:
            if routing_changed:  # the old routing's components serve until the new pools are ready
                serving = set(self.active.instances)
                dropped = [c for c in dropped if config_of(c) in serving]
            else:  # components that move serve until their successors are ready
                current_ids = {c.component_id for c in current}
                fresh = Counter(config_of(c) for c in result.components if c.component_id not in current_ids)
                dropped = [c for c in dropped if fresh[config_of(c)] > 0]
            if dropped:
                kept = [c for c in current if c.component_id in kept_ids]
                second = place(kept)
                if sum(second.unplaced.values()) <= sum(result.unplaced.values()):
                    result, retained = _distinct_ids(second, dropped, live_ids), dropped
        if serving_old:
            result = _distinct_ids(result, serving_old, live_ids)
            retained += serving_old
        before = dict(self.desired)
        self.plan = result.components
        desired = {c.component_id: c for c in result.components}
        for comp in retained:
            desired.setdefault(comp.component_id, comp)
        self.desired = desired
        if self.first or not (routing_changed or retained):
            self.active = solution
            self.pending = None
        else:
            old_ids = self.pending.old_ids if self.pending is not None else frozenset(before)
            self.pending = _Pending(solution, self.pending.since_s if self.pending is not None else now_s, old_ids)
        self.first = False
        return Applied(before != desired, routing_changed, len(retained), result)

    def maybe_switch(self, now_s: float, states: Mapping[str, Mapping[str, str]]) -> tuple[str, str] | None:
        """Route to the pending plan once every new component is ready ("switched"), or abandon it after
        ``switch_timeout_s`` ("abandoned"); returns (outcome, why), or None while it waits or nothing is pending."""
        if self.pending is None:
            return None
        waiting = [c for c in self.plan if states.get(c.node, {}).get(c.component_id) != "ready"]
        waited_s = now_s - self.pending.since_s
        if waiting and waited_s < self.switch_timeout_s - 1e-9:
            return None
        pending, self.pending = self.pending, None
        if not waiting:
            self.active = pending.solution
            self.desired = {c.component_id: c for c in self.plan}
            self.switches += 1
            return "switched", f"every new component ready after {waited_s:.1f} s: routing switched, old ones drain"
        abandoned = {c.component_id for c in waiting if c.component_id not in pending.old_ids}
        self.desired = {i: c for i, c in self.desired.items() if i not in abandoned}
        self.plan = tuple(c for c in self.plan if c.component_id not in abandoned)
        self.abandoned += 1
        names = sorted(abandoned)
        return "abandoned", (f"{len(names)} new component(s) not ready within switch_timeout_s "
                             f"{self.switch_timeout_s:g} s ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}): "
                             "replacement abandoned, the old components keep serving")


def _keep_unreplaced(result: PlacementResult, current: list[PlacedComponent],
                     config_of: Callable[[PlacedComponent], InstanceConfig],
                     node_live: Callable[[str], bool]) -> PlacementResult:
    """A running component that placement would move, but whose instance found no other place, stays where it
    is: a move never takes capacity away before its replacement exists."""
    unplaced = dict(result.unplaced)
    kept_ids = {c.component_id for c in result.components}
    stay = []
    for comp in current:
        config = config_of(comp)
        if comp.component_id in kept_ids or unplaced.get(config, 0) <= 0 or not node_live(comp.node):
            continue
        unplaced[config] -= 1
        stay.append(comp)
    if not stay:
        return result
    notes = tuple(f"component {c.component_id} stays on {c.node}: no other place for it "
                  f"({result.reasons.get(config_of(c), 'no reason given')})" for c in stay)
    return replace(result, components=tuple(sorted((*result.components, *stay), key=lambda c: c.component_id)),
                   unplaced={c: n for c, n in unplaced.items() if n > 0}, notes=result.notes + notes)


def _distinct_ids(result: PlacementResult, retained: list[PlacedComponent], live_ids: set[str]) -> PlacementResult:
    """New components must not take the id of a component that keeps running beside them."""
    retained_ids = {c.component_id for c in retained}
    taken = retained_ids | live_ids
    components = []
    for comp in result.components:
        if comp.component_id in retained_ids:
            n = 1
            while f"{comp.component_id}-b{n}" in taken:
                n += 1
            comp = replace(comp, component_id=f"{comp.component_id}-b{n}")
            taken.add(comp.component_id)
        components.append(comp)
    return replace(result, components=tuple(components))
