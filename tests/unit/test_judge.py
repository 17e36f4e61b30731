"""The request-level judge: its engine model, its independence from the planner, and runs under it."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from controller.simulator.judge.batching import BatchEngine, EngineProfile, closed_loop_latency_s
from controller.simulator.judge.models import MODEL_SHAPES, gpu_profile, stage_work
from controller.simulator.judge.tools import ToolServer
from controller.simulator.predictor_error import ErroneousPerfModel
from controller.simulator.run import run_simulation, scenario_hardware
from controller.simulator.scenario import load_scenario
from policies.model import InstanceConfig
from policies.perf_model import CatalogPerfModel

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "examples" / "scenarios" / "smoke.yaml"
PROFILE = EngineProfile(iteration_base_s=0.006, per_sequence_s=0.0004, per_context_token_s=1e-7,
                        prefill_base_s=0.002, prefill_per_token_s=2e-5, max_num_seqs=64, kv_capacity_tokens=200_000)
FORBIDDEN = ("policies.optimizer", "policies.milp", "policies.options", "policies.placement", "policies.queueing",
             "policies.colocation", "policies.perf_model", "policies.predictors", "controller.simulator.slo",
             "controller.simulator.service")


def _project_imports(module: str) -> set[str]:
    """Project modules ``module`` imports, transitively (parsed, not executed)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in ("controller", "policies", "common", "agent"):
                    todo.append(target)
    return seen


def test_the_judge_imports_nothing_of_the_planners_formulas() -> None:
    reached = set()
    for path in (ROOT / "controller" / "simulator" / "judge").glob("*.py"):
        reached |= _project_imports(f"controller.simulator.judge.{path.stem}")
    bad = sorted(m for m in reached if m.startswith(FORBIDDEN))
    assert not bad, f"the judge reaches the planner's modules: {bad}"
    assert "controller.simulator.judge.batching" in reached  # the walk does follow imports


def test_batching_saturates_throughput_and_grows_latency() -> None:
    latencies = [closed_loop_latency_s(PROFILE, c, 500, 128) for c in (1, 4, 16, 64)]
    throughputs = [c / lat for c, lat in zip((1, 4, 16, 64), latencies)]
    assert latencies == sorted(latencies) and latencies[-1] > 2 * latencies[0]
    assert throughputs == sorted(throughputs)
    assert throughputs[-1] < 1.05 / PROFILE.per_sequence_s  # bounded by the per-sequence cost
    assert latencies[0] == pytest.approx(PROFILE.unloaded_latency_s(500, 128), rel=0.02)


def test_a_full_kv_cache_makes_requests_wait() -> None:
    small = EngineProfile(0.006, 0.0004, 0.0, 0.0, 0.0, max_num_seqs=64, kv_capacity_tokens=1000)
    engine = BatchEngine(small)
    for i in range(3):
        engine.submit(0.0, i, 400, 100)  # 500 tokens each: two fit
    assert engine.running == 2 and engine.waiting == 1
    done = engine.advance(10.0)
    assert [r for r, _ in done] == [0, 1, 2]
    first, third = done[0][1], done[2][1]
    assert third == pytest.approx(2 * first, rel=0.05)  # the third starts when the first two leave


def test_prefill_only_requests_finish_with_their_prefill_and_slowdown_scales_time() -> None:
    engine = BatchEngine(PROFILE)
    engine.submit(0.0, 1, 1000, 0)
    (request, finished_s), = engine.advance(1.0)
    assert finished_s == pytest.approx(PROFILE.prefill_base_s + 1000 * PROFILE.prefill_per_token_s)
    slow = BatchEngine(PROFILE, slowdown=2.0)
    slow.submit(0.0, 1, 1000, 0)
    (_, slow_s), = slow.advance(1.0)
    assert slow_s == pytest.approx(2 * finished_s)


def test_tool_servers_are_fcfs_with_the_catalog_mean() -> None:
    server = ToolServer(2, 0.5, np.random.default_rng(0))
    for i in range(2000):
        server.submit(0.0, i)
    done = server.advance(math.inf)
    assert len(done) == 2000
    assert done[-1][1] == pytest.approx(2000 * 0.5 / 2, rel=0.05)  # two servers, mean 0.5 s


