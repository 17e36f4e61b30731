"""Who engines and tools run as: least privilege for the code the agent starts.

The agent may have to run as root (NVML power limits need CAP_SYS_ADMIN, RAPL energy
counters are root-readable), but what it starts is not its own code: vLLM servers, tool
functions, the programs they run. When the agent is root, those run as an unprivileged
account instead (``engine_user``; by default ``murakkab-engine``, else ``nobody``), dropped
to in the child between fork and exec (``subprocess`` ``user=``, ``group=``,
``extra_groups=``). The agent keeps what needs root: the devices, the engine records, the
logs (opened by the agent and handed over as file descriptors), and signalling its engines.

Each engine gets its component's ``work/`` directory as its own (owner the engine user,
group the agent's, mode 0750, so the agent can still enter it without CAP_DAC_OVERRIDE)
and as ``HOME``, so vLLM's, Hugging Face's and Triton's caches land there. The component
directory itself stays the agent's: the engine must not be able to forge the
``engine.pid`` record that a root agent later acts on.
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import pwd
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError

log = logging.getLogger("murakkab.agent.privileges")

ENGINE_ACCOUNT = "murakkab-engine"
FALLBACK_ACCOUNT = "nobody"
# /dev/dri/renderD* is root:render 0660; sites that restrict /dev/nvidia* (NVreg_DeviceFileGID,
# NVreg_DeviceFileMode=0660) usually give it to video. Engines need the GPUs, so they get both.
DEVICE_GROUPS = ("video", "render")
ENGINE_UMASK = 0o077  # what an engine writes is its own: nobody else on the host needs to read it
WORK_DIR_MODE = 0o750
USERADD_HINT = f"useradd --system --no-create-home --shell /usr/sbin/nologin {ENGINE_ACCOUNT}"


@dataclass(frozen=True)
class EngineIdentity:
    """The account engine processes run as: resolved once, at agent start."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups

    def describe(self) -> str:
        return f"user {self.user} (uid {self.uid}, gid {self.gid}, groups {list(self.groups)})"

    def spawn_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``subprocess.Popen`` / ``asyncio.create_subprocess_exec`` that drop to
        this account in the child (setgroups, setregid, setreuid, in that order, before exec)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups), "umask": ENGINE_UMASK}

    def environment(self, env: dict[str, str], home: Path) -> dict[str, str]:
        """``env`` (the agent's) for this account: HOME is the work directory, and the XDG
        directories inherited from root's session point into it too (root's would be unwritable)."""
        out = dict(env)
        out.update(HOME=str(home), USER=self.user, LOGNAME=self.user, XDG_CACHE_HOME=str(home / ".cache"),
                   XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local" / "share"))
        out.pop("XDG_RUNTIME_DIR", None)
        return out

    def may(self, st: os.stat_result, bits: int) -> bool:
        """Whether the mode bits of ``st`` grant this account ``bits`` (4 read, 2 write, 1 search),
        by the owner/group/other rule (ACLs are not looked at)."""
        if st.st_uid == self.uid:
            shift = 6
        elif st.st_gid == self.gid or st.st_gid in self.groups:
            shift = 3
        else:
            shift = 0
        return (st.st_mode >> shift) & bits == bits

    def blocked_at(self, path: Path, bits: int = 0) -> str | None:
        """Why this account cannot reach ``path`` (search every directory on the way, then ``bits`` on
        it), or None when it can; a missing path is not reported."""
        path = Path(os.path.abspath(path))
        for parent in reversed(path.parents):
            try:
                st = os.stat(parent)
            except OSError:
                return None
            if not self.may(st, 1):
                return f"{parent} (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid}) is not searchable"
        try:
            st = os.stat(path)
        except OSError:
            return None
        if bits and not self.may(st, bits):
            return f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid}) lacks the permission"
        return None


def resolve_engine_identity(engine_user: str = "", engine_group: str = "", *,
                            euid: int | None = None) -> EngineIdentity | None:
    """The account engines run as, or None when they run as the agent's own user (it is not root).

    Raises ConfigError for an account or group that does not exist, or one that is root's.
    Warnings (a shared fallback account, GPU device nodes it cannot open) are logged once.
    """
    return _resolve(engine_user, engine_group, os.geteuid() if euid is None else euid)


@functools.lru_cache(maxsize=8)  # main() checks the config before the Agent resolves again: log once
def _resolve(engine_user: str, engine_group: str, euid: int) -> EngineIdentity | None:
    if euid != 0:
        if engine_user or engine_group:
            log.info("engine_user/engine_group ignored: the agent runs as uid %d, not root, and its engines "
                     "run as that user", euid)
        return None
    if engine_user:
        account = _account(engine_user)
    else:
        try:
            account = pwd.getpwnam(ENGINE_ACCOUNT)
        except KeyError:
            account = _account(FALLBACK_ACCOUNT, what="fallback account")
            log.warning("the agent runs as root and there is no account %s: engines and tools run as %s, "
                        "which other services may share (their processes could signal ours and read what our "
                        "engines write); create a dedicated one: %s", ENGINE_ACCOUNT, FALLBACK_ACCOUNT,
                        USERADD_HINT)
    if account.pw_uid == 0:
        if not engine_user:
            raise ConfigError(f"account {account.pw_name!r} has uid 0; engines must run as an unprivileged "
                              f"account: set engine_user to one ({USERADD_HINT})")
        # The one way to keep engines as root, for development containers whose interpreter other
        # accounts cannot run (under /root) and for tests of in-process tools: it has to be written down.
        log.warning("engine_user = %r: engines and tools run as root, with all of the agent's privileges; "
                    "for development and tests only, never on a production host", engine_user)
        return None
    gid = _group(engine_group) if engine_group else account.pw_gid
    groups = set(os.getgrouplist(account.pw_name, gid)) - {gid}
    for name in DEVICE_GROUPS:
        try:
            groups.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            pass
    if gid == 0 or 0 in groups:
        raise ConfigError(f"engine account {account.pw_name!r} would run in group root (gid 0), which reads "
                          "root's group-readable files; use an account and engine_group outside group root")
    identity = EngineIdentity(account.pw_name, account.pw_uid, gid, tuple(sorted(groups)))
    log.info("engines and tools run as %s", identity.describe())
    for problem in device_problems(identity):
        log.warning("engines running as %s cannot use a GPU device: %s", identity.user, problem)
    return identity


