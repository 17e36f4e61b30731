"""The request trace: expected rates per workflow over the day, and seeded Poisson arrivals per demand.

Rate of workflow w at time t (hours h = t / 3600):

    rate_w(t) = base_w + (peak_w - base_w) * (1 + cos(2 pi (h - peak_hour_w) / 24)) / 2
                * product of the multipliers of the bursts active at t that hit w

so the load peaks at ``peak_hour`` and bottoms out twelve hours away. Each request carries one
SLO: with probability ``accuracy_share`` an accuracy tier, otherwise a latency tier, with the
level (best/good/fair/basic) drawn from the tier mix. A (workflow, SLO) pair is a ``Demand``.

Arrivals per step are Poisson with mean ``rate * share * step_s``, drawn once for the whole
scenario from ``numpy.random.default_rng(seed)``, so every policy sees the same requests (common
random numbers) and a seed reproduces the trace exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller.simulator.scenario import TraceSpec
from policies.plan import SLO_TIERS, Demand


def workflow_rate_rps(trace: TraceSpec, workflow: str, t_s: float) -> float:
    """Expected request rate of one workflow at ``t_s`` (bursts included)."""
    load = trace.workflows.get(workflow)
    if load is None:
        return 0.0
    hours = t_s / 3600.0
    diurnal = (1.0 + math.cos(2.0 * math.pi * (hours - load.peak_hour) / 24.0)) / 2.0
    rate = load.base_rps + (load.peak_rps - load.base_rps) * diurnal
    for burst in trace.bursts:
        start_s = burst.at_hour * 3600.0
        if start_s <= t_s < start_s + burst.duration_s and (burst.workflows is None or workflow in burst.workflows):
            rate *= burst.multiplier
    return rate


def demand_shares(trace: TraceSpec, workflows: list[str]) -> dict[Demand, float]:
    """Each demand's share of its workflow's requests (shares of one workflow sum to 1)."""
    shares: dict[Demand, float] = {}
    for workflow in workflows:
        for dimension, weight in (("accuracy", trace.tiers.accuracy_share),
                                  ("latency", 1.0 - trace.tiers.accuracy_share)):
            if weight <= 0:
                continue
            dist = trace.tiers.distribution(dimension)
            for tier in SLO_TIERS:
                share = weight * dist.get(tier, 0.0)
                if share > 0:
                    shares[Demand.of(workflow, {dimension: tier})] = share
    return shares


@dataclass(frozen=True)
class Arrivals:
    """Requests per step and demand, drawn once for the whole scenario."""

    step_s: float
    demands: tuple[Demand, ...]
    counts: np.ndarray  # shape (steps, demands), integer request counts
    expected_rps: np.ndarray  # shape (steps, demands), the rate the counts were drawn from (at step start)

    @property
    def steps(self) -> int:
        return int(self.counts.shape[0])

    def total(self) -> int:
        return int(self.counts.sum())

    def peak_rates(self) -> dict[Demand, float]:
        """Highest expected rate of each demand over the trace: what a peak-provisioned deployment plans for."""
        peaks = self.expected_rps.max(axis=0) if self.steps else np.zeros(len(self.demands))
        return {d: float(p) for d, p in zip(self.demands, peaks)}


def generate_arrivals(trace: TraceSpec, duration_s: float, step_s: float, seed: int) -> Arrivals:
    """Poisson counts per step and demand; the expected rate is sampled at the middle of each step."""
    workflows = sorted(trace.workflows)
    shares = demand_shares(trace, workflows)
    demands = tuple(sorted(shares, key=lambda d: (d.workflow, d.slo)))
    steps = int(math.ceil(duration_s / step_s - 1e-9))
    expected = np.zeros((steps, len(demands)))
    for k in range(steps):
        start_s = k * step_s
        width_s = min(step_s, duration_s - start_s)
        rates = {w: workflow_rate_rps(trace, w, start_s + width_s / 2.0) for w in workflows}
        for j, demand in enumerate(demands):
            expected[k, j] = rates[demand.workflow] * shares[demand]
    widths = np.minimum(step_s, duration_s - np.arange(steps) * step_s)[:, None]
    rng = np.random.default_rng(seed)
    counts = rng.poisson(expected * widths).astype(np.int64)
    return Arrivals(step_s=step_s, demands=demands, counts=counts, expected_rps=expected)
