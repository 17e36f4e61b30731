"""What every tool function shares: the error it raises for bad input and checked access to inputs and knobs.

A tool is ``def fn(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]``. It runs in a
thread of the agent, so it keeps no global state, and it must end on its own: every loop and every
input it reads is bounded. Input it cannot use raises :class:`ToolError`, which the tool engine turns
into a non-retryable ``tool_error`` (another replica would fail the same way).
"""

from __future__ import annotations

import math
from typing import Any


class ToolError(Exception):
    """Input a tool cannot use; ``message`` says what is wrong and where, for the user who sent it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def require(inputs: dict[str, Any], name: str) -> Any:
    """The input ``name``, or a ToolError naming it when it is missing."""
    if not isinstance(inputs, dict):
        raise ToolError(f"inputs must be a map of input names to values, got {type(inputs).__name__}")
    if name not in inputs or inputs[name] is None:
        raise ToolError(f"missing input {name!r}")
    return inputs[name]


def blob_data(inputs: dict[str, Any], name: str, max_bytes: int) -> tuple[str, str, bytes]:
    """(name, media_type, data) of the blob input ``name``, checked for shape and size."""
    value = require(inputs, name)
    if not isinstance(value, dict) or not isinstance(value.get("data"), (bytes, bytearray, memoryview)):
        raise ToolError(f"input {name!r}: expected a blob {{name, media_type, data: bytes}}, "
                        f"got {_describe(value)}")
    data = bytes(value["data"])
    if len(data) > max_bytes:
        raise ToolError(f"input {name!r}: {len(data)} bytes is more than the limit of {max_bytes} bytes")
    blob_name = value.get("name") if isinstance(value.get("name"), str) else ""
    media_type = value.get("media_type") if isinstance(value.get("media_type"), str) else ""
    return blob_name, media_type, data


def text_input(inputs: dict[str, Any], name: str, max_chars: int) -> str:
    """The text input ``name``, checked for type and length."""
    value = require(inputs, name)
    if not isinstance(value, str):
        raise ToolError(f"input {name!r}: expected text, got {_describe(value)}")
    if len(value) > max_chars:
        raise ToolError(f"input {name!r}: {len(value)} characters is more than the limit of {max_chars}")
    return value


def list_input(inputs: dict[str, Any], name: str, max_items: int) -> list[Any]:
    """The list input ``name``, checked for type and length."""
    value = require(inputs, name)
    if not isinstance(value, list):
        raise ToolError(f"input {name!r}: expected a list, got {_describe(value)}")
    if len(value) > max_items:
        raise ToolError(f"input {name!r}: {len(value)} items is more than the limit of {max_items}")
    return value


def int_knob(knobs: dict[str, Any] | None, name: str, default: int, minimum: int, maximum: int) -> int:
    """Knob ``name`` as an integer in [minimum, maximum]; integral floats and digit strings are accepted."""
    value = (knobs or {}).get(name, default)
    if value is None:
        return default
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    if number is None:
        raise ToolError(f"knob {name!r}: expected an integer, got {_describe(value)}")
    if not minimum <= number <= maximum:
        raise ToolError(f"knob {name!r}: {number} is outside the allowed range {minimum}..{maximum}")
    return number


def float_knob(knobs: dict[str, Any] | None, name: str, default: float, minimum: float, maximum: float) -> float:
    """Knob ``name`` as a finite number in [minimum, maximum]; numeric strings are accepted."""
    value = (knobs or {}).get(name, default)
    if value is None:
        return default
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise ToolError(f"knob {name!r}: expected a number, got {_describe(value)}")
    if not minimum <= number <= maximum:
        raise ToolError(f"knob {name!r}: {number:g} is outside the allowed range {minimum:g}..{maximum:g}")
    return number


def _describe(value: Any) -> str:
    """A short description of a value for error messages, never its (possibly huge) content."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"text {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"a map with keys {sorted(map(str, value))[:5]}"
    return type(value).__name__
