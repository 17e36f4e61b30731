"""YAML front end for workflows and executor catalogs, with errors that point at file and line.

PyYAML's composer keeps a mark (line, column) on every node, so documents are composed
into nodes and turned into plain data here while recording the line of every field path
(``spec.stages[2].inputs.text``). Every check, structural, semantic or pydantic's, reports
a field path; the recorded lines turn it into ``file:line: field: what was expected``.
All problems are collected and raised together as one ``SpecError``.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from common.workflow.catalog import ExecutorSpec, executor_issues
from common.workflow.spec import (
    CATALOG_KIND, Issues, SpecError, SpecIssue, WorkflowSpec, check_header, check_keys, describe,
    expect_mapping, expect_text, parse_workflow_document, validate_workflow,
)

MAX_DOCUMENT_BYTES = 1 << 20
MAX_NODES = 100_000  # aliases expanded: bounds "billion laughs" documents
MAX_DEPTH = 64

__all__ = ["SpecError", "SpecIssue", "load_workflow", "load_workflow_file", "load_catalog", "load_catalog_file",
           "MAX_DOCUMENT_BYTES"]


class _Lines:
    """Field path -> line number (1-based) of where that field is written."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}

    def locate(self, path: str) -> tuple[str, int | None]:
        """The line of ``path``, or of its nearest written ancestor (a missing key: its mapping)."""
        while True:
            if path in self.lines:
                return self.source, self.lines[path]
            if not path:
                return self.source, None
            path = _parent(path)


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[:path.rindex("[")]
    return path[:path.rindex(".")] if "." in path else ""


class _TooBig(Exception):
    pass


