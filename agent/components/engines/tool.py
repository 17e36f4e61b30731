"""The ``tool`` engine: a Python function ``module:function(inputs, knobs) -> outputs``.

Isolation ``thread`` imports the function into the agent at start and runs each call in
a worker thread of the component's own pool. Python cannot kill a thread: a call that
exceeds its timeout is answered with ``timeout`` while its thread runs on to its end
(tools are written to be bounded). Such threads are counted, and once every worker of
the pool is stuck the health probe fails, so the component ends up ``failed`` and the
controller restarts it with a fresh pool instead of queueing work behind dead threads.

Isolation ``subprocess`` runs each call in a child Python process (the agent's
interpreter or ``engine_python``), sending the request and reading the reply as msgpack
over stdin/stdout; the child's stdout is redirected to the component log so a ``print``
cannot corrupt the reply. A call past its timeout kills the child's process group. A
child that dies without replying (a signal, ``os._exit``, the OOM killer) is a crash of
the engine: the call fails as ``engine_failed`` (retryable on another replica) and
``exit_code`` reports it, so the component is marked failed and restarted.

When the agent runs as root, every child runs as the unprivileged engine account
(``agent.components.privileges``), with HOME in the component's work directory, and
``thread`` isolation is carried out as ``subprocess`` (the component log says so): a
thread of a root agent would run the tool as root.

A :class:`agent.tools.base.ToolError` is the input's fault: ``tool_error``, not retried.
Any other exception is a ``tool_error`` too (the tool is deterministic, another replica
would fail alike), with the exception's type and text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import os
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgpack

from agent.components.engines.base import Engine, EngineContext, EngineError
from agent.components.orphans import killpg_quietly
from agent.components.privileges import interpreter_problem
from agent.tools.base import ToolError

IMPORT_CHECK_TIMEOUT_S = 60.0  # importing a tool's module (OpenCV, numpy) in a fresh interpreter
MAX_REPLY_BYTES = 16 * 1024 * 1024  # far above what an invocation may return; a runaway child is cut off here
KILL_WAIT_S = 5.0
PROJECT_ROOT = str(Path(__file__).resolve().parents[3])  # so children find agent.tools.* from a source checkout

# The child process: import the entry point, read one request, write one reply, exit 0.
CHILD_SOURCE = r"""
import importlib, os, sys
reply_channel = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # the tool's prints go to the component log, not into the reply
import msgpack

def reply(obj):
    reply_channel.write(msgpack.packb(obj, use_bin_type=True))
    reply_channel.flush()

module_name, _, function_name = sys.argv[2].partition(":")
try:
    function = getattr(importlib.import_module(module_name), function_name)
    if not callable(function):
        raise TypeError(f"{sys.argv[2]} is a {type(function).__name__}, not a function")
except BaseException as exc:
    reply({"ok": False, "kind": "import", "message": f"{type(exc).__name__}: {exc}"})
    sys.exit(0)
if sys.argv[1] == "check":
    reply({"ok": True})
    sys.exit(0)
request = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
try:
    outputs = function(request["inputs"], request["knobs"])
except BaseException as exc:
    base = sys.modules.get("agent.tools.base")
    if base is not None and isinstance(exc, base.ToolError):
        reply({"ok": False, "kind": "tool_error", "message": exc.message})
    else:
        reply({"ok": False, "kind": "exception", "message": f"{type(exc).__name__}: {exc}"})
    sys.exit(0)
try:
    packed = msgpack.packb({"ok": True, "outputs": outputs}, use_bin_type=True)
except Exception as exc:
    reply({"ok": False, "kind": "bad_outputs", "message": f"outputs cannot be encoded: {type(exc).__name__}: {exc}"})
else:
    reply_channel.write(packed)
    reply_channel.flush()
