"""The bubblewrap command line the code sandbox runs candidates under, and its seccomp filter.

``command`` builds a ``bwrap`` invocation: new user, PID, network, IPC, UTS and mount namespaces (and a
cgroup namespace where the kernel has them), uid and gid 65534 without capabilities inside, no further
user namespaces, its own session (no terminal to inject input into), killed with its parent. The file
system is a read-only view of the interpreter (its prefix, the system library directories,
``/etc/ld.so.cache``) and nothing else of the host: a minimal ``/dev`` (read-only but for the device
nodes and a small ``/dev/shm``), size-bounded tmpfs ``/tmp`` and ``/work`` (the only writable places,
gone with the sandbox), and ``/proc`` of the sandbox's own PID namespace where that is safe (see
``command``). Inputs are copied in from file descriptors, so no host path is writable from inside.

``seccomp_program`` is a classic BPF filter for ``--seccomp``: it refuses (EPERM) creating processes
and threads, ptrace, kernel keyrings, bpf, perf events, userfaultfd, io_uring and namespace changes,
and kills a process that makes system calls of another architecture (i386 or x32 on x86_64). Process
creation is refused here and not only by RLIMIT_NPROC because the kernel does not apply that limit to
a process whose uid outside the namespace is root.

Only the standard library is imported: the sandbox runs in a bare tool process too.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

SANDBOX_UID = 65534  # nobody/nogroup: the uid and gid inside, and outside when a root caller can drop to it
WORK_DIR = "/work"
WORK_BYTES = 64 * 1024 * 1024  # tmpfs /work; each file is also limited by RLIMIT_FSIZE
TMP_BYTES = 16 * 1024 * 1024  # tmpfs /tmp
SHM_BYTES = 16 * 1024 * 1024  # tmpfs /dev/shm
SYSTEM_LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64")
SYSTEM_FILES = ("/etc/ld.so.cache",)


@dataclass(frozen=True)
class Layout:
    """How one host runs bwrap: found by the sandbox's probe, the same for every run after it."""

    bwrap: str  # path of the bwrap executable
    python: str  # the interpreter run inside (a real path, bound read-only at the same path)
    binds: tuple[tuple[str, str], ...]  # ("bind" | "symlink", path): what of the host the sandbox sees
    drop_to_uid: int | None  # run bwrap as this uid (a root caller), or None: as the caller
    mount_proc: bool  # False where the sandbox's uid outside is root (see ``command``)
    note: str = ""  # why this layout and not a stronger one, for operators

    @property
    def outside_uid(self) -> int:
        return os.geteuid() if self.drop_to_uid is None else self.drop_to_uid


def interpreter_view() -> tuple[str, tuple[tuple[str, str], ...]]:
    """(interpreter path, what to show of the host) for running this Python's stdlib inside the sandbox.

    The base interpreter, not a virtual environment's: the harness needs only the standard library,
    and a candidate sees no installed packages, configuration or source of the agent.
    """
    python = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    roots: list[str] = []
    for prefix in (sys.base_prefix, sys.base_exec_prefix):
        real = os.path.realpath(prefix)
        if real != "/" and os.path.isdir(real) and not _inside(real, roots):
            roots.append(real)
    binds: list[tuple[str, str]] = [("bind", root) for root in roots]
    if not _inside(python, roots):
        binds.append(("bind", python))
    for path in SYSTEM_LIBRARY_DIRS:
        if _inside(path, roots):
            continue
        if os.path.islink(path):
            binds.append(("symlink", path))
        elif os.path.isdir(path):
            binds.append(("bind", path))
    binds.extend(("bind", path) for path in SYSTEM_FILES if os.path.isfile(path))
    return python, tuple(binds)


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def command(layout: Layout, argv: list[str], env: dict[str, str], files: list[tuple[int, str]],
            seccomp_fd: int, info_fd: int | None = None) -> list[str]:
    """The bwrap command running ``argv`` (its first element the interpreter) inside the sandbox.

    ``files`` are (readable descriptor, name) pairs copied into ``/work`` before ``argv`` starts;
    ``seccomp_fd`` holds ``seccomp_program()``; bwrap writes ``{"child-pid": ...}`` (the host pid of the
    sandbox's init) to ``info_fd``. The caller passes these descriptors to bwrap.

    ``/proc`` (of the sandbox's own PID namespace) is mounted only when the sandbox's uid outside is
    not root: a root-owned process without capabilities may still write most of ``/proc/sys`` (the
    kernel checks the file mode against the global uid), and bwrap does not cover it.
    """
    cmd = [layout.bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
           "--hostname", "sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    if info_fd is not None:
        cmd += ["--info-fd", str(info_fd)]
    for name, value in env.items():
        cmd += ["--setenv", name, value]
    for kind, path in layout.binds:
        if kind == "symlink":
            cmd += ["--symlink", os.readlink(path), path]
        else:
            cmd += ["--ro-bind", path, path]
    if layout.mount_proc:
        cmd += ["--proc", "/proc"]
    cmd += ["--dev", "/dev", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--size", str(TMP_BYTES), "--tmpfs", "/tmp", "--size", str(WORK_BYTES), "--tmpfs", WORK_DIR]
    for fd, name in files:
        cmd += ["--file", str(fd), f"{WORK_DIR}/{name}"]
    cmd += ["--remount-ro", "/", "--chdir", WORK_DIR, "--seccomp", str(seccomp_fd), "--", *argv]
    return cmd


# --- seccomp ----------------------------------------------------------------------------------------------

# (audit architecture, first foreign syscall number or None, refused syscalls by name -> number)
_ARCHES: dict[str, tuple[int, int | None, dict[str, int]]] = {
    "x86_64": (0xC000003E, 0x40000000, {  # numbers >= 0x40000000 are the x32 ABI
        "clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "ptrace": 101, "add_key": 248, "request_key": 249,
        "keyctl": 250, "unshare": 272, "setns": 308, "perf_event_open": 298, "bpf": 321, "userfaultfd": 323,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}),
    "aarch64": (0xC00000B7, None, {
        "clone": 220, "clone3": 435, "ptrace": 117, "add_key": 217, "request_key": 218, "keyctl": 219,
        "unshare": 97, "setns": 268, "perf_event_open": 241, "bpf": 280, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}),
}
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_EPERM = 1


def seccomp_program(machine: str | None = None) -> bytes:
    """The filter as bytes of ``struct sock_filter``; ValueError for an architecture it does not know."""
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        raise ValueError(f"the sandbox's seccomp filter knows {' and '.join(_ARCHES)}, not {machine}")
    arch, foreign_from, refused = _ARCHES[machine]
    program = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 1, 0, arch), (_RET_K, 0, 0, _RET_KILL_PROCESS), (_LD_W_ABS, 0, 0, 0)]
    if foreign_from is not None:
        program += [(_JGE_K, 0, 1, foreign_from), (_RET_K, 0, 0, _RET_KILL_PROCESS)]
    for number in sorted(refused.values()):
        program += [(_JEQ_K, 0, 1, number), (_RET_K, 0, 0, _RET_ERRNO | _EPERM)]
    program.append((_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
