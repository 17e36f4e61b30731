"""The request trace: expected rates per workflow over the day, and seeded arrivals per demand and request.

A workflow's load has one of three shapes (docs/traces.md):

- **cosine**: rate_w(t) = base_w + (peak_w - base_w) * (1 + cos(2 pi (h - peak_hour_w) / 24)) / 2, with
  h = t / 3600, times the multipliers of the bursts active at t that hit w. Arrivals per step are
  Poisson with mean ``rate * share * step_s`` (rate at the middle of the step), drawn once for the whole
  scenario from ``numpy.random.default_rng(seed)``; each step's requests are then placed uniformly in
  the step with a second generator (``SeedSequence(seed, spawn_key=(1,))``), so the counts, and every
  report built on them, are what they were before requests had times.
- **rate file**: a recorded rate per window scaled so that the highest window within the scenario is
  ``peak_rps``; inside a window, arrivals are a stationary renewal process with gamma gaps of shape
  1 / cv^2 (cv 1: Poisson; cv 0 or missing: 1; cv clamped to [MIN_ARRIVAL_CV, MAX_ARRIVAL_CV]).
- **requests file**: recorded requests, time-scaled, tiled to cover the scenario, thinned or replicated
  to ``rate_scale`` (copies jittered by up to half the trace's mean gap).

File loads draw from a generator of their own (``SeedSequence(seed, spawn_key=(2, crc32(workflow)))``),
so adding a workflow changes no other workflow's requests. Each request carries one SLO: with
probability ``accuracy_share`` an accuracy tier, otherwise a latency tier, with the level drawn from
the tier mix. A (workflow, SLO) pair is a ``Demand``. Every policy sees the same requests (common
random numbers) and a seed reproduces the trace exactly.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controller.simulator.scenario import RateFileLoad, RequestFileLoad, TraceSpec, WorkflowLoad
from controller.simulator.trace_files import read_rate_file, read_request_file, trace_path
from policies.plan import SLO_TIERS, Demand

MIN_ARRIVAL_CV = 0.1  # rate files: gamma shape at most 100 (nearly regular arrivals)
MAX_ARRIVAL_CV = 4.0  # and at least 1/16: ServeGen's arrival_cv (an RMS over clients) reaches 900; the
#                       aggregate of the clients' arrivals is far smoother than that
SMOOTHING_S = 300.0  # requests files: their expected rate is the trace's rate averaged over this long
JITTER_GAPS = 0.5  # replicated requests move by up to this many of the trace's mean gaps


def workflow_rate_rps(trace: TraceSpec, workflow: str, t_s: float) -> float:
    """Expected request rate of one cosine-loaded workflow at ``t_s`` (bursts included)."""
    load = trace.workflows.get(workflow)
    if load is None:
        return 0.0
    if not isinstance(load, WorkflowLoad):
        raise ValueError(f"{workflow} replays a trace file; its rate is generate_arrivals(...).expected_rps")
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
class RequestStream:
    """Every request of the scenario, sorted by arrival time (parallel arrays, one entry per request)."""

    times_s: np.ndarray  # float64, seconds from the scenario's start, within [0, duration)
    demand: np.ndarray  # int32, index into Arrivals.demands
    context_tokens: np.ndarray  # int32, 0 when the trace gives none
    generated_tokens: np.ndarray  # int32, 0 when the trace gives none

    def __post_init__(self) -> None:
        sizes = {a.size for a in (self.times_s, self.demand, self.context_tokens, self.generated_tokens)}
        if len(sizes) != 1:
            raise ValueError(f"RequestStream arrays differ in length: {sorted(sizes)}")

    def __len__(self) -> int:
        return int(self.times_s.size)

    def step_counts(self, step_s: float, steps: int, demands: int) -> np.ndarray:
        """Requests per step and demand, binned exactly as ``Arrivals.counts`` is."""
        return _histogram(self.times_s, self.demand, _step_starts(steps, step_s), demands)


@dataclass(frozen=True)
class Arrivals:
    """Requests per step and demand, and each request, drawn once for the whole scenario."""

    step_s: float
    demands: tuple[Demand, ...]
    counts: np.ndarray  # shape (steps, demands), integer request counts: the histogram of ``requests``
    expected_rps: np.ndarray  # shape (steps, demands), the rate the requests were drawn from (docs/traces.md)
    requests: RequestStream

    @property
    def steps(self) -> int:
        return int(self.counts.shape[0])

    def total(self) -> int:
        return int(self.counts.sum())

    def peak_rates(self) -> dict[Demand, float]:
        """Highest expected rate of each demand over the trace: what a peak-provisioned deployment plans for."""
        peaks = self.expected_rps.max(axis=0) if self.steps else np.zeros(len(self.demands))
        return {d: float(p) for d, p in zip(self.demands, peaks)}


def _step_starts(steps: int, step_s: float) -> np.ndarray:
    return np.arange(steps) * step_s


def _histogram(times_s: np.ndarray, demand: np.ndarray, starts_s: np.ndarray, demands: int) -> np.ndarray:
    step = np.searchsorted(starts_s, times_s, side="right") - 1
    flat = np.bincount(step * demands + demand, minlength=starts_s.size * demands)
    return flat.reshape(starts_s.size, demands).astype(np.int64)


def generate_arrivals(trace: TraceSpec, duration_s: float, step_s: float, seed: int,
                      base_dir: str | Path = ".") -> Arrivals:
    """Counts per step and demand, and the individual requests; trace files are named relative to ``base_dir``."""
    workflows = sorted(trace.workflows)
    shares = demand_shares(trace, workflows)
    demands = tuple(sorted(shares, key=lambda d: (d.workflow, d.slo)))
    steps = int(math.ceil(duration_s / step_s - 1e-9))
    starts = _step_starts(steps, step_s)
    widths = np.minimum(step_s, duration_s - starts)
    expected = np.zeros((steps, len(demands)))
    counts = np.zeros((steps, len(demands)), dtype=np.int64)
    cosine = [j for j, d in enumerate(demands) if isinstance(trace.workflows[d.workflow], WorkflowLoad)]
    for k in range(steps):
        mid_s = starts[k] + widths[k] / 2.0
        rates = {w: workflow_rate_rps(trace, w, mid_s) for w in {demands[j].workflow for j in cosine}}
        for j in cosine:
            expected[k, j] = rates[demands[j].workflow] * shares[demands[j]]
    rng = np.random.default_rng(seed)
    counts[:, cosine] = rng.poisson(expected[:, cosine] * widths[:, None]).astype(np.int64)
    parts = [_place_in_steps(counts[:, cosine], np.asarray(cosine, dtype=np.int32), starts, widths, duration_s,
                             np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))))]
    for workflow in workflows:
        load = trace.workflows[workflow]
        if isinstance(load, WorkflowLoad):
            continue
        rng_w = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, zlib.crc32(workflow.encode()))))
        if isinstance(load, RateFileLoad):
            times, rate, context, generated = _rate_file_requests(load, base_dir, duration_s, starts, widths, rng_w)
        else:
            times, rate, context, generated = _request_file_requests(load, base_dir, duration_s, starts, widths,
                                                                     rng_w)
        columns = [j for j, d in enumerate(demands) if d.workflow == workflow]
        weights = np.array([shares[demands[j]] for j in columns])
        expected[:, columns] = rate[:, None] * weights / weights.sum()
        cumulative = np.cumsum(weights) / weights.sum()
        local = np.minimum(np.searchsorted(cumulative, rng_w.random(times.size), side="right"), len(columns) - 1)
        demand = np.asarray(columns, dtype=np.int32)[local]
        counts += _histogram(times, demand, starts, len(demands))
        parts.append((times, demand, context, generated))
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
    stream = RequestStream(*(np.concatenate([p[i] for p in parts])[order] for i in range(4)))
    return Arrivals(step_s=step_s, demands=demands, counts=counts, expected_rps=expected, requests=stream)


_Requests = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # times_s, demand, context, generated tokens
_Drawn = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # times_s, expected rps per step, tokens


def _place_in_steps(counts: np.ndarray, columns: np.ndarray, starts: np.ndarray, widths: np.ndarray,
                    duration_s: float, rng: np.random.Generator) -> _Requests:
    """Cosine loads: each step's requests uniformly inside the step (times, demands, no tokens)."""
    flat = counts.ravel()
    cells = np.repeat(np.arange(flat.size), flat)
    step, demand = np.divmod(cells, max(columns.size, 1))
    times = starts[step] + rng.random(cells.size) * widths[step]
    ends = np.append(starts[1:], duration_s)[step]
    times = np.where(times < ends, times, starts[step])  # rounding must not move a request into the next step
    zeros = np.zeros(cells.size, dtype=np.int32)
    return times, columns[demand].astype(np.int32), zeros, zeros.copy()


