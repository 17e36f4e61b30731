"""Co-location: several lightly loaded instances on the same GPUs, and what it costs them in speed.

A pool the optimizer sizes at one instance because some tier needs its speed (a small model at tp 2
on H100s for the fastest tier) may keep its devices busy a few percent of the time, and they idle at
the engine's idle power the rest. Putting such instances on the same devices saves the devices and
their idle power; the price is interference. Engines of different processes on one GPU time-slice
it: while a co-tenant runs kernels, an instance gets about half the device. With busy fractions
rho_j (the share of time each instance has work), instance i's work takes

    f_i = 1 / (1 - 1/2 * sum_{j != i} rho_j * f_j)

times as long as alone (its work meets each co-tenant's busy time in proportion to the co-tenant's
own stretched busy fraction, and runs at half speed then). ``slowdowns`` solves that fixed point; the
optimizer uses it to decide which pools to co-locate (``policies.optimizer.colocate_pools``) and the
cluster simulator to slow the instances placement actually put together.

The model is an estimate (no measurement of two engines on one GPU backs it yet): it assumes the
instances' busy periods are independent and that time-slicing splits a device evenly, and it ignores
that two small kernels may overlap on a GPU with room for both (which would make it pessimistic).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_CONTENTION = 0.9  # the share of a device co-tenants are taken to use at most (keeps f finite)
_ITERATIONS = 50


def slowdowns(busy: Sequence[float]) -> list[float]:
    """Service-time factor of each instance sharing one set of devices, from their busy fractions alone.

    ``busy[i]`` is instance i's busy fraction were it alone (load / capacity, in [0, 1]). A lone
    instance gets 1.0. Contention is held at ``MAX_CONTENTION``, so a hopeless overload gives a large
    but finite factor (1 / (1 - 0.9) = 10) rather than infinity.
    """
    rho = [min(max(float(b), 0.0), 1.0) for b in busy]
    factors = [1.0] * len(rho)
    if len(rho) < 2:
        return factors
    for _ in range(_ITERATIONS):
        stretched = [r * f for r, f in zip(rho, factors)]
        total = sum(stretched)
        new = [1.0 / (1.0 - min(MAX_CONTENTION, 0.5 * (total - s))) for s in stretched]
        if max(abs(a - b) for a, b in zip(new, factors)) < 1e-9:
            return new
        factors = new
    return factors


__all__ = ["MAX_CONTENTION", "slowdowns"]