def _account(name: str, what: str = "engine_user") -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"{what} {name!r}: no such account on this host; create it ({USERADD_HINT}) or "
                          "leave engine_user empty") from None


def _group(name: str) -> int:
    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"engine_group {name!r}: no such group on this host") from None


def interpreter_problem(identity: EngineIdentity, python: str) -> str | None:
    """Why ``identity`` could not run the interpreter ``python`` (and its installation next to it), or None.

    A virtual environment's python is a symlink: the real binary and its prefix must be reachable too.
    """
    real = Path(os.path.realpath(python))
    for path, bits in ((Path(os.path.abspath(python)), 5), (real, 5), (real.parent.parent / "lib", 5)):
        blocked = identity.blocked_at(path, bits)
        if blocked:
            return (f"{identity.user} cannot run the engine interpreter {python}"
                    + (f" (really {real})" if str(real) != os.path.abspath(python) else "") + f": {blocked}")
    return None


def local_cluster_engine_user(python: str = sys.executable) -> tuple[str, str]:
    """The ``engine_user`` a development cluster (``murakkabctl cluster up``) writes, and why.

    "" (engines drop to the engine account, as in production) unless the agents run as root
    and that account cannot run ``python`` (an interpreter installed under /root, as in many
    development containers); then "root", and the reason, for the console.
    """
    if os.geteuid() != 0:
        return "", ""
    identity = resolve_engine_identity()
    problem = interpreter_problem(identity, python) if identity is not None else None
    if problem is None:
        return "", ""
    return "root", (f"engines of this local cluster run as root: {problem} (install the agent where other "
                    "accounts can read it to have them run unprivileged, as production agents do)")


def device_problems(identity: EngineIdentity, dev: Path = Path("/dev")) -> list[str]:
    """The NVIDIA and DRI render nodes present that ``identity`` could not open read-write."""
    problems = []
    for node in sorted([*dev.glob("nvidia*"), *dev.glob("dri/renderD*")]):
        try:
            st = os.stat(node)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and not identity.may(st, 6):
            problems.append(f"{node} is mode {stat.S_IMODE(st.st_mode):04o} owner {st.st_uid}:{st.st_gid}")
    return problems


def prepare_work_dir(work_dir: Path, identity: EngineIdentity, state_dir: Path) -> list[str]:
    """Make ``work_dir`` the engine's own and reachable from ``state_dir`` down; lines for the component log.

    The directories from ``state_dir`` down to the component's get o+x when the agent owns
    them (passing through, not listing: what the agent keeps there is not world-readable).
    A work directory owned by another account (an earlier agent ran engines as root, or
    ``engine_user`` changed) is moved aside to ``work.previous`` and a fresh one is made,
    rather than chowned file by file under a tree someone else controlled.
    """
    notes: list[str] = []
    work_dir, state_dir = Path(os.path.abspath(work_dir)), Path(os.path.abspath(state_dir))
    euid = os.geteuid()
    for directory in [state_dir, *[p for p in work_dir.parents if state_dir in p.parents]]:
        st = os.stat(directory)
        if st.st_uid == euid and not st.st_mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            notes.append(f"{directory}: mode {stat.S_IMODE(st.st_mode):04o} -> "
                         f"{stat.S_IMODE(st.st_mode) | stat.S_IXOTH:04o}, so {identity.user} can pass through")
    try:
        st = os.lstat(work_dir)
    except FileNotFoundError:
        st = None
    if st is not None and (not stat.S_ISDIR(st.st_mode) or st.st_uid != identity.uid):
        previous = work_dir.with_name(work_dir.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)  # an older one: may fail where its owner's modes forbid
        if os.path.lexists(previous):
            previous = work_dir.with_name(f"{work_dir.name}.previous-{time.time_ns()}")
        os.rename(work_dir, previous)  # the component directory is the agent's: always allowed
        notes.append(f"{work_dir} was owned by uid {st.st_uid}, not {identity.user}: moved aside to {previous}; "
                     "delete it when nothing there is needed")
        st = None
    if st is None:
        os.mkdir(work_dir, WORK_DIR_MODE)
        os.chmod(work_dir, WORK_DIR_MODE)
        os.chown(work_dir, identity.uid, os.getegid())
    blocked = identity.blocked_at(work_dir, 7)
    if blocked:
        notes.append(f"{identity.user} cannot reach its work directory {work_dir} by path: {blocked}; it still "
                     "starts there, but HOME and the caches under it will fail")
    return notes
