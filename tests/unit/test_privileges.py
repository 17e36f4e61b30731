"""agent.components.privileges: resolving the engine account, its environment and permission checks."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from agent.components import privileges
from agent.components.privileges import (
    ENGINE_UMASK, EngineIdentity, interpreter_problem, resolve_engine_identity,
)
from agent.config import AgentSettings
from common.config import ConfigError

STRANGER = EngineIdentity("stranger", uid=54321, gid=54321, groups=(44,))


@pytest.fixture(autouse=True)
def _fresh_resolution() -> None:
    """resolve_engine_identity logs once per setting and process: earlier tests must not have used the log up."""
    privileges._resolve.cache_clear()


def test_a_non_root_agent_runs_engines_as_itself_and_ignores_engine_user(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "murakkab.agent.privileges"):
        assert resolve_engine_identity("no-such-murakkab-user", euid=1000) is None
    assert "ignored" in caplog.text
    assert resolve_engine_identity(euid=1000) is None


def test_a_missing_account_or_group_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="engine_user 'no-such-murakkab-user': no such account on this host"):
        resolve_engine_identity("no-such-murakkab-user", euid=0)
    with pytest.raises(ConfigError, match="engine_group 'no-such-murakkab-group': no such group"):
        resolve_engine_identity("nobody", "no-such-murakkab-group", euid=0)


def test_root_is_only_kept_when_written_down(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "murakkab.agent.privileges"):
        assert resolve_engine_identity("root", euid=0) is None
    assert "run as root" in caplog.text and "never on a production host" in caplog.text
    with pytest.raises(ConfigError, match="group root"):
        resolve_engine_identity("nobody", "root", euid=0)


def test_an_unprivileged_account_resolves_to_its_ids_and_device_groups() -> None:
    identity = resolve_engine_identity("nobody", euid=0)
    assert identity is not None and identity.user == "nobody" and identity.uid != 0 and identity.gid != 0
    assert 0 not in identity.groups
    try:
        import grp
        assert grp.getgrnam("video").gr_gid in identity.groups
    except KeyError:
        pass
    assert identity.spawn_kwargs() == {"user": identity.uid, "group": identity.gid,
                                       "extra_groups": list(identity.groups), "umask": ENGINE_UMASK}
    assert AgentSettings(engine_user="nobody").engine_user == "nobody"


def test_the_environment_points_home_and_caches_into_the_work_dir() -> None:
    env = STRANGER.environment({"HOME": "/root", "XDG_CACHE_HOME": "/root/.cache", "XDG_RUNTIME_DIR": "/run/user/0",
                                "HF_HOME": "/srv/hf", "PATH": "/usr/bin"}, Path("/state/components/c/work"))
    assert env["HOME"] == "/state/components/c/work" and env["XDG_CACHE_HOME"] == "/state/components/c/work/.cache"
    assert env["USER"] == env["LOGNAME"] == "stranger" and "XDG_RUNTIME_DIR" not in env
    assert env["HF_HOME"] == "/srv/hf" and env["PATH"] == "/usr/bin"  # chosen by the operator: kept


def test_permission_bits_follow_owner_group_other(tmp_path: Path) -> None:
    st = os.stat(tmp_path)

    def as_(uid: int, gid: int, mode: int) -> os.stat_result:
        values = list(st)
        values[0], values[4], values[5] = (st.st_mode & ~0o7777) | mode, uid, gid
        return os.stat_result(values)

    assert STRANGER.may(as_(54321, 0, 0o700), 7) and not STRANGER.may(as_(0, 0, 0o770), 1)
    assert STRANGER.may(as_(0, 44, 0o750), 5) and not STRANGER.may(as_(0, 44, 0o750), 2)
    assert STRANGER.may(as_(0, 0, 0o711), 1) and not STRANGER.may(as_(0, 0, 0o711), 4)
    assert not STRANGER.may(as_(54321, 54321, 0o077), 4)  # the owner's bits count, even when others' allow


def test_blocked_at_names_the_directory_in_the_way() -> None:
    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's base directory is private: start from /tmp
    tmp_path.chmod(0o711)
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    (tmp_path / "a").chmod(0o700)
    tool = inner / "python"
    tool.write_text("")
    tool.chmod(0o755)
    try:
        blocked = STRANGER.blocked_at(tool, 5)
        assert blocked is not None and f"{tmp_path / 'a'} (mode 0700" in blocked and "not searchable" in blocked
        problem = interpreter_problem(STRANGER, str(tool))
        assert problem is not None and "stranger cannot run the engine interpreter" in problem
        (tmp_path / "a").chmod(0o711)
        assert STRANGER.blocked_at(tool, 5) is None
        tool.chmod(0o700)
        assert "lacks the permission" in (STRANGER.blocked_at(tool, 5) or "")
        assert STRANGER.blocked_at(tmp_path / "missing" / "x", 4) is None  # a missing path is not reported
    finally:
        shutil.rmtree(tmp_path)
