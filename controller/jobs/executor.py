"""The job (DAG) executor as a pure state machine: events in, a list of actions out.

No sockets, sleeps or clocks: every event carries ``now_s`` and the controller daemon performs
the actions (sends ``Invoke``, persists stage outputs, stores the terminal job state). The same
core then runs under the daemon, under tests with a fake clock, and in the cluster simulator.
Modelled on dask/distributed's ``worker_state_machine``.

Guarantees the daemon relies on:
- every job accepted by ``JobSubmitted`` gets exactly one ``JobFinished`` (succeeded, failed
  with a reason, or cancelled); nothing can leave a job waiting forever, because every wait is
  bounded by the invocation, queue or job timeout, checked on ``Tick``;
- a component never gets more in-flight invocations than its capacity;
- invocation ids are deterministic (``job.stage.item.attempt``), so a retry elsewhere is safe
  and a late result for an abandoned attempt is recognised and ignored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.workflow.tasks import TASKS
from policies.plan import StageChoice

if TYPE_CHECKING:  # the executor only reads the spec's fields; it never builds one
    from common.workflow.spec import Ref, StageSpec, WorkflowSpec


@dataclass(frozen=True)
class ExecutorConfig:
    """Timeouts and retry limits; every wait a job can be in is bounded by one of them."""

    invocation_timeout_s: float = 120.0
    max_attempts: int = 3
    # An invocation that waits this long while its executor has no ready component fails the job.
    queue_timeout_s: float = 600.0
    job_timeout_s: float = 1800.0
    # A component that failed an item is skipped for that item's retries for this long, or until it
    # restarts (leaves the ready set and comes back), so a retry prefers another replica.
    failed_component_avoid_s: float = 10.0
    # Work for an executor that no node can serve (``ServabilityChanged``) fails this long after that became so,
    # with the reason, instead of waiting out ``queue_timeout_s``.
    unservable_grace_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("invocation_timeout_s", "queue_timeout_s", "job_timeout_s", "unservable_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ExecutorConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_attempts < 1:
            raise ValueError(f"ExecutorConfig.max_attempts must be >= 1, got {self.max_attempts!r}")
        if self.failed_component_avoid_s < 0:
            raise ValueError(f"ExecutorConfig.failed_component_avoid_s must be >= 0, "
                             f"got {self.failed_component_avoid_s!r}")


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadyComponent:
    """A component the controller may dispatch to: ready on a schedulable node."""

    component_id: str
    node: str
    executor: str
    capacity: int  # concurrent invocations it accepts
    device_indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class JobSubmitted:
    """A job to run. ``restored`` holds stage outputs persisted before a controller restart."""

    job_id: str
    workflow: WorkflowSpec
    inputs: dict[str, Any]
    choices: dict[str, StageChoice]
    now_s: float
    restored: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentsChanged:
    """The full current set of ready components (not a delta), so a lost update cannot stick."""

    components: tuple[ReadyComponent, ...]
    now_s: float


@dataclass(frozen=True)
class InvocationSucceeded:
    invocation_id: str
    outputs: dict[str, Any]
    now_s: float


@dataclass(frozen=True)
class InvocationFailed:
    invocation_id: str
    code: str
    message: str
    retryable: bool
    now_s: float


@dataclass(frozen=True)
class CancelRequested:
    job_id: str
    reason: str
    now_s: float


@dataclass(frozen=True)
class Tick:
    now_s: float


@dataclass(frozen=True)
class ServabilityChanged:
    """Executors no node can serve now (none placed, or every placed component keeps failing to start), with
    why; the full set, not a delta."""

    unservable: dict[str, str]
    now_s: float


Event = (JobSubmitted | ComponentsChanged | InvocationSucceeded | InvocationFailed | CancelRequested | Tick
         | ServabilityChanged)


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobStarted:
    """The job's first invocation is being dispatched (queued -> running)."""

    job_id: str
    now_s: float


@dataclass(frozen=True)
class Dispatch:
    """Send ``Invoke`` to ``component_id`` on ``node``; report the result as an event."""

    invocation_id: str
    job_id: str
    stage: str
    item: int | None  # element index for a mapped stage, None otherwise
    attempt: int  # 1-based
    component_id: str
    node: str
    executor: str
    task: str
    inputs: dict[str, Any]
    knobs: dict[str, Any]
    timeout_s: float
    device_indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class InvocationQueued:
    """An invocation is waiting for a free ready component of its executor (informational)."""

    invocation_id: str
    job_id: str
    stage: str
    item: int | None
    attempt: int
    executor: str


