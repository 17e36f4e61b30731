"""Value types of workflow inputs, stage inputs and stage outputs, and their runtime checks.

A type is written as a string: a scalar (``text``, ``integer``, ``number``, ``boolean``,
``json``), a blob (``file``, ``video``, ``image``, ``audio``), a record (``vector``,
``document``, ``passage``, ``scene``, ``test_result``) or ``list[T]``. Values are plain
msgpack-able data, so they cross the wire without pickle:

- blobs are maps ``{"name": str, "media_type": str, "data": bytes}``;
- ``vector`` is a list of numbers; ``document`` is ``{"id", "text"}``; ``passage`` is
  ``{"id", "score"}``; ``scene`` is ``{"index", "start_s", "end_s"}``; ``test_result`` is
  ``{"passed", "passed_tests", "total_tests", "error", "runtime_s"}``.
"""

from __future__ import annotations

import math
import re
from typing import Any

SCALARS = frozenset({"text", "integer", "number", "boolean", "json"})
BLOBS = frozenset({"file", "video", "image", "audio"})
RECORDS: dict[str, dict[str, str]] = {
    "document": {"id": "text", "text": "text"},
    "passage": {"id": "text", "score": "number"},
    "scene": {"index": "integer", "start_s": "number", "end_s": "number"},
    "test_result": {"passed": "boolean", "passed_tests": "integer", "total_tests": "integer", "error": "text",
                    "runtime_s": "number"},
}
_LIST = re.compile(r"^list\[(.+)\]$")


def known_types() -> list[str]:
    return sorted(SCALARS | BLOBS | set(RECORDS) | {"vector"}) + ["list[T]"]


def parse_type(expr: str) -> str:
    """Return the canonical form of a type expression, or raise ValueError saying what is allowed."""
    text = expr.strip().replace(" ", "")
    match = _LIST.match(text)
    if match:
        return f"list[{parse_type(match.group(1))}]"
    if text in SCALARS or text in BLOBS or text in RECORDS or text == "vector":
        return text
    raise ValueError(f"unknown type {expr!r} (expected one of {', '.join(known_types())})")


def element_type(expr: str) -> str | None:
    """The element type of ``list[T]``, or None when ``expr`` is not a list."""
    match = _LIST.match(expr)
    return match.group(1) if match else None


def list_of(expr: str) -> str:
    return f"list[{expr}]"


def assignable(source: str, target: str) -> bool:
    """Can a value of type ``source`` feed an input of type ``target``?"""
    if source == target or target == "json":
        return True
    if target == "file" and source in BLOBS:
        return True
    if source == "integer" and target == "number":
        return True
    src_el, dst_el = element_type(source), element_type(target)
    if src_el is not None and dst_el is not None:
        return assignable(src_el, dst_el)
    return target == "vector" and source == "list[number]"


def check_value(expr: str, value: Any, where: str = "value", max_depth: int = 8) -> str | None:
    """Return None if ``value`` is a valid ``expr``, otherwise a message naming what is wrong."""
    if max_depth <= 0:
        return f"{where}: nested too deeply"
    el = element_type(expr)
    if el is not None:
        if not isinstance(value, list):
            return f"{where}: expected {expr}, got {_kind(value)}"
        for i, item in enumerate(value):
            problem = check_value(el, item, f"{where}[{i}]", max_depth - 1)
            if problem:
                return problem
        return None
    if expr == "json":
        return None
    if expr == "text":
        return None if isinstance(value, str) else f"{where}: expected text, got {_kind(value)}"
    if expr == "boolean":
        return None if isinstance(value, bool) else f"{where}: expected boolean, got {_kind(value)}"
    if expr == "integer":
        return None if type(value) is int else f"{where}: expected integer, got {_kind(value)}"
    if expr == "number":
        if type(value) is int or (type(value) is float and math.isfinite(value)):
            return None
        return f"{where}: expected a finite number, got {_kind(value)}"
    if expr == "vector":
        if not isinstance(value, list) or not value:
            return f"{where}: expected a non-empty vector of numbers, got {_kind(value)}"
        for i, item in enumerate(value):
            if check_value("number", item, f"{where}[{i}]"):
                return f"{where}[{i}]: expected a number, got {_kind(item)}"
        return None
    if expr in BLOBS:
        if not isinstance(value, dict) or set(value) != {"name", "media_type", "data"}:
            return f"{where}: expected a {expr} ({{name, media_type, data}}), got {_kind(value)}"
        if not isinstance(value["data"], bytes) or not isinstance(value["name"], str) \
                or not isinstance(value["media_type"], str):
            return f"{where}: a {expr} needs text name and media_type and bytes data"
        return None
    fields = RECORDS.get(expr)
    if fields is None:
        return f"{where}: unknown type {expr!r}"
    if not isinstance(value, dict):
        return f"{where}: expected a {expr} record, got {_kind(value)}"
    missing = sorted(set(fields) - set(value))
    extra = sorted(set(value) - set(fields))
    if missing or extra:
        return f"{where}: a {expr} has fields {sorted(fields)} (missing {missing}, unexpected {extra})"
    for name, field_type in fields.items():
        problem = check_value(field_type, value[name], f"{where}.{name}", max_depth - 1)
        if problem:
            return problem
    return None


def value_bytes(value: Any) -> int:
    """A cheap upper-bound estimate of a value's encoded size, for input size limits."""
    if isinstance(value, (bytes, str)):
        return len(value) + 5
    if isinstance(value, dict):
        return 5 + sum(value_bytes(k) + value_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return 5 + sum(value_bytes(v) for v in value)
    return 9


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"a map with keys {sorted(map(str, value))[:5]}"
    return type(value).__name__