def _rate_file_requests(load: RateFileLoad, base_dir: str | Path, duration_s: float, starts: np.ndarray,
                        widths: np.ndarray, rng: np.random.Generator) -> _Drawn:
    """Times of a gamma renewal process per window, and the expected rate per step (the scaled window rate)."""
    curve = read_rate_file(trace_path(base_dir, load.rate_file))
    windows = curve.covering(load.start_s, load.start_s + duration_s)
    low_s = np.maximum(curve.window_start_s[windows] - load.start_s, 0.0)
    high_s = np.minimum(curve.window_end_s[windows] - load.start_s, duration_s)
    peak = float(curve.rate_rps[windows].max())
    if not peak > 0:
        raise ValueError(f"{curve.path}: every window within the scenario has rate 0; nothing to scale to peak_rps")
    rate = curve.rate_rps[windows] * (load.peak_rps / peak)
    cv = curve.arrival_cv[windows]
    cv = np.clip(np.where(np.isnan(cv) | (cv <= 0), 1.0, cv), MIN_ARRIVAL_CV, MAX_ARRIVAL_CV)
    expected_n = rate * (high_s - low_s)
    window, units = _renewal_points(expected_n, 1.0 / cv**2, rng)
    times = low_s[window] + units / rate[window]
    times = np.minimum(times, np.nextafter(high_s[window], -np.inf))
    order = np.argsort(times, kind="stable")
    edges = np.append(low_s, duration_s)
    cumulative = np.concatenate([[0.0], np.cumsum(expected_n)])
    per_step = np.diff(np.interp(np.append(starts, duration_s), edges, cumulative)) / widths
    zeros = np.zeros(times.size, dtype=np.int32)
    return times[order], per_step, zeros, zeros.copy()


