"""The simulator's steps under the request judge (``spec.judge: requests``): a mixin of ``Simulator``.

Per step the shell records what finished in the step before, hands the judge the step's arrivals,
updates every instance's speed (cap, heat, co-tenants), takes each pool's busy fraction over the step
before for the power of the step that starts (a one-step lag: busy time is only known once a step is
over), and gives the autopilot each routed pool's reading: invocations held by its instances (running
or queued) over its slots, as the daemon measures occupancy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from controller.simulator.service import RouteTable
from policies.model import InstanceConfig

MAX_REPORTED_UTILIZATION = 10.0  # overloaded pools report at most this (offered erlangs / slots)
DRAIN_AFTER_END_S = 600.0  # requests in flight at the end may finish this long after it


class RequestSteps:
    """Request-judge steps; the attributes are ``Simulator``'s."""

    requests_judge: Any
    recorder: Any
    scenario: Any
    perf: Any

    def _step_requests(self, k: int, now_s: float) -> None:
        """One step under the request judge: what finished in the step before, this step's arrivals handed over,
        pool readings for the autopilot, and busy fractions for power (each pool's over the step before)."""
        judge = self.requests_judge
        assert judge is not None
        tally = judge.take()
        self._record_tally(tally, now_s)
        width_s = min(self.spec.step_s, self.spec.duration_s - now_s)
        lo, hi = int(self._step_index[k]), int(self._step_index[k + 1])
        stream = self.arrivals.requests
        judge.arrive(stream.times_s[lo:hi], stream.demand[lo:hi], stream.context_tokens[lo:hi],
                     stream.generated_tokens[lo:hi])
        temperatures = self.thermals.temperature_c if self.telemetry else None
        previous_s = self._judge_step_s
        judge.update_speeds(now_s, temperatures)
        # Busy fraction per pool over the step that just ended (power for the step that starts).
        busy: dict[InstanceConfig, list[float]] = {}
        for inst in judge.instances:
            if inst is not None and not inst.draining:
                busy.setdefault(inst.config, []).append(inst.busy_fraction)
        self.utilization = {c: float(np.mean(v)) for c, v in busy.items()}
        self._power = None
        # What the autopilot sees: requests in a pool's instances (running or queued) over their slots.
        elapsed_s = max(now_s - previous_s, 1e-9)
        if self.routes is None and self.active is not None:
            self.routes = RouteTable.build(self.active, self.judge)  # reset when routing changes
        routed = self.routes.pools_used() if self.routes is not None else []
        pending = self.autopilot.rollout.pending
        rolling = set(pending.solution.instances) if pending is not None else set()
        outstanding = judge.pool_outstanding_s
        for config in routed:
            if config in rolling or previous_s <= 0:
                continue
            n = self.groups.get((config, "ready"), 0) + self.groups.get((config, "starting"), 0)
            if n > 0:
                held_s = outstanding.get(config, 0.0) - self._outstanding_seen.get(config, 0.0)
                rho = min(held_s / elapsed_s / (n * self.judge.slots(config)), MAX_REPORTED_UTILIZATION)
                self.window_util.setdefault(config, []).append(rho)
        self._outstanding_seen = dict(outstanding)
        self._judge_step_s = now_s
        self.window_steps.append(k)
        counts = self.arrivals.counts[k]
        load: dict[str, float] = {}
        for demand, n in zip(self.arrivals.demands, counts):
            load[demand.workflow] = load.get(demand.workflow, 0.0) + float(n) / width_s
        gpus_ready = sum(n * c.tp for (c, s), n in self.groups.items()
                         if s == "ready" and self.hardware[c.hardware].kind == "gpu")
        alloc_w, fleet_w, _ = self._power_now()
        self.recorder.step(now_s, float(counts.sum()), self._step_served, self._step_met, len(self.gpu_holders),
                           gpus_ready, alloc_w, fleet_w, load)

    def _record_tally(self, tally: Any, now_s: float) -> None:
        served = met = 0.0
        for label, (arrived, finished, ok) in tally.per_tier.items():
            self.recorder.tier(label, arrived, finished, ok)
            served += finished
            met += ok
        self._step_served, self._step_met = served, met
        self.judge_dropped += tally.dropped

    def _finish_requests(self, duration_s: float) -> dict[str, Any]:
        """After the last step: requests in flight finish (up to ``DRAIN_AFTER_END_S``, no energy counted) and
        are judged; those still unfinished then count as missed."""
        judge = self.requests_judge
        assert judge is not None
        judge.advance(duration_s + DRAIN_AFTER_END_S)
        self._record_tally(judge.take(), duration_s)
        if self.recorder.served:
            self.recorder.served[-1] += self._step_served
            self.recorder.met[-1] += self._step_met
        percentiles: dict[str, Any] = {}
        for label, samples in sorted(judge.latencies_s.items()):
            values = np.asarray(samples)
            percentiles[label] = {q: float(np.percentile(values, p)) for q, p in (("p50", 50), ("p99", 99))}
        return {"judge": "requests", "dropped": self.judge_dropped, "unfinished": judge.in_flight(),
                "latency_s": percentiles, "model_disagreement": self._disagreement()}

    def _disagreement(self) -> list[dict[str, Any]]:
        """Where the planner's perf model and the judge describe the same thing: one invocation's unloaded
        latency at the executor's default knobs on every configuration that ran (the planner's figure without
        predictor error), and their ratio."""
        judge = self.requests_judge
        rows = []
        for config in sorted(judge.configs_seen, key=str):
            exe = self.scenario.catalog[config.executor]
            truth = judge.unloaded_latency_s(config, exe.task, exe.knob_defaults(), 1.0)
            planned = self.perf.perf(exe, config, exe.knob_defaults(), 1.0)
            if truth is None or planned is None:
                continue
            rows.append({"executor": config.executor, "hardware": config.hardware, "tp": config.tp,
                         "power_cap_w": config.power_cap_w, "planner_latency_s": planned.latency_s,
                         "judge_latency_s": truth, "judge_over_planner": truth / planned.latency_s})
        return rows


