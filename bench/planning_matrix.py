"""The honest planning benchmark (``make bench-planning``): every policy, every scenario, three seeds, the
request-level judge, predictor error at 0, 10 and 20 %, and static's headroom searched (simulated).

    python bench/planning_matrix.py [--scenarios day-mix,real-day,emergency-day] [--seeds 1,2,3]
                                    [--policies ...] [--errors 0,0.1,0.2] [--headrooms 1.0,1.2,1.5,2.0]
                                    [--jobs 2] [--out bench/results/planning]

Settings are the scenario files' ``control`` sections, one set for every scenario (fixed before the run:
see bench/README.md, "Planning"); nothing here tunes them. Each cell runs ``bench/planning.py``'s
``run_one``; OUT/matrix.json has every report's headline figures and OUT/matrix.md the tables. Static's
headroom: every value in ``--headrooms`` runs on every scenario and seed; the reported ``static`` is the
smallest headroom whose SLO attainment is at least 99 % (the largest when none is), and every value is
listed. Predictor error runs for every policy on the real-trace scenario, first seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.planning import run_one  # noqa: E402

SCENARIOS = ROOT / "examples" / "scenarios"
DEFAULT_POLICIES = ("static-naive", "murakkab-epoch", "murakkab-epoch+5min", "murakkab-epoch+5min+caps",
                    "murakkab-epoch+5min+caps+colocation", "murakkab-epoch+5min+caps+colocation+lift", "murakkab")
HEADLINE = ("cost_usd", "gpu_hours", "h100_equiv_gpu_hours", "energy_mwh", "fleet_energy_mwh", "components_started",
            "dropped", "judge", "predictor_error", "sim_wall_s", "scenario_sha256", "settings_sha256")


def _cell(report: dict[str, Any]) -> dict[str, Any]:
    cell = {k: report.get(k) for k in HEADLINE}
    cell["slo_attainment"] = report["slo_attainment"]["overall"]
    cell["slo_attainment_per_tier"] = report["slo_attainment"]["per_tier"]
    cell["plan_seconds_p50"] = report["plan_seconds"]["p50"]
    cell["plan_seconds_max"] = report["plan_seconds"]["max"]
    cell["throttled_gpu_minutes"] = report.get("throttled_gpu_minutes")
    return cell


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="day-mix,real-day,emergency-day")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    parser.add_argument("--errors", default="0,0.1,0.2")
    parser.add_argument("--headrooms", default="1.0,1.2,1.5,2.0")
    parser.add_argument("--cells", default=None, metavar="FILE",
                        help="run only these cells: a JSON list of [scenario, seed, policy, error, headroom or null]")
    parser.add_argument("--summarize", action="store_true", help="rewrite matrix.md from OUT/matrix.json only")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planning"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        results = json.loads((out / "matrix.json").read_text(encoding="utf-8"))["cells"]
        (out / "matrix.md").write_text(headline(results) + "\nEvery cell:\n\n" + markdown(results), encoding="utf-8")
        print(headline(results))
        return 0
    cells: list[tuple[str, int, str, float, float | None]] = []  # scenario, seed, policy, error, headroom
    scenarios = [s for s in args.scenarios.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    policies = [p for p in args.policies.split(",") if p]
    for scenario in scenarios:
        for seed in seeds:
            cells += [(scenario, seed, p, 0.0, None) for p in policies]
            cells += [(scenario, seed, "static", 0.0, h) for h in _floats(args.headrooms)]
    real = "real-day" if "real-day" in scenarios else scenarios[0]
    for error in _floats(args.errors):
        if error > 0:
            cells += [(real, seeds[0], p, error, None) for p in policies]
            cells += [(real, seeds[0], "static", error, h) for h in _floats(args.headrooms)]
    if args.cells is not None:
        cells = [(str(c[0]), int(c[1]), str(c[2]), float(c[3]), None if c[4] is None else float(c[4]))
                 for c in json.loads(Path(args.cells).read_text(encoding="utf-8"))]
    # Longest first, so the pool's workers finish together (day-mix has four times real-day's requests).
    cells.sort(key=lambda c: (c[0] != "day-mix", c[0] != "emergency-day"))
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = []
        for scenario, seed, policy, error, headroom in cells:
            changes: dict[str, Any] = {"predictor_error": error}
            if headroom is not None:
                changes["static_headroom"] = headroom
            where = out / scenario / f"seed-{seed}" / f"error-{error:g}" / (f"headroom-{headroom:g}" if headroom else "")
            futures.append(((scenario, seed, policy, error, headroom),
                            pool.submit(run_one, str(SCENARIOS / f"{scenario}.yaml"), policy, str(where), False,
                                        seed, changes)))
        for (scenario, seed, policy, error, headroom), future in futures:
            cell = _cell(future.result())
            cell.update(scenario=scenario, seed=seed, policy=policy, error=error, headroom=headroom)
            results.append(cell)
            print(f"{scenario} seed {seed} {policy}{'' if headroom is None else f' x{headroom:g}'} error {error:g}: "
                  f"${cell['cost_usd']:,.0f}, {cell['energy_mwh']:.3f} MWh, SLO "
                  f"{100 * (cell['slo_attainment'] or 0):.2f} %, {cell['sim_wall_s']:.0f} s", flush=True)
    chosen = [chosen_static(results, sc, sd, e) for sc, sd, e in sorted({(c["scenario"], c["seed"], c["error"])
                                                                           for c in results})]
    summary = {"cells": results, "static_chosen": [c for c in chosen if c is not None],
               "bench_wall_s": time.perf_counter() - started, "simulated": True,
               "judge": sorted({str(c["judge"]) for c in results})}
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "matrix.md").write_text(headline(results) + "\nEvery cell:\n\n" + markdown(results), encoding="utf-8")
    print(headline(results))
    return 0


def chosen_static(results: list[dict[str, Any]], scenario: str, seed: int, error: float) -> dict[str, Any] | None:
    """The smallest headroom with SLO attainment >= 99 % (the largest when none reaches it)."""
    runs = sorted((c for c in results if c["policy"] == "static" and c["scenario"] == scenario and c["seed"] == seed
                   and c["error"] == error), key=lambda c: c["headroom"])
    good = [c for c in runs if (c["slo_attainment"] or 0) >= 0.99]
    return good[0] if good else (runs[-1] if runs else None)


def headline(results: list[dict[str, Any]]) -> str:
    """Per scenario and predictor error: each policy's mean over seeds (static: the headroom chosen per seed),
    murakkab's ratios against static and murakkab-epoch, and the issue's targets."""
    lines: list[str] = []
    groups = sorted({(c["scenario"], c["error"]) for c in results})
    for scenario, error in groups:
        cells = [c for c in results if c["scenario"] == scenario and c["error"] == error]
        seeds = sorted({c["seed"] for c in cells})
        by_policy: dict[str, list[dict[str, Any]]] = {}
        for seed in seeds:
            chosen = chosen_static(results, scenario, seed, error)
            if chosen is not None:
                by_policy.setdefault(f"static (x{chosen['headroom']:g})" if len(seeds) == 1 else "static (chosen)",
                                     []).append(chosen)
            for c in cells:
                if c["seed"] == seed and c["policy"] != "static":
                    by_policy.setdefault(c["policy"], []).append(c)
        lines += [f"**{scenario}**, predictor error {error:g}, seeds {', '.join(map(str, seeds))} (means; "
                  f"static: the smallest headroom with >= 99 % SLO attainment per seed, else the largest tried)", "",
                  "| policy | cost (USD) | H100-eq GPU-h | energy MWh (allocated) | energy MWh (fleet) | SLO attainment "
                  "| latency:best | dropped | starts |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        means: dict[str, dict[str, float]] = {}
        for name, runs in by_policy.items():
            def mean(key: str) -> float:
                return sum(float(r[key] or 0) for r in runs) / len(runs)
            m = {k: mean(k) for k in ("cost_usd", "h100_equiv_gpu_hours", "energy_mwh", "fleet_energy_mwh",
                                      "slo_attainment", "dropped", "components_started")}
            m["latency_best"] = sum(float((r["slo_attainment_per_tier"] or {}).get("latency:best") or 0)
                                    for r in runs) / len(runs)
            means[name] = m
            lines.append(f"| {name} | {m['cost_usd']:,.0f} | {m['h100_equiv_gpu_hours']:.1f} | {m['energy_mwh']:.3f} | "
                         f"{m['fleet_energy_mwh']:.3f} | {100 * m['slo_attainment']:.2f} % | "
                         f"{100 * m['latency_best']:.2f} % | {m['dropped']:,.0f} | {m['components_started']:,.0f} |")
        ours = means.get("murakkab")
        static = next((v for k, v in means.items() if k.startswith("static (")), None)
        epoch = means.get("murakkab-epoch")
        if ours and static:
            lines.append(f"\nmurakkab against static: cost {static['cost_usd'] / ours['cost_usd']:.2f}x, allocated "
                         f"energy {static['energy_mwh'] / ours['energy_mwh']:.2f}x, fleet energy "
                         f"{static['fleet_energy_mwh'] / ours['fleet_energy_mwh']:.2f}x (targets 2x and 2x at equal or "
                         f"better SLO: {100 * ours['slo_attainment']:.2f} % against {100 * static['slo_attainment']:.2f} %).")
        if ours and epoch:
            lines.append(f"murakkab against murakkab-epoch: energy {epoch['energy_mwh'] / ours['energy_mwh']:.2f}x "
                         f"(target 1.25x at equal or better SLO: {100 * ours['slo_attainment']:.2f} % against "
                         f"{100 * epoch['slo_attainment']:.2f} %).")
        lines.append("")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| scenario | seed | error | policy | cost (USD) | H100-eq GPU-h | energy MWh (alloc / fleet) | SLO % "
             "| dropped | starts | plan s p50 |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(results, key=lambda c: (c["scenario"], c["seed"], c["error"], c["policy"], c["headroom"] or 0)):
        name = c["policy"] + ("" if c["headroom"] is None else f" x{c['headroom']:g}")
        lines.append(f"| {c['scenario']} | {c['seed']} | {c['error']:g} | {name} | {c['cost_usd']:,.0f} | "
                     f"{c['h100_equiv_gpu_hours']:.1f} | {c['energy_mwh']:.3f} / {c['fleet_energy_mwh']:.3f} | "
                     f"{100 * (c['slo_attainment'] or 0):.2f} | {c['dropped'] or 0:,.0f} | {c['components_started']} | "
                     f"{(c['plan_seconds_p50'] or 0):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
