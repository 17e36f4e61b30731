"""Outputs of simulated engines: well-typed, deterministic, and unmistakably simulated.

A sim executor stands in for a model on a host that cannot run it, so downstream stages
still receive values of the right types (every value passes ``check_value`` for the
task's output types) while nobody can mistake them for real results: every text says
"[simulated ...]" and names the executor, blobs are named ``simulated-*``.

Values are a pure function of (executor, task, inputs, knobs): replicas of one executor
answer a retried invocation identically, and the same request gives the same answer.
Where it costs nothing, values stay consistent with their inputs (retrieved passages are
among the given documents, the best candidate is the one whose tests passed most), so a
simulated workflow exercises the same data flow as a real one.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from typing import Any

import msgpack

from common.workflow.tasks import TASKS
from common.workflow.types import BLOBS, RECORDS, element_type

VECTOR_DIM = 384  # all-MiniLM-L6-v2's dimension, so simulated and real embeddings are interchangeable
DEFAULT_LIST_LENGTH = 3
MAX_LIST_LENGTH = 64
OBJECT_WORDS = ("person", "car", "dog", "bicycle", "chair", "laptop", "cup", "tree", "bus", "bird")


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return [[str(k), _canonical(v)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def seed_of(*parts: Any) -> int:
    """A stable seed from plain data (msgpack of key-sorted maps, then SHA-256)."""
    packed = msgpack.packb(_canonical(list(parts)), use_bin_type=True, default=repr)
    return int.from_bytes(hashlib.sha256(packed).digest()[:8], "big")


def tiny_png(seed: int, size: int = 8) -> bytes:
    """A valid grayscale PNG of ``size`` x ``size`` pixels whose pattern depends on the seed."""
    rng = random.Random(seed)
    rows = b"".join(b"\x00" + bytes(rng.randrange(256) for _ in range(size)) for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def unit_vector(seed: int, dim: int = VECTOR_DIM) -> list[float]:
    rng = random.Random(seed)
    values = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]


def _label(what: str, executor: str) -> str:
    return f"[simulated {what} by {executor}]"


def _list_length(inputs: dict[str, Any], knobs: dict[str, Any], *knob_names: str) -> int:
    for name in knob_names:
        value = knobs.get(name)
        if type(value) is int and value > 0:
            return min(value, MAX_LIST_LENGTH)
    lengths = [len(v) for v in inputs.values() if isinstance(v, list)]
    return min(max(lengths), MAX_LIST_LENGTH) if lengths and max(lengths) > 0 else DEFAULT_LIST_LENGTH


def generic_value(type_expr: str, rng: random.Random, what: str, executor: str, length: int) -> Any:
    """A value of ``type_expr``, labeled simulated wherever the type has room for a label."""
    el = element_type(type_expr)
    if el is not None:
        return [generic_value(el, rng, f"{what} {i}", executor, length) for i in range(length)]
    if type_expr == "text":
        return f"{_label(what, executor)} #{rng.getrandbits(32):08x}"
    if type_expr == "integer":
        return rng.randrange(0, 100)
    if type_expr == "number":
        return round(rng.random(), 6)
    if type_expr == "boolean":
        return rng.random() < 0.5
    if type_expr == "json":
        return {"simulated": True, "executor": executor, "what": what, "value": rng.randrange(1000)}
    if type_expr == "vector":
        return unit_vector(rng.getrandbits(64))
    if type_expr in BLOBS:
        if type_expr == "image":
            return {"name": f"simulated-{what.replace(' ', '-')}.png", "media_type": "image/png",
                    "data": tiny_png(rng.getrandbits(64))}
        return {"name": f"simulated-{what.replace(' ', '-')}.txt", "media_type": "text/plain",
                "data": _label(what, executor).encode()}
    if type_expr == "document":
        return {"id": f"sim-{rng.getrandbits(24):06x}", "text": _label(what, executor)}
    if type_expr == "passage":
        return {"id": f"sim-{rng.getrandbits(24):06x}", "score": round(rng.random(), 6)}
    if type_expr == "scene":
        start_s = round(rng.uniform(0, 10), 3)
        return {"index": 0, "start_s": start_s, "end_s": round(start_s + rng.uniform(0.5, 5), 3)}
    if type_expr == "test_result":
        total = rng.randrange(1, 6)
        passed = rng.randrange(0, total + 1)
        return {"passed": passed == total, "passed_tests": passed, "total_tests": total,
                "error": "" if passed == total else _label("test failure", executor),
                "runtime_s": round(rng.uniform(0.01, 0.5), 4)}
    if type_expr in RECORDS:
        raise ValueError(f"no simulated value for record type {type_expr!r}")
    raise ValueError(f"no simulated value for type {type_expr!r}")


def _text(inputs: dict[str, Any], name: str, limit: int = 80) -> str:
    value = inputs.get(name)
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[:limit] + "..."


def _task_outputs(task: str, executor: str, inputs: dict[str, Any], knobs: dict[str, Any],
                  rng: random.Random) -> dict[str, Any] | None:
    """Outputs for the tasks where consistency with the inputs is cheap; None for the generic path."""
    if task == "chat":
        context = inputs.get("context") or []
        return {"answer": f"{_label('answer', executor)} to {_text(inputs, 'question')!r} "
                          f"using {len(context)} context passage(s)"}
    if task == "embed":
        return {"embedding": unit_vector(seed_of(executor, inputs.get("text")))}
    if task == "load-documents":
        n = DEFAULT_LIST_LENGTH + rng.randrange(3)
        documents = [{"id": f"sim-doc-{i}", "text": _label(f"document {i}", executor)} for i in range(n)]
        return {"documents": documents, "texts": [d["text"] for d in documents]}
    if task == "retrieve":
        documents = [d for d in inputs.get("documents") or [] if isinstance(d, dict)]
        k = min(_list_length({}, knobs, "top_k"), len(documents))
        picked = rng.sample(documents, k)
        scores = sorted((round(rng.uniform(0.2, 0.95), 6) for _ in picked), reverse=True)
        return {"passages": [{"id": str(d.get("id")), "score": s} for d, s in zip(picked, scores)],
                "texts": [str(d.get("text")) for d in picked]}
    if task == "scene-detection":
        n = DEFAULT_LIST_LENGTH + rng.randrange(3)
        scenes, start_s = [], 0.0
        for i in range(n):
            end_s = round(start_s + rng.uniform(1.0, 6.0), 3)
            scenes.append({"index": i, "start_s": start_s, "end_s": end_s})
            start_s = end_s
        return {"scenes": scenes}
    if task == "frame-extraction":
        n = _list_length({"scenes": inputs.get("scenes")}, knobs, "frames")
        return {"frames": [generic_value("image", rng, f"frame {i}", executor, 0) for i in range(n)]}
    if task == "object-detection":
        n = min(len(inputs.get("frames") or []) or DEFAULT_LIST_LENGTH, len(OBJECT_WORDS))
        return {"objects": [f"[simulated] {word}" for word in rng.sample(OBJECT_WORDS, n)]}
    if task == "code-generation":
        n = _list_length({}, knobs, "debaters")
        return {"candidates": [f"# {_label(f'candidate {i}', executor)}\ndef solution(*args):\n    return None\n"
                               for i in range(n)]}
    if task == "rank-candidates":
        candidates = [c for c in inputs.get("candidates") or [] if isinstance(c, str)]
        results = inputs.get("results") or []
        scores = []
        for i, _ in enumerate(candidates):
            result = results[i] if i < len(results) and isinstance(results[i], dict) else {}
            total = result.get("total_tests") or 0
            scores.append(round((result.get("passed_tests") or 0) / total, 6) if total else 0.0)
        order = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))
        best = candidates[order[0]] if order else _label("best candidate (none given)", executor)
        return {"best": best, "ranking": [{"index": i, "score": scores[i], "simulated": True} for i in order]}
    return None


def simulated_outputs(task: str, executor: str, inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """Every output of ``task``, typed as the task declares and deterministic in its arguments."""
    spec = TASKS.get(task)
    if spec is None:
        raise ValueError(f"unknown task {task!r}")
    rng = random.Random(seed_of(executor, task, inputs, knobs))
    outputs = _task_outputs(task, executor, inputs, knobs, rng)
    if outputs is None:
        length = _list_length(inputs, knobs)
        outputs = {name: generic_value(type_expr, rng, name, executor, length)
                   for name, type_expr in spec.outputs.items()}
    return outputs