"""


def load_entry_point(entry_point: str) -> Callable[..., Any]:
    """Import ``module:function``; raise EngineError naming the entry point and the cause."""
    module_name, _, function_name = entry_point.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except Exception as exc:
        raise EngineError("engine_failed", f"cannot import tool {entry_point}: {type(exc).__name__}: {exc}",
                          retryable=False) from None
    if not callable(function):
        raise EngineError("engine_failed", f"tool {entry_point} is a {type(function).__name__}, not a function",
                          retryable=False)
    return function


def _call(function: Callable[..., Any], inputs: dict[str, Any], knobs: dict[str, Any]) -> Any:
    return function(inputs, knobs)


def _as_engine_error(exc: BaseException) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, ToolError):
        return EngineError("tool_error", exc.message, retryable=False)
    return EngineError("tool_error", f"{type(exc).__name__}: {exc}", retryable=False)


class ToolEngine(Engine):
    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        if ctx.executor.tool is None:
            raise EngineError("engine_failed", f"executor {ctx.executor.name} has no 'tool' section", retryable=False)
        self.spec = ctx.executor.tool
        self.entry_point = self.spec.entry_point
        self.isolation = self.spec.isolation
        self.identity = ctx.identity
        if self.identity is not None and self.isolation == "thread":
            self.isolation = "subprocess"  # a thread of a root agent is root: the call runs as the engine user
        self.python = ctx.python or sys.executable
        self._function: Callable[..., Any] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stuck_threads = 0
        self._children: set[asyncio.subprocess.Process] = set()
        self._crash_code: int | None = None
        self._ready = False
        self._stopped = False

    # --- lifecycle ---------------------------------------------------------------------

    def _log(self, text: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with open(self.ctx.log_path, "a", encoding="utf-8") as log:
            log.write(f"{stamp} tool engine {self.ctx.component_id}: {text}\n")

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.identity is not None:
            env = self.identity.environment(env, self.ctx.work_dir)
        env.update(self.ctx.env)
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = PROJECT_ROOT + (os.pathsep + path if path else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    async def start(self) -> None:
        if self.identity is not None:
            problem = interpreter_problem(self.identity, self.python)
            if problem:
                raise EngineError("engine_failed", f"tool {self.entry_point}: {problem}; set engine_python to an "
                                  "interpreter that account can run", retryable=False)
        if self.isolation != self.spec.isolation:
            self._log(f"{self.spec.isolation} isolation: each call runs in a child process as "
                      f"{self.identity.describe() if self.identity else '?'} instead, because a thread of an "
                      "agent running as root would run the tool as root")
        if self.isolation == "thread":
            self._function = await asyncio.to_thread(load_entry_point, self.entry_point)
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.spec.max_concurrency, thread_name_prefix=f"tool-{self.ctx.component_id}")
        else:
            reply, code = await self._run_child("check", b"", IMPORT_CHECK_TIMEOUT_S)
            if reply is None or not reply.get("ok"):
                why = reply.get("message") if reply else f"the check process exited with code {code}"
                raise EngineError("engine_failed", f"cannot import tool {self.entry_point} with {self.python}: "
                                  f"{why}", retryable=False)
        self._ready = True
        self._log(f"ready: {self.entry_point} ({self.isolation} isolation, up to {self.spec.max_concurrency} "
                  "concurrent calls)")

    async def probe(self) -> bool:
        if not self._ready or self._stopped or self._crash_code is not None:
            return False
        return self._stuck_threads < self.spec.max_concurrency

    def exit_code(self) -> int | None:
        return self._crash_code

    async def stop(self, grace_s: float) -> None:
        self._stopped = True
        children = list(self._children)
        for child in children:
            _signal_group(child, signal.SIGTERM)
        if children:
            _, pending = await asyncio.wait([asyncio.ensure_future(c.wait()) for c in children], timeout=grace_s)
            for child in children:
                if child.returncode is None:
                    _signal_group(child, signal.SIGKILL)
            for task in pending:
                try:
                    await asyncio.wait_for(task, KILL_WAIT_S)
                except asyncio.TimeoutError:
                    pass
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._stuck_threads:
            self._log(f"stopped with {self._stuck_threads} worker thread(s) still running past their timeout")

    # --- invocations -------------------------------------------------------------------

    async def invoke(self, task: str, inputs: dict[str, Any], knobs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if self._stopped or not self._ready:
            raise EngineError("engine_failed", f"tool engine {self.ctx.component_id} is not running", retryable=True)
        if self.isolation == "thread":
            return await self._invoke_thread(inputs, knobs, timeout_s)
        return await self._invoke_child(inputs, knobs, timeout_s)

    async def _invoke_thread(self, inputs: dict[str, Any], knobs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self._pool is not None and self._function is not None
        future = self._pool.submit(_call, self._function, inputs, knobs)
        waiter = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait([waiter], timeout=timeout_s)
        except asyncio.CancelledError:
            self._abandon(future, waiter)
            raise
        if not done:
            self._abandon(future, waiter)
            raise EngineError("timeout", f"tool {self.entry_point} did not return within {timeout_s:g} s (its "
                              "thread cannot be killed and runs on)", retryable=False)
        exc = future.exception()
        if exc is not None:
            raise _as_engine_error(exc)
        return future.result()

    def _abandon(self, future: concurrent.futures.Future[Any], waiter: asyncio.Future[Any]) -> None:
        """Stop waiting for a call; if its thread already runs it, count it as stuck until it ends."""
        not_started = future.cancel()  # succeeds only while the call waits for a worker
        waiter.cancel()
        if not_started:
            return
        self._stuck_threads += 1
        loop = asyncio.get_running_loop()

        def ended(_: concurrent.futures.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(self._unstick)
            except RuntimeError:  # the loop has closed: nobody counts any more
                pass

        future.add_done_callback(ended)

    async def _invoke_child(self, inputs: dict[str, Any], knobs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        request = msgpack.packb({"inputs": inputs, "knobs": knobs}, use_bin_type=True)
        reply, code = await self._run_child("call", request, timeout_s)
        if reply is None:
            if code is None:
                raise EngineError("timeout", f"tool {self.entry_point} did not return within {timeout_s:g} s; its "
                                  "process was killed", retryable=False)
            if self._crash_code is None:
                self._crash_code = code
                self._log(f"tool process exited with code {code} without replying: treating as an engine crash")
            raise EngineError("engine_failed", f"tool process exited with code {code} without replying "
                              f"(see log {self.ctx.log_path})", retryable=True)
        if reply.get("ok"):
            outputs = reply.get("outputs")
            if not isinstance(outputs, dict):
                raise EngineError("engine_failed", f"tool {self.entry_point} returned a "
                                  f"{type(outputs).__name__}, not a map of outputs", retryable=False)
            return outputs
        kind, message = reply.get("kind"), str(reply.get("message", ""))
        if kind == "bad_outputs":
            raise EngineError("engine_failed", f"tool {self.entry_point}: {message}", retryable=False)
        if kind == "import":
            raise EngineError("engine_failed", f"cannot import tool {self.entry_point}: {message}", retryable=True)
        raise EngineError("tool_error", message, retryable=False)

    async def _run_child(self, mode: str, request: bytes, timeout_s: float) -> tuple[dict[str, Any] | None, int | None]:
        """Run one child; (reply, exit code), with code None when it was killed for the timeout."""
        with open(self.ctx.log_path, "ab") as log:
            child = await asyncio.create_subprocess_exec(
                self.python, "-c", CHILD_SOURCE, mode, self.entry_point, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, cwd=self.ctx.work_dir, env=self._child_env(),
                start_new_session=True, **(self.identity.spawn_kwargs() if self.identity is not None else {}))
        self._children.add(child)
        try:
            data = await asyncio.wait_for(self._exchange(child, request), timeout_s)
        except asyncio.TimeoutError:
            _signal_group(child, signal.SIGKILL)
            await _reap(child)
            return None, None
        except BaseException:
            _signal_group(child, signal.SIGKILL)
            await _reap(child)
            raise
        finally:
            self._children.discard(child)
        code = child.returncode
        if not data:
            return None, code
        try:
            reply = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise EngineError("engine_failed", f"tool {self.entry_point} sent an unreadable reply "
                              f"({len(data)} bytes): {type(exc).__name__}", retryable=False) from None
        return (reply if isinstance(reply, dict) else None), code

    async def _exchange(self, child: asyncio.subprocess.Process, request: bytes) -> bytes:
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(request)
            await child.stdin.drain()
            child.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child died before reading; its exit status tells why
        chunks, size = [], 0
        while True:
            chunk = await child.stdout.read(1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                _signal_group(child, signal.SIGKILL)
                await _reap(child)
                raise EngineError("output_too_large", f"tool {self.entry_point} replied with more than "
                                  f"{MAX_REPLY_BYTES} bytes", retryable=False)
            chunks.append(chunk)
        await child.wait()
        return b"".join(chunks)


def _signal_group(child: asyncio.subprocess.Process, sig: int) -> None:
    if child.returncode is None:
        killpg_quietly(child.pid, sig)  # the child leads its own session: this reaches anything it spawned


async def _reap(child: asyncio.subprocess.Process) -> None:
    try:
        await asyncio.wait_for(child.wait(), KILL_WAIT_S)
    except asyncio.TimeoutError:
        pass
