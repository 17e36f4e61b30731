"""Fit an ``EngineProfile`` (``batching.py``) to closed-loop measurements of a real engine. Pure: no I/O.

A point is one closed-loop concurrency-sweep measurement: ``concurrency`` clients, each sending a request of
``prompt_tokens`` and exactly ``output_tokens`` (``ignore_eos``) as soon as its last one returned, and the mean
latency they saw (optionally the mean time to first token as well).

Why the fit is linear. In the judge's model such a loop settles into waves: ``b`` requests run together, where
``b = min(concurrency, max_num_seqs, kv_capacity_tokens // (prompt + output))`` (at least 1); their prefills are
done back to back, then they decode ``N = output_tokens`` iterations side by side and finish together, and the
next wave starts. A wave takes ``b * prefill + N * iteration_s(b, kv)`` with ``kv = 0.75 * b * (P + N)`` (the
cache the engine accounts for), so by Little's law the mean latency is::

    latency = c * (prefill_base_s + prefill_per_token_s * P)
              + (c / b) * N * (iteration_base_s + per_sequence_s * b + per_context_token_s * 0.75 * b * (P + N))

which is linear in the five constants. A request that generates nothing (an embedding) is done with its
prefill: ``latency = c * prefill``. A first token (TTFT) is a one-token request: the same formula with N = 1.
``fit_profile`` solves these rows by non-negative least squares on relative error (every point counts the same,
short or long), and ``prediction_errors`` checks the result against ``closed_loop_latency_s`` itself, the judge's
simulation, not this closed form.

Which points identify which constant (the fewest that pin all five):

- concurrency 1, two output lengths: ``latency = prefill + N * iteration(1)``; the slope in N is the decode
  step ``iteration_base_s + per_sequence_s (+ context)``, the intercept the prefill;
- concurrency 1, two prompt lengths: the intercept's change with P is ``prefill_per_token_s``, what is left of
  it ``prefill_base_s``; the change of the N-slope with P (the N x P term) is ``per_context_token_s``;
- one point at higher concurrency c: the step grows by ``per_sequence_s * (c - 1)`` per token and the prefills
  queue up (c of them per wave), which splits ``per_sequence_s`` from ``iteration_base_s``.

So concurrency 1 at 2 prompt x 2 output lengths plus one high-concurrency point are five rows of full rank;
more points (all four shapes at the high concurrency, repeats) average out noise. With only prefill-only points
the decode constants are not identified at all; see ``fit_profile``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from controller.simulator.judge.batching import EngineProfile, closed_loop_latency_s

# The five fitted constants, in the order of the feature columns below.
CONSTANTS = ("prefill_base_s", "prefill_per_token_s", "iteration_base_s", "per_sequence_s", "per_context_token_s")
KV_FILL = 0.75  # BatchEngine._kv_now: the cache the engine charges is 3/4 of what the running requests reserve


@dataclass(frozen=True)
class Point:
    """One closed-loop measurement (means over its requests)."""

    concurrency: int
    prompt_tokens: int
    output_tokens: int
    latency_s: float
    ttft_s: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.prompt_tokens < 0 or self.output_tokens < 0:
            raise ValueError(f"bad point {self}: concurrency >= 1, token counts >= 0")
        if not self.latency_s > 0 or (self.ttft_s is not None and not self.ttft_s > 0):
            raise ValueError(f"bad point {self}: latencies must be positive")


@dataclass(frozen=True)
class PointError:
    point: Point
    predicted_s: float

    @property
    def error(self) -> float:
        """Relative error of the prediction: (predicted - measured) / measured."""
        return (self.predicted_s - self.point.latency_s) / self.point.latency_s


def wave_size(concurrency: int, prompt_tokens: int, output_tokens: int, max_num_seqs: int,
              kv_capacity_tokens: int) -> int:
    """How many requests of this shape the judge's engine runs at once in a closed loop."""
    fits = max(1, kv_capacity_tokens // max(1, prompt_tokens + output_tokens))
    return max(1, min(concurrency, max_num_seqs, fits))


def features(concurrency: int, prompt_tokens: int, output_tokens: int, max_num_seqs: int,
             kv_capacity_tokens: int) -> tuple[float, ...]:
    """Coefficients ``a`` (in ``CONSTANTS`` order) with closed-loop mean latency = ``a . constants``."""
    c, p, n = concurrency, prompt_tokens, output_tokens
    prefill = (float(c), float(c * p))
    if n <= 0:
        return (*prefill, 0.0, 0.0, 0.0)
    b = wave_size(c, p, n, max_num_seqs, kv_capacity_tokens)
    steps = c / b * n  # decode iterations a request waits through, its own wave's and the ones before it
    return (*prefill, steps, steps * b, steps * KV_FILL * b * (p + n))


def _rows(points: Sequence[Point], max_num_seqs: int, kv_capacity_tokens: int,
          ttft_weight: float) -> tuple[np.ndarray, np.ndarray]:
    rows: list[tuple[float, ...]] = []
    targets: list[float] = []
    for point in points:
        a = features(point.concurrency, point.prompt_tokens, point.output_tokens, max_num_seqs, kv_capacity_tokens)
        rows.append(tuple(x / point.latency_s for x in a))  # relative residuals
        targets.append(1.0)
        if point.ttft_s is not None and ttft_weight > 0 and point.output_tokens > 0:
            first = features(point.concurrency, point.prompt_tokens, 1, max_num_seqs, kv_capacity_tokens)
            rows.append(tuple(ttft_weight * x / point.ttft_s for x in first))
            targets.append(ttft_weight)
    return np.array(rows, dtype=float), np.array(targets, dtype=float)


def fit_profile(points: Iterable[Point], max_num_seqs: int, kv_capacity_tokens: int,
                fixed: Mapping[str, float] | None = None, ttft_weight: float = 0.0) -> EngineProfile:
    """The ``EngineProfile`` whose closed-loop latencies best match ``points`` (least relative squares, every
    constant >= 0).

    ``fixed`` pins constants to given values (a model variation to test, or a constant known from elsewhere);
    the rest are fitted. ``ttft_weight`` > 0 adds each point's TTFT as a row of that weight.

    Raises ValueError when the points do not identify the free constants (see the module doc for which
    points pin which). The one exception: when no point decodes (an embedding model), the decode constants
    cannot be observed and are set, unless fixed, to what one decode step of one sequence would cost as a
    one-token prefill (``iteration_base_s = prefill_base_s + prefill_per_token_s``, ``per_sequence_s =
    prefill_per_token_s``, ``per_context_token_s = 0``): placeholders that keep the profile valid, never used
    by prefill-only work.
    """
    points = list(points)
    if not points:
        raise ValueError("no points to fit")
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(CONSTANTS)
    if unknown:
        raise ValueError(f"cannot fix {sorted(unknown)}: the constants are {CONSTANTS}")
    a, y = _rows(points, max_num_seqs, kv_capacity_tokens, ttft_weight)
    prefill_only = not a[:, 2:].any()
    free = [i for i, name in enumerate(CONSTANTS) if name not in fixed and not (prefill_only and i >= 2)]
    pinned = np.array([fixed.get(name, 0.0) for name in CONSTANTS])
    target = y - a @ pinned
    design = a[:, free]
    if free and np.linalg.matrix_rank(design) < len(free):
        raise ValueError(f"the {len(points)} points do not identify {[CONSTANTS[i] for i in free]}: "
                         "use concurrency 1 at two prompt and two output lengths, and one higher concurrency")
    values = pinned.copy()
    if free:
        solution, _ = nnls(design, target)
        values[free] = solution
    fitted = dict(zip(CONSTANTS, (float(v) for v in values)))
    if prefill_only:
        fitted["iteration_base_s"] = fixed.get("iteration_base_s",
                                               fitted["prefill_base_s"] + fitted["prefill_per_token_s"])
        fitted["per_sequence_s"] = fixed.get("per_sequence_s", fitted["prefill_per_token_s"])
        fitted["per_context_token_s"] = fixed.get("per_context_token_s", 0.0)
    return EngineProfile(max_num_seqs=max_num_seqs, kv_capacity_tokens=kv_capacity_tokens, **fitted)


def predicted_latency_s(profile: EngineProfile, concurrency: int, prompt_tokens: int, output_tokens: int) -> float:
    """The closed form above for ``profile`` (what ``closed_loop_latency_s`` settles to)."""
    a = features(concurrency, prompt_tokens, output_tokens, profile.max_num_seqs, profile.kv_capacity_tokens)
    return float(sum(x * getattr(profile, name) for x, name in zip(a, CONSTANTS)))


def prediction_errors(profile: EngineProfile, points: Iterable[Point], requests: int = 200) -> list[PointError]:
    """What the judge itself (``closed_loop_latency_s``) predicts at each point, against the measurement."""
    return [PointError(p, closed_loop_latency_s(profile, p.concurrency, p.prompt_tokens, p.output_tokens, requests))
            for p in points]
