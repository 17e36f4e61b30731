"""The load-documents tool: a JSONL corpus file in, documents and their texts out.

Each non-blank line is a JSON object ``{"id": ..., "text": ...}`` (other fields are ignored).
Errors name the line, so a user can fix a corpus of thousands of lines.
"""

from __future__ import annotations

import json
from typing import Any

from agent.tools.base import ToolError, blob_data

MAX_DOCUMENTS = 10_000
MAX_CORPUS_BYTES = 64 * 1024 * 1024
MAX_ID_CHARS = 256


def load_documents(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """Parse ``inputs["corpus"]`` (a JSONL file blob) into ``documents`` [{id, text}] and ``texts``.

    Ids must be unique. An id may be text or an integer; integers are converted to their decimal
    text (``7`` -> ``"7"``), so ``7`` and ``"7"`` count as the same id. Texts must be non-empty,
    because an empty passage can neither be embedded nor retrieved usefully. Blank lines are
    skipped. At most ``MAX_DOCUMENTS`` documents and ``MAX_CORPUS_BYTES`` bytes are accepted.
    """
    _, _, data = blob_data(inputs, "corpus", MAX_CORPUS_BYTES)
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ToolError(f"corpus line {line}: not UTF-8 text (byte {exc.start} of the file)") from None
    documents: list[dict[str, str]] = []
    first_line_of: dict[str, int] = {}
    # split on "\n" only: str.splitlines() would also split inside a JSON string holding U+2028
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        document = _parse_line(line, number)
        if document["id"] in first_line_of:
            raise ToolError(f"corpus line {number}: duplicate id {document['id']!r} "
                            f"(first used on line {first_line_of[document['id']]})")
        if len(documents) >= MAX_DOCUMENTS:
            raise ToolError(f"corpus line {number}: more than {MAX_DOCUMENTS} documents; split the corpus")
        first_line_of[document["id"]] = number
        documents.append(document)
    if not documents:
        raise ToolError("corpus has no documents (expected JSONL lines like {\"id\": \"a\", \"text\": \"...\"})")
    return {"documents": documents, "texts": [d["text"] for d in documents]}


def _parse_line(line: str, number: int) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ToolError(f"corpus line {number}: not JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise ToolError(f"corpus line {number}: JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise ToolError(f"corpus line {number}: expected an object {{\"id\", \"text\"}}, "
                        f"got {type(record).__name__}")
    missing = [name for name in ("id", "text") if name not in record]
    if missing:
        raise ToolError(f"corpus line {number}: missing field {' and '.join(map(repr, missing))}")
    raw_id, text = record["id"], record["text"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise ToolError(f"corpus line {number}: id must be text or an integer, got {type(raw_id).__name__}")
    doc_id = str(raw_id)
    if not doc_id.strip():
        raise ToolError(f"corpus line {number}: id is empty")
    if len(doc_id) > MAX_ID_CHARS:
        raise ToolError(f"corpus line {number}: id is longer than {MAX_ID_CHARS} characters")
    if not isinstance(text, str):
        raise ToolError(f"corpus line {number}: text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ToolError(f"corpus line {number}: text is empty")
    return {"id": doc_id, "text": text}
