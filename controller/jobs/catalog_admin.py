"""The workload service's catalog and workflow requests: apply, list, show, delete (with the checks that
keep unfinished jobs' workflows). A mixin of ``controller.jobs.service.WorkloadService``, kept apart so
each module reads in one sitting; it uses the service's catalog, workflows, store and demands."""

from __future__ import annotations

import logging
from typing import Any

from common.protocol import (
    CatalogApplied, ErrorReply, ExecutorList, ExecutorView, WorkflowApplied, WorkflowDeleted, WorkflowDetail,
    WorkflowList, WorkflowSummary,
)
from common.workflow.catalog import ExecutorSpec
from common.workflow.loader import SpecError, load_catalog, load_workflow
from common.workflow.spec import WorkflowSpec
from controller.jobs.store import StoredWorkflow, WorkloadStore
from policies.plan import Demand

log = logging.getLogger("murakkab.controller.jobs")


class CatalogAdmin:
    c: Any
    store: WorkloadStore
    catalog: dict[str, ExecutorSpec]
    catalog_versions: dict[str, int]
    workflows: dict[str, tuple[StoredWorkflow, WorkflowSpec]]
    demands: dict[Demand, float]
    _job_demands: dict[str, Demand]
    _replan_needed: bool

    def apply_catalog(self, source_name: str, yaml_text: str) -> Any:
        try:
            executors = load_catalog(yaml_text, source_name)
        except SpecError as exc:
            return ErrorReply("invalid_catalog", str(exc))
        version = self.store.save_executors([(e.name, e.model_dump(mode="json")) for e in executors], source_name)
        for executor in executors:
            self.catalog[executor.name] = executor
            self.catalog_versions[executor.name] = version
        self._replan_needed = True
        warnings = tuple(self._unserved_tasks_warnings())
        log.info("catalog v%d from %s: %s", version, source_name, ", ".join(e.name for e in executors))
        return CatalogApplied(version, tuple(e.name for e in executors), warnings)

    def _missing_tasks(self, spec: WorkflowSpec) -> list[str]:
        """The workflow's tasks no executor in the catalog implements."""
        return sorted({s.task for s in spec.stages} - {e.task for e in self.catalog.values()})

    def _unserved_tasks_warnings(self) -> list[str]:
        warnings = []
        for name, (_, spec) in sorted(self.workflows.items()):
            missing = self._missing_tasks(spec)
            if missing:
                warnings.append(f"workflow {name}: no executor in the catalog for task(s) {', '.join(missing)}")
        return warnings

    def list_executors(self) -> ExecutorList:
        views = []
        for name, spec in sorted(self.catalog.items()):
            views.append(ExecutorView(name, spec.task, spec.engine, spec.resources.device, self.catalog_versions[name],
                                      {k: tuple(v.values) for k, v in spec.knobs.items()}, spec.model_dump(mode="json")))
        return ExecutorList(tuple(views))

    def apply_workflow(self, source_name: str, yaml_text: str) -> Any:
        try:
            spec = load_workflow(yaml_text, source_name)
        except SpecError as exc:
            return ErrorReply("invalid_workflow", str(exc))
        version, unchanged = self.store.save_workflow(spec.name, yaml_text, spec.to_dict(), source_name)
        stored = self.store.latest_workflow(spec.name)
        assert stored is not None
        self.workflows[spec.name] = (stored, spec)
        self.demands[Demand(spec.name)] = self.c.clock()
        self._replan_needed = True
        missing = self._missing_tasks(spec)
        warnings = (f"no executor in the catalog for task(s) {', '.join(missing)}; jobs will be refused until "
                    "a catalog provides them",) if missing else ()
        return WorkflowApplied(spec.name, version, unchanged, warnings)

    def _summary(self, stored: StoredWorkflow, spec: WorkflowSpec) -> WorkflowSummary:
        return WorkflowSummary(spec.name, stored.version, spec.description, len(spec.stages), spec.input_types(),
                               stored.applied_at_unix_s)

    def list_workflows(self) -> WorkflowList:
        return WorkflowList(tuple(self._summary(s, w) for _, (s, w) in sorted(self.workflows.items())))

    def get_workflow(self, name: str) -> Any:
        entry = self.workflows.get(name)
        if entry is None:
            return self._unknown_workflow(name)
        stored, spec = entry
        return WorkflowDetail(self._summary(stored, spec), stored.yaml_text, spec.to_dict())

    def delete_workflow(self, name: str) -> Any:
        if name not in self.workflows:
            return self._unknown_workflow(name)
        live = sorted(job_id for job_id, demand in self._job_demands.items() if demand.workflow == name)
        if live:
            shown = ", ".join(live[:5]) + (f" and {len(live) - 5} more" if len(live) > 5 else "")
            return ErrorReply("workflow_in_use", f"workflow {name} has {len(live)} unfinished job(s) ({shown}); "
                                                 "cancel them or wait for them to end, then delete it")
        versions = self.store.delete_workflow(name)
        del self.workflows[name]
        self._replan_needed = True
        return WorkflowDeleted(name, versions)

    def _unknown_workflow(self, name: str) -> ErrorReply:
        known = ", ".join(sorted(self.workflows)) or "none applied"
        return ErrorReply("unknown_workflow", f"no workflow named {name!r} (known: {known})")
