"""Loading TOML config files into pydantic models, with errors that name the file and field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and every bad field."""


def load_toml_config(path: Path, section: str, model: type[T]) -> T:
    """Read ``path``, take the whole document (``section`` holds the daemon's own keys)."""
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if section not in document:
        raise ConfigError(f"{path}: missing the [{section}] table")
    return validate_config(document, model, str(path))


def validate_config(document: dict, model: type[T], origin: str) -> T:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        lines = [f"{origin}: invalid config:"]
        for err in exc.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
