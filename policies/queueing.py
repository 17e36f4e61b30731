"""Queueing approximations: how many requests of a pool wait, and how many meet a latency bound.

A pool of ``n`` instances, each serving up to ``k`` requests at once (its batch slots), is an
M/M/c queue with c = n * k servers and offered load a = sum(lambda_i * S_i) erlangs, where
S_i is the service time of stream i at that pool. Erlang C gives the probability that a request
waits, P_wait = C(c, a), and the waiting time of those that wait is exponential with rate
theta = (c - a) / S_mean. Exponential service makes this conservative against the nearly
deterministic service times of model inference (M/D/c waits about half as long).

Erlang C is computed from Erlang B in log space, B(c, a) = pmf(c; a) / cdf(c; a) of a Poisson
variable with mean a (the regularised upper incomplete gamma function gives the cdf), so it is
exact and fast for tens of thousands of servers.

A request crosses several stages; its waits add up. The sum of independent "wait with
probability p_i, then Exp(theta_i)" terms is a phase-type distribution whose CDF comes from one
small matrix exponential (fast paths when no stage, or one, has a noticeable chance of waiting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaincc

NEGLIGIBLE_WAIT = 1e-7  # a stage whose probability of waiting is below this is treated as never waiting


def erlang_c(servers: int, offered_erlangs: float) -> float:
    """Probability that an arriving request waits in an M/M/c queue (1.0 when overloaded)."""
    if servers <= 0:
        return 1.0
    a = float(offered_erlangs)
    if a <= 0.0:
        return 0.0
    if a >= servers:
        return 1.0
    log_pmf = servers * math.log(a) - a - math.lgamma(servers + 1)
    cdf = float(gammaincc(servers + 1, a))  # P(Poisson(a) <= servers)
    if cdf <= 0.0:
        return 1.0
    b = math.exp(log_pmf) / cdf
    c = servers * b / (servers - a * (1.0 - b))
    return min(max(c, 0.0), 1.0)


def wait_tail(servers: int, offered_erlangs: float, mean_service_s: float) -> tuple[float, float]:
    """(probability of waiting, exponential rate of the wait) of an M/M/c pool; rate 0 when overloaded."""
    p_wait = erlang_c(servers, offered_erlangs)
    if offered_erlangs >= servers or mean_service_s <= 0:
        return p_wait, 0.0
    return p_wait, (servers - offered_erlangs) / mean_service_s


def probability_waits_within(bound_s: float, stages: Sequence[tuple[float, float]]) -> float:
    """P(sum of the stages' waits <= bound_s); each stage is (probability of waiting, rate of the wait)."""
    if bound_s < 0:
        return 0.0
    active = [(p, theta) for p, theta in stages if p > NEGLIGIBLE_WAIT]
    if not active:
        return 1.0
    if any(theta <= 0 for _, theta in active):
        return 0.0  # an overloaded stage: its queue grows without bound
    if len(active) == 1:
        p, theta = active[0]
        return 1.0 - p * math.exp(-theta * bound_s)
    if len(active) == 2:
        (p1, t1), (p2, t2) = active
        both = _hypoexponential_cdf(bound_s, t1, t2)
        return ((1 - p1) * (1 - p2) + p1 * (1 - p2) * (1 - math.exp(-t1 * bound_s))
                + (1 - p1) * p2 * (1 - math.exp(-t2 * bound_s)) + p1 * p2 * both)
    return _phase_type_cdf(bound_s, active)


def _hypoexponential_cdf(x: float, a: float, b: float) -> float:
    """P(Exp(a) + Exp(b) <= x), stable when the rates are close (then it tends to the Erlang-2 CDF)."""
    if abs(a - b) <= 1e-6 * max(a, b):
        rate = (a + b) / 2.0
        return 1.0 - math.exp(-rate * x) * (1.0 + rate * x)
    lo, hi = (a, b) if a < b else (b, a)
    survival = (hi * math.exp(-lo * x) - lo * math.exp(-hi * x)) / (hi - lo)
    return min(max(1.0 - survival, 0.0), 1.0)


def _expm(a: np.ndarray) -> np.ndarray:
    """Matrix exponential by scaling and squaring with a 12-term Taylor series (small matrices only)."""
    norm = float(np.abs(a).sum(axis=1).max())
    squarings = max(0, int(math.ceil(math.log2(norm))) + 1) if norm > 0 else 0
    b = a / (2.0 ** squarings)
    result = np.eye(len(a))
    term = np.eye(len(a))
    for k in range(1, 13):
        term = term @ b / k
        result = result + term
    for _ in range(squarings):
        result = result @ result
    return result


def _phase_type_cdf(x: float, stages: list[tuple[float, float]]) -> float:
    """CDF at x of a chain of optional exponential phases (phase i entered with probability p_i)."""
    k = len(stages)
    probs = [p for p, _ in stages]
    rates = [theta for _, theta in stages]
    alpha = np.zeros(k)
    generator = np.zeros((k, k))
    for i in range(k):
        alpha[i] = probs[i] * math.prod(1.0 - probs[m] for m in range(i))
        generator[i, i] = -rates[i]
        for j in range(i + 1, k):
            generator[i, j] = rates[i] * probs[j] * math.prod(1.0 - probs[m] for m in range(i + 1, j))
    survival = float(alpha @ _expm(generator * x) @ np.ones(k))
    return min(max(1.0 - survival, 0.0), 1.0)
