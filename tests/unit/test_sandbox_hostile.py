"""Hostile candidates in the code sandbox are contained, and the tool refuses where it cannot contain them.

Each attack is a candidate whose tests pass only when it was contained: it reads files outside its
work directory (``/etc/shadow``, a planted agent key and state, the agent's source), connects to a
socket of the host, forks without end, writes outside, signals the agent, or tries ctypes tricks.
The assertions here then check the host side: the listener saw no connection, the file outside was
not written, the agent and a sentinel process are alive, no process of the run is left.

Tests that need bubblewrap are skipped with the reason where it cannot run, unless
``MURAKKAB_REQUIRE_SANDBOX=1`` (``make test`` sets it) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.tools import sandbox as sandbox_module
from agent.tools.base import ToolError
from agent.tools.bwrap import SANDBOX_UID
from agent.tools.sandbox import SandboxUnavailable, execute_code, sandbox_layout
from common.workflow.loader import load_catalog_file

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"


def require_bubblewrap() -> None:
    """Skip (or fail, under MURAKKAB_REQUIRE_SANDBOX=1) where bubblewrap cannot run here."""
    try:
        sandbox_layout()
    except SandboxUnavailable as exc:
        if os.environ.get("MURAKKAB_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"MURAKKAB_REQUIRE_SANDBOX=1 but {exc}")
        pytest.skip(str(exc))


@pytest.fixture
def bubblewrap() -> None:
    require_bubblewrap()


def run(code: str, tests: str, **knobs: Any) -> dict[str, Any]:
    return execute_code({"code": code, "tests": tests}, knobs)["result"]


def assert_contained(result: dict[str, Any], total: int) -> None:
    assert result["error"] == "" and result["passed"] is True, result["error"]
    assert result["passed_tests"] == total


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def processes_named(comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def sentinel() -> Iterator[subprocess.Popen[bytes]]:
    """A process of the agent's user that a candidate would like to kill."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


# --- reading -------------------------------------------------------------------------------------------------

ATTEMPT_READ = """
def attempt_read(path):
    try:
        with open(path, "rb") as f:
            return "read %d bytes" % len(f.read())
    except OSError as exc:
        return type(exc).__name__
"""


def test_files_outside_the_work_directory_are_not_there(bubblewrap: None, tmp_path: Path) -> None:
    state = tmp_path / "var-lib-murakkab"
    (state / "keys").mkdir(parents=True)
    (state / "keys" / "agent.key_secret").write_text("private key material\n")
    (state / "state.db").write_bytes(b"SQLite format 3\x00")
    assert Path("/etc/shadow").exists()
    paths = ["/etc/shadow", "/etc/passwd", str(state / "keys" / "agent.key_secret"), str(state / "state.db"),
             str(ROOT / "tests" / "keys.py"), str(ROOT / "agent" / "tools" / "sandbox.py"), "/root/.bash_history",
             f"/proc/{os.getpid()}/environ", "/var/lib/murakkab/controller/keys/server.key_secret"]
    tests = "".join(f"assert attempt_read({p!r}) == 'FileNotFoundError'\n" for p in paths)
    tests += f"import os\nassert not os.path.exists({str(state)!r}) and not os.path.exists({str(ROOT)!r})\n"
    tests += "assert not os.path.exists('/home') and not os.path.exists('/var')\n"
    assert_contained(run(ATTEMPT_READ, tests), len(paths) + 2)