@dataclass(frozen=True)
class Abandon:
    """Stop waiting for this invocation: its result, if it ever comes, will be ignored."""

    invocation_id: str
    reason: str
    job_id: str = ""


@dataclass(frozen=True)
class StageCompleted:
    """A stage's outputs (lists in item order for a mapped stage); persist them for resume."""

    job_id: str
    stage: str
    outputs: dict[str, Any]


@dataclass(frozen=True)
class JobFinished:
    job_id: str
    state: str  # succeeded | failed | cancelled
    reason: str
    outputs: dict[str, Any]


Action = JobStarted | Dispatch | InvocationQueued | Abandon | StageCompleted | JobFinished


# --- read-only views ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StageView:
    name: str
    state: str  # waiting | running | done
    executor: str
    items_total: int | None  # None until the stage starts (a mapped stage's length is known then)
    items_done: int
    queued: int
    inflight: int


@dataclass(frozen=True)
class JobStateView:
    job_id: str
    workflow: str
    state: str  # queued (nothing dispatched yet) | running
    submitted_s: float
    stages: tuple[StageView, ...]


# --- internal state ----------------------------------------------------------------------------

_WAITING, _RUNNING, _DONE = "waiting", "running", "done"


class _Item:
    """One unit of a stage's work: the whole stage, or one element of a mapped stage."""

    __slots__ = ("index", "inputs", "attempt", "outputs", "avoid")

    def __init__(self, index: int | None, inputs: dict[str, Any]) -> None:
        self.index = index
        self.inputs = inputs
        self.attempt = 0
        self.outputs: dict[str, Any] | None = None
        self.avoid: dict[str, tuple[float, int]] = {}  # component id -> (failed at, its incarnation)


class _Stage:
    __slots__ = ("spec", "choice", "deps", "state", "items", "items_done", "outputs")

    def __init__(self, spec: StageSpec, choice: StageChoice) -> None:
        self.spec = spec
        self.choice = choice
        self.deps = {ref.stage for ref in spec.inputs.values() if ref.stage is not None}
        self.state = _WAITING
        self.items: list[_Item] = []
        self.items_done = 0
        self.outputs: dict[str, Any] | None = None


class _Job:
    __slots__ = ("job_id", "workflow", "inputs", "stages", "remaining", "submitted_s", "started", "live")

    def __init__(self, job_id: str, workflow: WorkflowSpec, inputs: dict[str, Any], submitted_s: float) -> None:
        self.job_id = job_id
        self.workflow = workflow
        self.inputs = inputs
        self.stages: dict[str, _Stage] = {}
        self.remaining = 0  # stages not done
        self.submitted_s = submitted_s
        self.started = False
        self.live: dict[str, _Invocation] = {}  # this job's queued and in-flight invocations, oldest first


class _Invocation:
    __slots__ = ("invocation_id", "seq", "job", "stage", "item", "attempt", "executor", "enqueued_s",
                 "component", "deadline_s")

    def __init__(self, invocation_id: str, seq: int, job: _Job, stage: _Stage, item: _Item,
                 enqueued_s: float) -> None:
        self.invocation_id = invocation_id
        self.seq = seq  # global enqueue order, so actions list dispatches oldest first
        self.job = job
        self.stage = stage
        self.item = item
        self.attempt = item.attempt
        self.executor = stage.choice.executor
        self.enqueued_s = enqueued_s
        self.component: ReadyComponent | None = None  # set when dispatched
        self.deadline_s = 0.0


