"""The simulator judge's continuous-batching model against a real vLLM engine (the CPU build, tiny Llama).

One engine; closed-loop concurrency sweeps through ``/v1/completions`` with random token-id prompts and
``ignore_eos`` (every answer is exactly ``max_tokens`` long; each ``usage`` is checked). An ``EngineProfile`` is
fitted (``controller.simulator.judge.calibrate``) on concurrency 1 and 16 only, and the judge's
``closed_loop_latency_s`` must then predict the mean latency at concurrency 2, 4 and 8 within 15 %. Two wrong
model shapes fitted the same way must miss somewhere, so the check can fail: an engine whose concurrent prompts
cost nothing (no prefill queueing) and one without batching (``max_num_seqs = 1``).

What is compared is the engine's own mean request latency over each visit, from vLLM's
``vllm:e2e_request_latency_seconds`` (arrival in the API server to the last token), which is what the judge
models. The client-side latency is printed next to it: on this shared 2-core VM the HTTP front end now and then
makes a request miss its batch and wait a whole extra round, which moves client-side means by 20-100 % from pass
to pass (bench/README.md, "Judge calibration"). Points are visited in shuffled passes (a visit that other work
on the machine disturbed is repeated once it calms down), and a point's value is the median over passes. When
other work kept the machine busy throughout (more than a tenth of the visits disturbed after two minutes of
waiting for quiet), a miss skips the test, saying so, instead of failing it.

Marked ``vllm``: skipped where vllm is not installed, unless MURAKKAB_REQUIRE_VLLM=1 makes that a failure.
``-s`` prints the table. bench/judge_calibration.py takes the same measurements more thoroughly.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.components.engines.vllm import VllmEngine
from common.workflow.catalog import ExecutorSpec
from controller.simulator.judge.batching import EngineProfile, closed_loop_latency_s
from controller.simulator.judge.calibrate import Point, fit_profile, predicted_latency_s, prediction_errors
from tests.integration.test_vllm_engine import require_model_deps, start_engine

FIT_AT = (1, 16)
CHECK_AT = (2, 4, 8)
SHAPES = ((16, 16), (16, 64), (512, 16), (512, 64))  # (prompt, output) tokens
TOLERANCE = 0.15
PASSES = 3
SAMPLES_PER_VISIT = 12  # requests per point and pass (at least 2 per client after the first)
MAX_NUM_SEQS = 128  # vLLM 0.32's default for the OpenAI server on CPU; every concurrency here is below it
BUSY_CORES = 0.3  # other work using more than this during a visit makes it disturbed
RETRIES = 2
QUIET_BUDGET_S = 120.0
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
E2E = "vllm:e2e_request_latency_seconds"
Key = tuple[int, int, int]  # (concurrency, prompt tokens, output tokens)


# --- pure: the fit recovers what it should ---------------------------------------------------------


def test_fit_recovers_a_profile_from_its_own_closed_loop_latencies() -> None:
    truth = EngineProfile(iteration_base_s=1.7e-3, per_sequence_s=9e-5, per_context_token_s=3e-7,
                          prefill_base_s=4e-4, prefill_per_token_s=1.1e-5, max_num_seqs=8, kv_capacity_tokens=50_000)
    points = [Point(c, p, n, closed_loop_latency_s(truth, c, p, n)) for c in (1, 8) for p, n in SHAPES]
    fitted = fit_profile(points, truth.max_num_seqs, truth.kv_capacity_tokens)
    for name in ("iteration_base_s", "per_sequence_s", "per_context_token_s", "prefill_base_s", "prefill_per_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3), name
    # The closed form is the judge's own steady state, also past max_num_seqs (waves of 8 here).
    for c in (2, 16, 20):
        assert predicted_latency_s(truth, c, 16, 64) == pytest.approx(closed_loop_latency_s(truth, c, 16, 64), rel=0.01)
    # Concurrency 1 alone cannot split the per-sequence cost from the iteration's base.
    with pytest.raises(ValueError, match="do not identify"):
        fit_profile([p for p in points if p.concurrency == 1], 8, 50_000)
    # Prefill-only points (an embedding model) fit the prefill; the decode constants are placeholders.
    embed = fit_profile([Point(c, p, 0, c * (4e-4 + 1e-5 * p)) for c in (1, 4) for p in (16, 128)], 8, 50_000)
    assert (embed.prefill_base_s, embed.prefill_per_token_s) == (pytest.approx(4e-4), pytest.approx(1e-5))


# --- a real engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_model_deps()
    from agent.components.tiny_model import build_tiny_llama
    configured = os.environ.get("MURAKKAB_MODEL_DIR")
    root = Path(configured) if configured else tmp_path_factory.mktemp("models")
    return build_tiny_llama(root / "tiny-llama")


@pytest.fixture(scope="module")
def engine(loop: asyncio.AbstractEventLoop, tiny_llama: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    executor = ExecutorSpec(name="tiny-llama-judge", task="chat", engine="vllm",
                            vllm={"model": str(tiny_llama), "args": ENGINE_ARGS})
    started = start_engine(loop, tmp_path_factory.mktemp("vllm-judge"), executor)  # 1 GiB KV cache by default
    yield started
    loop.run_until_complete(started.stop(10.0))


def kv_capacity_tokens(engine: VllmEngine) -> int:
    found = re.search(r"KV cache size: ([\d,]+) tokens", engine.ctx.log_path.read_text(errors="replace"))
    assert found, "the engine log does not say its KV cache size"
    return int(found.group(1).replace(",", ""))


class OtherWork:
    """CPU cores that other work on the machine uses: all busy time minus this process's and the engine's.

    Another suite or engine on the same two cores slows everything down for a while. A visit during or right
    after which other work used more than ``BUSY_CORES`` is repeated once that work has calmed down, within
    ``QUIET_BUDGET_S`` of waiting for the whole test; past that, visits are taken as they come.
    """

    def __init__(self, engine: VllmEngine) -> None:
        self.group = engine.pid
        self.budget_s = QUIET_BUDGET_S
        self.disturbed = 0  # visits during or after which other work was busy
        self.kept_disturbed = 0  # ... of them kept (not repeated: out of retries or of budget)

    def sample(self) -> tuple[float, float]:
        import psutil
        times = psutil.cpu_times()
        ours = 0.0
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid() or os.getpgid(proc.pid) == self.group:
                    ours += sum(proc.cpu_times()[:2])
            except (OSError, psutil.Error):
                pass
        return time.monotonic(), sum(times) - times.idle - getattr(times, "iowait", 0.0) - ours

    @staticmethod
    def cores(before: tuple[float, float], after: tuple[float, float]) -> float:
        return (after[1] - before[1]) / max(1e-3, after[0] - before[0])

    async def busy(self, window_s: float = 0.25) -> bool:
        before = self.sample()
        await asyncio.sleep(window_s)
        return self.cores(before, self.sample()) > BUSY_CORES

    async def wait_quiet(self) -> None:
        while self.budget_s > 0:
            self.budget_s -= 0.5
            if not await self.busy(0.5):
                return


async def measure(engine: VllmEngine, vocab_size: int) -> tuple[dict[Key, list[tuple[float, float]]], OtherWork]:
    """(engine-side, client-side) mean latency of every point in each of the shuffled passes."""
    import aiohttp
    rng = random.Random(0)
    grid = [(c, p, n) for c in sorted(FIT_AT + CHECK_AT) for p, n in SHAPES]
    means: dict[Key, list[tuple[float, float]]] = {key: [] for key in grid}
    other = OtherWork(engine)

    async def request(session: aiohttp.ClientSession, prompt_tokens: int, output_tokens: int) -> float:
        body = {"model": engine.model_name, "prompt": [rng.randrange(8, vocab_size) for _ in range(prompt_tokens)],
                "max_tokens": output_tokens, "ignore_eos": True, "temperature": 0.0}
        sent = time.perf_counter()
        async with session.post(f"{engine.base_url}/v1/completions", json=body) as resp:
            data = await resp.json(content_type=None)
        elapsed = time.perf_counter() - sent
        assert resp.status == 200, data
        usage = data["usage"]  # ignore_eos honoured: exactly max_tokens generated (random weights stop early otherwise)
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens, output_tokens), usage
        return elapsed

    async def e2e(session: aiohttp.ClientSession) -> tuple[float, float]:
        async with session.get(f"{engine.base_url}/metrics") as resp:
            text = await resp.text()
        return tuple(float(re.search(rf"^{E2E}_{part}{{[^}}]*}} (\S+)$", text, re.M).group(1))  # type: ignore[return-value]
                     for part in ("sum", "count"))

    async def client(session: aiohttp.ClientSession, key: Key, count: int, latencies: list[float]) -> None:
        for i in range(count):
            elapsed = await request(session, key[1], key[2])
            if i > 0:  # the first of each visit starts the loop off
                latencies.append(elapsed)

    async def visit(session: aiohttp.ClientSession, key: Key) -> tuple[float, float]:
        per_client = max(2, math.ceil(SAMPLES_PER_VISIT / key[0])) + 1
        for attempt in range(RETRIES + 1):
            latencies: list[float] = []
            before, cpu = await e2e(session), other.sample()
            await asyncio.gather(*[client(session, key, per_client, latencies) for _ in range(key[0])])
            # While the engine runs, other work gets only what it leaves of the two cores, so it is also looked
            # for right after the visit, with the engine idle.
            disturbed = other.cores(cpu, other.sample()) > BUSY_CORES or await other.busy()
            after = await e2e(session)
            for _ in range(100):  # the server records a request's latency just after answering it
                if after[1] - before[1] >= key[0] * per_client:
                    break
                await asyncio.sleep(0.05)
                after = await e2e(session)
            assert after[1] - before[1] == key[0] * per_client, (before, after, key, per_client)
            other.disturbed += disturbed
            if not disturbed or attempt == RETRIES or other.budget_s <= 0:
                other.kept_disturbed += disturbed
                break
            await other.wait_quiet()
        return (after[0] - before[0]) / (after[1] - before[1]), statistics.fmean(latencies)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False) as session:
        for c, p, n in grid:  # warm-up: one round of every point (new batch shapes allocate)
            await asyncio.gather(*[request(session, p, n) for _ in range(c)])
        for _ in range(PASSES):
            order = grid[:]
            rng.shuffle(order)
            for key in order:
                means[key].append(await visit(session, key))
    return means, other


def fit_and_check(points: list[Point], kv: int, max_num_seqs: int = MAX_NUM_SEQS,
                  fixed: dict[str, float] | None = None) -> tuple[EngineProfile, dict[Key, float]]:
    """Fit on FIT_AT; the relative errors of the judge's prediction at every point."""
    profile = fit_profile([p for p in points if p.concurrency in FIT_AT], max_num_seqs, kv, fixed=fixed)
    return profile, {(e.point.concurrency, e.point.prompt_tokens, e.point.output_tokens): e.error
                     for e in prediction_errors(profile, points)}


