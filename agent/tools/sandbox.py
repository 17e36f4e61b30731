"""The code-execution tool: run a candidate program against assert tests in a contained subprocess.

Candidates are model-written code, and whoever writes the prompt can make it hostile. By default
(knob ``sandbox: bubblewrap``) each run is a fresh ``python -I -B`` harness (the agent's base
interpreter, standard library only) under bubblewrap (``agent.tools.bwrap``): new user, PID, network,
IPC, UTS and mount namespaces, uid 65534 without capabilities, no network at all, a read-only view of
only what the interpreter needs, private size-bounded ``/work`` and ``/tmp`` as the only writable
places, a seccomp filter refusing process creation and a few kernel interfaces. It cannot see the
agent's files, keys or state, reach a socket of the host, signal or trace a process outside, or leave
a process or file behind. A root caller runs bwrap as uid 65534, so the candidate is nobody outside
the namespaces too; where that uid cannot reach the interpreter (a Python under ``/root``) bwrap runs
as root: still uid 65534 inside and without capabilities, but root-owned outside, so ``/proc`` is not
mounted and a warning names the fix. Inside, as before, the harness sets resource limits (address
space, CPU time, file size, open files, no core dumps, no new processes) as its first act, before any
candidate code is read, rather than in ``preexec_fn`` (the agent runs tools in threads, and
``preexec_fn`` can deadlock a forked child of a threaded parent), and the parent kills the whole run
at a wall-clock deadline. Whatever the candidate does, the result is a ``test_result``; only tests
that are not Python raise ToolError (those come from the user).

Whether bubblewrap works here is found out once per process, by its first run (the harness says
when it has started, before any candidate code runs). Where it cannot run (not installed, no
unprivileged user namespaces, an interpreter it cannot show), the tool raises
SandboxUnavailable, a fault of the deployment, saying what is missing: it does not fall back on its
own. A catalog that accepts less gives the executor the knob ``sandbox`` with values ``[rlimits]``:
the harness then runs directly on the host in a temporary directory with the same limits, which
contains accidents, not an attacker (the candidate sees the host's files and network as the agent's
user, and as root it can fork past the process limit through ctypes). ``MURAKKAB_BWRAP`` names
another bwrap executable.

Not covered: kernel exploits through the system calls the filter allows; CPU and memory use beyond
the per-process limits of each run (no cgroup); reading what the read-only view shows (the
interpreter's prefix and system libraries); timing and other side channels; and the verdict itself:
the candidate shares the harness's process, so it can write to the result descriptor and claim tests
it did not pass.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.components.orphans import killpg_quietly
from agent.tools import bwrap
from agent.tools.base import ToolError, float_knob, int_knob, text_input
from agent.tools.bwrap import Layout

logger = logging.getLogger(__name__)

MAX_CODE_CHARS = 1_000_000
MAX_TESTS_CHARS = 1_000_000
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 64
MAX_CAPTURE_BYTES = 64 * 1024  # per stream: the candidate may print without end
MAX_ERROR_CHARS = 2000
SANDBOX_MODES = ("bubblewrap", "rlimits")
BWRAP_ENV = "MURAKKAB_BWRAP"  # another bwrap executable (a name on PATH or a path)
PROBE_TIMEOUT_S = 10
PROBE_RETRY_S = 60.0  # bubblewrap failing here is tried again after this long (an administrator may fix it)

# Runs as `python -I -B -c HARNESS WORK_DIR RESULT_FD LIMITS_JSON`; reports JSON lines on RESULT_FD:
# {"event": "start"}, {"event": "code", "error"}, {"event": "test-start", "index"},
# {"event": "test", "index", "ok", "error"}, {"event": "done", "runtime_s"}. Everything it needs is bound
# before the candidate runs, so a candidate that rebinds json or os cannot break the reporting by accident.
HARNESS = r'''
import ast, json, os, resource, sys, time

def main():
    work, fd, limits = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    os.closerange(3, fd)  # nothing but the result pipe crosses into the candidate
    os.closerange(fd + 1, 1 << 16)
    dumps, write, perf = json.dumps, os.write, time.perf_counter

    def report(**event):
        data = (dumps(event) + "\n").encode()
        while data:
            data = data[write(fd, data):]

    report(event="start")  # the sandbox works; nothing of the candidate has run yet

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


class SandboxUnavailable(Exception):
    """This host cannot contain untrusted code as the executor asks: a fault of the deployment, not the input."""


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
    (wall clock for the whole run, default 5), ``memory_bytes`` (address space, default 256 MiB) and
    ``sandbox``: ``bubblewrap`` (the default) or ``rlimits``, the weaker mode a catalog must choose
    explicitly. ``runtime_s`` is the time the code and tests took inside the sandbox (interpreter start
    excluded), or the wall time until the run was stopped. Raises SandboxUnavailable when bubblewrap
    is asked for and cannot run here.
    """
    code = text_input(inputs, "code", MAX_CODE_CHARS)
    tests = text_input(inputs, "tests", MAX_TESTS_CHARS)
    timeout_s = float_knob(knobs, "timeout_s", DEFAULT_TIMEOUT_S, 0.1, 600.0)
    memory_bytes = int_knob(knobs, "memory_bytes", DEFAULT_MEMORY_BYTES, 64 * 1024 * 1024, 64 * 1024 ** 3)
    mode = (knobs or {}).get("sandbox") or "bubblewrap"
    if mode not in SANDBOX_MODES:
        raise ToolError(f"knob 'sandbox': expected one of {', '.join(SANDBOX_MODES)}, got {mode!r}")
    sources = _test_sources(tests)
    cpu_s = math.ceil(timeout_s) + 1
    limits = _limits(memory_bytes, cpu_s)
    if mode == "bubblewrap":
        run = _run_contained(code, tests, limits, timeout_s)
    else:
        if not sys.executable:
            raise ToolError("the agent cannot locate its Python interpreter to run code in")
        with tempfile.TemporaryDirectory(prefix="murakkab-sandbox-", ignore_cleanup_errors=True) as work:
            (Path(work) / "candidate.py").write_text(code, encoding="utf-8", errors="replace")
            (Path(work) / "tests.py").write_text(tests, encoding="utf-8", errors="replace")
            run = _run(lambda fd: [sys.executable, "-I", "-B", "-c", HARNESS, work, str(fd), json.dumps(limits)],
                       timeout_s, cwd=work, env=_environment())
    return {"result": _result(run, sources, timeout_s, cpu_s)}


