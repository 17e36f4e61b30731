"""What the controller's services (admin API, workloads, profiler) see of the daemon, as a protocol.

They are handed the ``Controller`` itself, but type it as ``ControllerContext`` so none of them imports
``controller.daemon``, and the daemon imports them without an import circle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.transport import RpcEndpoint
from controller.config import ControllerSettings
from controller.registry import NodeRecord, NodeRegistry
from controller.store import Store


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames_rejected = Counter("murakkab_frames_rejected", "Frames refused by strict decoding.",
                                       ["endpoint", "code"], registry=registry)
        self.heartbeats = Counter("murakkab_heartbeats", "Heartbeats received.", ["result"], registry=registry)
        self.heartbeat_handling = Histogram(
            "murakkab_heartbeat_handling_seconds", "Time from a heartbeat's arrival to its reply.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry)
        self.transitions = Counter("murakkab_node_transitions", "Node state transitions.", ["to"], registry=registry)
        self.commands = Counter("murakkab_commands", "Commands sent to agents.", ["op", "result"], registry=registry)
        self.jobs = Counter("murakkab_jobs", "Jobs accepted and ended, by outcome.", ["result"], registry=registry)
        self.auth_refused = Counter("murakkab_auth_refused", "Handshakes and messages refused by authentication "
                                    "or roles.", ["endpoint", "reason"], registry=registry)
        self.facility_messages = Counter("murakkab_facility_messages", "Facility MQTT messages (rack budgets, "
                                         "cooling, grid) by what became of them: applied, held (no node of the "
                                         "rack yet), unchanged (a retained one re-sent) or why they were ignored.", ["topic_kind", "result"],
                                         registry=registry)
        # Per workflow and SLO tier (``tier``: "latency=good", "accuracy=best,latency=fair", "default"), observed
        # once per job when it ends; cancelled jobs count in ``murakkab_jobs_total`` only.
        self.job_latency = Histogram(
            "murakkab_job_latency_seconds", "Submission to end of each succeeded or failed job.",
            ["workflow", "tier"], buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0),
            registry=registry)
        self.job_energy = Histogram(
            "murakkab_job_energy_joules", "Measured energy of each succeeded job's invocations (J).",
            ["workflow", "tier"], buckets=(1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6), registry=registry)
        self.jobs_slo = Counter(
            "murakkab_jobs_slo", "Ended jobs by whether they met their SLO's latency target: true (succeeded within "
            "the plan's target), false (later, or failed), unknown (no target known: no plan predicts one).",
            ["workflow", "tier", "met"], registry=registry)

    def job_ended(self, workflow: str, slo: Mapping[str, str], state: str, latency_s: float | None,
                  energy_j: float | None, target_s: float | None) -> None:
        if state not in ("succeeded", "failed"):
            return
        tier = slo_tier_label(slo)
        if latency_s is not None:
            self.job_latency.labels(workflow, tier).observe(max(0.0, latency_s))
        if state == "succeeded" and energy_j is not None:
            self.job_energy.labels(workflow, tier).observe(max(0.0, energy_j))
        if state == "failed":
            met = "false"
        elif target_s is None or latency_s is None or target_s != target_s or target_s == float("inf"):
            met = "unknown"
        else:
            met = "true" if latency_s <= target_s else "false"
        self.jobs_slo.labels(workflow, tier, met).inc()


def slo_tier_label(slo: Mapping[str, str]) -> str:
    """A job's SLO as one label value: ``dimension=tier`` pairs sorted and comma-joined, ``default`` for none."""
    return ",".join(f"{d}={t}" for d, t in sorted(slo.items())) or "default"


NODE_STATES = ("joining", "ready", "suspect", "lost", "draining", "drained")


class ControllerStateCollector(Collector):
    """Gauges computed at scrape time (on the exposition server's thread) from the node registry and the
    autopilot's budgets: nothing on the heartbeat path. A scrape that races a change on the event loop
    retries once, then leaves the family out of that scrape rather than failing it."""

    def __init__(self, ctx: "ControllerContext") -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        for build in (self._nodes, self._budgets):
            for _attempt in range(2):
                try:
                    families = list(build())
                except RuntimeError:  # "dictionary changed size during iteration"
                    continue
                yield from families
                break
            else:
                logging.getLogger("murakkab.controller").debug("scrape: %s raced the event loop", build.__name__)

    def _nodes(self) -> Iterator[Metric]:
        counts = dict.fromkeys(NODE_STATES, 0)
        per_node = GaugeMetricFamily("murakkab_node_state", "1 for each node's current state (joining, ready, "
                                     "suspect, lost, draining, drained).", labels=["node", "state"])
        for node in list(self.ctx.registry.nodes.values()):
            state = node.state
            counts[state] = counts.get(state, 0) + 1
            per_node.add_metric([node.name, state], 1.0)
        total = GaugeMetricFamily("murakkab_nodes", "Nodes the controller knows, by state.", labels=["state"])
        for state, n in counts.items():
            total.add_metric([state], float(n))
        yield total
        yield per_node

    def _budgets(self) -> Iterator[Metric]:
        autopilot = getattr(getattr(self.ctx, "workloads", None), "autopilot", None)
        if autopilot is None:  # first-fit: no budgets
            return
        view = autopilot.budget_view()
        labels = ["scope", "rack"]
        budget = GaugeMetricFamily("murakkab_power_budget_watts", "Power budget in force (W): scope cluster "
                                   "(rack empty) or rack.", labels=labels)
        measured = GaugeMetricFamily("murakkab_power_budget_measured_watts", "Measured GPU power within the "
                                     "budget's scope (W), as the autopilot sees it.", labels=labels)
        floor = GaugeMetricFamily("murakkab_power_budget_floor_watts", "The least GPU power the scope can draw "
                                  "with every cap at its minimum (W).", labels=labels)
        feasible = GaugeMetricFamily("murakkab_power_budget_feasible", "1 when caps can hold the scope within "
                                     "its budget.", labels=labels)
        for b in view.get("budgets", ()):
            values = [str(b["scope"]), str(b["rack"] or "")]
            budget.add_metric(values, float(b["power_budget_w"]))
            measured.add_metric(values, float(b["measured_power_w"]))
            floor.add_metric(values, float(b["floor_w"]))
            feasible.add_metric(values, 1.0 if b["feasible"] else 0.0)
        hot = GaugeMetricFamily("murakkab_autopilot_hot_gpus", "GPUs the autopilot's heat reaction holds "
                                "(hot or thermally throttling), by whether their work was moved away.",
                                labels=["evacuated"])
        held = list(view.get("hot_gpus", ()))
        for evacuated in ("true", "false"):
            hot.add_metric([evacuated], float(sum(1 for h in held if str(bool(h["evacuated"])).lower() == evacuated)))
        yield from (budget, measured, floor, feasible, hot)


class ControllerContext(Protocol):
    settings: ControllerSettings
    epoch: int
    started_s: float
    registry: NodeRegistry
    store: Store
    metrics: ControllerMetrics
    metrics_registry: CollectorRegistry
    agents: RpcEndpoint | None
    admin: RpcEndpoint | None
    agent_endpoint: str
    admin_endpoint: str
    workloads: Any  # controller.jobs.service.WorkloadService
    profiler: Any  # controller.profiler.ProfilerService

    def clock(self) -> float: ...

    def to_unix(self, monotonic_s: float | None) -> float | None: ...

    def apply(self, actions: list[Any]) -> Any: ...

    async def set_power_limit(self, node: NodeRecord, device_index: int, power_limit_w: float) -> Any: ...
