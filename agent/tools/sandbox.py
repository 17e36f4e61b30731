"""The code-execution tool: run a candidate program against assert tests in a bounded subprocess.

Candidates are model-written code, so they loop, allocate without end, call ``sys.exit``, fork or fill
the disk by accident. Each run gets a fresh ``python -I -B`` interpreter (the agent's own), an empty
environment but PATH and LANG, a temporary working directory removed afterwards, its own session,
resource limits (address space, CPU time, file size, open files, no core dumps, no new processes) and
a wall-clock deadline after which its whole process group is killed. Whatever the candidate does, the
result is a ``test_result``; only tests that are not Python raise ToolError (those come from the user).

The limits are set by a trusted harness as its first act, before any candidate code is read, rather
than in ``preexec_fn``: the agent runs tools in threads, and ``preexec_fn`` can deadlock a forked child
of a threaded parent. This contains accidents, not an attacker: code that calls ``fork`` through
ctypes while the agent runs as root escapes the process limit. Run the agent unprivileged or in a
container where untrusted code is expected.
"""

from __future__ import annotations

import ast
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.components.orphans import killpg_quietly
from agent.tools.base import ToolError, float_knob, int_knob, text_input

MAX_CODE_CHARS = 1_000_000
MAX_TESTS_CHARS = 1_000_000
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 64
MAX_CAPTURE_BYTES = 64 * 1024  # per stream: the candidate may print without end
MAX_ERROR_CHARS = 2000

# Runs as `python -I -B -c HARNESS WORK_DIR RESULT_FD LIMITS_JSON`; reports JSON lines on RESULT_FD:
# {"event": "code", "error"}, {"event": "test-start", "index"}, {"event": "test", "index", "ok", "error"},
# {"event": "done", "runtime_s"}. Everything it needs is bound before the candidate runs, so a candidate
# that rebinds json or os cannot break the reporting by accident.
HARNESS = r'''
import ast, json, os, resource, sys, time

def main():
    work, fd, limits = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    dumps, write, perf = json.dumps, os.write, time.perf_counter

    def report(**event):
        data = (dumps(event) + "\n").encode()
        while data:
            data = data[write(fd, data):]

    with open(os.path.join(work, "candidate.py"), encoding="utf-8") as f:
        code = f.read()
    with open(os.path.join(work, "tests.py"), encoding="utf-8") as f:
        tests = f.read()
    for name, soft, hard in limits:
        which = getattr(resource, name)
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))
    memory_bytes = dict((n, s) for n, s, _ in limits)["RLIMIT_AS"]
    file_bytes = dict((n, s) for n, s, _ in limits)["RLIMIT_FSIZE"]
    _forbid_processes()

    def describe(exc):
        try:
            text = str(exc)
        except BaseException:
            text = "<unprintable>"
        name = type(exc).__name__
        if isinstance(exc, MemoryError):
            return f"MemoryError: out of memory (the sandbox allows {memory_bytes // 2**20} MiB)"
        if isinstance(exc, OSError) and exc.errno == 27:
            return f"{name}: {text} (the sandbox allows files up to {file_bytes // 2**20} MiB)"
        if isinstance(exc, SystemExit):
            return f"SystemExit: the program called exit({text})"
        return f"{name}: {text}" if text else name

    namespace = {"__name__": "candidate", "__builtins__": __builtins__}
    statements = ast.parse(tests, "<tests>").body
    started = perf()
    try:
        compiled = compile(code, "<candidate>", "exec")
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        report(event="code", error=f"SyntaxError: {exc.msg}{where}")
        report(event="done", runtime_s=perf() - started)
        return
    except BaseException as exc:
        report(event="code", error=f"the code does not compile: {describe(exc)}")
        report(event="done", runtime_s=perf() - started)
        return
    try:
        exec(compiled, namespace)
    except BaseException as exc:
        report(event="code", error=describe(exc))
        report(event="done", runtime_s=perf() - started)
        return
    index = 0
    for stmt in statements:
        source = (ast.get_source_segment(tests, stmt) or "")[:200]
        is_test = isinstance(stmt, ast.Assert)
        if is_test:
            report(event="test-start", index=index)
        try:
            exec(compile(ast.Module([stmt], []), "<tests>", "exec"), namespace)
            error = ""
        except AssertionError as exc:
            error = f"failed: {source}" + (f" ({describe(exc)})" if str(exc) else "")
        except BaseException as exc:
            error = f"raised {describe(exc)}: {source}"
        if is_test:
            report(event="test", index=index, ok=not error, error=error)
            index += 1
        elif error:
            report(event="setup", error=f"tests line {stmt.lineno} {error}")
    report(event="done", runtime_s=perf() - started)

def _forbid_processes():
    """Process creation fails with a clear message; RLIMIT_NPROC = 0 enforces it for unprivileged users."""
    import _posixsubprocess
    def refuse(*args, **kwargs):
        raise PermissionError("creating processes is not allowed in the sandbox")
    for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "killpg",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    own, real_kill = os.getpid(), os.kill
    def kill(pid, sig):
        if pid != own:
            raise PermissionError("signalling other processes is not allowed in the sandbox")
        return real_kill(pid, sig)
    os.kill = kill
    _posixsubprocess.fork_exec = refuse
    if "subprocess" in sys.modules:
        sys.modules["subprocess"]._fork_exec = refuse
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass

main()
'''