def _limits(memory_bytes: int, cpu_s: int) -> list[list[Any]]:
    return [["RLIMIT_AS", memory_bytes, memory_bytes], ["RLIMIT_CPU", cpu_s, cpu_s + 1],
            ["RLIMIT_FSIZE", MAX_FILE_BYTES, MAX_FILE_BYTES], ["RLIMIT_NOFILE", MAX_OPEN_FILES, MAX_OPEN_FILES],
            ["RLIMIT_CORE", 0, 0]]


def _environment() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8")}


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


# --- bubblewrap ---------------------------------------------------------------------------------------------

# What worked, or failed and why, per (bwrap, euid, interpreter): a process finds out once (a failure is
# retried after PROBE_RETRY_S). Dictionary assignments only, so threads calling at once are safe.
_layouts: dict[tuple[str, int, str], Layout] = {}
_failures: dict[tuple[str, int, str], tuple[float, str]] = {}


def sandbox_layout() -> Layout:
    """How this process runs candidates under bubblewrap, found with a trivial candidate if no run has yet.

    SandboxUnavailable says what is missing.
    """
    key, _ = _layout_choices()
    if key not in _layouts:
        run = _run_contained("", "assert True", _limits(DEFAULT_MEMORY_BYTES, PROBE_TIMEOUT_S + 1), PROBE_TIMEOUT_S)
        if key not in _layouts:
            raise SandboxUnavailable(_unavailable(f"a trivial candidate did not start within {PROBE_TIMEOUT_S} s "
                                                  f"({_failure(run)})"))
    return _layouts[key]