def test_the_sandbox_shows_a_small_read_only_world(bubblewrap: None) -> None:
    probe = f"""
import os, resource, socket, sys
assert sorted(os.environ) in (["LANG", "PATH", "PWD"], ["LANG", "LC_CTYPE", "PATH", "PWD"]), sorted(os.environ)
assert os.getcwd() == "/work" and sorted(os.listdir("/work")) == ["candidate.py", "tests.py"]
assert (os.getuid(), os.getgid(), os.geteuid()) == ({SANDBOX_UID}, {SANDBOX_UID}, {SANDBOX_UID})
assert set(os.listdir("/")) <= {{"work", "tmp", "dev", "proc", "etc", "usr", "lib", "lib64", "root", "opt"}}
assert os.listdir("/etc") == ["ld.so.cache"]
assert socket.gethostname() == "sandbox" and [name for _, name in socket.if_nameindex()] == ["lo"]
assert [fd for fd in range(64) if _open(fd)] == [0, 1, 2, int(sys.argv[2])]
assert sys.flags.isolated == 1 and not any(p.startswith({str(ROOT)!r}) for p in sys.path)
assert resource.getrlimit(resource.RLIMIT_AS) == (256 * 2**20, 256 * 2**20)
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0) and resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 64
assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == 16 * 2**20 and resource.getrlimit(resource.RLIMIT_CPU)[0] == 6
assert _status("Seccomp") in ("2", None) and _status("CapEff") in ("0000000000000000", None)
"""
    helpers = """
import os
def _open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
def _status(field):
    try:
        lines = open("/proc/self/status").read().splitlines()
    except OSError:
        return None  # no /proc where bwrap runs as root (see agent.tools.bwrap.command)
    return next(line.split(":", 1)[1].strip() for line in lines if line.startswith(field + ":"))
"""
    assert_contained(run(helpers, probe), 12)


# --- network -------------------------------------------------------------------------------------------------

