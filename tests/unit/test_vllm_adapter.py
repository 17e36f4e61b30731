"""The vLLM engine adapter without vLLM: command line, environment, model paths, and the HTTP
invocation logic against a fake OpenAI-compatible server on loopback (in process, and as a
fake ``python -m vllm...`` subprocess for start/probe/stop/crash)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.components.engines.base import EngineContext, EngineError
from agent.components.engines.vllm import (
    VllmEngine, build_command, build_env, chat_messages, extract_code, parse_objects)
from agent.components.paths import ModelPathError, expand_model_path, package_dir
from agent.devices.base import Device
from common.protocol import DeviceInfo, DeviceTelemetry
from common.workflow.catalog import ExecutorSpec


class FakeDevice(Device):
    def __init__(self, index: int, kind: str = "gpu", simulated: bool = False) -> None:
        self.info = DeviceInfo(index=index, kind=kind, model="H100", uuid=f"GPU-{index}", backend="nvml",
                               simulated=simulated, memory_total_bytes=80 << 30)

    def sample(self, now_s: float) -> DeviceTelemetry:
        raise AssertionError("the vLLM adapter only reads device identities; it must not sample devices")

    def set_power_limit(self, power_limit_w: float) -> float:
        raise AssertionError("the vLLM adapter must not change power limits")


def executor(task: str = "chat", runner: str = "generate", **vllm: Any) -> ExecutorSpec:
    return ExecutorSpec(name="tiny-chat", task=task, engine="vllm",
                        vllm={"model": "{model_dir}/tiny", "runner": runner, **vllm})


def context(tmp_path: Path, port: int | None = 8123, ex: ExecutorSpec | None = None, **kw: Any) -> EngineContext:
    return EngineContext(component_id="c-1", executor=ex or executor(), devices=kw.pop("devices", []),
                         log_path=tmp_path / "logs" / "c-1.log", work_dir=tmp_path / "work", port=port,
                         model_dir=kw.pop("model_dir", Path("/models")), **kw)


def spawnable(tmp_path: Path, **kw: Any) -> EngineContext:
    """A context whose ``python`` is the fake vLLM and whose model directory exists."""
    (tmp_path / "tiny").mkdir(exist_ok=True)
    return context(tmp_path, port=free_port(), python=fake_python(tmp_path), model_dir=tmp_path, **kw)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- command line, environment, model paths ---------------------------------------------


def test_command_line_for_generate_and_pooling(tmp_path: Path) -> None:
    ctx = context(tmp_path, ex=executor(args=["--dtype", "float32", "--max-model-len", "256"]))
    assert build_command(ctx, "/models/tiny") == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny", "--host",
        "127.0.0.1", "--port", "8123", "--served-model-name", "tiny-chat", "--dtype", "float32",
        "--max-model-len", "256"]
    pooled = context(tmp_path, ex=executor("embed", "pooling", served_model_name="minilm"), python="/opt/py/bin/python")
    cmd = build_command(pooled, "/m")
    assert cmd[0] == "/opt/py/bin/python"
    assert cmd[cmd.index("--served-model-name") + 1] == "minilm"
    assert cmd[-2:] == ["--runner", "pooling"]


@pytest.mark.parametrize("arg", ["--port", "--model=/x", "--served-model-name", "--runner"])
def test_managed_flags_in_catalog_args_are_refused(tmp_path: Path, arg: str) -> None:
    with pytest.raises(EngineError) as err:
        build_command(context(tmp_path, ex=executor(args=[arg, "1"])), "/m")
    assert err.value.code == "engine_failed" and not err.value.retryable
    assert arg.split("=")[0] in err.value.message


def test_command_needs_a_port(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="needs a port"):
        build_command(context(tmp_path, port=None), "/m")


def test_environment_layers_and_cpu_kv_cache_default(tmp_path: Path) -> None:
    ctx = context(tmp_path, ex=executor(env={"A": "executor", "B": "executor"}), env={"B": "agent"})
    env = build_env(ctx, base={"A": "inherited", "PATH": "/bin"})
    assert env["PATH"] == "/bin" and env["A"] == "executor" and env["B"] == "agent"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "CUDA_VISIBLE_DEVICES" not in env
    assert build_env(ctx, base={"VLLM_CPU_KVCACHE_SPACE": "4"})["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_environment_exposes_only_assigned_real_gpus(tmp_path: Path) -> None:
    ctx = context(tmp_path, devices=[FakeDevice(2), FakeDevice(0)], env={"CUDA_VISIBLE_DEVICES": "7"})
    env = build_env(ctx, base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    simulated = build_env(context(tmp_path, devices=[FakeDevice(0, simulated=True), FakeDevice(0, kind="cpu")]),
                          base={})
    assert "CUDA_VISIBLE_DEVICES" not in simulated and simulated["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_model_path_expansion() -> None:
    assert expand_model_path("{model_dir}/llama", Path("/srv/models")) == "/srv/models/llama"
    assert expand_model_path("/abs/path", Path("/x")) == "/abs/path"
    assert expand_model_path("{package:json}/x", Path("/m")) == str(Path(json.__file__).parent / "x")
    with pytest.raises(ModelPathError, match="unknown placeholder {home}"):
        expand_model_path("{home}/x", Path("/m"))
    with pytest.raises(ModelPathError, match="not installed"):
        expand_model_path("{package:no_such_package_murakkab}/model", Path("/m"))
    with pytest.raises(ModelPathError, match="not a Python package name"):
        expand_model_path("{package:../etc}", Path("/m"))
    with pytest.raises(ModelPathError, match="unbalanced"):
        expand_model_path("{model_dir/x", Path("/m"))


def test_package_dir_does_not_import_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "exploding_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_dir("exploding_pkg") == pkg
    assert "exploding_pkg" not in sys.modules


def test_package_dir_under_another_interpreter(tmp_path: Path) -> None:
    # A copy of the interpreter's path that is not sys.executable takes the subprocess route.
    other = tmp_path / "python"
    other.symlink_to(sys.executable)
    assert package_dir("json", str(other)) == Path(json.__file__).parent
    with pytest.raises(ModelPathError, match="not installed in the environment"):
        package_dir("no_such_package_murakkab", str(other))
    with pytest.raises(ModelPathError, match="cannot run engine interpreter"):
        package_dir("json", str(tmp_path / "missing-python"))


def test_prompt_helpers() -> None:
    user = chat_messages("Why?", ["first passage", "second"], "some background")[1]["content"]
    assert "[1] first passage\n[2] second" in user and "Background:\nsome background" in user
    assert user.rstrip().endswith("Question: Why?")
    assert extract_code("intro\n```python\nx = 1\n```\nthen\n```python\ny = 2\n```") == "y = 2"
    assert extract_code("```\nplain = 1\n```") == "plain = 1"
    assert extract_code("  just text  ") == "just text"
    assert parse_objects("1. Person, a Car.\n- dog; person") == ["person", "a car", "dog"]


# --- the fake OpenAI-compatible server ----------------------------------------------------


class FakeOpenAI:
    """Records requests; ``mode`` switches it into failure behaviours."""

    def __init__(self, model: str = "tiny-chat") -> None:
        self.model = model
        self.mode = "ok"
        self.requests: list[tuple[str, Any]] = []
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.port = 0

    async def __aenter__(self) -> "FakeOpenAI":
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release.set()
        await self.runner.cleanup()

    async def failure(self, request: web.Request) -> web.StreamResponse | None:
        if self.mode == "400":
            return web.json_response({"object": "error", "message": "prompt is too long", "code": 400}, status=400)
        if self.mode == "500":
            return web.json_response({"error": {"message": "engine core died"}}, status=500)
        if self.mode == "slow":
            await asyncio.wait_for(self.release.wait(), 30)
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return None

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.mode != "starting" else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("chat", body))
        failed = await self.failure(request)
        if failed is not None:
            return failed
        content = body["messages"][-1]["content"]
        if isinstance(content, list):
            reply = "Person, car.\n- tree"
        elif body["messages"][0]["content"].startswith("You are an expert Python"):
            reply = f"Sure:\n```python\ndef solve():\n    return {len(self.requests)}\n```\n"
        else:
            reply = f"echo: {content[-20:]}"
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("embed", body))
        failed = await self.failure(request)
        if failed is not None:
            return failed
        return web.json_response({"data": [{"index": 0, "embedding": [0.5, -0.25, float(len(body["input"]))]}]})

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        self.requests.append(("stt", {"model": form["model"], "filename": upload.filename,
                                      "content_type": upload.content_type, "data": upload.file.read()}))
        return web.json_response({"text": " hello from the audio "})


def engine_for(tmp_path: Path, server_port: int, task: str = "chat") -> VllmEngine:
    return VllmEngine(context(tmp_path, port=server_port, ex=executor(task)))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_chat_request_and_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            engine = engine_for(tmp_path, fake.port)
            assert await engine.probe()
            out = await engine.invoke("chat", {"question": "What is up?", "context": ["alpha", "beta"],
                                               "background": "bg"}, {"max_tokens": 7}, 5.0)
            body = fake.requests[0][1]
            assert out == {"answer": "echo: uestion: What is up?"}
            assert body["model"] == "tiny-chat" and body["max_tokens"] == 7
            assert "[1] alpha\n[2] beta" in body["messages"][1]["content"]
            await engine.stop(1.0)
    run(scenario())


def test_probe_learns_the_served_model_name(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeOpenAI(model="served-as-other") as fake:
            engine = engine_for(tmp_path, fake.port)
            fake.mode = "starting"
            assert not await engine.probe()
            fake.mode = "ok"
            assert await engine.probe()
            assert engine.model_name == "served-as-other"
            await engine.invoke("chat", {"question": "q"}, {}, 5.0)
            assert fake.requests[-1][1]["model"] == "served-as-other"
            await engine.stop(1.0)
        assert not await engine_for(tmp_path, free_port()).probe()  # refused: False, not an exception
    run(scenario())


def test_embed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            engine = engine_for(tmp_path, fake.port, "embed")
            assert await engine.invoke("embed", {"text": "four"}, {}, 5.0) == {"embedding": [0.5, -0.25, 4.0]}
            assert fake.requests[0][1]["input"] == "four"
            await engine.stop(1.0)
    run(scenario())


@pytest.mark.parametrize("debaters,rounds", [(3, 2), (2, 1), (1, 3)])
def test_debate_rounds_and_candidates(tmp_path: Path, debaters: int, rounds: int) -> None:
    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            engine = engine_for(tmp_path, fake.port, "code-generation")
            out = await engine.invoke("code-generation", {"problem": "Add two numbers."},
                                      {"debaters": debaters, "rounds": rounds, "max_tokens": 64}, 5.0)
            assert len(fake.requests) == debaters * rounds
            assert len(out["candidates"]) == debaters
            assert all(c.startswith("def solve():") and "```" not in c for c in out["candidates"])
            first_round = fake.requests[:debaters]
            assert all("previous solution" not in r[1]["messages"][1]["content"] for r in first_round)
            for _, body in fake.requests[debaters:]:
                text = body["messages"][1]["content"]
                assert "Your previous solution" in text
                assert text.count("Solution from agent") == debaters - 1
            await engine.stop(1.0)
    run(scenario())


def test_debate_knobs_are_checked(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = engine_for(tmp_path, free_port(), "code-generation")
        with pytest.raises(EngineError) as err:
            await engine.invoke("code-generation", {"problem": "p"}, {"debaters": 0}, 5.0)
        assert err.value.code == "invalid_input" and "debaters" in err.value.message
        await engine.stop(1.0)
    run(scenario())


def test_speech_to_text_uploads_the_media(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            engine = engine_for(tmp_path, fake.port, "speech-to-text")
            media = {"name": "clip.wav", "media_type": "audio/wav", "data": b"RIFF\x00\x01binary"}
            assert await engine.invoke("speech-to-text", {"media": media}, {}, 5.0) == {
                "transcript": "hello from the audio"}
            sent = fake.requests[0][1]
            assert sent == {"model": "tiny-chat", "filename": "clip.wav", "content_type": "audio/wav",
                            "data": b"RIFF\x00\x01binary"}
            await engine.stop(1.0)
    run(scenario())


def test_object_detection_sends_frames_as_data_urls(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            engine = engine_for(tmp_path, fake.port, "object-detection")
            frames = [{"name": f"f{i}.jpg", "media_type": "image/jpeg", "data": bytes([i]) * 10} for i in range(3)]
            assert await engine.invoke("object-detection", {"frames": frames}, {}, 5.0) == {
                "objects": ["person", "car", "tree"]}
            content = fake.requests[0][1]["messages"][0]["content"]
            urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
            assert urls == [f"data:image/jpeg;base64,{base64.b64encode(bytes([i]) * 10).decode()}" for i in range(3)]
            await engine.stop(1.0)
    run(scenario())


@pytest.mark.parametrize("mode,code,retryable,text", [
    ("400", "invalid_input", False, "prompt is too long"),
    ("500", "engine_failed", True, "engine core died"),
    ("reset", "engine_failed", True, "POST /v1/chat/completions"),
])
def test_http_failures_map_to_engine_errors(tmp_path: Path, mode: str, code: str, retryable: bool, text: str) -> None:
    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            fake.mode = mode
            engine = engine_for(tmp_path, fake.port)
            with pytest.raises(EngineError) as err:
                await engine.invoke("chat", {"question": "q"}, {}, 5.0)
            assert (err.value.code, err.value.retryable) == (code, retryable)
            assert text in err.value.message
            await engine.stop(1.0)
    run(scenario())


def test_connection_refused_is_retryable_engine_failure(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = engine_for(tmp_path, free_port(), "embed")
        with pytest.raises(EngineError) as err:
            await engine.invoke("embed", {"text": "x"}, {}, 5.0)
        assert err.value.code == "engine_failed" and err.value.retryable
        await engine.stop(1.0)
    run(scenario())


def test_timeout_is_bounded_and_cancels_debate_requests(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            fake.mode = "slow"
            engine = engine_for(tmp_path, fake.port, "code-generation")
            started = time.monotonic()
            with pytest.raises(EngineError) as err:
                await engine.invoke("code-generation", {"problem": "p"}, {"debaters": 3, "rounds": 2}, 0.5)
            assert err.value.code == "timeout" and err.value.retryable
            assert time.monotonic() - started < 2.0
            assert len(fake.requests) == 3  # the first round only; no further requests after the deadline
            await engine.stop(1.0)
    run(scenario())


def test_bad_inputs_and_unknown_task(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = engine_for(tmp_path, free_port())
        for task, inputs in [("chat", {}), ("chat", {"question": "q", "context": "not a list"}),
                             ("speech-to-text", {"media": b"raw"}), ("object-detection", {"frames": []}),
                             ("scene-detection", {"video": {}})]:
            with pytest.raises(EngineError) as err:
                await engine.invoke(task, inputs, {}, 5.0)
            assert err.value.code == "invalid_input" and not err.value.retryable, (task, err.value.message)
        await engine.stop(1.0)
    run(scenario())


# --- a fake vLLM process: start, probe, stop, crash ----------------------------------------

FAKE_VLLM = r'''
import json, os, signal, sys
from aiohttp import web
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
name = args[args.index("--served-model-name") + 1]
print("fake vllm", json.dumps(args), "kv", os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "cwd", os.getcwd(), flush=True)
if os.environ.get("FAKE_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, lambda *a: print("ignoring SIGTERM", flush=True))
async def health(request):
    return web.Response()
async def models(request):
    return web.json_response({"data": [{"id": name}]})
async def chat(request):
    return web.json_response({"choices": [{"message": {"content": "pong"}}]})
app = web.Application()
app.router.add_get("/health", health)
app.router.add_get("/v1/models", models)
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=not os.environ.get("FAKE_IGNORE_TERM"))
'''


def fake_python(tmp_path: Path) -> str:
    """An interpreter stand-in: ``fake-python -m vllm.entrypoints... ARGS`` runs the fake server with ARGS."""
    (tmp_path / "fake_vllm.py").write_text(FAKE_VLLM)
    script = tmp_path / "fake-python"
    script.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{tmp_path / "fake_vllm.py"}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


async def wait_ready(engine: VllmEngine, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await engine.probe():
        assert engine.exit_code() is None, f"fake server exited: {engine.ctx.log_path.read_text()}"
        assert time.monotonic() < deadline, "fake server did not become ready"
        await asyncio.sleep(0.05)


def test_process_start_probe_stop(tmp_path: Path) -> None:
    async def scenario() -> None:
        ctx = spawnable(tmp_path, env={"MARK": "1"})
        engine = VllmEngine(ctx)
        await engine.start()
        assert engine.pid is not None and engine.exit_code() is None
        await wait_ready(engine)
        assert await engine.invoke("chat", {"question": "ping"}, {}, 5.0) == {"answer": "pong"}
        assert engine.memory_bytes() and engine.memory_bytes() > 1 << 20
        await engine.stop(5.0)
        assert engine.exit_code() is not None and not await engine.probe()
        await engine.stop(5.0)  # idempotent
        log = ctx.log_path.read_text()
        assert f"--model {tmp_path}/tiny" in log.splitlines()[0]  # the header names the command
        assert f"kv 1 cwd {ctx.work_dir}" in log
    run(scenario())


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = VllmEngine(spawnable(tmp_path, env={"FAKE_IGNORE_TERM": "1"}))
        await engine.start()
        await wait_ready(engine)
        started = time.monotonic()
        await engine.stop(0.5)
        assert engine.exit_code() == -signal.SIGKILL
        assert time.monotonic() - started < 3.0
    run(scenario())


def test_killed_process_is_reported_and_fails_invocations(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = VllmEngine(spawnable(tmp_path))
        await engine.start()
        await wait_ready(engine)
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGKILL)
        for _ in range(100):
            if engine.exit_code() is not None:
                break
            await asyncio.sleep(0.02)
        assert engine.exit_code() == -signal.SIGKILL
        assert not await engine.probe()
        with pytest.raises(EngineError) as err:
            await engine.invoke("chat", {"question": "q"}, {}, 5.0)
        assert err.value.code == "engine_failed" and err.value.retryable and "SIGKILL" in err.value.message
        await engine.stop(1.0)
    run(scenario())


def test_unexpandable_model_path_fails_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        ex = ExecutorSpec(name="x", task="embed", engine="vllm", vllm={"model": "{package:no_such_pkg_murakkab}/m"})
        engine = VllmEngine(context(tmp_path, ex=ex))
        with pytest.raises(EngineError) as err:
            await engine.start()
        assert err.value.code == "engine_failed" and not err.value.retryable and "not installed" in err.value.message
        assert engine.pid is None
        missing = VllmEngine(context(tmp_path, model_dir=tmp_path / "nowhere"))
        with pytest.raises(EngineError, match="does not exist on this host"):
            await missing.start()
        assert missing.pid is None
        await engine.stop(1.0)
    run(scenario())