def _layout_choices() -> tuple[tuple[str, int, str], list[Layout]]:
    """The cache key and the layouts to try, best first.

    A root caller first runs bwrap as uid 65534, so that nothing inside is root even outside the
    namespaces; where that uid cannot reach the interpreter, bwrap runs as root (uid 65534 inside,
    root outside, without /proc) and the layout's ``note`` and a warning say why. Each layout with
    /proc has a fallback without it: inside a hardened systemd unit (``ProtectKernelTunables=``
    over-mounts /proc/sys) the kernel refuses a new proc mount in a user namespace, and a sandbox
    without /proc still contains the candidate.
    """
    name = os.environ.get(BWRAP_ENV) or "bwrap"
    path = shutil.which(name)
    if path is None:
        raise SandboxUnavailable(_unavailable(f"bubblewrap ({name}) not found"
                                              + (f" (set by {BWRAP_ENV})" if os.environ.get(BWRAP_ENV) else "")))
    try:
        bwrap.seccomp_program()
    except ValueError as exc:
        raise SandboxUnavailable(_unavailable(str(exc))) from None
    python, binds = bwrap.interpreter_view()
    root = os.geteuid() == 0
    preferred = [Layout(path, python, binds, bwrap.SANDBOX_UID, True)] if root else []
    preferred.append(Layout(path, python, binds, None, not root))
    choices = []
    for layout in preferred:
        choices.append(layout)
        if layout.mount_proc:
            choices.append(dataclasses.replace(layout, mount_proc=False))
    return (path, os.geteuid(), python), choices


def _unavailable(reason: str) -> str:
    return (f"the code sandbox cannot contain untrusted code on this host: {reason}. Install Debian's bubblewrap "
            "(apt-get install bubblewrap) on a kernel that allows unprivileged user namespaces, or accept the "
            "weaker mode (resource limits only, no isolation from the host) by giving the executor the knob "
            "sandbox with values [rlimits] in the catalog")


def _run_contained(code: str, tests: str, limits: list[list[Any]], timeout_s: float) -> _Run:
    """One run under bubblewrap; the first run of a process also finds the layout that works here.

    A layout works when the harness reported that it started; until then no candidate code has run,
    so trying the next layout with the same candidate is safe.
    """
    key, choices = _layout_choices()
    if key in _layouts:
        return _run_bwrap(_layouts[key], code, tests, limits, timeout_s)
    failed = _failures.get(key)
    if failed is not None and time.monotonic() - failed[0] < PROBE_RETRY_S:
        raise SandboxUnavailable(_unavailable(failed[1]))
    reasons: list[str] = []
    for layout in choices:
        try:
            run = _run_bwrap(layout, code, tests, limits, timeout_s)
        except OSError as exc:  # bwrap not executable by that uid, no memfd, out of processes
            reasons.append(f"bwrap as uid {layout.outside_uid} did not start: {type(exc).__name__}: {exc}")
            continue
        if any(event.get("event") == "start" for event in run.events):
            if reasons:
                without_proc = "" if layout.mount_proc else ", without /proc"
                layout = dataclasses.replace(layout, note=f"as uid {layout.outside_uid} outside the namespaces"
                                                          f"{without_proc}, because {reasons[0]}")
                logger.warning("code sandbox: bubblewrap runs candidates %s; make the interpreter %s readable by "
                               "uid %d for the stronger mode", layout.note, layout.python, bwrap.SANDBOX_UID)
            _layouts[key] = layout
            _failures.pop(key, None)
            return run
        if run.timed_out:
            return run  # too slow to say whether it works: a result now, and the next run tries again
        reasons.append(f"bwrap as uid {layout.outside_uid} failed: {_failure(run)}")
    _failures[key] = (time.monotonic(), "; ".join(reasons))
    raise SandboxUnavailable(_unavailable(_failures[key][1]))