def test_no_connection_reaches_a_socket_of_the_host(bubblewrap: None, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    unix_path = str(tmp_path / "agent.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen()
    unix.setblocking(False)
    port = listener.getsockname()[1]
    code = f"""
import socket
def tcp():
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__
def unix():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect({unix_path!r})
        return "connected"
    except OSError as exc:
        return type(exc).__name__
def resolve():
    try:
        return socket.getaddrinfo("example.com", 80)
    except OSError as exc:
        return type(exc).__name__
"""
    tests = ("assert tcp() in ('ConnectionRefusedError', 'OSError'), tcp()\n"
             "assert unix() == 'FileNotFoundError'\nassert resolve() == 'gaierror'\n")
    try:
        assert_contained(run(code, tests), 3)
        for server in (listener, unix):
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        listener.close()
        unix.close()


# --- processes -----------------------------------------------------------------------------------------------

def test_forking_without_end_fails_and_leaves_no_process(bubblewrap: None) -> None:
    name = "bomb" + uuid.uuid4().hex[:8]
    code = f"""
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, {name.encode()!r}, 0, 0, 0)  # PR_SET_NAME: children would carry it
def forks(n):
    made = 0
    for _ in range(n):
        pid = libc.fork()
        if pid == 0:
            while True:
                pass
        made += pid > 0
    return made, ctypes.get_errno()
def thread():
    try:
        threading.Thread(target=lambda: None).start()
        return "started"
    except RuntimeError as exc:
        return str(exc)
def bomb():
    while True:
        if libc.fork() == 0:
            while True:
                pass
"""
    tests = ("assert forks(200) == (0, 1)\n"  # every fork: -1, EPERM
             "assert thread() == \"can't start new thread\"\n"
             "assert bomb()\n")
    started = time.monotonic()
    result = run(code, tests, timeout_s=2.0)
    assert time.monotonic() - started < 6.0
    assert result["passed_tests"] == 2, result["error"]
    assert result["error"] == "timed out after 2 s while running test 3 of 3: assert bomb()"
    deadline = time.monotonic() + 2.0
    while processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_named(name) == []


SUBREAPER_SCRIPT = """
import ctypes, os, sys, time
sys.path.insert(0, sys.argv[1])
from agent.tools.sandbox import execute_code
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of the runs come to this process
for code in ("while True:\\n    pass\\n", "import time\\ntime.sleep(60)\\n",
             "import ctypes\\nwhile True:\\n    ctypes.CDLL(None).fork()\\n"):
    assert execute_code({"code": code, "tests": "assert True"}, {"timeout_s": 0.5})["result"]["error"].startswith(
        "timed out")
time.sleep(0.5)
try:
    print(os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT))
except ChildProcessError:
    print("no children")
"""


def test_a_stopped_run_leaves_no_orphan_for_the_host_to_reap(bubblewrap: None) -> None:
    done = subprocess.run([sys.executable, "-I", "-B", "-c", SUBREAPER_SCRIPT, str(ROOT)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no children"


def test_signals_do_not_reach_the_agent_or_its_processes(bubblewrap: None, sentinel: subprocess.Popen[bytes]) -> None:
    agent = os.getpid()
    code = f"""
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
def os_kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        return "sent"
    except OSError as exc:
        return type(exc).__name__
def libc_kill(pid):
    return libc.kill(pid, signal.SIGKILL), ctypes.get_errno()
"""
    tests = (f"assert os_kill({agent}) == 'PermissionError'\n"
             f"assert libc_kill({agent}) == (-1, 3)\n"  # ESRCH: no such process in the sandbox's PID namespace
             f"assert libc_kill({sentinel.pid}) == (-1, 3)\n"
             "assert libc_kill(-1) == (-1, 3)\n"  # every process it may signal: none but itself and pid 1
             f"assert not os.path.exists('/proc/{agent}/status')\n")
    result = run(code, tests)
    assert_contained(result, 5)
    assert alive(agent) and sentinel.poll() is None


def test_ctypes_tricks_change_nothing_and_end_in_a_result(bubblewrap: None, sentinel: subprocess.Popen[bytes]) -> None:
    code = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    ctypes.set_errno(0)
    return getattr(libc, name)(*args), ctypes.get_errno()
"""
    tests = ("assert call('setuid', 0) == (-1, 22) and os.getuid() == 65534\n"  # EINVAL: uid 0 is not mapped
             "assert call('setgid', 0) == (-1, 22) and os.getgid() == 65534\n"
             f"assert call('ptrace', 16, {sentinel.pid}, 0, 0) == (-1, 1)\n"  # PTRACE_ATTACH: refused by seccomp
             "assert call('unshare', 0x10000000) == (-1, 1)\n"  # CLONE_NEWUSER
             "assert call('mount', b'none', b'/work', b'tmpfs', 0, 0) == (-1, 1)\n"
             "assert call('chroot', b'/tmp') == (-1, 1)\n"
             "assert call('syscall', 250, 0, -3, 0, 0) == (-1, 1)\n"  # keyctl(GET_KEYRING_ID, session): refused
             "assert call('sethostname', b'pwned', 5) == (-1, 1)\n")
    if os.uname().machine != "x86_64":
        tests = tests.replace("assert call('syscall', 250", "assert True or call('syscall', 250")
    result = run(code, tests)
    assert_contained(result, 8)
    crash = run("import ctypes\ndef add(a, b):\n    return ctypes.string_at(1, 8)\n", "assert add(1, 2) == 3\n")
    assert crash["passed"] is False and crash["error"].startswith("the program was killed by SIGSEGV while running "
                                                                   "test 1 of 1"), crash["error"]
    assert sentinel.poll() is None and socket.gethostname() != "pwned"


# --- writing -------------------------------------------------------------------------------------------------

def test_writes_outside_the_work_directory_fail_and_leave_nothing(bubblewrap: None, tmp_path: Path) -> None:
    outside = tmp_path / "escaped.txt"
    marker = f"murakkab-escape-{uuid.uuid4().hex[:8]}"
    targets = [str(outside), f"/usr/lib/{marker}", f"/{marker}", f"/etc/{marker}", f"/dev/{marker}"]
    code = f"""
import os
def attempt_write(path):
    try:
        with open(path, "w") as f:
            f.write("pwned")
        return "written"
    except OSError as exc:
        return type(exc).__name__
def fill(path):
    try:
        with open(path, "wb") as f:
            for _ in range(200):
                f.write(b"x" * 2**20)
        return "filled"
    except OSError as exc:
        return exc.errno
"""
    tests = "".join(f"assert attempt_write({t!r}) in ('FileNotFoundError', 'OSError', 'PermissionError')\n"
                    for t in targets)
    tests += ("assert attempt_write('/work/mine.txt') == 'written' and attempt_write('/tmp/mine.txt') == 'written'\n"
              "assert fill('/work/a') == 27 and fill('/work/b') == 27 and fill('/work/c') == 27\n"  # EFBIG: 16 MiB
              "assert fill('/work/d') == 28 and fill('/tmp/e') == 28\n")  # ENOSPC: /work holds 64 MiB, /tmp 16
    result = run(code, tests)
    assert_contained(result, len(targets) + 3)
    assert not outside.exists() and not any(Path(t).exists() for t in targets[1:])


# --- an unprivileged caller and a root caller that can drop to uid 65534 -----------------------------------------

CALLER_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from agent.tools.sandbox import SandboxUnavailable, execute_code, sandbox_layout
try:
    layout = sandbox_layout()
except SandboxUnavailable as exc:
    print(json.dumps({"unavailable": str(exc)}))
    sys.exit(0)
cases = json.loads(sys.argv[2])
results = [execute_code({"code": code, "tests": tests}, {"timeout_s": 2})["result"] for code, tests in cases]
print(json.dumps({"layout": {"drop_to_uid": layout.drop_to_uid, "mount_proc": layout.mount_proc,
                             "outside_uid": layout.outside_uid, "note": layout.note}, "results": results}))
"""


@pytest.fixture
def host_secrets() -> Iterator[tuple[Path, socket.socket]]:
    """A secret file and a listening socket that uid 65534 can reach on the host, outside any sandbox."""
    where = Path(tempfile.mkdtemp(prefix="murakkab-hostile-"))
    try:
        where.chmod(0o755)
        secret = where / "agent.key_secret"
        secret.write_text("secret\n")
        secret.chmod(0o644)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        yield secret, listener
        listener.close()
    finally:
        shutil.rmtree(where, ignore_errors=True)


def run_as_caller(secret: Path, port: int, victim: int, user: int | None) -> dict[str, Any]:
    cases = [
        (ATTEMPT_READ, f"assert attempt_read({str(secret)!r}) == 'FileNotFoundError'\n"),
        ("import socket\ndef tcp():\n    try:\n        socket.create_connection(('127.0.0.1', %d), timeout=2)\n"
         "        return 'connected'\n    except OSError as exc:\n        return type(exc).__name__\n" % port,
         "assert tcp() != 'connected'\n"),
        ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n",
         f"assert libc.kill({victim}, 9) == -1 and ctypes.get_errno() == 3\nassert libc.fork() == -1\n"
         "import os\nassert os.getuid() == 65534\n"),
    ]
    kwargs: dict[str, Any] = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    env = {"PATH": "/usr/bin:/bin", **({k: v for k, v in os.environ.items() if k == "MURAKKAB_BWRAP"})}
    done = subprocess.run([SYSTEM_PYTHON, "-I", "-B", "-c", CALLER_SCRIPT, str(ROOT), json.dumps(cases)],
                          capture_output=True, text=True, timeout=60, cwd="/", env=env, **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def system_python_or_skip() -> None:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} is missing: the test runs the sandbox from an interpreter uid 65534 can read")
    done = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 10))"],
                          capture_output=True, text=True)
    if done.stdout.strip() != "True":
        pytest.skip(f"{SYSTEM_PYTHON} is older than 3.10")
    if not os.access(ROOT, os.R_OK | os.X_OK) or not (os.stat(ROOT).st_mode & stat.S_IXOTH):
        pytest.skip(f"uid 65534 cannot read the project at {ROOT}")