def _compose(text: str, source: str) -> tuple[Any, _Lines]:
    """Parse one YAML document into plain data plus the line of every field; SpecError on bad YAML."""
    lines = _Lines(source)
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_DOCUMENT_BYTES:
        raise SpecError([SpecIssue(source, None, "", f"document is {size} bytes; the limit is "
                                                     f"{MAX_DOCUMENT_BYTES} bytes")])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = exc.problem or exc.context or "syntax error"
        context = ""
        if exc.context and exc.problem and exc.context.startswith("expected"):
            detail = f"{exc.context}, {exc.problem}"  # "expected a single document ..., but found another"
        elif exc.context and exc.problem and exc.context_mark:
            context = f" ({exc.context} that starts on line {exc.context_mark.line + 1})"
        column = f" at column {mark.column + 1}" if mark else ""
        raise SpecError([SpecIssue(source, mark.line + 1 if mark else None, "",
                                   f"invalid YAML: {detail}{column}{context}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecIssue(source, None, "", f"invalid YAML: {exc}")]) from None
    if root is None:
        raise SpecError([SpecIssue(source, 1, "", "the document is empty")])
    walker = _Walker(lines)
    try:
        data = walker.plain(root, "", 0)
    except _TooBig as exc:
        raise SpecError([SpecIssue(source, None, "", str(exc))]) from None
    if walker.issues:
        raise SpecError(walker.issues)
    return data, lines


class _Walker:
    """Nodes -> plain Python values, recording lines and reporting keys YAML lets through."""

    def __init__(self, lines: _Lines) -> None:
        self.lines = lines
        self.constructor = yaml.constructor.SafeConstructor()
        self.issues: list[SpecIssue] = []
        self.count = 0
        self.active: set[int] = set()

    def _issue(self, node: yaml.Node, path: str, message: str) -> None:
        self.issues.append(SpecIssue(self.lines.source, node.start_mark.line + 1, path, message))

    def plain(self, node: yaml.Node, path: str, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig(f"document has more than {MAX_NODES} values once aliases are expanded")
        if depth > MAX_DEPTH:
            raise _TooBig(f"{path}: nested more than {MAX_DEPTH} levels deep")
        self.lines.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self.active:
            self._issue(node, path, "a recursive alias (a value that contains itself)")
            return None
        try:
            if isinstance(node, yaml.MappingNode):
                self.active.add(id(node))
                try:
                    return self._mapping(node, path, depth)
                finally:
                    self.active.discard(id(node))
            if isinstance(node, yaml.SequenceNode):
                self.active.add(id(node))
                try:
                    return [self.plain(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node.value)]
                finally:
                    self.active.discard(id(node))
            return self.constructor.construct_object(node)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark or node.start_mark
            self.issues.append(SpecIssue(self.lines.source, mark.line + 1, path, f"invalid YAML: {exc.problem}"))
            return None

    def _mapping(self, node: yaml.MappingNode, path: str, depth: int) -> dict[str, Any]:
        self.constructor.flatten_mapping(node)  # YAML merge keys (<<: *base)
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = self.constructor.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if isinstance(key, (bool, int, float)):
                key = str(key)  # knob values as keys (knob_latency_factors: {8: 1.0})
            if not isinstance(key, str) or not key:
                self._issue(key_node, path, f"keys must be text, got {describe(key)}")
                continue
            child = f"{path}.{key}" if path else key
            if key in result:
                self._issue(key_node, child, f"key '{key}' appears twice in one mapping (first on line "
                                             f"{first_line[key]})")
                continue
            first_line[key] = line
            self.lines.lines[child] = line
            result[key] = self.plain(value_node, child, depth + 1)
        return result


# --- workflows ----------------------------------------------------------------------


def load_workflow(text: str, source: str) -> WorkflowSpec:
    """Parse and validate a Workflow document; raises SpecError listing every problem with file:line."""
    data, lines = _compose(text, source)
    issues = Issues(source, lines.locate)
    spec = parse_workflow_document(data, issues)
    if spec is not None and not issues:
        validate_workflow(spec, issues)
    if issues or spec is None:
        raise SpecError(_by_line(issues.items))
    return spec


def load_workflow_file(path: str | Path) -> WorkflowSpec:
    return load_workflow(_read(path), str(path))


# --- catalogs -----------------------------------------------------------------------

_CATALOG_KEYS = ("apiVersion", "kind", "metadata", "spec")


def load_catalog(text: str, source: str) -> list[ExecutorSpec]:
    """Parse and validate an ExecutorCatalog document; raises SpecError listing every problem."""
    data, lines = _compose(text, source)
    issues = Issues(source, lines.locate)
    executors: list[ExecutorSpec] = []
    if not isinstance(data, dict):
        issues.add("", f"expected an ExecutorCatalog document (a mapping with {', '.join(_CATALOG_KEYS)}), "
                       f"got {describe(data)}")
        raise SpecError(issues.items)
    check_keys(data, "", _CATALOG_KEYS, issues, required=("apiVersion", "kind", "spec"))
    check_header(data, CATALOG_KIND, issues)
    metadata = data.get("metadata")
    if metadata is not None and expect_mapping(metadata, "metadata", issues, "metadata (name, description)"):
        check_keys(metadata, "metadata", ("name", "description"), issues)
        for key in ("name", "description"):
            if key in metadata:
                expect_text(metadata[key], f"metadata.{key}", issues)
    body = data.get("spec")
    raw: Any = []
    if "spec" in data and expect_mapping(body, "spec", issues, "executors"):
        check_keys(body, "spec", ("executors",), issues, required=("executors",))
        raw = body.get("executors", [])
        if not isinstance(raw, list):
            issues.add("spec.executors", f"expected a list of executors, got {describe(raw)}")
            raw = []
        elif not raw and "executors" in body:
            issues.add("spec.executors", "a catalog needs at least one executor")
    first: dict[str, str] = {}
    for index, item in enumerate(raw):
        path = f"spec.executors[{index}]"
        if not expect_mapping(item, path, issues, "executor fields (name, task, engine, ...)"):
            continue
        try:
            spec = ExecutorSpec.model_validate(item)
        except ValidationError as exc:
            for field, message in _pydantic_issues(exc):
                issues.add(f"{path}.{field}" if field else path, message)
            continue
        for field, message in executor_issues(spec):
            issues.add(f"{path}.{field}", message)
        if spec.name in first:
            _, line = lines.locate(first[spec.name])
            issues.add(f"{path}.name", f"duplicate executor name '{spec.name}' (first defined on line {line})")
        else:
            first[spec.name] = f"{path}.name"
        executors.append(spec)
    if issues:
        raise SpecError(_by_line(issues.items))
    return executors


def load_catalog_file(path: str | Path) -> list[ExecutorSpec]:
    return load_catalog(_read(path), str(path))


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecIssue(str(path), None, "", f"cannot read the file: {exc}")]) from None


def _by_line(items: list[SpecIssue]) -> list[SpecIssue]:
    return sorted(items, key=lambda issue: issue.line or 0)


# --- pydantic errors -> field paths and plain messages --------------------------------

_ENTRY_POINT_HINT = "expected 'module:function', e.g. 'agent.tools.retrieve:retrieve'"
_NAME_HINT = ("executor names are lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, "
              "at most 63 characters")


def _pydantic_issues(exc: ValidationError) -> list[tuple[str, str]]:
    """One (field path, message) per problem; a union's per-member errors become one message."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for error in exc.errors(include_url=False):
        parts, model = _walk(error["loc"])
        if error["type"] == "value_error":
            message = str(error["msg"]).removeprefix("Value error, ")
            head, sep, rest = message.partition(": ")
            if sep and model is not None and head in model.model_fields:
                parts, message = parts + [head], rest  # model validators name their field first
            error = {**error, "msg": message}
        grouped.setdefault(_join(parts), []).append({**error, "_model": model})
    result = []
    for path, errors in grouped.items():
        if len(errors) > 1 and all(e["type"].endswith(("_type", "_parsing")) for e in errors):
            words = list(dict.fromkeys(_KIND_WORDS.get(e["type"].split("_")[0], e["type"]) for e in errors))
            expected = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
            result.append((path, f"expected {expected}, got {describe(errors[0].get('input'))}"))
            continue
        for error in errors:
            result.append((path, _message(error, path)))
    return result


_KIND_WORDS = {"int": "an integer", "float": "a number", "string": "text", "bool": "a boolean"}


def _message(error: dict[str, Any], path: str) -> str:
    kind, value = error["type"], error.get("input")
    leaf = path.rsplit(".", 1)[-1]
    if kind == "missing":
        return f"missing required key '{leaf}'"
    if kind == "extra_forbidden":
        model = error["_model"]
        allowed = ", ".join(model.model_fields) if model is not None else "see the docs"
        return f"unknown key '{leaf}' (allowed: {allowed})"
    if kind == "string_pattern_mismatch":
        if leaf == "entry_point":
            return f"{_ENTRY_POINT_HINT}, got {describe(value)}"
        if leaf == "name":
            return f"{_NAME_HINT}; got {describe(value)}"
        return f"expected text matching {error.get('ctx', {}).get('pattern')}, got {describe(value)}"
    if kind == "literal_error":
        return f"expected {error.get('ctx', {}).get('expected')}, got {describe(value)}"
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping, got {describe(value)}"
    if kind == "list_type":
        return f"expected a list, got {describe(value)}"
    if kind == "value_error":
        return str(error["msg"])
    return f"{str(error['msg']).replace('Input should', 'should')}, got {describe(value)}"


def _walk(loc: tuple[Any, ...]) -> tuple[list[Any], type[BaseModel] | None]:
    """Follow a pydantic error location through ExecutorSpec's annotations.

    Returns the path without union member tags ('int', 'str', ...) and the model that holds
    the last key (for 'unknown key' messages), or None when the last step is not a model field.
    """
    node: Any = ExecutorSpec
    parts: list[Any] = []
    holder: type[BaseModel] | None = ExecutorSpec
    for item in loc:
        node = _unwrap_optional(node)
        if isinstance(node, type) and issubclass(node, BaseModel) and isinstance(item, str):
            holder = node
            parts.append(item)
            field = node.model_fields.get(item)
            node = field.annotation if field is not None else Any
        elif typing.get_origin(node) is list and isinstance(item, int):
            holder = None
            parts.append(item)
            node = typing.get_args(node)[0]
        elif typing.get_origin(node) is dict and isinstance(item, str):
            holder = None
            parts.append(item)
            node = typing.get_args(node)[1]
        elif node is Any:
            parts.append(item)
        # else: a union member tag; not part of the document's path
    return parts, (_unwrap_optional(node) if _is_model(_unwrap_optional(node)) else holder)


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _unwrap_optional(node: Any) -> Any:
    if typing.get_origin(node) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(node) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return node


def _join(parts: list[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
