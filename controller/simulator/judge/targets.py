"""SLO bounds and accuracy floors under the judge's own model.

The tier definitions are the operator's promise (``policies.model.SloTargets``, docs/planning.md):
an accuracy tier keeps options within its slack of the stage's best known accuracy; the latency bound
is the tier's factor times the best achievable end-to-end latency. What "achievable" means is measured
here with the judge's engines (one request alone on an idle, uncapped instance of each option on the
hardware the cluster has), not with the planner's perf model, so a planner that misjudges speeds is
graded against the truth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from common.workflow.catalog import ExecutorSpec, knob_settings, option_accuracy
from common.workflow.catalog import runs_on_gpu as on_gpu
from controller.simulator.judge.models import Work, gpu_profile, stage_work, unloaded_latency_s
from policies.model import SloTargets
from policies.plan import Demand

TP_SIZES = (1, 2, 4, 8)
EPS = 1e-9


def tool_mean_s(exe: ExecutorSpec) -> float:
    """A CPU executor's mean service time: the catalog's expected latency (the only source there is)."""
    if exe.expected_latency_s:
        return float(exe.expected_latency_s)
    if exe.sim is not None:
        return float(exe.sim.latency_s)
    return 1.0


class Targets:
    """Latency bounds per demand and accuracy floors per (workflow, stage, tier)."""

    def __init__(self, workflows: Mapping[str, Any], catalog: Mapping[str, ExecutorSpec],
                 device_memory_bytes: Mapping[str, int], present: set[str],
                 stage_items: Mapping[str, Mapping[str, float]], slo: SloTargets | None = None,
                 cpu_latency_s: Any = None) -> None:
        self.workflows = workflows
        self.catalog = catalog
        self.memory = dict(device_memory_bytes)
        self.present = set(present)
        self.items = stage_items
        self.slo = slo or SloTargets()
        self.cpu_latency_s = cpu_latency_s  # (exe, work) -> unloaded latency on a CPU, or None
        self._options: dict[tuple[str, str], list[tuple[float | None, float]]] = {}
        self._targets: dict[Demand, float] = {}

    def stage_items(self, workflow: str, stage: str) -> float:
        return float(self.items.get(workflow, {}).get(stage, 1.0))

    def option_latency_s(self, exe: ExecutorSpec, work: Work) -> float:
        """Fastest unloaded latency of one invocation over the cluster's hardware and tensor-parallel sizes."""
        if not on_gpu(exe):
            if self.cpu_latency_s is not None:
                found = self.cpu_latency_s(exe, work)
                if found is not None:
                    return found
            return tool_mean_s(exe) if "cpu" in self.present else math.inf
        best = math.inf
        for hardware in sorted(self.present):
            memory = self.memory.get(hardware)
            if memory is None:
                continue
            fitting = [tp for tp in TP_SIZES if gpu_profile(exe, hardware, tp, memory) is not None]
            if not fitting:
                continue
            tps = {tp for tp in fitting if tp <= 2 * fitting[0]}
            if fitting[0] <= exe.resources.gpu_count <= max(TP_SIZES):
                tps.add(exe.resources.gpu_count)
            for tp in tps:
                profile = gpu_profile(exe, hardware, tp, memory)
                if profile is not None:
                    best = min(best, unloaded_latency_s(profile, work))
        return best

    def stage_options(self, workflow: str, stage_name: str) -> list[tuple[float | None, float]]:
        """(accuracy, fastest unloaded latency) of every option of a stage."""
        key = (workflow, stage_name)
        if key not in self._options:
            stage = self.workflows[workflow].stage(stage_name)
            pin, floor = stage.constraints.executor, stage.constraints.min_accuracy
            candidates = [self.catalog[pin]] if pin in self.catalog else \
                [e for e in self.catalog.values() if e.task == stage.task]
            items = self.stage_items(workflow, stage_name)
            found: list[tuple[float | None, float]] = []
            for exe in sorted(candidates, key=lambda e: e.name):
                for knobs in knob_settings(exe, workflow):
                    accuracy = option_accuracy(exe, workflow, knobs)
                    if floor is not None and (accuracy is None or accuracy < floor - EPS):
                        continue
                    work = stage_work(stage.task, knobs, items)
                    latency = self.option_latency_s(exe, work)
                    if math.isfinite(latency):
                        found.append((accuracy, latency))
            self._options[key] = found
        return self._options[key]

    def accuracy_floor(self, workflow: str, stage: str, tier: str | None) -> float | None:
        if tier is None or tier == "basic":
            return None
        known = [a for a, _ in self.stage_options(workflow, stage) if a is not None]
        return max(known) * (1.0 - self.slo.accuracy_slack.get(tier, 0.0)) if known else None

    def accuracy_ok(self, workflow: str, stage: str, tier: str | None, exe: ExecutorSpec | None,
                    knobs: Mapping[str, Any]) -> bool:
        floor = self.accuracy_floor(workflow, stage, tier)
        if floor is None:
            return True
        accuracy = option_accuracy(exe, workflow, knobs) if exe is not None else None
        return accuracy is not None and accuracy >= floor - EPS

    def target_s(self, demand: Demand) -> float:
        found = self._targets.get(demand)
        if found is not None:
            return found
        tiers = dict(demand.slo)
        spec = self.workflows[demand.workflow]
        order = spec.topological_order()
        finish: dict[str, float] = {}
        for name in order:
            options = self.stage_options(demand.workflow, name)
            floor = self.accuracy_floor(demand.workflow, name, tiers.get("accuracy"))
            if floor is not None:
                options = [o for o in options if o[0] is not None and o[0] >= floor - EPS]
            best = min((lat for _, lat in options), default=math.inf)
            upstream = [u for u in spec.stage(name).upstream() if u in finish]
            finish[name] = max((finish[u] for u in upstream), default=0.0) + best
        factor = self.slo.latency_factor.get(tiers["latency"], self.slo.default_latency_factor) \
            if "latency" in tiers else self.slo.default_latency_factor
        target = factor * max(finish.values(), default=0.0)
        self._targets[demand] = target
        return target