def outcome_or_skip(outcome: dict[str, Any], who: str) -> dict[str, Any]:
    if "unavailable" in outcome:
        message = f"bubblewrap cannot run for {who}: {outcome['unavailable']}"
        if os.environ.get("MURAKKAB_REQUIRE_SANDBOX") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return outcome


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as uid 65534")
def test_an_unprivileged_caller_contains_candidates(host_secrets: tuple[Path, socket.socket]) -> None:
    system_python_or_skip()
    secret, listener = host_secrets
    victim = subprocess.Popen(["sleep", "60"], user=SANDBOX_UID, group=SANDBOX_UID, extra_groups=[])
    try:  # a process the caller itself could kill: the sandbox must not reach it
        outcome = outcome_or_skip(run_as_caller(secret, listener.getsockname()[1], victim.pid, SANDBOX_UID),
                                  f"uid {SANDBOX_UID}")
        assert outcome["layout"] == {"drop_to_uid": None, "mount_proc": True, "outside_uid": SANDBOX_UID, "note": ""}
        for result in outcome["results"]:
            assert_contained(result, result["total_tests"])
        with pytest.raises(BlockingIOError):
            listener.accept()
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_root_caller_runs_bwrap_as_uid_65534_where_it_can(host_secrets: tuple[Path, socket.socket],
                                                            sentinel: subprocess.Popen[bytes]) -> None:
    system_python_or_skip()
    secret, listener = host_secrets
    outcome = outcome_or_skip(run_as_caller(secret, listener.getsockname()[1], sentinel.pid, None), "root")
    assert outcome["layout"] == {"drop_to_uid": SANDBOX_UID, "mount_proc": True, "outside_uid": SANDBOX_UID,
                                 "note": ""}
    for result in outcome["results"]:
        assert_contained(result, result["total_tests"])
    assert sentinel.poll() is None


