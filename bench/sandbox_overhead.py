"""Code sandbox overhead: one trivial candidate, bubblewrap against resource limits only, side by side.

Each round runs the same passing candidate ``--runs`` times per mode (modes alternate, so drift
on a shared machine hits both), and reports the median, min and max wall time of
``execute_code`` (harness start, candidate, tests, result). The layout bubblewrap settled on
(uid outside, /proc or not) is reported with the numbers.

    .venv/bin/python bench/sandbox_overhead.py --runs 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.tools.sandbox import execute_code, sandbox_layout  # noqa: E402

CANDIDATE = {"code": "def add(a, b):\n    return a + b\n", "tests": "assert add(1, 2) == 3\n"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sandbox_overhead.json")
    args = parser.parse_args()
    assert execute_code(CANDIDATE, {"sandbox": "bubblewrap"})["result"]["passed"]  # settles the layout
    layout = sandbox_layout()
    rounds = []
    for _ in range(args.rounds):
        for mode in ("rlimits", "bubblewrap"):
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                assert execute_code(CANDIDATE, {"sandbox": mode})["result"]["passed"]
                times.append(time.perf_counter() - started)
            rounds.append({"mode": mode, "median_ms": round(statistics.median(times) * 1000, 1),
                           "min_ms": round(min(times) * 1000, 1), "max_ms": round(max(times) * 1000, 1)})
    result = {"python": sys.executable, "euid": os.geteuid(), "runs_per_round": args.runs, "rounds": rounds,
              "bubblewrap_layout": {"outside_uid": layout.outside_uid, "proc": layout.mount_proc,
                                    "note": layout.note},
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