def worst_held_out(errors: dict[Key, float]) -> float:
    return max(abs(x) for key, x in errors.items() if key[0] in CHECK_AT)


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_judge_predicts_held_out_concurrencies_of_a_real_engine(engine: VllmEngine, tiny_llama: Path,
                                                                 loop: asyncio.AbstractEventLoop) -> None:
    vocab_size = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    started = time.monotonic()
    means, other = loop.run_until_complete(measure(engine, vocab_size))
    measured_s = time.monotonic() - started
    kv = kv_capacity_tokens(engine)
    points = [Point(*key, statistics.median(m[0] for m in ms)) for key, ms in sorted(means.items())]
    client_points = [Point(*key, statistics.median(m[1] for m in ms)) for key, ms in sorted(means.items())]
    spread = {key: (max(m[0] for m in ms) - min(m[0] for m in ms)) / statistics.median(m[0] for m in ms)
              for key, ms in means.items()}

    profile, errors = fit_and_check(points, kv)
    _, client_errors = fit_and_check(client_points, kv)
    wrong = {  # model shapes that must not fit
        "no prefill queueing": fit_and_check(points, kv, fixed={"prefill_base_s": 0.0, "prefill_per_token_s": 0.0})[1],
        "no batching": fit_and_check(points, kv, max_num_seqs=1, fixed={"per_sequence_s": 0.0})[1],
    }
    _, no_per_sequence = fit_and_check(points, kv, fixed={"per_sequence_s": 0.0})

    print(f"\n[judge] {len(points)} points x {PASSES} passes in {measured_s:.0f} s ({other.disturbed} visits disturbed by "
          f"other work, repeated while {QUIET_BUDGET_S:.0f} s of waiting for quiet lasted: "
          f"{QUIET_BUDGET_S - other.budget_s:.0f} s used); fitted on concurrency "
          f"{FIT_AT}: iteration_base {1e3 * profile.iteration_base_s:.3f} ms, per_sequence "
          f"{1e6 * profile.per_sequence_s:.1f} us, per_context_token {1e9 * profile.per_context_token_s:.1f} ns, "
          f"prefill_base {1e3 * profile.prefill_base_s:.3f} ms, prefill_per_token {1e6 * profile.prefill_per_token_s:.2f} us")
    print(f"  {'conc':>4} {'prompt':>6} {'out':>4} {'engine ms':>9} {'spread':>6} {'error':>7} | {'client ms':>9} "
          f"{'error':>7} | errors of: no prefill queue, no batching, per_sequence_s = 0")
    for point, client in zip(points, client_points):
        key = (point.concurrency, point.prompt_tokens, point.output_tokens)
        fitted = " (fitted)" if key[0] in FIT_AT else ""
        print(f"  {key[0]:>4} {key[1]:>6} {key[2]:>4} {1e3 * point.latency_s:>9.1f} {100 * spread[key]:>5.0f}% "
              f"{100 * errors[key]:>+6.1f}% | {1e3 * client.latency_s:>9.1f} {100 * client_errors[key]:>+6.1f}% | "
              + ", ".join(f"{100 * e[key]:+.0f}%" for e in (*wrong.values(), no_per_sequence)) + fitted)

    for name, shape_errors in wrong.items():  # the check has teeth (these miss by 30 % and more)
        assert worst_held_out(shape_errors) > TOLERANCE, f"a judge with {name} fits as well: {shape_errors}"
    misses = {key: f"{100 * x:+.1f}%" for key, x in errors.items() if key[0] in CHECK_AT and abs(x) > TOLERANCE}
    if misses and other.kept_disturbed > len(points) * PASSES // 10:
        pytest.skip(f"the machine was too busy to time the engine: {other.kept_disturbed} of {len(points) * PASSES} "
                    f"visits ran while other work used more than {BUSY_CORES} cores, and the judge missed {misses}")
    assert not misses, f"the judge misses held-out points by more than {TOLERANCE:.0%}: {misses}"
