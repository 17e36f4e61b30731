"""Load forecast for planning: an exponentially weighted mean and variance of per-window request rates.

The planner provisions for a high percentile of the next window's rate, not its mean, so a burst the
recent windows already hinted at does not breach the SLO before the reactive scaler reacts:
``forecast = mean + z * std`` with z = 1.64 (the one-sided 95th percentile of a normal distribution).

Update per observed window rate x (West 1979; Finch 2009, "Incremental calculation of weighted mean
and variance"): ``diff = x - mean; mean += alpha * diff; var = (1 - alpha) * (var + alpha * diff**2)``.
A new demand starts at its first observation with zero variance. Pure: windows are whatever the
caller says they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.plan import Demand

P95_Z = 1.64


@dataclass
class _State:
    mean_rps: float
    variance: float
    windows: int


class EwmaForecast:
    """EWMA of window rates with an EW variance; ``forecast`` is ``mean + percentile_z * std``."""

    def __init__(self, alpha: float = 0.5, percentile_z: float = P95_Z) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be within (0, 1], got {alpha}")
        if percentile_z < 0.0 or not math.isfinite(percentile_z):
            raise ValueError(f"percentile_z must be a finite number >= 0, got {percentile_z}")
        self.alpha = alpha
        self.percentile_z = percentile_z
        self._state: dict[Demand, _State] = {}

    def observe(self, demand: Demand, window_rate_rps: float) -> None:
        if window_rate_rps < 0.0 or not math.isfinite(window_rate_rps):
            raise ValueError(f"a window rate is a finite number >= 0, got {window_rate_rps} for {demand}")
        state = self._state.get(demand)
        if state is None:
            self._state[demand] = _State(window_rate_rps, 0.0, 1)
            return
        diff = window_rate_rps - state.mean_rps
        state.mean_rps += self.alpha * diff
        state.variance = (1.0 - self.alpha) * (state.variance + self.alpha * diff * diff)
        state.windows += 1

    def mean(self, demand: Demand) -> float:
        state = self._state.get(demand)
        return 0.0 if state is None else state.mean_rps

    def std(self, demand: Demand) -> float:
        state = self._state.get(demand)
        return 0.0 if state is None else math.sqrt(max(state.variance, 0.0))

    def forecast(self, demand: Demand) -> float:
        """The rate to plan for: mean + z * std; 0 for a demand never observed."""
        return max(0.0, self.mean(demand) + self.percentile_z * self.std(demand))

    def windows(self, demand: Demand) -> int:
        state = self._state.get(demand)
        return 0 if state is None else state.windows

    def demands(self) -> tuple[Demand, ...]:
        return tuple(self._state)

    def snapshot(self) -> list[dict[str, object]]:
        """The state per demand as JSON-able rows, for a controller restart."""
        return [{"workflow": d.workflow, "slo": [list(p) for p in d.slo], "mean_rps": s.mean_rps,
                 "variance": s.variance, "windows": s.windows} for d, s in self._state.items()]

    def restore(self, rows: list[dict[str, object]]) -> None:
        """Take back what ``snapshot`` wrote; rows that do not parse are skipped."""
        for row in rows:
            try:
                demand = Demand(str(row["workflow"]), tuple((str(k), str(v)) for k, v in row["slo"]))  # type: ignore
                state = _State(float(row["mean_rps"]), float(row["variance"]), int(row["windows"]))  # type: ignore
            except (KeyError, TypeError, ValueError):
                continue
            if state.mean_rps >= 0 and state.variance >= 0 and math.isfinite(state.mean_rps + state.variance):
                self._state[demand] = state