# --- where bubblewrap cannot run ----------------------------------------------------------------------------

GOOD = ("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\n")


def test_without_bubblewrap_the_tool_refuses_and_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MURAKKAB_BWRAP", "/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable) as refused:
        run(*GOOD)
    assert not isinstance(refused.value, ToolError)  # the deployment's fault, not the input's
    message = str(refused.value)
    assert "bubblewrap (/nonexistent/bwrap) not found (set by MURAKKAB_BWRAP)" in message
    assert "apt-get install bubblewrap" in message and "knob sandbox with values [rlimits]" in message


def test_a_bwrap_that_cannot_create_namespaces_is_refused_with_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    where = Path(tempfile.mkdtemp(prefix="murakkab-fake-bwrap-"))
    try:
        where.chmod(0o755)
        fake, calls = where / "bwrap", where / "calls"
        fake.write_text(f"#!/bin/sh\necho >> {calls}\necho 'bwrap: No permissions to creating new namespace' >&2\n"
                        "exit 1\n")
        fake.chmod(0o755)
        where.chmod(0o777)  # a root caller tries bwrap as uid 65534 first: it must be able to count too
        monkeypatch.setenv("MURAKKAB_BWRAP", str(fake))
        with pytest.raises(SandboxUnavailable, match=r"bwrap as uid \d+ failed: bwrap: No permissions to creating "
                                                     r"new namespace"):
            run(*GOOD)
        tried = len(calls.read_text().splitlines())
        # as root: uid 65534 with and without /proc, then root without /proc; otherwise itself with and without
        assert tried == (3 if os.geteuid() == 0 else 2)
        with pytest.raises(SandboxUnavailable, match=r"No permissions to creating new namespace"):
            run(*GOOD)
        assert len(calls.read_text().splitlines()) == tried  # the answer is kept for a while: not tried again
        assert sandbox_module._layouts.keys().isdisjoint(sandbox_module._failures.keys())
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_the_weaker_mode_runs_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MURAKKAB_BWRAP", "/nonexistent/bwrap")
    result = run(*GOOD, sandbox="rlimits")
    assert_contained(result, 1)
    with pytest.raises(ToolError, match=r"knob 'sandbox': expected one of bubblewrap, rlimits, got 'none'"):
        run(*GOOD, sandbox="none")


def test_the_example_catalog_asks_for_bubblewrap() -> None:
    catalog = {e.name: e for e in load_catalog_file(ROOT / "examples" / "catalog" / "cpu.yaml")}
    knob = catalog["python-sandbox"].knobs["sandbox"]
    assert (knob.values, knob.default) == (["bubblewrap"], "bubblewrap")


def test_the_agent_survives_a_burst_of_hostile_runs(bubblewrap: None) -> None:
    pid, signals = os.getpid(), signal.getsignal(signal.SIGTERM)
    for code in (f"import os\nos.kill({pid}, 9)\n", f"import ctypes\nassert ctypes.CDLL(None).kill({pid}, 9) == 0\n",
                 "import ctypes\nctypes.string_at(1, 1)\n", "import os\nos._exit(1)\n",
                 "import ctypes\nwhile True:\n    ctypes.CDLL(None).fork()\n"):
        result = run(code, "assert True\n", timeout_s=1.0)
        assert result["passed"] is False and result["passed_tests"] == 0 and result["error"], result
    assert signal.getsignal(signal.SIGTERM) is signals and alive(pid) and sys.executable
    assert_contained(run(*GOOD), 1)
