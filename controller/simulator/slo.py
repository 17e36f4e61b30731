"""Judging requests against their SLO tier, independently of the policy that served them.

The definitions are the ones the planner plans with (``policies.model.SloTargets``, written
down in docs/planning.md), recomputed here from the catalog and the perf model so that a policy
cannot grade its own homework:

- A stage's options are its task's executors (or the pinned one), at the default knob setting
  and every setting a quality entry for the workflow names, on every instance configuration of
  the hardware the cluster has (uncapped; tensor-parallel sizes as the optimizer tries them: the
  smallest that fits, up to twice it, and the catalog's gpu_count).
- An accuracy tier other than ``basic`` is met by a stage's chosen option when its accuracy is at
  least the best known accuracy among the stage's options times ``1 - accuracy_slack[tier]``
  (stages with no known accuracy pass). Every stage must pass.
- The latency bound is ``latency_factor[tier]`` (latency tiers) or ``default_latency_factor``
  (accuracy tiers) times the best achievable latency: the workflow's critical path over each
  stage's fastest option that survives the accuracy filter.
- Service times are the perf model's times ``service_time_factor`` (1: the model is exact); SLO
  bounds always come from the model, as the operator's promise does.
- Stage sizes: a mapped stage runs ``items`` invocations (one instance serves them in waves of
  its batch slots); another stage with list inputs passes ``items`` (default 1) to the perf model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.workflow.catalog import ExecutorSpec
from policies.model import HardwareType, InstanceConfig, Perf, PerfModel, SloTargets
from policies.optimizer import MAX_TP_SCALE, path_latency_s, stage_counts  # the optimizer's rules
from policies.perf_model import knob_settings, option_accuracy
from policies.perf_model import model_memory_bytes, runs_on_gpu
from policies.plan import Demand, StageChoice

_EPS = 1e-9
TP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class StageCost:
    """One stage of one request on one pool: service time per invocation and how many run."""

    invocations: float  # per workflow request
    service_s: float  # one invocation, no waiting
    latency_s: float  # the stage, no waiting: waves of invocations on one instance
    slots: int  # requests one instance serves side by side


class SloJudge:
    """Latency bounds and accuracy checks per demand, and stage costs per (choice, pool)."""

    def __init__(self, workflows: Mapping[str, Any], catalog: Mapping[str, ExecutorSpec], perf: PerfModel,
                 hardware: Mapping[str, HardwareType], hardware_present: set[str],
                 stage_items: Mapping[str, Mapping[str, float]], slo: SloTargets | None = None,
                 service_time_factor: float = 1.0) -> None:
        if not service_time_factor > 0:
            raise ValueError(f"service_time_factor must be positive, got {service_time_factor}")
        self.workflows = dict(workflows)
        self.catalog = dict(catalog)
        self.perf = perf
        self.service_time_factor = service_time_factor
        self.hardware = dict(hardware)
        self.present = set(hardware_present)
        self.stage_items = {w: dict(s) for w, s in stage_items.items()}
        self.slo = slo or SloTargets()
        self._perf: dict[tuple[Any, ...], Perf | None] = {}
        self._targets: dict[Demand, float] = {}
        self._floors: dict[tuple[str, str, str], float | None] = {}
        self._slots: dict[InstanceConfig, int] = {}

    # --- stage sizes and costs -------------------------------------------------------------

    def items(self, workflow: str, stage_name: str) -> tuple[float, float]:
        """(invocations per request, items per invocation), as the optimizer counts them."""
        spec = self.workflows[workflow]
        return stage_counts(self.stage_items, spec, spec.stage(stage_name))

    def perf_of(self, exe: ExecutorSpec, config: InstanceConfig, knobs: Mapping[str, Any], items: float) -> Perf | None:
        key = (exe.name, config, tuple(sorted((k, repr(v)) for k, v in knobs.items())), items)
        if key not in self._perf:
            p = self.perf.perf(exe, config, dict(knobs), items)
            self._perf[key] = p if p is not None and p.latency_s > 0 and p.capacity_rps > 0 else None
        return self._perf[key]

    def stage_cost(self, workflow: str, stage: str, choice: StageChoice, config: InstanceConfig,
                   modeled: bool = False) -> StageCost | None:
        """What one request costs at a stage on a pool: the true service (the perf model's times
        ``service_time_factor``), or with ``modeled`` the perf model's own (which SLO bounds use)."""
        exe = self.catalog.get(choice.executor)
        if exe is None:
            return None
        invocations, items = self.items(workflow, stage)
        p = self.perf_of(exe, config, choice.knobs, items)
        if p is None:
            return None
        slots = max(1, math.floor(p.capacity_rps * p.latency_s + 1e-9))
        waves = max(1, math.ceil(invocations / slots - 1e-9)) if invocations > 0 else 0
        service_s = p.latency_s * (1.0 if modeled else self.service_time_factor)
        return StageCost(invocations=invocations, service_s=service_s, latency_s=waves * service_s, slots=slots)

    def slots(self, config: InstanceConfig) -> int:
        """Batch slots of one instance of a pool (at the executor's default knobs)."""
        found = self._slots.get(config)
        if found is None:
            exe = self.catalog[config.executor]
            p = self.perf_of(exe, config, exe.knob_defaults(), 1.0)
            found = 1 if p is None else max(1, math.floor(p.capacity_rps * p.latency_s + 1e-9))
            self._slots[config] = found
        return found

    # --- options and tiers ---------------------------------------------------------------------

    def _configs(self, exe: ExecutorSpec) -> list[InstanceConfig]:
        configs: list[InstanceConfig] = []
        on_gpu = runs_on_gpu(exe)
        for name in sorted(self.present):
            hw = self.hardware.get(name)
            if hw is None or (hw.kind == "gpu") != on_gpu:
                continue
            if not on_gpu:
                configs.append(InstanceConfig(exe.name, name, 1, None))
                continue
            fitting = [tp for tp in TP_SIZES if math.ceil(model_memory_bytes(exe) / tp) <= hw.memory_bytes]
            if not fitting:
                continue
            tps = {tp for tp in fitting if tp <= fitting[0] * MAX_TP_SCALE}
            if fitting[0] <= exe.resources.gpu_count <= max(TP_SIZES):
                tps.add(exe.resources.gpu_count)
            configs += [InstanceConfig(exe.name, name, tp, None) for tp in sorted(tps)]
        return configs

    def _stage_options(self, workflow: str, stage_name: str) -> list[tuple[float | None, float]]:
        """(accuracy, latency) of every runnable option of a stage."""
        stage = self.workflows[workflow].stage(stage_name)
        pin, min_accuracy = stage.constraints.executor, stage.constraints.min_accuracy
        candidates = [self.catalog[pin]] if pin in self.catalog else \
            [e for e in self.catalog.values() if e.task == stage.task]
        invocations, items = self.items(workflow, stage_name)
        found: list[tuple[float | None, float]] = []
        for exe in sorted(candidates, key=lambda e: e.name):
            configs = self._configs(exe)
            for knobs in knob_settings(exe, workflow):
                accuracy = option_accuracy(exe, workflow, knobs)
                if min_accuracy is not None and (accuracy is None or accuracy < min_accuracy - _EPS):
                    continue
                for config in configs:
                    cost = self.stage_cost(workflow, stage_name, StageChoice(exe.name, knobs), config, modeled=True)
                    if cost is not None:
                        found.append((accuracy, cost.latency_s))
        return found

    def accuracy_floor(self, workflow: str, stage: str, tier: str) -> float | None:
        """Lowest accuracy the tier accepts at a stage; None when anything goes."""
        key = (workflow, stage, tier)
        if key not in self._floors:
            floor = None
            if tier != "basic":
                known = [a for a, _ in self._stage_options(workflow, stage) if a is not None]
                if known:
                    floor = max(known) * (1.0 - self.slo.accuracy_slack.get(tier, 0.0))
            self._floors[key] = floor
        return self._floors[key]

    def target_s(self, demand: Demand) -> float:
        """The demand's latency bound (see the module doc); inf when the workflow cannot run at all."""
        if demand in self._targets:
            return self._targets[demand]
        tiers = dict(demand.slo)
        spec = self.workflows[demand.workflow]
        order = spec.topological_order()
        upstream = {s.name: [u for u in s.upstream() if u in order] for s in spec.stages}
        best: dict[str, float] = {}
        accuracy_tier = tiers.get("accuracy")
        for name in order:
            options = self._stage_options(demand.workflow, name)
            floor = self.accuracy_floor(demand.workflow, name, accuracy_tier) if accuracy_tier else None
            if floor is not None:
                options = [o for o in options if o[0] is not None and o[0] >= floor - _EPS]
            best[name] = min((lat for _, lat in options), default=math.inf)
        factor = self.slo.latency_factor.get(tiers["latency"], self.slo.default_latency_factor) \
            if "latency" in tiers else self.slo.default_latency_factor
        target = factor * path_latency_s(order, upstream, best)
        self._targets[demand] = target
        return target

    def accuracy_ok(self, demand: Demand, choices: Mapping[str, StageChoice]) -> bool:
        tier = dict(demand.slo).get("accuracy")
        if tier is None or tier == "basic":
            return True
        for stage, choice in choices.items():
            floor = self.accuracy_floor(demand.workflow, stage, tier)
            if floor is None:
                continue
            exe = self.catalog.get(choice.executor)
            accuracy = option_accuracy(exe, demand.workflow, choice.knobs) if exe is not None else None
            if accuracy is None or accuracy < floor - _EPS:
                return False
        return True
