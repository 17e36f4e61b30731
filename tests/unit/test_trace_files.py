"""Recorded request traces in simulator scenarios: the readers, the three load shapes, and the request stream."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from controller.simulator.scenario import (RateFileLoad, RequestFileLoad, ScenarioError, TraceSpec, WorkflowLoad,
                                           load_scenario, parse_scenario)
from controller.simulator.trace import (MAX_ARRIVAL_CV, Arrivals, demand_shares, generate_arrivals,
                                        workflow_rate_rps)
from controller.simulator.trace_files import TraceFileError, read_rate_file, read_request_file

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "examples" / "scenarios"
SMOKE = SCENARIOS / "smoke.yaml"
TRACES = ROOT.parent / "shared" / "traces"  # where examples/scenarios/real-day.yaml finds them
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"the shared traces are not at {TRACES}")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def rate_file(path: Path, rates: list[float], cvs: list[float] | None = None, window_s: float = 600.0) -> Path:
    rows = [f"{i * window_s:g},{r:g}" + ("" if cvs is None else f",{cvs[i]:g}") for i, r in enumerate(rates)]
    header = "window_start_s,rate_rps" + ("" if cvs is None else ",arrival_cv")
    return write(path, "\n".join([header, *rows]) + "\n")


def requests_file(path: Path, times_s: list[float] | np.ndarray, tokens: bool = True) -> Path:
    if tokens:
        rows = [f"{t:.6f},{100 + i},{10 + i % 7}" for i, t in enumerate(times_s)]
        return write(path, "\n".join(["TIMESTAMP,ContextTokens,GeneratedTokens", *rows]) + "\n")
    return write(path, "\n".join(["TIMESTAMP", *(f"{t:.6f}" for t in times_s)]) + "\n")


def trace(loads: dict[str, Any], **extra: Any) -> TraceSpec:
    return TraceSpec.model_validate({"workflows": loads, **extra})


def arrivals(loads: dict[str, Any], duration_s: float, base_dir: Path, seed: int = 3, step_s: float = 60.0) -> Arrivals:
    return generate_arrivals(trace(loads), duration_s, step_s, seed, base_dir=base_dir)


def workflow_counts(a: Arrivals, workflow: str) -> np.ndarray:
    return a.counts[:, [j for j, d in enumerate(a.demands) if d.workflow == workflow]].sum(axis=1)


def workflow_expected(a: Arrivals, workflow: str) -> np.ndarray:
    return a.expected_rps[:, [j for j, d in enumerate(a.demands) if d.workflow == workflow]].sum(axis=1)


def assert_consistent(a: Arrivals, duration_s: float) -> None:
    """The stream is sorted, inside the scenario, typed, and its per-step histogram is ``counts``."""
    r = a.requests
    assert r.times_s.dtype == np.float64 and r.demand.dtype == np.int32
    assert r.context_tokens.dtype == np.int32 and r.generated_tokens.dtype == np.int32
    assert len(r) == r.demand.size == r.context_tokens.size == r.generated_tokens.size == a.total()
    assert (np.diff(r.times_s) >= 0).all()
    if len(r):
        assert r.times_s[0] >= 0 and r.times_s[-1] < duration_s
        assert 0 <= r.demand.min() and r.demand.max() < len(a.demands)
    assert (r.step_counts(a.step_s, a.steps, len(a.demands)) == a.counts).all()


# --- the shipped traces ---------------------------------------------------------------------------


@needs_traces
@pytest.mark.parametrize(("name", "rows"), [("azure-llm-2023-conv.csv", 19366), ("azure-llm-2023-code.csv", 8819)])
def test_shipped_request_traces_read(name: str, rows: int) -> None:
    t = read_request_file(TRACES / name)
    assert t.requests == rows  # the README's counts
    assert t.times_s[0] == 0 and (np.diff(t.times_s) >= 0).all()
    assert 3300 < t.span_s < 3600  # "about one hour"
    assert t.context_tokens.min() > 0 and t.context_tokens.max() > 2000  # long-tailed context
    assert t.generated_tokens.min() > 0


@needs_traces
@pytest.mark.parametrize("name", ["servegen-m-large-rate.csv", "servegen-m-mid-rate.csv", "servegen-m-small-rate.csv"])
def test_shipped_rate_curves_read(name: str) -> None:
    c = read_rate_file(TRACES / name)
    assert c.windows == 14 * 144  # 14 days of 600 s windows
    assert (np.diff(c.window_start_s) == 600).all() and c.window_end_s[-1] == 14 * 86400
    assert (c.rate_rps >= 0).all() and c.rate_rps.max() > 0 and (c.arrival_cv >= 0).all()
    assert not c.rate_rps.flags.writeable  # the reader's cache cannot be corrupted


@needs_traces
@pytest.mark.parametrize("name", ["real-day.yaml", "emergency-day.yaml"])
def test_real_day_scenarios_load_and_replay(name: str) -> None:
    scenario = load_scenario(SCENARIOS / name)
    spec = scenario.spec
    assert isinstance(spec.trace.workflows["rag-qa"], RateFileLoad)
    assert isinstance(spec.trace.workflows["code-debate"], RequestFileLoad)
    started = time.perf_counter()
    a = generate_arrivals(spec.trace, spec.duration_s, spec.step_s, spec.seed, base_dir=scenario.base_dir)
    assert time.perf_counter() - started < 10.0
    assert_consistent(a, spec.duration_s)
    assert workflow_expected(a, "rag-qa").max() == pytest.approx(7.5)
    assert workflow_expected(a, "video-qa").max() == pytest.approx(2.0)
    assert workflow_counts(a, "code-debate").sum() / spec.duration_s == pytest.approx(1.0, abs=0.05)
    tokens = a.requests.context_tokens[np.isin(a.requests.demand, [j for j, d in enumerate(a.demands)
                                                                    if d.workflow == "code-debate"])]
    assert tokens.min() > 0  # the Azure requests keep their token counts


@needs_traces
def test_emergency_day_cuts_a_rack_budget_by_30_percent_and_restores_it() -> None:
    faults = load_scenario(SCENARIOS / "emergency-day.yaml").spec.faults
    budgets = [f for f in faults if f.kind == "budget"]
    assert [b.power_budget_w for b in budgets] == [16800, 24000] and budgets[0].rack == budgets[1].rack
    assert budgets[1].at_s - budgets[0].at_s == 7200
    failed = [f.rack for f in faults if f.kind == "cooling-failure"]
    restored = [f.rack for f in faults if f.kind == "cooling-restored"]
    assert failed == restored == ["h100-r001"] and budgets[0].rack != "h100-r001"  # a whole rack, another one


# --- malformed files --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "line", "what"), [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,10,5\n2.0,ten,5\n", 3, "ContextTokens: not a number"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,10,5\n2.0,10\n", 3, "expected 3 columns"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,10,5\n\n2.0,-4,5\n", 4, "whole number of tokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n5.0,10,5\n4.0,10,5\n", 3, "before the previous request"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,1\n2023-11-16 18:15:45,1,1\n", 3,
     "before the previous request"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n", 2, "neither seconds nor a date-time"),
    ("time,tokens\n1.0,10\n", 1, "expected a header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", 1, "no requests"),
])
def test_malformed_request_rows_name_the_file_and_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = write(tmp_path / "bad-requests.csv", text)
    with pytest.raises(TraceFileError) as caught:
        read_request_file(path)
    assert caught.value.line == line and what in caught.value.message
    assert str(caught.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize(("text", "line", "what"), [
    ("window_start_s,rate_rps,arrival_cv\n0,1.5,1\n600,x,1\n", 3, "rate_rps: not a number"),
    ("window_start_s,rate_rps,arrival_cv\n0,1.5,1\n600,2,1,7\n", 3, "expected 3 columns"),
    ("window_start_s,rate_rps,arrival_cv\n0,1.5,1\n600,-2,1\n", 3, "must not be negative"),
    ("window_start_s,rate_rps,arrival_cv\n0,1.5,1\n600,2,1\n600,2,1\n", 4, "does not come after"),
    ("window_start_s,rate_rps,arrival_cv\n0,1.5,nan\n600,2,1\n", 2, "not a finite number"),
    ("window_start_s\n0\n", 1, "expected a header"),
])
def test_malformed_rate_rows_name_the_file_and_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = write(tmp_path / "bad-rates.csv", text)
    with pytest.raises(TraceFileError) as caught:
        read_rate_file(path)
    assert caught.value.line == line and what in caught.value.message
    assert f"{path}:{line}: " in str(caught.value)


def smoke_with(loads: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(yaml.safe_load(SMOKE.read_text()))
    doc["spec"]["trace"]["workflows"] = {**doc["spec"]["trace"]["workflows"], **loads}
    doc["spec"]["trace"]["bursts"] = []
    return doc


def problems_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(doc, "test.yaml", SMOKE.parent)
    return str(caught.value)


def test_the_scenario_loader_reports_bad_trace_files_with_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n0.5,2,3\n")
    message = problems_of(smoke_with({"rag-qa": {"requests_file": str(bad)}}))
    assert f"spec.trace.workflows.rag-qa.requests_file: {bad}:3: TIMESTAMP" in message
    message = problems_of(smoke_with({"video-qa": {"rate_file": "no-such-rates.csv", "peak_rps": 1}}))
    assert "spec.trace.workflows.video-qa.rate_file:" in message and "no-such-rates.csv" in message
    short = rate_file(tmp_path / "short.csv", [1.0, 2.0, 3.0])  # 1800 s; smoke lasts 3600 s
    message = problems_of(smoke_with({"video-qa": {"rate_file": str(short), "peak_rps": 1}}))
    assert f"{short}: windows cover 0..1800 s, not the requested 0..3600 s" in message
    zeros = rate_file(tmp_path / "zeros.csv", [0.0] * 8)
    assert "has rate 0" in problems_of(smoke_with({"video-qa": {"rate_file": str(zeros), "peak_rps": 1}}))


def test_trace_files_are_named_relative_to_the_scenario_file(tmp_path: Path) -> None:
    doc = smoke_with({"rag-qa": {"rate_file": "rates/day.csv", "peak_rps": 3.0}})
    for key in ("catalog", "workflows"):
        for ref in doc["spec"][key]:
            ref["file"] = str((SMOKE.parent / ref["file"]).resolve())
    (tmp_path / "rates").mkdir()
    rate_file(tmp_path / "rates" / "day.csv", [1.0, 2.0, 4.0, 2.0, 1.0, 1.0, 1.0])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    scenario = load_scenario(tmp_path / "s.yaml")
    spec = scenario.spec
    a = generate_arrivals(spec.trace, spec.duration_s, spec.step_s, spec.seed, base_dir=scenario.base_dir)
    assert workflow_expected(a, "rag-qa").max() == pytest.approx(3.0)


# --- the load shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize(("load", "expected"), [
    ({"requests_file": "a.csv", "rate_file": "b.csv"}, "both requests_file and rate_file given"),
    ({"time_scale": 0.5, "repeat": False}, "repeat, time_scale belong to a file load"),
    ({"rate_file": "b.csv", "peak_rps": 2, "base_rps": 1},
     "spec.trace.workflows.rag-qa.rate-file.base_rps: unknown key"),
    ({"requests_file": "a.csv", "time_scale": 0}, "spec.trace.workflows.rag-qa.requests-file.time_scale:"),
    ({"rate_file": "b.csv"}, "spec.trace.workflows.rag-qa.rate-file.peak_rps: missing required key"),
    ({"requests_file": "a.csv", "peak_rps": 3}, "spec.trace.workflows.rag-qa.requests-file.peak_rps: unknown key"),
    (7, "spec.trace.workflows.rag-qa: a load is a mapping of one of three shapes"),
])
def test_load_shapes_are_strict_and_errors_name_the_field(load: Any, expected: str) -> None:
    assert expected in problems_of(smoke_with({"rag-qa": load}))


def test_the_three_shapes_validate_with_their_defaults() -> None:
    spec = trace({"a": {"base_rps": 1, "peak_rps": 2}, "b": {"requests_file": "x.csv"},
                  "c": {"rate_file": "y.csv", "peak_rps": 4}})
    assert isinstance(spec.workflows["a"], WorkflowLoad)
    b = spec.workflows["b"]
    assert isinstance(b, RequestFileLoad) and (b.time_scale, b.rate_scale, b.start_s, b.repeat) == (1, 1, 0, True)
    c = spec.workflows["c"]
    assert isinstance(c, RateFileLoad) and (c.start_s, c.peak_rps) == (0, 4)
    assert set(spec.file_loads()) == {"b", "c"}
    with pytest.raises(ValueError, match="replays a trace file"):
        workflow_rate_rps(spec, "c", 0.0)


def test_bursts_hitting_file_loads_are_refused(tmp_path: Path) -> None:
    rates = rate_file(tmp_path / "r.csv", [1.0] * 8)
    doc = smoke_with({"rag-qa": {"rate_file": str(rates), "peak_rps": 1}})
    doc["spec"]["trace"]["bursts"] = [{"at_hour": 0.5, "duration_s": 60, "multiplier": 2}]
    assert "bursts apply to cosine loads only, and rag-qa replays a trace file" in problems_of(doc)
    doc["spec"]["trace"]["bursts"] = [{"at_hour": 0.5, "duration_s": 60, "multiplier": 2, "workflows": ["video-qa"]}]
    parse_scenario(doc, "test.yaml", SMOKE.parent)  # a burst on a cosine load stays allowed


# --- rate curves -----------------------------------------------------------------------------------


def test_rate_scaling_hits_peak_rps_and_empty_windows_get_nothing(tmp_path: Path) -> None:
    rate_file(tmp_path / "r.csv", [100.0, 0.0, 400.0, 200.0, 0.0, 0.0, 1000.0], [1.0, 0.0, 2.0, 1.0, 0.0, 1.0, 1.0])
    a = arrivals({"w": {"rate_file": "r.csv", "start_s": 0, "peak_rps": 8.0}}, 3000.0, tmp_path)  # 1000 is beyond
    assert_consistent(a, 3000.0)
    per_window = workflow_counts(a, "w").reshape(5, 10).sum(axis=1)
    expected = workflow_expected(a, "w").reshape(5, 10)
    assert expected.max() == pytest.approx(8.0)  # the highest window within the duration
    assert np.allclose(expected[:, 0], [2.0, 0.0, 8.0, 4.0, 0.0])
    assert per_window[1] == 0 and per_window[4] == 0  # rate 0: no arrivals, no crash
    assert per_window[2] == pytest.approx(8.0 * 600, rel=0.2)
    assert np.isin(a.requests.times_s // 600, [0, 2, 3]).all()


def test_a_rate_file_starts_at_start_s_and_steps_straddling_windows_get_the_mean(tmp_path: Path) -> None:
    rate_file(tmp_path / "r.csv", [1.0, 2.0, 4.0, 4.0], window_s=100.0)
    a = arrivals({"w": {"rate_file": "r.csv", "start_s": 150, "peak_rps": 4.0}}, 240.0, tmp_path)  # 150..390
    assert np.allclose(workflow_expected(a, "w"), [(50 * 2 + 10 * 4) / 60, 4.0, 4.0, 4.0])


def dispersion(cv: float, tmp_path: Path) -> float:
    """Index of dispersion (variance / mean) of 60 s counts at a constant 10 req/s for 12 h."""
    rate_file(tmp_path / f"cv{cv}.csv", [10.0] * 72, [cv] * 72)
    a = arrivals({"w": {"rate_file": f"cv{cv}.csv", "peak_rps": 10.0}}, 43200.0, tmp_path, seed=11)
    counts = workflow_counts(a, "w")
    assert counts.mean() == pytest.approx(600, rel=0.05)
    return float(counts.var() / counts.mean())


def test_the_arrival_cv_makes_arrivals_burstier(tmp_path: Path) -> None:
    poisson, bursty = dispersion(1.0, tmp_path), dispersion(2.0, tmp_path)
    assert 0.7 < poisson < 1.4  # Poisson counts: variance = mean
    assert 2.5 < bursty < 6.0  # a renewal process: variance ~ cv^2 x mean
    assert MAX_ARRIVAL_CV >= 2.0


def test_a_missing_or_zero_cv_is_poisson(tmp_path: Path) -> None:
    rate_file(tmp_path / "r.csv", [10.0] * 72)  # no arrival_cv column
    a = arrivals({"w": {"rate_file": "r.csv", "peak_rps": 10.0}}, 43200.0, tmp_path, seed=11)
    counts = workflow_counts(a, "w")
    assert 0.7 < counts.var() / counts.mean() < 1.4
    assert a.requests.context_tokens.max() == 0  # a rate curve has no tokens


# --- request files -----------------------------------------------------------------------------------


def test_requests_play_once_time_scaled(tmp_path: Path) -> None:
    requests_file(tmp_path / "q.csv", np.arange(1000) * 1.0 + 50.0)  # 1 req/s; times count from the first
    a = arrivals({"w": {"requests_file": "q.csv", "time_scale": 0.5, "repeat": False}}, 1000.0, tmp_path)
    assert_consistent(a, 1000.0)
    assert np.allclose(a.requests.times_s, np.arange(1000) * 0.5)  # twice as fast, then nothing
    assert (a.requests.context_tokens == 100 + np.arange(1000)).all()
    assert workflow_expected(a, "w")[:6] == pytest.approx(2.0)  # the trace's rate after time scaling (5 min mean)
    b = arrivals({"w": {"requests_file": "q.csv", "start_s": 100, "repeat": False}}, 2000.0, tmp_path)
    assert b.requests.times_s[0] == pytest.approx(0.0) and b.requests.context_tokens[0] == 200
    assert len(b.requests) == 900


def test_requests_repeat_to_cover_the_scenario(tmp_path: Path) -> None:
    requests_file(tmp_path / "q.csv", np.arange(1000) * 1.0, tokens=False)  # period 1000 s
    a = arrivals({"w": {"requests_file": "q.csv", "start_s": 250}}, 3000.0, tmp_path)
    assert np.allclose(a.requests.times_s, np.arange(3000))
    assert a.requests.context_tokens.max() == 0 and a.requests.generated_tokens.max() == 0  # not in the file
    assert workflow_expected(a, "w") == pytest.approx(1.0)


def test_rate_scale_thins_and_replicates(tmp_path: Path) -> None:
    originals = np.arange(2000) * 1.0
    requests_file(tmp_path / "q.csv", originals)
    thin = arrivals({"w": {"requests_file": "q.csv", "rate_scale": 0.5, "repeat": False}}, 2000.0, tmp_path)
    assert 880 < len(thin.requests) < 1120  # 1000 expected, sd 22
    assert np.isin(thin.requests.times_s, originals).all()  # a subset, not moved
    assert workflow_expected(thin, "w")[3:-3] == pytest.approx(0.5)
    many = arrivals({"w": {"requests_file": "q.csv", "rate_scale": 2.5, "repeat": False}}, 2000.0, tmp_path)
    assert_consistent(many, 2000.0)
    assert 4880 < len(many.requests) < 5120  # 5000 expected, sd 22
    nearest = np.rint(many.requests.times_s)
    assert np.abs(many.requests.times_s - nearest).max() <= 0.5  # jitter within half a mean gap
    assert (many.requests.context_tokens == 100 + nearest.astype(int)).all()  # copies keep their tokens
    exact = np.isin(many.requests.times_s, originals).sum()
    assert 1900 < exact <= 2000  # the originals stay (minus the few jittered out of the first second)
    assert workflow_expected(many, "w")[3:-3] == pytest.approx(2.5)


def test_request_tiles_draw_independently(tmp_path: Path) -> None:
    requests_file(tmp_path / "q.csv", np.arange(600) * 1.0)
    a = arrivals({"w": {"requests_file": "q.csv", "rate_scale": 0.5}}, 1800.0, tmp_path)
    tiles = [set(np.mod(a.requests.times_s[(a.requests.times_s >= k * 600) & (a.requests.times_s < (k + 1) * 600)],
                        600)) for k in range(3)]
    assert tiles[0] != tiles[1] != tiles[2]


# --- the request stream -------------------------------------------------------------------------------


def mixed(tmp_path: Path) -> dict[str, Any]:
    rate_file(tmp_path / "r.csv", [3.0, 1.0, 0.0, 5.0, 2.0, 2.0, 2.0])
    requests_file(tmp_path / "q.csv", np.cumsum(np.random.default_rng(0).exponential(0.5, 3000)))
    return {"a": {"base_rps": 1.0, "peak_rps": 3.0, "peak_hour": 0.5},
            "b": {"rate_file": "r.csv", "peak_rps": 4.0},
            "c": {"requests_file": "q.csv", "time_scale": 2.0, "rate_scale": 1.7}}


def test_the_request_stream_is_sorted_consistent_and_deterministic(tmp_path: Path) -> None:
    loads = mixed(tmp_path)
    a, b, c = (arrivals(loads, 3600.0, tmp_path, seed=s) for s in (5, 5, 6))
    for x in (a, b, c):
        assert_consistent(x, 3600.0)
    for field in ("times_s", "demand", "context_tokens", "generated_tokens"):
        assert (getattr(a.requests, field) == getattr(b.requests, field)).all()
    assert not np.array_equal(a.requests.times_s, c.requests.times_s)
    assert (a.counts == b.counts).all() and (a.expected_rps == b.expected_rps).all()
    assert {d.workflow for d in a.demands} == {"a", "b", "c"}


def test_demands_follow_the_tier_mix(tmp_path: Path) -> None:
    rate_file(tmp_path / "r.csv", [10.0] * 8)
    a = arrivals({"w": {"rate_file": "r.csv", "peak_rps": 10.0}}, 4000.0, tmp_path)
    shares = demand_shares(trace({"w": {"rate_file": "r.csv", "peak_rps": 10.0}}), ["w"])
    observed = np.bincount(a.requests.demand, minlength=len(a.demands)) / len(a.requests)
    for j, demand in enumerate(a.demands):
        assert observed[j] == pytest.approx(shares[demand], abs=0.01)
        assert a.peak_rates()[demand] == pytest.approx(10.0 * shares[demand])


def test_a_workflows_requests_do_not_depend_on_the_others(tmp_path: Path) -> None:
    loads = mixed(tmp_path)
    together = arrivals(loads, 3600.0, tmp_path)
    alone = arrivals({"b": loads["b"]}, 3600.0, tmp_path)
    b_index = [j for j, d in enumerate(together.demands) if d.workflow == "b"]
    assert np.array_equal(together.requests.times_s[np.isin(together.requests.demand, b_index)],
                          alone.requests.times_s)


def test_a_day_with_a_million_requests_generates_in_seconds(tmp_path: Path) -> None:
    rate_file(tmp_path / "r.csv", list(np.linspace(4.0, 20.0, 145)), [2.0] * 145)
    requests_file(tmp_path / "q.csv", np.arange(3600) * 1.0)
    loads = {"b": {"rate_file": "r.csv", "peak_rps": 16.0}, "c": {"requests_file": "q.csv", "rate_scale": 1.5}}
    started = time.perf_counter()
    a = arrivals(loads, 86400.0, tmp_path)
    assert time.perf_counter() - started < 10.0
    assert a.total() > 800_000
    assert_consistent(a, 86400.0)


# --- cosine loads: the counts of before requests had times -----------------------------------------------


def old_counts(spec: TraceSpec, duration_s: float, step_s: float, seed: int) -> np.ndarray:
    """The count generator as it was before request streams (a copy, to pin the rng stream)."""
    workflows = sorted(spec.workflows)
    shares = demand_shares(spec, workflows)
    demands = tuple(sorted(shares, key=lambda d: (d.workflow, d.slo)))
    steps = int(math.ceil(duration_s / step_s - 1e-9))
    expected = np.zeros((steps, len(demands)))
    for k in range(steps):
        start_s = k * step_s
        width_s = min(step_s, duration_s - start_s)
        rates = {w: workflow_rate_rps(spec, w, start_s + width_s / 2.0) for w in workflows}
        for j, demand in enumerate(demands):
            expected[k, j] = rates[demand.workflow] * shares[demand]
    widths = np.minimum(step_s, duration_s - np.arange(steps) * step_s)[:, None]
    return np.random.default_rng(seed).poisson(expected * widths).astype(np.int64)


@pytest.mark.parametrize("name", ["smoke.yaml", "day-mix.yaml"])
def test_cosine_counts_are_unchanged_and_requests_fill_them(name: str) -> None:
    spec = load_scenario(SCENARIOS / name).spec
    a = generate_arrivals(spec.trace, spec.duration_s, spec.step_s, spec.seed)
    assert np.array_equal(a.counts, old_counts(spec.trace, spec.duration_s, spec.step_s, spec.seed))
    assert_consistent(a, spec.duration_s)
    if name == "smoke.yaml":
        assert a.total() == 11505  # what the generator drew before this change
        starts = np.floor(a.requests.times_s / spec.step_s)
        offsets = a.requests.times_s - starts * spec.step_s
        assert 0.45 < offsets.mean() / spec.step_s < 0.55  # uniform inside the step


def test_cosine_placement_with_a_step_that_does_not_divide_the_duration() -> None:
    spec = trace({"w": {"base_rps": 5.0, "peak_rps": 9.0, "peak_hour": 0.0}})
    a = generate_arrivals(spec, 1000.0, 7.3, 2)
    assert a.steps == 137
    assert_consistent(a, 1000.0)