def test_model_profiles_follow_the_roofline() -> None:
    big, small = MODEL_SHAPES["sim-llama-70b-chat"], MODEL_SHAPES["sim-llama-8b-chat"]
    assert big.parameters > 8 * small.parameters
    h100 = 80 * 10 ** 9
    one = gpu_profile_for("sim-llama-8b-chat", "h100", 1, h100)
    two = gpu_profile_for("sim-llama-8b-chat", "h100", 2, h100)
    l4 = gpu_profile_for("sim-llama-8b-chat", "l4", 1, 24 * 10 ** 9)
    work = stage_work("chat", {"max_tokens": 256}, 1)
    assert one.unloaded_latency_s(work.prompt_tokens, work.output_tokens) > \
        two.unloaded_latency_s(work.prompt_tokens, work.output_tokens) > \
        0.5 * one.unloaded_latency_s(work.prompt_tokens, work.output_tokens)  # tensor parallelism: sublinear
    assert l4.iteration_base_s > 8 * one.iteration_base_s  # 300 GB/s against 3.35 TB/s
    assert gpu_profile_for("sim-llama-70b-chat", "h100", 1, h100) is None  # 141 GB of weights do not fit


def gpu_profile_for(executor: str, hardware: str, tp: int, memory: int) -> EngineProfile | None:
    scenario = load_scenario(SMOKE)
    return gpu_profile(scenario.catalog[executor], hardware, tp, memory)


def test_predictor_error_is_deterministic_bounded_and_off_at_zero() -> None:
    scenario = load_scenario(SMOKE)
    perf = CatalogPerfModel(scenario_hardware(scenario))
    exe = scenario.catalog["sim-llama-8b-chat"]
    config = InstanceConfig(exe.name, "h100", 1, None)
    truth = perf.perf(exe, config, exe.knob_defaults(), 1.0)
    assert ErroneousPerfModel(perf, 0.0, 1).perf(exe, config, exe.knob_defaults(), 1.0) == truth
    ratios = []
    for seed in range(20):
        wrong = ErroneousPerfModel(perf, 0.2, seed).perf(exe, config, exe.knob_defaults(), 1.0)
        assert wrong == ErroneousPerfModel(perf, 0.2, seed).perf(exe, config, exe.knob_defaults(), 1.0)
        ratio = wrong.latency_s / truth.latency_s
        assert 0.8 * 0.9 - 1e-9 <= ratio <= 1.2 * 1.1 + 1e-9
        assert wrong.capacity_rps * wrong.latency_s == pytest.approx(truth.capacity_rps * truth.latency_s)
        ratios.append(ratio)
    assert min(ratios) < 0.95 and max(ratios) > 1.05  # biased both ways across seeds


@pytest.fixture(scope="module")
def smoke_requests(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("smoke-requests")
    report, sim = run_simulation(load_scenario(SMOKE), "murakkab", out, plots=False)
    return report, sim, out


def test_a_run_under_the_request_judge_accounts_for_every_request(smoke_requests) -> None:
    report, sim, _ = smoke_requests
    assert report["judge"] == "requests"
    arrived = report["requests"]["arrived"]
    assert arrived == int(sim.arrivals.counts.sum()) == len(sim.arrivals.requests.times_s)
    finished = sum(t["served"] for t in report["requests_per_tier"].values())
    assert finished + report["dropped"] + report["unfinished"] == pytest.approx(arrived)
    assert 0 < report["slo_attainment"]["overall"] <= 1
    assert report["h100_equiv_gpu_hours"] < report["gpu_hours"]  # smoke runs on A100 and L4 too
    assert len(report["scenario_sha256"]) == 64 and len(report["settings_sha256"]) == 64
    for tier, latency in report["latency_s"].items():
        assert 0 < latency["p50"] <= latency["p99"], tier


def test_the_request_judge_is_deterministic_for_a_seed(smoke_requests) -> None:
    report, _, _ = smoke_requests
    again, _ = run_simulation(load_scenario(SMOKE), "murakkab", plots=False)
    for key in ("slo_attainment", "energy_mwh", "gpu_hours", "latency_s", "dropped"):
        assert again[key] == report[key], key


def test_sim_compare_prints_ratios(smoke_requests, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.cli.main import main

    _, _, out = smoke_requests
    static_dir = tmp_path / "static"
    run_simulation(load_scenario(SMOKE), "static", static_dir, plots=False)
    assert main(["sim", "compare", str(static_dir), str(out), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = {row[0]: row[1:] for row in table["rows"]}
    assert rows["cost (USD) ratio"][0] == "1.00x"
    assert table["judges"] == ["requests"]
    assert main(["sim", "compare", str(tmp_path / "missing")]) == 2
