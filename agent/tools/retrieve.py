"""The retrieve tool: rank documents by cosine similarity of their embeddings to a query embedding."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.tools.base import ToolError, int_knob, list_input, require
from agent.tools.documents import MAX_DOCUMENTS

MAX_DIMENSIONS = 65_536
DEFAULT_TOP_K = 3


def retrieve(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """Return the ``top_k`` (knob, default 3) best documents: ``passages`` [{id, score}] and their ``texts``.

    Scores are cosine similarities rounded to 6 digits, best first; equal scores keep corpus order so
    the answer is deterministic. Embeddings pair with documents by position.
    """
    top_k = int_knob(knobs, "top_k", DEFAULT_TOP_K, 1, MAX_DOCUMENTS)
    query = _vector(require(inputs, "query"), "query")
    embeddings = list_input(inputs, "embeddings", MAX_DOCUMENTS)
    documents = list_input(inputs, "documents", MAX_DOCUMENTS)
    if len(embeddings) != len(documents):
        raise ToolError(f"got {len(embeddings)} embeddings for {len(documents)} documents; "
                        "each document needs exactly one embedding, in the same order")
    if not documents:
        raise ToolError("no documents to retrieve from")
    for i, document in enumerate(documents):
        if not isinstance(document, dict) or not isinstance(document.get("id"), str) \
                or not isinstance(document.get("text"), str):
            raise ToolError(f"documents[{i}]: expected a document {{id: text, text: text}}")
    rows = []
    for i, embedding in enumerate(embeddings):
        row = _vector(embedding, f"embeddings[{i}]")
        if row.shape != query.shape:
            raise ToolError(f"embeddings[{i}] has {row.shape[0]} dimensions but the query has {query.shape[0]}; "
                            "embed the query and the documents with the same model")
        rows.append(row)
    matrix = np.stack(rows)
    peaks = np.max(np.abs(matrix), axis=1)
    zero = np.flatnonzero(peaks == 0.0)
    if zero.size:
        raise ToolError(f"embeddings[{int(zero[0])}] (document {documents[int(zero[0])]['id']!r}) is a zero vector; "
                        "cosine similarity is undefined for it")
    scores = _unit_rows(matrix, peaks) @ _unit_rows(query[None, :], np.max(np.abs(query))[None])[0]
    order = np.argsort(-scores, kind="stable")[:top_k]
    passages = [{"id": documents[i]["id"], "score": _score(scores[i])} for i in order]
    return {"passages": passages, "texts": [documents[i]["text"] for i in order]}


def _vector(value: Any, where: str) -> np.ndarray:
    """A non-empty, finite float64 vector, or a ToolError naming ``where``."""
    if not isinstance(value, list) or not value:
        raise ToolError(f"{where}: expected a non-empty list of numbers")
    if len(value) > MAX_DIMENSIONS:
        raise ToolError(f"{where}: {len(value)} dimensions is more than the limit of {MAX_DIMENSIONS}")
    try:
        vector = np.array(value)
    except (ValueError, TypeError, OverflowError):
        vector = np.array([], dtype=object)
    if vector.ndim != 1 or vector.dtype.kind not in "iuf" or not np.all(np.isfinite(vector)):
        raise ToolError(f"{where}[{_first_bad(value)}]: expected a finite number")
    vector = vector.astype(np.float64)
    if where == "query" and not np.any(vector):
        raise ToolError("query is a zero vector; cosine similarity is undefined for it")
    return vector


def _unit_rows(matrix: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; dividing by the largest entry first keeps huge values from overflowing."""
    scaled = matrix / peaks[:, None]
    return scaled / np.linalg.norm(scaled, axis=1)[:, None]


def _first_bad(value: list[Any]) -> int:
    """The index of the first item that is not a finite number (for the error message)."""
    for j, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return j
        try:
            if not math.isfinite(item):
                return j
        except OverflowError:
            return j
    return 0


def _score(value: float) -> float:
    """A plain float in [-1, 1] rounded to 6 digits (rounding error can push a cosine just past 1)."""
    return round(min(1.0, max(-1.0, float(value))), 6)