@dataclass
class _Run:
    """What the parent saw of one harness run."""

    events: list[dict[str, Any]] = field(default_factory=list)
    stdout: bytes = b""
    stderr: bytes = b""
    returncode: int = 0
    timed_out: bool = False
    wall_s: float = 0.0


def execute_code(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """Run ``inputs["code"]`` then each ``assert`` of ``inputs["tests"]``; output ``result`` (a test_result).

    Tests are Python source: every top-level ``assert`` is one test, other statements (imports,
    helpers) run in order as setup. Each test runs even if an earlier one failed. Knobs: ``timeout_s``
    (wall clock for the whole run, default 5) and ``memory_bytes`` (address space, default 256 MiB).
    ``runtime_s`` is the time the code and tests took inside the sandbox (interpreter start excluded),
    or the wall time until the run was stopped.
    """
    code = text_input(inputs, "code", MAX_CODE_CHARS)
    tests = text_input(inputs, "tests", MAX_TESTS_CHARS)
    timeout_s = float_knob(knobs, "timeout_s", DEFAULT_TIMEOUT_S, 0.1, 600.0)
    memory_bytes = int_knob(knobs, "memory_bytes", DEFAULT_MEMORY_BYTES, 64 * 1024 * 1024, 64 * 1024 ** 3)
    sources = _test_sources(tests)
    if not sys.executable:
        raise ToolError("the agent cannot locate its Python interpreter to run code in")
    cpu_s = math.ceil(timeout_s) + 1
    limits = [["RLIMIT_AS", memory_bytes, memory_bytes], ["RLIMIT_CPU", cpu_s, cpu_s + 1],
              ["RLIMIT_FSIZE", MAX_FILE_BYTES, MAX_FILE_BYTES], ["RLIMIT_NOFILE", MAX_OPEN_FILES, MAX_OPEN_FILES],
              ["RLIMIT_CORE", 0, 0]]
    with tempfile.TemporaryDirectory(prefix="murakkab-sandbox-", ignore_cleanup_errors=True) as work:
        (Path(work) / "candidate.py").write_text(code, encoding="utf-8", errors="replace")
        (Path(work) / "tests.py").write_text(tests, encoding="utf-8", errors="replace")
        run = _run(work, limits, timeout_s)
    return {"result": _result(run, sources, timeout_s, cpu_s)}


def _test_sources(tests: str) -> list[str]:
    """The source of each ``assert`` in ``tests`` (what a failure message quotes); ToolError if none or not Python."""
    try:
        module = ast.parse(tests, "<tests>")
    except SyntaxError as exc:
        where = f"tests line {exc.lineno}" if exc.lineno else "tests"
        raise ToolError(f"{where}: not valid Python: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ToolError(f"tests are not valid Python: {type(exc).__name__}: {exc}") from None
    sources = [(ast.get_source_segment(tests, stmt) or "")[:200] for stmt in module.body
               if isinstance(stmt, ast.Assert)]
    if not sources:
        raise ToolError("tests contain no top-level assert statements (write one `assert ...` per test)")
    return sources


def _run(work: str, limits: list[list[Any]], timeout_s: float) -> _Run:
    """Start the harness in ``work`` and collect its reports and output until it ends or the deadline passes."""
    run = _Run()
    read_fd, write_fd = os.pipe()
    started_s = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", HARNESS, work, str(write_fd), json.dumps(limits)],
            cwd=work, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8")},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(write_fd,), start_new_session=True)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    results = b""
    deadline = started_s + timeout_s
    with selectors.DefaultSelector() as selector:
        assert proc.stdout is not None and proc.stderr is not None
        for fd, name in ((proc.stdout.fileno(), "stdout"), (proc.stderr.fileno(), "stderr"), (read_fd, "results")):
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, name)
        try:
            while not run.timed_out:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    run.timed_out = True
                    break
                if not selector.get_map():
                    if _exited(proc.pid):
                        break
                    time.sleep(min(remaining, 0.02))
                    continue
                for key, _ in selector.select(min(remaining, 0.5)):
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        selector.unregister(key.fd)
                    elif key.data == "results":
                        results += chunk  # a few short lines per test; bounded by the deadline
                    elif key.data == "stdout":
                        run.stdout = run.stdout + chunk[:MAX_CAPTURE_BYTES - len(run.stdout)]
                    else:
                        run.stderr = (run.stderr + chunk)[-MAX_CAPTURE_BYTES:]
        finally:
            # kill the group while the leader is unreaped, so its id cannot have been reused by another group
            killpg_quietly(proc.pid, signal.SIGKILL)
            run.returncode = proc.wait()
            run.wall_s = time.monotonic() - started_s
            proc.stdout.close()
            proc.stderr.close()
            os.close(read_fd)
    for line in results.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a candidate wrote to the result descriptor; ignore what is not ours
        if isinstance(event, dict):
            run.events.append(event)
    return run


def _exited(pid: int) -> bool:
    """True once ``pid`` has exited, without reaping it (so its process group id stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _result(run: _Run, sources: list[str], timeout_s: float, cpu_s: int) -> dict[str, Any]:
    """The test_result of a run: counts from the harness's reports, the first error, how the run ended."""
    total = len(sources)
    errors: list[str] = []
    passed_tests = 0
    running: int | None = None
    done: dict[str, Any] | None = None
    for event in run.events:
        kind = event.get("event")
        if kind in ("code", "setup"):
            errors.append(str(event.get("error", "")))
        elif kind == "test-start":
            running = event.get("index") if isinstance(event.get("index"), int) else None
        elif kind == "test":
            running = None
            if event.get("ok") is True:
                passed_tests += 1
            else:
                errors.append(f"test {_ordinal(event.get('index'))} of {total} {event.get('error', '')}")
        elif kind == "done":
            done = event
    passed_tests = min(passed_tests, total)
    if done is None:
        errors.append(_ending(run, sources, running, timeout_s, cpu_s))
    error = errors[0] if errors else ""
    if done is None and len(errors) > 1:
        error += f"; then {errors[-1]}"
    runtime_s = done.get("runtime_s") if done is not None else None
    if isinstance(runtime_s, bool) or not isinstance(runtime_s, (int, float)) or not math.isfinite(runtime_s) \
            or runtime_s < 0:
        runtime_s = run.wall_s
    return {"passed": done is not None and not errors and passed_tests == total, "passed_tests": passed_tests,
            "total_tests": total, "error": error[:MAX_ERROR_CHARS], "runtime_s": round(float(runtime_s), 6)}


def _ending(run: _Run, sources: list[str], running: int | None, timeout_s: float, cpu_s: int) -> str:
    """Why a run ended before the harness said it was done."""
    where = ""
    if running is not None and 0 <= running < len(sources):
        where = f" while running test {running + 1} of {len(sources)}: {sources[running]}"
    if run.timed_out:
        return f"timed out after {timeout_s:g} s{where}"
    code = run.returncode
    if code == -signal.SIGXCPU:
        message = f"exceeded the CPU time limit of {cpu_s} s{where}"
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        message = f"the program was killed by {name}{where}"
    else:
        message = f"the program exited with status {code} before the tests finished{where}"
    tail = run.stderr.decode("utf-8", "replace").strip()[-500:]
    return f"{message}; stderr: {tail}" if tail else message


def _ordinal(index: Any) -> str:
    return str(index + 1) if isinstance(index, int) else "?"