def _renewal_points(expected_n: np.ndarray, shape: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points of a stationary renewal process with Gamma(shape, 1/shape) gaps (mean 1) in [0, n_i) per window.

    Windows run in operational time (one unit per expected request). The first point is the stationary
    forward recurrence time, U * Gamma(shape + 1, 1/shape) (a uniform point in a length-biased gap), so
    each window starts in equilibrium. Gaps are drawn for all windows at once, with room for eight
    standard deviations of the count; the rare window that needs more draws again.
    """
    active = np.flatnonzero(expected_n > 0)
    scale = 1.0 / shape[active]
    position = rng.random(active.size) * rng.gamma(shape[active] + 1.0, scale)
    found_w: list[np.ndarray] = []
    found_u: list[np.ndarray] = []
    while active.size:
        left = np.maximum(expected_n[active] - position, 0.0)
        sigma = np.sqrt(left / shape[active])
        draws = np.ceil(left + 8.0 * sigma + 16.0).astype(np.int64)
        owner = np.repeat(np.arange(active.size), draws)
        gaps = rng.gamma(np.repeat(shape[active], draws), np.repeat(1.0 / shape[active], draws))
        running = np.cumsum(gaps)
        group_end = np.cumsum(draws) - 1
        before = np.concatenate([[0.0], running[group_end[:-1]]])  # gaps of earlier windows
        within = running - before[owner]  # inclusive sum of this window's gaps so far
        points = position[owner] + within - gaps  # the point each gap starts from
        keep = points < expected_n[active][owner]
        found_w.append(active[owner[keep]])
        found_u.append(points[keep])
        position = position + within[group_end]
        more = position < expected_n[active]
        active, position = active[more], position[more]
    if not found_w:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(found_w), np.concatenate(found_u)


def _request_file_requests(load: RequestFileLoad, base_dir: str | Path, duration_s: float, starts: np.ndarray,
                           widths: np.ndarray, rng: np.random.Generator) -> _Drawn:
    """Recorded requests, tiled, time-scaled and thinned or replicated; the expected rate per step.

    The expected rate is the tiled, time-scaled trace's own (before thinning) times rate_scale,
    averaged over SMOOTHING_S around each step: the rate the thinning and replication draw from.
    """
    trace = read_request_file(trace_path(base_dir, load.requests_file))
    jitter_s = JITTER_GAPS * trace.mean_gap_s if load.rate_scale > 1 else 0.0
    low_s, high_s = load.start_s - jitter_s, load.start_s + duration_s / load.time_scale + jitter_s
    if load.repeat:
        period_s = trace.period_s
        tiles = np.arange(math.floor(low_s / period_s), math.floor(high_s / period_s) + 1)
    else:
        period_s, tiles = 0.0, np.zeros(1)
    recorded = (trace.times_s[None, :] + tiles[:, None] * period_s).ravel()
    source = np.tile(np.arange(trace.requests), tiles.size)
    inside = (recorded >= low_s) & (recorded < high_s)
    recorded, source = recorded[inside], source[inside]
    played = (recorded - load.start_s) * load.time_scale
    in_run = (played >= 0) & (played < duration_s)
    trace_counts = np.bincount(np.searchsorted(starts, played[in_run], side="right") - 1, minlength=starts.size)
    span = max(1, min(2 * round(SMOOTHING_S / 2.0 / float(widths[0])) + 1, starts.size - (starts.size + 1) % 2))
    kernel = np.ones(span)
    rate = (np.convolve(trace_counts.astype(float), kernel, "same") / np.convolve(widths, kernel, "same")
            * load.rate_scale)
    whole, fraction = divmod(load.rate_scale, 1.0)
    copies = int(whole) + (rng.random(recorded.size) < fraction)
    pick = np.repeat(np.arange(recorded.size), copies)
    rank = np.arange(pick.size) - np.repeat(np.cumsum(copies) - copies, copies)
    jitter = np.where(rank > 0, rng.uniform(-jitter_s, jitter_s, pick.size), 0.0)
    times = (recorded[pick] + jitter - load.start_s) * load.time_scale
    keep = (times >= 0) & (times < duration_s)
    pick, times = pick[keep], times[keep]
    order = np.argsort(times, kind="stable")
    chosen = source[pick[order]]
    return times[order], rate, trace.context_tokens[chosen].copy(), trace.generated_tokens[chosen].copy()