def _failure(run: _Run) -> str:
    tail = run.stderr.decode("utf-8", "replace").strip()
    if run.timed_out:
        return "timed out"
    return tail.splitlines()[-1][:300] if tail else f"exit status {run.returncode} and no message"


def _run_bwrap(layout: Layout, code: str, tests: str, limits: list[list[Any]], timeout_s: float) -> _Run:
    """Run the harness under bubblewrap; candidate, tests and the seccomp filter enter through memory files."""
    fds: list[int] = []
    info_read, info_write = os.pipe()
    try:
        os.set_blocking(info_read, False)
        for name, data in (("candidate.py", code.encode("utf-8", "replace")),
                           ("tests.py", tests.encode("utf-8", "replace")), ("seccomp", bwrap.seccomp_program())):
            fd = os.memfd_create(f"murakkab-sandbox-{name}")
            fds.append(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
        files = [(fds[0], "candidate.py"), (fds[1], "tests.py")]
        env = {"PATH": "/usr/bin:/bin", "LANG": os.environ.get("LANG", "C.UTF-8")}

        def argv(result_fd: int) -> list[str]:
            inside = [layout.python, "-I", "-B", "-c", HARNESS, bwrap.WORK_DIR, str(result_fd), json.dumps(limits)]
            return bwrap.command(layout, inside, env, files, fds[2], info_write)

        user = {} if layout.drop_to_uid is None else {
            "user": layout.drop_to_uid, "group": layout.drop_to_uid, "extra_groups": []}
        run = _run(argv, timeout_s, cwd="/", env={}, pass_fds=(*fds, info_write),
                   before_kill=lambda proc: _stop_sandbox_init(proc, info_read), **user)
    finally:
        for fd in (*fds, info_read, info_write):
            os.close(fd)
    if 128 < run.returncode <= 128 + 64:
        run.returncode = 128 - run.returncode  # bwrap exits 128 + N when the harness was killed by signal N
    return run


def _stop_sandbox_init(proc: subprocess.Popen[bytes], info_fd: int) -> None:
    """Kill the sandbox's init (its PID namespace with it) while bwrap lives, so bwrap reaps it.

    Killing bwrap first would leave its child to the host's init, a zombie where that init does not
    reap (an agent that is PID 1 of a container). bwrap wrote the init's pid to ``info_fd``; a pidfd
    and its parent being bwrap make sure the signal reaches that process and no other.
    """
    if _exited(proc.pid):
        return
    try:
        child = int(json.loads(os.read(info_fd, 65536))["child-pid"])
        pidfd = os.pidfd_open(child)
    except (OSError, ValueError, KeyError, TypeError):
        return  # bwrap has not started its child, or the child is gone
    try:
        with open(f"/proc/{child}/stat", "rb") as f:
            parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        if parent != proc.pid:
            return
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        return
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + 2.0
    while not _exited(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.005)


# --- one run ----------------------------------------------------------------------------------------------


def _run(argv: Callable[[int], list[str]], timeout_s: float, *, pass_fds: tuple[int, ...] = (),
         before_kill: Callable[[subprocess.Popen[bytes]], None] | None = None, **popen: Any) -> _Run:
    """Start ``argv(result_fd)`` and collect its reports and output until it ends or the deadline passes.

    ``before_kill`` runs before the process group is killed (the process unreaped, maybe exited)."""
    run = _Run()
    read_fd, write_fd = os.pipe()
    started_s = time.monotonic()
    try:
        proc = subprocess.Popen(argv(write_fd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(write_fd, *pass_fds), start_new_session=True,
                                **popen)
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
            if before_kill is not None:
                before_kill(proc)
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
