"""The controller's workload shell: catalog, workflows, jobs, plan and components.

A thin asyncio layer around three pure cores — the job executor (DAG execution), the
planner (which executors, knobs and placements) and the reconciler (desired versus
reported components). It feeds them events (submissions, heartbeats, invocation
results, clock ticks) and performs the actions they return: send commands and
invocations to agents, persist to SQLite, answer waiting clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from common.protocol import (
    CancelInvocation, ComponentList, ComponentReport, ComponentView, ErrorReply, InvocationResult, InvocationView,
    Invoke, JobAccepted, JobDetail, JobList, JobSummary, JobView, ProtocolError, StartComponent, StopComponent,
    SubmitJob,
)
from common.transport import PeerUnreachable, RemoteError, RequestTimeout
from common.workflow.catalog import ExecutorSpec
from common.workflow.loader import SpecError
from common.workflow.spec import WorkflowSpec
from common.workflow.types import check_value, value_bytes
from controller import reconciler as rc
from controller.autopilot_shell import AutopilotSettings, AutopilotShell
from controller.context import ControllerContext
from controller.jobs import executor as jx
from controller.jobs.catalog_admin import CatalogAdmin
from controller.jobs.store import InvocationRow, StoredJob, StoredWorkflow, WorkloadStore
from controller.registry import Liveness, NodeRecord
from policies import first_fit
from policies.plan import (
    SLO_DIMENSIONS, SLO_TIERS, Demand, DeviceSlot, NodeSnapshot, PlacedComponent, Plan, StageChoice,
)

log = logging.getLogger("murakkab.controller.jobs")

MAX_JOB_INPUT_BYTES = 768 * 1024  # a job's inputs must fit one frame, with room for the envelope
MAX_WAIT_S = 30.0
REPLY_GRACE_S = 5.0  # on top of an invocation's own timeout, for the reply to travel back


@dataclass(frozen=True)
class WorkloadConfig:
    invocation_timeout_s: float = 300.0
    max_attempts: int = 3
    queue_timeout_s: float = 900.0
    job_timeout_s: float = 3600.0
    demand_ttl_s: float = 3600.0  # a (workflow, SLO) pair keeps its components this long after its last job
    replan_interval_s: float = 30.0
    command_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0
    restart_grace_s: float = 30.0  # after a restart, how long to wait for known nodes before planning without them
    planner: str = "murakkab"  # an autopilot preset ("murakkab", "murakkab-epoch", "static") or "first-fit"
    autopilot: AutopilotSettings = AutopilotSettings()  # its settings (the preset is ``planner``)
    power_limit_retry_s: float = 10.0
    start_failure_limit: int = 3  # reported failed this many times in a row: the executor avoids that node ...
    avoid_node_s: float = 600.0  # ... for this long (then it may be tried there again)


class WorkloadService(CatalogAdmin):
    def __init__(self, controller: ControllerContext, config: WorkloadConfig) -> None:
        self.c = controller
        self.config = config
        self.store = WorkloadStore(controller.store.db)
        self.catalog: dict[str, ExecutorSpec] = {}
        self.catalog_versions: dict[str, int] = {}
        self.workflows: dict[str, tuple[StoredWorkflow, WorkflowSpec]] = {}
        self.executor = jx.JobExecutor(jx.ExecutorConfig(
            invocation_timeout_s=config.invocation_timeout_s, max_attempts=config.max_attempts,
            queue_timeout_s=config.queue_timeout_s, job_timeout_s=config.job_timeout_s))
        self.reconciler = rc.Reconciler(rc.ReconcilerConfig(command_timeout_s=config.command_timeout_s,
                                                            drain_timeout_s=config.drain_timeout_s),
                                        command_prefix=f"e{controller.epoch}-")  # unique across restarts
        self.plan = Plan(choices={}, components=())
        self.demands: dict[Demand, float] = {}  # demand -> last time a job asked for it (monotonic s)
        self.reports: dict[str, tuple[ComponentReport, ...]] = {}
        self._ready_key: tuple[Any, ...] = ()
        self._ready_by_node: dict[str, tuple[jx.ReadyComponent, ...]] = {}
        self._desired_by_id: dict[str, Any] = {}
        self._nodes_key: tuple[Any, ...] = ()
        self._replan_at_s = 0.0
        self._replan_needed = True
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._commands: dict[str, asyncio.Task[None]] = {}
        self._dispatched: dict[str, InvocationRow] = {}
        self._job_demands: dict[str, Demand] = {}  # unfinished job -> its demand (keeps its components planned)
        self._job_executors: dict[str, frozenset[str]] = {}  # unfinished job -> the executors its stored choices name
        self._grace_until_s: float | None = None
        self._grace_planning: asyncio.Future[None] | None = None  # the first plan after a restart, off the loop
        self._avoid: dict[tuple[str, str], tuple[float, str]] = {}  # (executor, node) -> (until, why)
        self._unservable: dict[str, str] = {}  # executor -> why no node can serve it (told to the job executor)
        self._failures_forgiven: dict[tuple[str, str], int] = {}  # (node, component id) -> failures counted already
        self.autopilot = (AutopilotShell(self, dataclasses.replace(config.autopilot, preset=config.planner))
                          if config.planner != "first-fit" else None)
        if self.autopilot is not None:  # the avoid list survives a restart, in wall time
            offset = time.time() - controller.clock()
            for executor, node, until_unix_s, why in self.autopilot.stored_avoid:
                if until_unix_s > time.time():
                    self._avoid[(executor, node)] = (until_unix_s - offset, why)
        self._power_limit_sent_s: dict[tuple[str, int], float] = {}
        self._first_fit_explanation: dict[str, Any] = {"planner": config.planner}

    # --- start-up --------------------------------------------------------------------------

    def load(self) -> None:
        """Restore catalog, workflows and unfinished jobs; resumed jobs keep their completed stages."""
        for name, (version, data) in self.store.load_executors().items():
            try:
                self.catalog[name] = ExecutorSpec.model_validate(data)
                self.catalog_versions[name] = version
            except ValidationError as exc:
                log.error("stored executor %s v%d no longer validates; ignored: %s", name, version, exc)
        for stored in self.store.load_workflows():
            try:
                self.workflows[stored.name] = (stored, WorkflowSpec.from_dict(stored.spec, source=stored.source))
            except SpecError as exc:
                log.error("stored workflow %s v%d no longer validates; ignored: %s", stored.name, stored.version, exc)
        now = self.c.clock()
        failed = self.store.fail_running_invocations("the controller restarted while it ran; the job resumes")
        if failed:
            log.info("%d invocations were running when the controller stopped; marked failed", failed)
        if self.c.registry.nodes:  # a restart: give the known nodes time to report what they run
            self._grace_until_s = now + self.config.restart_grace_s
        for name in self.workflows:
            self.demands[Demand(name)] = now
        for job in self.store.unfinished_jobs():
            demand = Demand.of(job.workflow, job.slo)
            self.demands[demand] = now
            self._job_demands[job.job_id] = demand
            restored = self.store.stage_outputs(job.job_id)
            choices = {stage: StageChoice(c["executor"], dict(c["knobs"])) for stage, c in job.choices.items()}
            self._job_executors[job.job_id] = frozenset(c.executor for c in choices.values())
            try:
                spec = WorkflowSpec.from_dict(job.spec, source=f"job {job.job_id}")
            except SpecError as exc:
                self._finish_job(job.job_id, "failed", f"cannot resume after a controller restart: {exc}", None)
                continue
            log.info("resuming job %s (%s) with %d completed stages", job.job_id, job.workflow, len(restored))
            # The job's clock keeps running across restarts: its timeout counts from its submission.
            submitted_s = now - max(0.0, time.time() - job.submitted_at_unix_s)
            self.perform(self.executor.handle(jx.JobSubmitted(job.job_id, spec, job.inputs, choices, submitted_s,
                                                              restored=restored)))

    # --- the clock and the heartbeats ------------------------------------------------------

    def tick(self, now_s: float) -> None:
        # The executor's clock first: job, queue and invocation timeouts must fire even if planning fails.
        self.perform(self.executor.handle(jx.Tick(now_s)))
        self._expire_demands(now_s)
        nodes_key = tuple((n.name, n.liveness, n.admin_state, n.generation, tuple(sorted(n.labels.items())))
                          for n in self.c.registry.nodes.values())  # labels too: placement reads the rack label
        if nodes_key != self._nodes_key:
            self._nodes_key = nodes_key
            if self.autopilot is None:
                self._replan_needed = True
            else:  # the autopilot places replacements at once when it sees the fleet change
                self.autopilot.observe_fleet_now()
            for node in self.c.registry.nodes.values():
                if node.liveness is not Liveness.READY:
                    self._node_report(node.name, False, self.reports.get(node.name, ()), now_s)
        if self.in_restart_grace(now_s):
            return
        self._update_avoided(now_s)
        if self.autopilot is None:
            if self._replan_needed or now_s >= self._replan_at_s:
                self.replan(now_s)
        else:
            if self._replan_needed:
                self._replan_needed = False
                self.autopilot.inputs_changed(now_s, replan=True, running=self.unplanned_running())
            self.autopilot.tick(now_s)
        self.perform(self.reconciler.handle(rc.Tick(now_s)))
        self._apply_power_limits(now_s)
        unservable = self._unservable_executors()
        if unservable != self._unservable:
            self._unservable = unservable
            for name, why in sorted(unservable.items()):
                log.warning("executor %s: no node can serve it (%s); its queued work fails in %g s", name, why,
                            self.executor.config.unservable_grace_s)
            self.perform(self.executor.handle(jx.ServabilityChanged(dict(unservable), now_s)))

    def _update_avoided(self, now_s: float) -> None:
        """Executors that keep failing to start on a node avoid it for a while, and the plan moves them.

        A component reported failed ``start_failure_limit`` times in a row (the reconciler's count,
        reset when it is ready) puts (executor, node) on the list for ``avoid_node_s``; both planners
        then place the executor elsewhere, or say why they cannot. When the time is up the executor
        may go there again, and only failures after that count towards a new entry.
        """
        changed = False
        for key, (until_s, _) in list(self._avoid.items()):
            if now_s >= until_s:
                del self._avoid[key]
                changed = True
                log.info("executor %s may run on node %s again", *key)
        failing = self.reconciler.failing()
        seen = {(status.node, status.component_id) for status in failing}
        for component in [c for c in self._failures_forgiven if c not in seen]:
            del self._failures_forgiven[component]  # ready since: its count started again at 0
        for status in failing:
            key = (status.executor, status.node)
            forgiven = self._failures_forgiven.get((status.node, status.component_id), 0)
            if status.failures_since_ready < forgiven:
                self._failures_forgiven.pop((status.node, status.component_id), None)  # it was ready since
                forgiven = 0
            if not status.desired or key in self._avoid or \
                    status.failures_since_ready - forgiven < self.config.start_failure_limit:
                continue
            self._failures_forgiven[(status.node, status.component_id)] = status.failures_since_ready
            reason = (f"failed {status.failures_since_ready - forgiven} times in a row there (last: "
                      f"{status.last_error or 'no reason reported'}); avoided for {self.config.avoid_node_s:g} s")
            self._avoid[key] = (now_s + self.config.avoid_node_s, reason)
            log.warning("executor %s avoids node %s: %s", status.executor, status.node, reason)
            changed = True
        if changed:
            self._replan_needed = True

    def _unservable_executors(self) -> dict[str, str]:
        """Executors with queued work that no node can serve: the plan places none of them (placement said
        why, or every node is avoided), or every placed one keeps failing to start."""
        queued = self.executor.queued_executors()
        if not queued:
            return {}
        failing = {(s.node, s.component_id): s for s in self.reconciler.failing()}
        result: dict[str, str] = {}
        for name in queued:
            placed = [c for c in self.plan.components if c.executor == name]
            if not placed:
                avoided = sorted(node for (executor, node) in self._avoid if executor == name)
                notes = [n for n in self.plan.notes if name in n]
                result[name] = (f"avoided on {', '.join(avoided)} after repeated start failures" if avoided
                                else notes[0] if notes else "the plan places no component of it")[:500]
                continue
            statuses = [failing.get((c.node, c.component_id)) for c in placed]
            if all(s is not None and s.failures_since_ready >= self.config.start_failure_limit for s in statuses):
                last = next((s.last_error for s in statuses if s is not None and s.last_error), "no reason reported")
                result[name] = f"every component failed {self.config.start_failure_limit}+ times (last: {last})"[:500]
        return result

    def wanted_demands(self) -> tuple[Demand, ...]:
        """Demands the plan must serve: recently asked for, or named by unfinished jobs."""
        return tuple(sorted(set(self.demands) | set(self._job_demands.values()), key=repr))

    def live_job_executors(self) -> frozenset[str]:
        """Executors that unfinished jobs' stored choices name: the plan keeps them running even when a
        workflow update or a re-plan would choose others for new jobs."""
        return frozenset().union(*self._job_executors.values()) if self._job_executors else frozenset()

    def avoid_entries(self) -> dict[tuple[str, str], tuple[float, str]]:
        """(executor, node) -> (until, on the controller's clock; why)."""
        return dict(self._avoid)

    def avoided(self) -> dict[tuple[str, str], str]:
        """(executor, node) pairs the planners do not use for now, with why."""
        return {key: why for key, (_, why) in self._avoid.items()}

    @property
    def power_limits(self) -> dict[tuple[str, int], float]:
        """The limit each device should run at (the autopilot's: plan, heat, budgets and pins); none for first fit."""
        return self.autopilot.power_limits if self.autopilot is not None else {}

    @property
    def explanation(self) -> dict[str, Any]:
        return self.autopilot.explanation if self.autopilot is not None else self._first_fit_explanation

    def _apply_power_limits(self, now_s: float) -> None:
        """Level-triggered, like the reconciler: a device whose reported limit differs from the plan's
        gets a set_power_limit, at most once per retry interval."""
        for (node_name, index), limit_w in self.power_limits.items():
            node = self.c.registry.nodes.get(node_name)
            if node is None or node.liveness is not Liveness.READY:
                continue
            ring = node.history.get(index)  # the latest sample of this device only
            reported = ring[-1][1].power_limit_w if ring else None
            if reported is not None and abs(reported - limit_w) < 1.0:
                continue
            sent_s = self._power_limit_sent_s.get((node_name, index))
            if sent_s is not None and now_s - sent_s < self.config.power_limit_retry_s:
                continue
            self._power_limit_sent_s[(node_name, index)] = now_s
            self._in_background(f"power-{node_name}-{index}-{now_s}", self.c.set_power_limit(node, index, limit_w))

    def on_heartbeat(self, node_name: str, reports: tuple[ComponentReport, ...], now_s: float) -> None:
        node = self.c.registry.nodes.get(node_name)
        ready = node is not None and node.liveness is Liveness.READY
        self._node_report(node_name, ready, reports, now_s)

    def in_restart_grace(self, now_s: float) -> bool:
        """After a controller restart, wait for the known nodes to come back before reconciling.

        Until they have re-registered (or the grace period ends), what they run is unknown: a plan
        made now would stop and restart every running engine, or move it to whichever node
        registered first.
        """
        if self._grace_until_s is None:
            return False
        if self._grace_planning is not None:  # the first plan is being solved on a worker thread
            if not self._grace_planning.done():
                return True
            failed = self._grace_planning.cancelled() or self._grace_planning.exception() is not None
            self._grace_planning = None
            self._end_restart_grace(now_s, plan_first=failed)  # a failed solve: plan on the loop after all
            return False
        waiting = [n for n in self.c.registry.nodes.values() if n.liveness is Liveness.JOINING]  # no heartbeat yet
        if waiting and now_s < self._grace_until_s:
            return True
        if self.autopilot is not None:
            # The MILP may take seconds: solve it off the loop, and keep the reports from the reconciler
            # until its plan is adopted (the next tick or report after it ends the grace).
            self._grace_planning = self.autopilot.plan_now(now_s)
            self._grace_planning.add_done_callback(lambda _done: self.in_restart_grace(self.c.clock()))
            return True
        self._end_restart_grace(now_s, plan_first=True)
        return False

    def _end_restart_grace(self, now_s: float, plan_first: bool) -> None:
        """The first plan adopts what the nodes reported during the grace period; only then does the
        reconciler hear those reports, so nothing that should keep running is stopped."""
        self._grace_until_s = None
        if plan_first:
            self.replan(now_s)
        for node_name, reports in list(self.reports.items()):
            node = self.c.registry.nodes.get(node_name)
            ready = node is not None and node.liveness is Liveness.READY
            self.perform(self.reconciler.handle(rc.NodeReport(node_name, ready, reports, now_s)))

    def _node_report(self, node_name: str, ready: bool, reports: tuple[ComponentReport, ...], now_s: float) -> None:
        self.reports[node_name] = reports if ready else ()
        if self.autopilot is not None:
            self.autopilot.components_reported(node_name, reports, ready, now_s)
        if self.in_restart_grace(now_s):
            return  # the reconciler hears about the node after the first plan, which adopts what it runs
        self.perform(self.reconciler.handle(rc.NodeReport(node_name, ready, reports, now_s)))
        node_ready = self._ready_on(node_name)
        if node_ready != self._ready_by_node.get(node_name, ()):
            self._ready_by_node[node_name] = node_ready
            self._publish_ready_components(now_s)

    def _ready_on(self, node_name: str) -> tuple[jx.ReadyComponent, ...]:
        """The components on one node the job executor may know about.

        Reported ready and placed there by the plan: they take new invocations. Still serving but
        no longer wanted (draining, or dropped from the plan): capacity 0, so what runs there
        finishes instead of being abandoned and retried elsewhere.
        """
        desired = self._desired_by_id
        ready = []
        for report in self.reports.get(node_name, ()):
            placed = desired.get(report.component_id)
            spec = self.catalog.get(report.executor)
            if spec is None or report.state not in ("ready", "draining"):
                continue
            wanted = report.state == "ready" and placed is not None and placed.node == node_name
            weight = self.autopilot.weights.get(report.component_id, 1.0) if self.autopilot is not None else 1.0
            capacity = math.ceil(spec.max_concurrency * weight - 1e-9) if wanted and weight > 0 else 0
            ready.append(jx.ReadyComponent(report.component_id, node_name, report.executor, capacity,
                                           tuple(report.device_indexes)))
        return tuple(sorted(ready, key=lambda r: r.component_id))

    def _publish_ready_components(self, now_s: float) -> None:
        components = tuple(sorted((c for group in self._ready_by_node.values() for c in group),
                                  key=lambda r: r.component_id))
        if components != self._ready_key:
            self._ready_key = components
            self.perform(self.executor.handle(jx.ComponentsChanged(components, now_s)))

    # --- planning --------------------------------------------------------------------------

    def _expire_demands(self, now_s: float) -> None:
        live = set(self._job_demands.values())
        for demand, seen_s in list(self.demands.items()):
            applied_default = demand.slo == () and demand.workflow in self.workflows
            if (demand.workflow not in self.workflows
                    or (not applied_default and demand not in live and now_s - seen_s > self.config.demand_ttl_s)):
                del self.demands[demand]
                self._replan_needed = True

    def node_snapshots(self) -> list[NodeSnapshot]:
        snapshots = []
        for node in self.c.registry.nodes.values():
            schedulable = node.schedulable()
            devices = tuple(DeviceSlot(d.index, d.kind, d.model, d.simulated, d.memory_total_bytes) for d in node.devices)
            host = node.host_info
            snapshots.append(NodeSnapshot(node.name, schedulable, devices, host.cpu_count if host else 0,
                                          host.memory_total_bytes if host else 0, dict(node.labels)))
        return snapshots

    def unplanned_running(self) -> tuple[PlacedComponent, ...]:
        """Running components agents report that the plan does not know (e.g. after a controller restart)."""
        known = {p.component_id for p in self.plan.components}
        return tuple(PlacedComponent(r.component_id, r.executor, node, tuple(r.device_indexes))
                     for node, reports in sorted(self.reports.items()) for r in reports
                     if r.component_id not in known and r.executor in self.catalog
                     and r.state in ("pending", "starting", "ready"))

    def _current_components(self) -> tuple[PlacedComponent, ...]:
        """The plan's components plus the running ones it does not know, so placement keeps them where they
        are instead of starting them again."""
        return (*self.plan.components, *self.unplanned_running())

    async def replan_now(self, now_s: float) -> None:
        """A plan from the latest inputs before going on (a submission for a demand the plan lacks)."""
        if self.autopilot is None:
            self.replan(now_s)
            return
        self._replan_needed = False
        await asyncio.wait([self.autopilot.plan_now(now_s)])  # a failed solve is logged; the caller sees no plan

    def replan(self, now_s: float) -> Plan:
        """Plan now, on the event loop: first fit always, the autopilot only after a restart."""
        if self.autopilot is not None:
            self._replan_needed = False
            self.autopilot.plan_inline(now_s)
            return self.plan
        self._replan_needed = False
        self._replan_at_s = now_s + self.config.replan_interval_s
        workflows = {name: spec for name, (_, spec) in self.workflows.items()}
        demands = list(self.wanted_demands())
        started = time.perf_counter()
        plan = first_fit.plan(workflows, self.catalog, demands, self.node_snapshots(), self._current_components(),
                              self.avoided(), keep_executors=self.live_job_executors())
        self._first_fit_explanation = first_fit_explanation(plan, time.perf_counter() - started)
        return self.adopt_plan(plan, now_s)

    def routing_changed(self, now_s: float) -> None:
        """The autopilot moved work between components (a hot GPU, a rollout): capacities follow."""
        self._ready_by_node = {name: self._ready_on(name) for name in self.reports}
        self._publish_ready_components(now_s)

    def adopt_plan(self, plan: Plan, now_s: float) -> Plan:
        if plan.components != self.plan.components or plan.notes != self.plan.notes:
            for note in plan.notes:
                log.warning("plan: %s", note)
            log.info("plan: %d components for %d demands", len(plan.components), len(plan.choices))
        self.plan = plan
        self._desired_by_id = {p.component_id: p for p in plan.components}
        self.perform(self.reconciler.handle(rc.DesiredChanged(plan.components, now_s)))
        self._ready_by_node = {name: self._ready_on(name) for name in self.reports}
        self._publish_ready_components(now_s)
        return plan

    # --- performing actions ----------------------------------------------------------------

    def perform(self, actions: Iterable[Any]) -> None:
        actions = list(actions)
        # Stage outputs are kept only so an unfinished job can resume after a restart; a job that
        # ends in this same batch needs none (saves a write on every job's last stage).
        finishing = {a.job_id for a in actions if isinstance(a, jx.JobFinished)}
        cancelled = {a.job_id for a in actions if isinstance(a, jx.JobFinished) and a.state == "cancelled"}
        for action in actions:
            match action:
                case jx.Dispatch():
                    self._dispatch(action)
                case jx.Abandon(invocation_id=invocation_id, reason=reason):
                    task = self._inflight.pop(invocation_id, None)
                    if task is not None:
                        task.cancel()
                    row = self._dispatched.pop(invocation_id, None)
                    if row is not None:
                        self._save_row(row, "cancelled" if row.job_id in cancelled else "failed", reason)
                        if row.node is not None:
                            self._cancel_on_agent(row.node, invocation_id, reason)
                case jx.JobStarted(job_id=job_id):
                    self.store.mark_started(job_id, time.time())
                case jx.StageCompleted(job_id=job_id, stage=stage, outputs=outputs):
                    if job_id not in finishing:
                        self.store.save_stage_outputs(job_id, stage, outputs)
                case jx.JobFinished(job_id=job_id, state=state, reason=reason, outputs=outputs):
                    self._finish_job(job_id, state, reason, outputs)
                case rc.SendStart() | rc.SendStop():
                    self._send_command(action)
                case _:
                    pass  # informational actions (e.g. queued) need no side effect

    def _finish_job(self, job_id: str, state: str, reason: str, outputs: dict[str, Any] | None) -> None:
        self.store.finish_job(job_id, state, reason, outputs if state == "succeeded" else None, time.time())
        self._observe_job_end(job_id, state, self._job_demands.pop(job_id, None))
        self._job_executors.pop(job_id, None)
        level = logging.INFO if state == "succeeded" else logging.WARNING
        log.log(level, "job %s %s%s", job_id, state, f": {reason}" if reason else "")
        self.c.metrics.jobs.labels(state).inc()
        for waiter in self._waiters.pop(job_id, []):
            if not waiter.done():
                waiter.set_result(None)

    def _observe_job_end(self, job_id: str, state: str, demand: Demand | None) -> None:
        """Latency, energy and SLO outcome per workflow and tier (``murakkab_job_*``, ``murakkab_jobs_slo_total``)."""
        if state not in ("succeeded", "failed"):
            return
        job = self.store.get_job(job_id)
        if job is None:
            return
        latency_s = (job.ended_at_unix_s - job.submitted_at_unix_s) if job.ended_at_unix_s is not None else None
        energies = [r.energy_j for r in self.store.invocations(job_id) if r.energy_j is not None]
        target_s = (self.autopilot.latency_target_s(demand or Demand.of(job.workflow, job.slo))
                    if self.autopilot is not None else None)
        self.c.metrics.job_ended(job.workflow, job.slo, state, latency_s, sum(energies) if energies else None,
                                 target_s)

    def _save_row(self, row: InvocationRow, state: str, error: str = "", result: InvocationResult | None = None) -> None:
        if result is not None:
            row = dataclasses.replace(
                row, device_indexes=tuple(result.device_indexes) or row.device_indexes, state=state, error=error,
                started_at_unix_s=result.started_at_unix_s, ended_at_unix_s=result.ended_at_unix_s,
                latency_s=result.latency_s, energy_j=result.energy_j, simulated=result.simulated)
        else:
            row = dataclasses.replace(row, state=state, error=error,
                                      ended_at_unix_s=time.time() if state != "running" else None)
        self.store.save_invocation(row)

    def _dispatch(self, d: "jx.Dispatch") -> None:
        placed = self._desired_by_id.get(d.component_id)
        spec = self.catalog.get(d.executor)
        devices = tuple(d.device_indexes) or (placed.device_indexes if placed else ())
        row = InvocationRow(d.invocation_id, d.job_id, d.stage, d.item, d.attempt, d.executor, dict(d.knobs), d.node,
                            d.component_id, devices, "running", "", time.time(),
                            None, None, None, spec is not None and spec.engine == "sim")
        self.store.save_invocation(row)
        self._dispatched[d.invocation_id] = row
        task = asyncio.ensure_future(self._invoke(d, row))
        self._inflight[d.invocation_id] = task
        task.add_done_callback(lambda _t, i=d.invocation_id: self._inflight.pop(i, None))

    def _cancel_on_agent(self, node_name: str, invocation_id: str, reason: str) -> None:
        """Tell the agent to stop an abandoned invocation, so it frees its slot; best effort (an agent that
        does not answer finishes the invocation and its result is ignored)."""
        node = self.c.registry.nodes.get(node_name)
        if node is None or node.liveness is not Liveness.READY or self.c.agents is None:
            return
        message = CancelInvocation(uuid.uuid4().hex, self.c.epoch, node.generation, invocation_id, reason[:500])
        self._in_background(f"cancel-{invocation_id}", self._send_cancel(node_name, message))

    async def _send_cancel(self, node_name: str, message: CancelInvocation) -> None:
        assert self.c.agents is not None
        try:
            result = await self.c.agents.request(message, peer=node_name.encode(),
                                                 timeout_s=self.config.command_timeout_s)
        except (RequestTimeout, PeerUnreachable, RemoteError) as exc:
            log.info("cancel of invocation %s on %s not delivered: %s", message.invocation_id, node_name, exc)
            return
        log.info("cancel of invocation %s on %s: %s", message.invocation_id, node_name, result.message)

    async def _invoke(self, d: "jx.Dispatch", row: InvocationRow) -> None:
        assert self.c.agents is not None
        message = Invoke(d.invocation_id, self.c.epoch, d.component_id, d.task, dict(d.inputs), dict(d.knobs),
                         float(d.timeout_s))
        event: Any
        try:
            result = await self.c.agents.request(message, peer=d.node.encode(), timeout_s=d.timeout_s + REPLY_GRACE_S)
        except RequestTimeout:
            event = jx.InvocationFailed(d.invocation_id, "timeout", f"no reply from {d.node} within "
                                        f"{d.timeout_s + REPLY_GRACE_S:g}s", True, self.c.clock())
        except PeerUnreachable:
            event = jx.InvocationFailed(d.invocation_id, "node_unreachable", f"node {d.node} is not connected",
                                        True, self.c.clock())
        except RemoteError as exc:
            retryable = exc.code in ("stale_command", "not_registered", "internal")
            event = jx.InvocationFailed(d.invocation_id, exc.code, exc.message, retryable, self.c.clock())
        except ProtocolError as exc:  # e.g. the stage's inputs do not fit a frame
            event = jx.InvocationFailed(d.invocation_id, exc.code, f"stage inputs cannot be sent: {exc.message}",
                                        False, self.c.clock())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an unexpected transport error: fail fast instead of timing out
            log.exception("invocation %s failed unexpectedly", d.invocation_id)
            event = jx.InvocationFailed(d.invocation_id, "internal", f"{type(exc).__name__}: {exc}", True,
                                        self.c.clock())
        else:
            if result.ok:
                self._save_row(row, "succeeded", result=result)
                event = jx.InvocationSucceeded(d.invocation_id, dict(result.outputs), self.c.clock())
            else:
                self._save_row(row, "failed", f"{result.error_code}: {result.error}", result=result)
                event = jx.InvocationFailed(d.invocation_id, result.error_code, result.error, result.retryable,
                                            self.c.clock())
            self._dispatched.pop(d.invocation_id, None)
            self._inflight.pop(d.invocation_id, None)
            self.perform(self.executor.handle(event))
            return
        self._dispatched.pop(d.invocation_id, None)
        self._inflight.pop(d.invocation_id, None)
        self._save_row(row, "failed", f"{event.code}: {event.message}")
        self.perform(self.executor.handle(event))

    def _send_command(self, action: "rc.SendStart | rc.SendStop") -> None:
        node = self.c.registry.nodes.get(action.node)
        if node is None:
            self.perform(self.reconciler.handle(rc.CommandDone(action.command_id, False, f"unknown node {action.node}",
                                                               self.c.clock())))
            return
        if isinstance(action, rc.SendStart):
            spec = self.catalog.get(action.executor)
            if spec is None:
                self.perform(self.reconciler.handle(rc.CommandDone(
                    action.command_id, False, f"executor {action.executor} is not in the catalog", self.c.clock())))
                return
            message: Any = StartComponent(action.command_id, self.c.epoch, node.generation, action.component_id,
                                          spec.model_dump(mode="json"), tuple(action.device_indexes))
        else:
            message = StopComponent(action.command_id, self.c.epoch, node.generation, action.component_id,
                                    float(action.drain_timeout_s))
        self._in_background(action.command_id, self._command(action.command_id, node, message))

    def _in_background(self, key: str, command: Coroutine[Any, Any, Any]) -> None:
        """Send a command to an agent without waiting; held in ``_commands`` (by key) until it ends."""
        task = asyncio.ensure_future(command)
        self._commands[key] = task
        task.add_done_callback(lambda _t, k=key: self._commands.pop(k, None))

    async def _command(self, command_id: str, node: NodeRecord, message: Any) -> None:
        assert self.c.agents is not None
        try:
            result = await self.c.agents.request(message, peer=node.name.encode(),
                                                 timeout_s=self.config.command_timeout_s)
            ok, text = result.ok, result.message
        except (RequestTimeout, PeerUnreachable, RemoteError) as exc:
            ok, text = False, f"{type(exc).__name__}: {exc}"
        self.c.metrics.commands.labels(message.op, "ok" if ok else "failed").inc()
        if not ok:
            log.warning("%s %s on %s failed: %s", message.op, message.component_id, node.name, text)
        self.perform(self.reconciler.handle(rc.CommandDone(command_id, ok, text, self.c.clock())))

    async def close(self) -> None:
        tasks = [*self._inflight.values(), *self._commands.values()]
        if self.autopilot is not None:
            await self.autopilot.close()  # a solve already on its thread finishes there, unused
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.cancel()

    # --- admin: jobs -----------------------------------------------------------------------

    async def submit(self, msg: SubmitJob, owner: str = "") -> Any:
        """Accept a job for ``owner`` (the submitting user key; '' without authentication).

        Idempotency keys are scoped to their owner, so one tenant's key never returns another's job.
        """
        idempotency_key = f"{owner}\x00{msg.idempotency_key}" if owner and msg.idempotency_key else msg.idempotency_key
        if idempotency_key:
            existing = self.store.job_for_key(idempotency_key)
            if existing is not None:
                job = self.store.get_job(existing)
                assert job is not None
                return JobAccepted(existing, job.workflow_version)
        entry = self.workflows.get(msg.workflow)
        if entry is None:
            return self._unknown_workflow(msg.workflow)
        stored, spec = entry
        problem = self._check_slo(msg.slo) or self._check_inputs(spec, msg.inputs)
        if problem is not None:
            return problem
        now = self.c.clock()
        if self.in_restart_grace(now):  # a plan now would see only the nodes that came back so far
            return ErrorReply("unavailable", "the controller restarted moments ago and is waiting for its nodes to "
                                             "report what they run; retry shortly")
        demand = Demand.of(msg.workflow, dict(msg.slo))
        if self._replan_needed or demand not in self.plan.choices:  # e.g. a workflow or catalog just applied
            new_demand = demand not in self.demands
            self.demands[demand] = now
            await self.replan_now(now)
        else:
            new_demand = False
        if demand not in self.plan.choices:
            reason = self.plan.unsatisfiable.get(demand, "the planner found no executors for it")
            if new_demand and demand.slo and demand not in self._job_demands.values():
                del self.demands[demand]
            if not any(n.schedulable() for n in self.c.registry.nodes.values()):
                return ErrorReply("unavailable", f"no node can take work right now ({reason}); the controller "
                                                 "restarted recently or every node is unhealthy: retry shortly")
            return ErrorReply("unsatisfiable", f"workflow {msg.workflow} at SLO {dict(msg.slo) or 'default'} cannot "
                                               f"be served: {reason}")
        self.demands[demand] = now
        if self.autopilot is not None:
            self.autopilot.record_arrival(demand)
        choices = self.plan.choices[demand]
        job = StoredJob(f"j-{uuid.uuid4().hex[:12]}", msg.workflow, stored.version, spec.to_dict(), dict(msg.slo),
                        {stage: {"executor": c.executor, "knobs": dict(c.knobs)} for stage, c in choices.items()},
                        dict(msg.inputs), "queued", "", None, time.time(), None, None, owner)
        self.store.insert_job(job, idempotency_key)
        self._job_demands[job.job_id] = demand
        self._job_executors[job.job_id] = frozenset(c.executor for c in choices.values())
        self.c.metrics.jobs.labels("accepted").inc()
        self.perform(self.executor.handle(jx.JobSubmitted(job.job_id, spec, dict(msg.inputs), dict(choices), now)))
        return JobAccepted(job.job_id, stored.version)

    @staticmethod
    def _check_slo(slo: dict[str, str]) -> ErrorReply | None:
        for dimension, tier in slo.items():
            if dimension not in SLO_DIMENSIONS:
                return ErrorReply("invalid_slo", f"unknown SLO dimension {dimension!r} (use {', '.join(SLO_DIMENSIONS)})")
            if tier not in SLO_TIERS:
                return ErrorReply("invalid_slo", f"unknown {dimension} tier {tier!r} (use {', '.join(SLO_TIERS)})")
        return None

    @staticmethod
    def _check_inputs(spec: WorkflowSpec, inputs: dict[str, Any]) -> ErrorReply | None:
        declared = spec.inputs
        unknown = sorted(set(inputs) - set(declared))
        if unknown:
            return ErrorReply("invalid_input", f"unknown input(s) {', '.join(unknown)}; {spec.name} takes "
                                               + ", ".join(f"{n} ({i.type})" for n, i in declared.items()))
        missing = sorted(n for n, i in declared.items() if i.required and n not in inputs)
        if missing:
            return ErrorReply("invalid_input", f"missing required input(s) {', '.join(missing)} for {spec.name}")
        size = sum(value_bytes(v) for v in inputs.values())
        if size > MAX_JOB_INPUT_BYTES:
            return ErrorReply("input_too_large", f"inputs are about {size} bytes; a job takes at most "
                                                 f"{MAX_JOB_INPUT_BYTES} bytes of inputs")
        for name, value in inputs.items():
            problem = check_value(declared[name].type, value, f"input {name}")
            if problem is not None:
                return ErrorReply("invalid_input", problem)
        return None

    def cancel(self, job_id: str, reason: str, owner: str | None = None) -> Any:
        job = self.store.get_job(job_id)
        if job is None:
            return ErrorReply("unknown_job", f"no job {job_id!r}")
        if owner is not None and job.owner != owner:
            return _not_yours(job_id)
        if job.state in ("queued", "running"):
            if job_id in self.executor.job_ids():
                self.perform(self.executor.handle(jx.CancelRequested(job_id, reason, self.c.clock())))
            else:  # stored unfinished but unknown to the executor (a failed write lost its end): end it now
                self._finish_job(job_id, "cancelled", reason, None)
        return JobDetail(self.job_view(job_id))

    async def get_job(self, job_id: str, wait_s: float, include_outputs: bool, owner: str | None = None) -> Any:
        """``owner`` set: only that user's jobs (a submitter's view); None: every job."""
        job = self.store.get_job(job_id)
        if job is None:
            return ErrorReply("unknown_job", f"no job {job_id!r}")
        if owner is not None and job.owner != owner:
            return _not_yours(job_id)
        if wait_s > 0 and job.state in ("queued", "running"):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(job_id, []).append(waiter)
            await asyncio.wait([waiter], timeout=min(wait_s, MAX_WAIT_S))
            if not waiter.done():
                waiters = self._waiters.get(job_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                waiter.cancel()
        return JobDetail(self.job_view(job_id, include_outputs))

    def job_view(self, job_id: str, include_outputs: bool = True) -> JobView:
        job = self.store.get_job(job_id)
        assert job is not None
        view_fields = [f.name for f in dataclasses.fields(InvocationView)]  # a stored row less its job id
        invocations = tuple(InvocationView(**{name: getattr(r, name) for name in view_fields})
                            for r in self.store.invocations(job_id))
        return JobView(job.job_id, job.workflow, job.workflow_version, job.state, job.reason, job.slo,
                       job.submitted_at_unix_s, job.started_at_unix_s, job.ended_at_unix_s,
                       (job.outputs or {}) if include_outputs else {}, invocations)

    def list_jobs(self, limit: int, state: str, workflow: str, owner: str | None = None) -> Any:
        if not 1 <= limit <= 1000:
            return ErrorReply("invalid_argument", f"limit must be 1-1000, got {limit}")
        summaries = []
        for job, energy_j in self.store.list_jobs(limit, state, workflow, owner):
            latency = (job.ended_at_unix_s - job.submitted_at_unix_s) if job.ended_at_unix_s else None
            summaries.append(JobSummary(job.job_id, job.workflow, job.state, job.reason, job.slo,
                                        job.submitted_at_unix_s, job.ended_at_unix_s, latency, energy_j))
        return JobList(tuple(summaries))

    def list_components(self) -> ComponentList:
        views: list[ComponentView] = []
        desired = self._desired_by_id
        seen: set[str] = set()
        for node_name, reports in sorted(self.reports.items()):
            for report in reports:
                seen.add(report.component_id)
                placed = desired.get(report.component_id)
                status = self.reconciler.status(report.component_id)
                views.append(ComponentView(node_name, placed is not None and placed.node == node_name, report,
                                           report.component_id, report.executor, tuple(report.device_indexes),
                                           status.last_error if status else ""))
        for placed in self.plan.components:
            if placed.component_id not in seen:
                status = self.reconciler.status(placed.component_id)
                views.append(ComponentView(placed.node, True, None, placed.component_id, placed.executor,
                                           placed.device_indexes, status.last_error if status else ""))
        return ComponentList(tuple(views))


def first_fit_explanation(plan: Plan, elapsed_s: float) -> dict[str, Any]:
    """``plan show`` for the first-fit planner: the choices and placements, without predictions."""
    return {
        "planner": "first-fit",
        "plan_s": round(elapsed_s, 4),
        "demands": [{"workflow": d.workflow, "slo": dict(d.slo),
                     "stages": {stage: {"executor": c.executor, "knobs": dict(c.knobs)} for stage, c in stages.items()}}
                    for d, stages in sorted(plan.choices.items(), key=lambda kv: repr(kv[0]))]
                   + [{"workflow": d.workflow, "slo": dict(d.slo), "unserved": why}
                      for d, why in sorted(plan.unsatisfiable.items(), key=lambda kv: repr(kv[0]))],
        "components": [{"component_id": p.component_id, "executor": p.executor, "node": p.node,
                        "devices": list(p.device_indexes)} for p in plan.components],
        "notes": list(plan.notes),
    }


def _not_yours(job_id: str) -> ErrorReply:
    return ErrorReply("forbidden", f"job {job_id} was submitted by another user; role submitter sees only its own "
                                   "jobs (operator, admin and viewer see all)")
