"""What ``murakkabctl plan show`` prints for the autopilot: per demand the choice and its predictions, the
pools, the limits that bind, the placement, budgets, hot GPUs and pins. JSON-able; pure."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from policies.model import InstanceConfig, Solution
from policies.placement import PlacementResult
from policies.plan import Demand


def config_text(config: InstanceConfig) -> str:
    cap = f" @ {config.power_cap_w:.0f} W" if config.power_cap_w else ""
    return f"{config.executor} on {config.tp}x {config.hardware}{cap}"


def explain(preset: str, solution: Solution | None, placement: PlacementResult, rates: Mapping[Demand, float],
            unsatisfiable: Mapping[Demand, str], solve_history_s: Sequence[float], budgets: Mapping[str, Any],
            rollout_pending: bool) -> dict[str, Any]:
    demands = []
    for d in sorted(set(rates) | set(unsatisfiable) | set(solution.choices if solution else ()),
                    key=lambda d: (d.workflow, d.slo)):
        entry: dict[str, Any] = {"workflow": d.workflow, "slo": dict(d.slo)}
        if d in rates:
            entry["planned_rate_rps"] = round(rates[d], 4)
        if solution is not None and d in solution.choices:
            configs = solution.configs.get(d, {})
            entry["stages"] = {stage: {"executor": c.executor, "knobs": dict(c.knobs),
                                       "config": config_text(configs[stage]) if stage in configs else None}
                               for stage, c in solution.choices[d].items()}
            predicted = solution.predicted.get(d)
            if predicted is not None:
                entry["predicted"] = {"latency_s": round(predicted.latency_s, 4),
                                      "latency_target_s": round(predicted.latency_target_s, 4),
                                      "energy_j_per_request": round(predicted.energy_j_per_request, 3),
                                      "accuracy": predicted.accuracy}
        if d in unsatisfiable:
            entry["unserved"] = unsatisfiable[d]
        demands.append(entry)
    instances = ([{"config": config_text(c), "executor": c.executor, "hardware": c.hardware, "tp": c.tp,
                   "power_cap_w": c.power_cap_w, "instances": n, "unplaced": placement.unplaced.get(c, 0)}
                  for c, n in sorted(solution.instances.items(), key=lambda kv: config_text(kv[0]))]
                 if solution is not None else [])
    return {
        "planner": preset,
        "status": solution.status if solution is not None else "no plan yet",
        "objective_value": solution.objective_value if solution is not None else None,
        "demands": demands, "instances": instances,
        "binding": list(solution.binding) if solution is not None else [],
        "power_w": round(solution.power_w, 1) if solution is not None else None,
        "cost_per_hour_usd": round(solution.cost_per_hour_usd, 3) if solution is not None else None,
        "solve_s": round(solution.solve_s, 4) if solution is not None else None,
        "solve_s_p50": round(statistics.median(solve_history_s), 4) if solve_history_s else None,
        "rollout_pending": rollout_pending,
        "components": [{"component_id": p.component_id, "executor": p.executor, "node": p.node,
                        "devices": list(p.device_indexes)} for p in placement.components],
        "power_limits": [{"node": n, "device": i, "power_limit_w": w}
                         for (n, i), w in sorted(placement.power_limits.items())],
        "power": dict(budgets),
        "notes": (list(solution.notes) if solution is not None else []) + list(placement.notes),
    }
