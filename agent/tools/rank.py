"""The rank-candidates tool: order candidate programs by their test results and name the best."""

from __future__ import annotations

import math
from typing import Any

from agent.tools.base import ToolError, list_input

MAX_CANDIDATES = 10_000


def rank_candidates(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """Rank by tests passed (most first), then runtime_s (fastest first), then candidate order.

    ``results[i]`` is the test_result of ``candidates[i]``. Outputs ``best`` (the top candidate's code,
    "" when there are no candidates; it may still fail tests, check ``ranking``) and ``ranking``
    [{index, passed_tests, total_tests, runtime_s, error}] best first.
    """
    candidates = list_input(inputs, "candidates", MAX_CANDIDATES)
    results = list_input(inputs, "results", MAX_CANDIDATES)
    if len(candidates) != len(results):
        raise ToolError(f"got {len(candidates)} candidates but {len(results)} results; "
                        "each candidate needs exactly one test result, in the same order")
    rows = []
    for i, (code, result) in enumerate(zip(candidates, results)):
        if not isinstance(code, str):
            raise ToolError(f"candidates[{i}]: expected the program text")
        rows.append(_row(i, result))
    rows.sort(key=lambda row: (-row["passed_tests"], row["runtime_s"], row["index"]))
    return {"best": candidates[rows[0]["index"]] if rows else "", "ranking": rows}


def _row(index: int, result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise ToolError(f"results[{index}]: expected a test_result "
                        "{passed, passed_tests, total_tests, error, runtime_s}")
    counts = []
    for name in ("passed_tests", "total_tests"):
        value = result.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ToolError(f"results[{index}].{name}: expected a count (an integer >= 0)")
        counts.append(value)
    passed_tests, total_tests = counts
    if passed_tests > total_tests:
        raise ToolError(f"results[{index}]: passed_tests {passed_tests} is more than total_tests {total_tests}")
    runtime_s = result.get("runtime_s")
    if isinstance(runtime_s, bool) or not isinstance(runtime_s, (int, float)) or not math.isfinite(runtime_s) \
            or runtime_s < 0:
        raise ToolError(f"results[{index}].runtime_s: expected a number of seconds >= 0")
    error = result.get("error", "")
    if not isinstance(error, str):
        raise ToolError(f"results[{index}].error: expected text")
    return {"index": index, "passed_tests": passed_tests, "total_tests": total_tests,
            "runtime_s": float(runtime_s), "error": error}