class JobExecutor:
    """Runs workflow jobs as DAGs of stage invocations over the ready components it is told about."""

    def __init__(self, config: ExecutorConfig | None = None) -> None:
        self.config = config or ExecutorConfig()
        self._jobs: dict[str, _Job] = {}
        self._queues: dict[str, OrderedDict[str, _Invocation]] = {}  # executor -> FIFO of waiting work
        self._inflight: dict[str, _Invocation] = {}
        self._components: dict[str, ReadyComponent] = {}
        self._incarnation: dict[str, int] = {}  # component id -> which appearance of it this is
        self._next_incarnation = 0
        self._by_executor: dict[str, list[str]] = {}  # executor -> sorted ids of its usable components
        self._on_component: dict[str, dict[str, None]] = {}  # component id -> in-flight invocation ids
        self._absent_since_s: dict[str, float] = {}  # executor -> when its last component went away
        self._new_queued: list[_Invocation] = []  # queued during the current event
        self._seq = 0
        self._unservable: dict[str, tuple[float, str]] = {}  # executor -> (since, why no node can serve it)

    # --- read-only views -----------------------------------------------------------------------

    def job_ids(self) -> tuple[str, ...]:
        return tuple(self._jobs)

    def job_state(self, job_id: str) -> JobStateView | None:
        """The job's progress, or None once it finished (finished jobs are forgotten)."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        for inv_id, inv in job.live.items():
            name = inv.stage.spec.name
            counter = running if inv_id in self._inflight else queued
            counter[name] = counter.get(name, 0) + 1
        stages = tuple(
            StageView(name, st.state, st.choice.executor,
                      None if st.state == _WAITING else len(st.items),
                      st.items_done, queued.get(name, 0), running.get(name, 0))
            for name, st in job.stages.items())
        return JobStateView(job.job_id, job.workflow.name, "running" if job.started else "queued",
                            job.submitted_s, stages)

    @property
    def queued_count(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    def queued_executors(self) -> tuple[str, ...]:
        """Executors with invocations waiting for a component."""
        return tuple(name for name, queue in self._queues.items() if queue)

    def queued_for(self, executor: str) -> int:
        """Invocations waiting for a component of ``executor``."""
        return len(self._queues.get(executor, ()))

    def inflight_for(self, component_id: str) -> tuple[str, ...]:
        """Ids of the invocations dispatched to ``component_id`` and not yet resolved, oldest first."""
        return tuple(self._on_component.get(component_id, ()))

    # --- events --------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; duplicate, late and unknown ones change nothing and return no actions."""
        out: list[Action] = []
        match event:
            case JobSubmitted():
                if event.job_id in self._jobs:
                    return out  # duplicate submission
                self._submit(event, out)
            case ComponentsChanged():
                self._components_changed(event, out)
            case InvocationSucceeded():
                inv = self._take_inflight(event.invocation_id)
                if inv is None:
                    return out  # unknown, duplicate, or abandoned
                self._succeeded(inv, event, out)
            case InvocationFailed():
                inv = self._take_inflight(event.invocation_id)
                if inv is None:
                    return out
                self._failed(inv, event.code, event.message, event.retryable, event.now_s, out)
            case CancelRequested():
                job = self._jobs.get(event.job_id)
                if job is None:
                    return out  # finished (and forgotten) or never known
                self._finish(job, "cancelled", event.reason or "cancelled", {}, out)
            case Tick():
                self._tick(event.now_s, out)
            case ServabilityChanged():
                self._unservable = {name: self._unservable.get(name, (event.now_s, why))[:1] + (why,)
                                    for name, why in event.unservable.items()}
                self._tick(event.now_s, out)
            case _:
                raise TypeError(f"unknown event {event!r}")
        self._pump(event.now_s, out)
        for inv in self._new_queued:
            if inv.component is None and inv.job.job_id in self._jobs and inv.invocation_id in inv.job.live:
                out.append(InvocationQueued(inv.invocation_id, inv.job.job_id, inv.stage.spec.name,
                                            inv.item.index, inv.attempt, inv.executor))
        self._new_queued.clear()
        return out

    def _submit(self, ev: JobSubmitted, out: list[Action]) -> None:
        job = _Job(ev.job_id, ev.workflow, dict(ev.inputs), ev.now_s)
        self._jobs[job.job_id] = job
        problem = self._build_stages(job, ev.choices)
        if problem:
            self._finish(job, "failed", problem, {}, out)
            return
        for name, outputs in ev.restored.items():
            stage = job.stages.get(name)
            if stage is not None and stage.state != _DONE:
                stage.state, stage.outputs = _DONE, dict(outputs)
                job.remaining -= 1
        self._advance(job, ev.now_s, out)

    def _build_stages(self, job: _Job, choices: dict[str, StageChoice]) -> str:
        """Fill ``job.stages``; return why the job cannot run ('' if it can)."""
        for spec in job.workflow.stages:
            if spec.name in job.stages:
                return f"workflow {job.workflow.name} has two stages named {spec.name}"
            choice = choices.get(spec.name)
            if choice is None:
                return f"no executor chosen for stage {spec.name}"
            job.stages[spec.name] = _Stage(spec, choice)
        job.remaining = len(job.stages)
        for name, stage in job.stages.items():
            for dep in sorted(stage.deps):
                if dep not in job.stages:
                    return f"stage {name} refers to unknown stage {dep}"
            if stage.spec.map_over is not None and stage.spec.map_over not in stage.spec.inputs:
                return f"stage {name} maps over {stage.spec.map_over!r}, which is not one of its inputs"
        for out_name, ref in job.workflow.outputs.items():
            if ref.stage is not None and ref.stage not in job.stages:
                return f"workflow output {out_name} refers to unknown stage {ref.stage}"
        # Kahn's algorithm: a cycle would leave stages waiting forever, so refuse it up front.
        indegree = {name: len(st.deps) for name, st in job.stages.items()}
        ready = [name for name, n in indegree.items() if n == 0]
        seen = 0
        while ready:
            name = ready.pop()
            seen += 1
            for other, st in job.stages.items():
                if name in st.deps:
                    indegree[other] -= 1
                    if indegree[other] == 0:
                        ready.append(other)
        if seen != len(job.stages):
            cyclic = sorted(name for name, n in indegree.items() if n > 0)
            return f"workflow {job.workflow.name} has a cycle through stages {', '.join(cyclic)}"
        return ""

    def _advance(self, job: _Job, now_s: float, out: list[Action]) -> None:
        """Start every stage whose inputs are all available; finish the job when all are done."""
        progressed = True
        while progressed:
            progressed = False
            for stage in job.stages.values():
                if stage.state != _WAITING or any(job.stages[d].state != _DONE for d in stage.deps):
                    continue
                if not self._start_stage(job, stage, now_s, out):
                    return  # the job failed
                if stage.state == _DONE:
                    progressed = True  # an empty map completes at once and may unblock others
        if job.remaining == 0:
            outputs: dict[str, Any] = {}
            for name, ref in job.workflow.outputs.items():
                found, value, problem = self._resolve(job, ref)
                if problem:
                    self._finish(job, "failed", f"workflow output {name}: {problem}", {}, out)
                    return
                if found:
                    outputs[name] = value
            self._finish(job, "succeeded", "", outputs, out)

    def _resolve(self, job: _Job, ref: Ref) -> tuple[bool, Any, str]:
        """(found, value, problem): an unbound workflow input is simply not found."""
        if ref.stage is None:
            return (ref.field in job.inputs, job.inputs.get(ref.field), "")
        outputs = job.stages[ref.stage].outputs or {}
        if ref.field not in outputs:
            return False, None, f"stage {ref.stage} produced no output {ref.field!r}"
        return True, outputs[ref.field], ""

    def _start_stage(self, job: _Job, stage: _Stage, now_s: float, out: list[Action]) -> bool:
        name = stage.spec.name
        inputs: dict[str, Any] = {}
        for param, ref in stage.spec.inputs.items():
            found, value, problem = self._resolve(job, ref)
            if problem:
                self._finish(job, "failed", f"stage {name} input {param}: {problem}", {}, out)
                return False
            if found:
                inputs[param] = value
        stage.state = _RUNNING
        over = stage.spec.map_over
        if over is None:
            stage.items = [_Item(None, inputs)]
        else:
            elements = inputs.get(over)
            if not isinstance(elements, (list, tuple)):
                got = "nothing (it is unbound)" if over not in inputs else type(elements).__name__
                self._finish(job, "failed", f"stage {name} maps over {over} but got {got}, not a list", {}, out)
                return False
            stage.items = [_Item(i, {**inputs, over: element}) for i, element in enumerate(elements)]
            if not stage.items:
                self._complete_stage(job, stage, out)
                return True
        for item in stage.items:
            self._enqueue(job, stage, item, now_s, retry=False)
        return True

    def _complete_stage(self, job: _Job, stage: _Stage, out: list[Action]) -> None:
        if stage.spec.map_over is None:
            outputs = dict(stage.items[0].outputs or {})
        else:
            task = TASKS.get(stage.spec.task)
            names: dict[str, None] = dict.fromkeys(task.outputs if task else ())
            for item in stage.items:
                names.update(dict.fromkeys(item.outputs or {}))
            outputs = {n: [(item.outputs or {}).get(n) for item in stage.items] for n in names}
        stage.state, stage.outputs = _DONE, outputs
        job.remaining -= 1
        out.append(StageCompleted(job.job_id, stage.spec.name, outputs))

    def _enqueue(self, job: _Job, stage: _Stage, item: _Item, now_s: float, retry: bool) -> None:
        item.attempt += 1
        inv_id = f"{job.job_id}.{stage.spec.name}.{item.index or 0}.{item.attempt}"
        self._seq += 1
        inv = _Invocation(inv_id, self._seq, job, stage, item, now_s)
        queue = self._queues.setdefault(inv.executor, OrderedDict())
        queue[inv_id] = inv
        if retry:
            queue.move_to_end(inv_id, last=False)  # a retry is older work: it goes first
        job.live[inv_id] = inv
        self._new_queued.append(inv)

    def _succeeded(self, inv: _Invocation, ev: InvocationSucceeded, out: list[Action]) -> None:
        job, stage = inv.job, inv.stage
        inv.item.outputs = dict(ev.outputs)
        stage.items_done += 1
        if stage.items_done == len(stage.items):
            self._complete_stage(job, stage, out)
            self._advance(job, ev.now_s, out)

    def _take_inflight(self, invocation_id: str) -> _Invocation | None:
        inv = self._inflight.pop(invocation_id, None)
        if inv is None:
            return None
        assert inv.component is not None
        on = self._on_component.get(inv.component.component_id)
        if on is not None:
            on.pop(invocation_id, None)
            if not on:
                del self._on_component[inv.component.component_id]
        inv.job.live.pop(invocation_id, None)
        return inv

    def _failed(self, inv: _Invocation, code: str, message: str, retryable: bool, now_s: float,
                out: list[Action], incarnation: int | None = None) -> None:
        """Handle a failed attempt already taken out of flight: retry it or fail the job.

        ``incarnation`` is the failed component's, when it is no longer the current one.
        """
        job, item = inv.job, inv.item
        where = f"stage {inv.stage.spec.name}" + ("" if item.index is None else f" item {item.index}")
        if not retryable:
            self._finish(job, "failed", f"{where} failed: {code}: {message}", {}, out)
            return
        if item.attempt >= self.config.max_attempts:
            self._finish(job, "failed", f"{where} failed after {item.attempt} attempts: {code}: {message}", {}, out)
            return
        assert inv.component is not None
        cid = inv.component.component_id
        item.avoid[cid] = (now_s, self._incarnation.get(cid, -1) if incarnation is None else incarnation)
        self._enqueue(job, inv.stage, item, now_s, retry=True)

    def _finish(self, job: _Job, state: str, reason: str, outputs: dict[str, Any], out: list[Action]) -> None:
        """The one place a job ends: abandon its in-flight work, drop its queued work, forget it."""
        for inv_id, inv in list(job.live.items()):
            if self._take_inflight(inv_id) is not None:
                out.append(Abandon(inv_id, f"job {state}: {reason}" if reason else f"job {state}", job.job_id))
            else:
                self._queues.get(inv.executor, {}).pop(inv_id, None)
        job.live.clear()
        del self._jobs[job.job_id]
        out.append(JobFinished(job.job_id, state, reason, outputs))

    def _components_changed(self, ev: ComponentsChanged, out: list[Action]) -> None:
        new = {c.component_id: c for c in ev.components}
        gone: list[tuple[ReadyComponent, int]] = []
        for cid, old in self._components.items():
            cur = new.get(cid)
            if cur is None or (cur.node, cur.executor) != (old.node, old.executor):
                gone.append((old, self._incarnation.pop(cid)))  # if it comes back, it is a new incarnation
        had = {ex for ex, ids in self._by_executor.items() if ids}
        self._components = new
        for cid in new:
            if cid not in self._incarnation:
                self._next_incarnation += 1
                self._incarnation[cid] = self._next_incarnation
        self._by_executor = {}
        for cid in sorted(new):
            if new[cid].capacity > 0:
                self._by_executor.setdefault(new[cid].executor, []).append(cid)
        for ex in had - set(self._by_executor):
            self._absent_since_s[ex] = ev.now_s
        for ex in self._by_executor:
            self._absent_since_s.pop(ex, None)
        for comp, incarnation in gone:
            for inv_id in list(self._on_component.get(comp.component_id, ())):
                inv = self._take_inflight(inv_id)
                if inv is None:
                    continue
                message = f"component {comp.component_id} on node {comp.node} went away"
                out.append(Abandon(inv_id, message, inv.job.job_id))
                self._failed(inv, "component_lost", message, True, ev.now_s, out, incarnation)

    def _tick(self, now_s: float, out: list[Action]) -> None:
        cfg = self.config
        for job in list(self._jobs.values()):
            if now_s - job.submitted_s >= cfg.job_timeout_s:
                self._finish(job, "failed", f"job exceeded {cfg.job_timeout_s:g} s", {}, out)
        for inv in [i for i in self._inflight.values() if now_s >= i.deadline_s]:
            if self._take_inflight(inv.invocation_id) is None:
                continue  # its job failed earlier in this tick
            assert inv.component is not None
            message = (f"no result within {cfg.invocation_timeout_s:g} s from component "
                       f"{inv.component.component_id} on node {inv.component.node}")
            out.append(Abandon(inv.invocation_id, f"timeout: {message}", inv.job.job_id))
            self._failed(inv, "timeout", message, True, now_s, out)
        for executor, queue in list(self._queues.items()):
            if self._by_executor.get(executor):
                continue  # it has ready components: the work waits for capacity, bounded by the job timeout
            absent_since_s = self._absent_since_s.get(executor, float("-inf"))
            unservable = self._unservable.get(executor)
            for inv in list(queue.values()):
                if inv.invocation_id not in queue:
                    continue  # dropped with a job that failed just now
                if unservable is not None and now_s - max(inv.enqueued_s, unservable[0]) >= cfg.unservable_grace_s:
                    self._finish(inv.job, "failed", f"stage {inv.stage.spec.name} cannot be served: no node can "
                                                    f"run executor {executor} ({unservable[1]})", {}, out)
                elif now_s - max(inv.enqueued_s, absent_since_s) >= cfg.queue_timeout_s:
                    self._finish(inv.job, "failed",
                                 f"stage {inv.stage.spec.name} waited {cfg.queue_timeout_s:g} s for a ready "
                                 f"component of executor {executor}", {}, out)

    # --- dispatch ------------------------------------------------------------------------------

    def _pump(self, now_s: float, out: list[Action]) -> None:
        """Dispatch waiting work, oldest first per executor, to the least-loaded eligible component."""
        assigned: list[_Invocation] = []
        for executor in sorted(self._queues):
            queue = self._queues[executor]
            if not queue:
                del self._queues[executor]
                continue
            ids = self._by_executor.get(executor, ())
            free = sum(max(0, self._components[c].capacity - len(self._on_component.get(c, ()))) for c in ids)
            if free == 0:
                continue
            taken: list[_Invocation] = []
            for inv in queue.values():  # stops at the first free slots, so a long queue costs little
                comp = self._pick(inv, ids, now_s)
                if comp is None:
                    continue
                self._assign(inv, comp, now_s)
                taken.append(inv)
                free -= 1
                if free == 0:
                    break
            for inv in taken:
                del queue[inv.invocation_id]
            assigned.extend(taken)
            if not queue:
                del self._queues[executor]
        for inv in sorted(assigned, key=lambda i: i.seq):
            self._emit_dispatch(inv, now_s, out)

    def _pick(self, inv: _Invocation, ids: Sequence[str], now_s: float) -> ReadyComponent | None:
        best: ReadyComponent | None = None
        best_load = 0.0
        for cid in ids:  # sorted, so the first of equally loaded components wins
            comp = self._components[cid]
            used = len(self._on_component.get(cid, ()))
            if used >= comp.capacity:
                continue
            avoided = inv.item.avoid.get(cid)
            if (avoided is not None and avoided[1] == self._incarnation[cid]
                    and now_s < avoided[0] + self.config.failed_component_avoid_s):
                continue
            load = used / comp.capacity
            if best is None or load < best_load:
                best, best_load = comp, load
        return best

    def _assign(self, inv: _Invocation, comp: ReadyComponent, now_s: float) -> None:
        inv.component = comp
        inv.deadline_s = now_s + self.config.invocation_timeout_s
        self._inflight[inv.invocation_id] = inv
        self._on_component.setdefault(comp.component_id, {})[inv.invocation_id] = None

    def _emit_dispatch(self, inv: _Invocation, now_s: float, out: list[Action]) -> None:
        job, stage, comp = inv.job, inv.stage, inv.component
        assert comp is not None
        if not job.started:
            job.started = True
            out.append(JobStarted(job.job_id, now_s))
        out.append(Dispatch(inv.invocation_id, job.job_id, stage.spec.name, inv.item.index, inv.attempt,
                            comp.component_id, comp.node, comp.executor, stage.spec.task, dict(inv.item.inputs),
                            dict(stage.choice.knobs), self.config.invocation_timeout_s, tuple(comp.device_indexes)))
