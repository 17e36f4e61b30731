"""Co-location: the interference model, the optimizer's groups, placement of the groups, and the
simulator's slowdown of instances that share GPUs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from controller.simulator.engine import Simulator
from tests.unit.fluid import fluid, run_simulation
from policies.colocation import MAX_CONTENTION, slowdowns
from policies.optimizer import optimize, with_instances
from policies.placement import PlacementLimits, place
from tests.unit.test_optimizer import day_mix
from tests.unit.test_placement import CATALOG, cfg, node, where
from tests.unit.test_simulator import ScriptedPolicy, _inputs, _planned, parse, short, smoke_document

# --- the interference model -------------------------------------------------------------------------


def test_a_lone_instance_is_not_slowed() -> None:
    assert slowdowns([]) == []
    assert slowdowns([0.7]) == [1.0]
    assert slowdowns([0.0, 0.0]) == [1.0, 1.0]


def test_two_equal_tenants_solve_the_fixed_point() -> None:
    # f = 1 / (1 - rho f / 2)  =>  rho f^2 / 2 - f + 1 = 0  =>  f = (1 - sqrt(1 - 2 rho)) / rho
    rho = 0.2
    expected = (1 - math.sqrt(1 - 2 * rho)) / rho
    assert slowdowns([rho, rho]) == pytest.approx([expected, expected], rel=1e-9)


def test_busier_co_tenants_slow_an_instance_more_and_contention_is_bounded() -> None:
    quiet, busy = slowdowns([0.05, 0.3])
    assert busy < quiet  # the busy instance meets the quiet one's work less often than the reverse
    assert slowdowns([0.1, 0.1, 0.1])[0] > slowdowns([0.1, 0.1])[0] > 1.0
    worst = slowdowns([1.0, 1.0, 1.0])
    assert all(math.isfinite(f) and f == pytest.approx(1 / (1 - MAX_CONTENTION)) for f in worst)


# --- the optimizer ---------------------------------------------------------------------------------


def _quiet_day(**changes):
    return day_mix(0.05, **{"wait_quantile": 0.99, "queueing_slack": 0.2, **changes})


def test_co_location_is_off_unless_asked_and_bad_limits_are_refused() -> None:
    plain = optimize(_quiet_day())
    assert plain.colocate is None
    assert optimize(_quiet_day(colocate_max_busy=1.5)).status.startswith("error: colocate_max_busy")
    assert optimize(_quiet_day(colocate_max_busy=-0.1)).status.startswith("error: colocate_max_busy")


def test_quiet_one_instance_pools_share_devices_within_the_busy_limit() -> None:
    plain = optimize(_quiet_day())
    shared = optimize(_quiet_day(colocate_max_busy=0.3))
    assert shared.status == "optimal" and shared.colocate, shared.notes
    assert shared.instances == plain.instances and shared.choices == plain.choices  # the plan is the same
    for group in shared.colocate:
        assert len(group) >= 2
        assert len({(c.hardware, c.tp, c.power_cap_w) for c in group}) == 1
        assert all(shared.instances[c] == 1 for c in group)
        assert sum(shared.load[c] for c in group) <= 0.3 + 1e-9
    saved = sum(sum(plain.instance_idle_power_w[c] for c in g) - max(plain.instance_idle_power_w[c] for c in g)
                for g in shared.colocate)
    assert shared.average_power_w == pytest.approx(plain.average_power_w - saved)
    assert any(n.startswith("co-located on") for n in shared.notes)
    # Nothing is busy enough to be left out at a limit of 1; at 0 only idle pools could share.
    assert sum(len(g) for g in optimize(_quiet_day(colocate_max_busy=1.0)).colocate) >= \
        sum(len(g) for g in shared.colocate)
    none_busy = optimize(_quiet_day(colocate_max_busy=0.0))
    assert all(none_busy.load[c] == 0 for g in none_busy.colocate for c in g)


def test_co_location_keeps_every_demand_within_its_wait_quantile() -> None:
    """The busy limit allows every group here; what stops them is the latency tiers' room for slowdown."""
    roomy = optimize(_quiet_day(colocate_max_busy=1.0))
    assert roomy.colocate
    tight = optimize(_quiet_day(colocate_max_busy=1.0, queueing_slack=0.0, wait_quantile=0.999))
    assert tight.status == "optimal" and tight.colocate == ()
    assert not any(n.startswith("co-located") for n in tight.notes)


def test_scaling_a_co_located_pool_gives_it_devices_of_its_own() -> None:
    shared = optimize(_quiet_day(colocate_max_busy=0.3))
    group = shared.colocate[0]
    grown = with_instances(shared, {**shared.instances, group[0]: 2})
    assert group not in grown.colocate
    assert grown.average_power_w > shared.average_power_w
    same = with_instances(shared, shared.instances)
    assert same.colocate == shared.colocate and same.average_power_w == pytest.approx(shared.average_power_w)


# --- placement -------------------------------------------------------------------------------------


def test_a_group_goes_to_the_same_gpus_and_others_keep_theirs() -> None:
    small, tiny = cfg("chat"), cfg("tiny")
    apart = place({small: 1, tiny: 1}, [node("n1", gpus=4)], CATALOG, limits=PlacementLimits(spread=False))
    assert len(set(where(apart))) == 2  # empty GPUs first, as before
    together = place({small: 1, tiny: 1}, [node("n1", gpus=4)], CATALOG, limits=PlacementLimits(spread=False),
                     colocate=[(small, tiny)])
    assert len(set(where(together))) == 1 and not together.unplaced


def test_current_instances_gather_into_their_group_and_split_when_it_ends() -> None:
    small, tiny = cfg("chat"), cfg("tiny")
    apart = place({small: 1, tiny: 1}, [node("n1", gpus=4)], CATALOG, limits=PlacementLimits(spread=False))
    gathered = place({small: 1, tiny: 1}, [node("n1", gpus=4)], CATALOG, apart.components,
                     limits=PlacementLimits(spread=False), colocate=[(small, tiny)])
    assert len(set(where(gathered))) == 1
    kept = {c.component_id for c in apart.components} & {c.component_id for c in gathered.components}
    assert len(kept) == 1  # one stayed, the other moved to it
    # Without co-location planned (None), sharing current components stay (the fallback rule) ...
    still = place({small: 1, tiny: 1}, [node("n1", gpus=4)], CATALOG, gathered.components,
                  limits=PlacementLimits(spread=False))
    assert len(set(where(still))) == 1
    # ... with co-location planned and the group gone, they split.
    split = place({small: 1, tiny: 1}, [node("n1", gpus=4)], CATALOG, gathered.components,
                  limits=PlacementLimits(spread=False), colocate=())
    assert len(set(where(split))) == 2


def test_a_group_that_does_not_fit_one_gpu_is_placed_apart() -> None:
    big, chat = cfg("big"), cfg("chat")  # 50 + 30 GiB > one H100's 79.6 GiB
    result = place({big: 1, chat: 1}, [node("n1", gpus=2)], CATALOG, colocate=[(big, chat)])
    assert len(set(where(result))) == 2 and not result.unplaced


def test_the_running_plans_groups_are_kept_first() -> None:
    def names(groups):
        return sorted(tuple(sorted(c.executor for c in g)) for g in groups)

    # Busy fractions here: 8b chat 16 %, 3b vision 7 %, coder 5 %, embedder 1 %.
    fresh = optimize(_quiet_day(colocate_max_busy=0.2))
    assert names(fresh.colocate) == [("sim-coder-7b-debate", "sim-vlm-3b-detect"),
                                     ("sim-llama-8b-chat", "sim-minilm-embed")], fresh.notes
    by_name = {c.executor: c for g in fresh.colocate for c in g}
    incumbent = ((by_name["sim-vlm-3b-detect"], by_name["sim-minilm-embed"]),)
    again = optimize(_quiet_day(colocate_max_busy=0.2, incumbent_colocate=incumbent))
    assert names(again.colocate) == [("sim-coder-7b-debate", "sim-minilm-embed", "sim-vlm-3b-detect")]
    # A running group stays together a little above the limit (17 % at 15 %: hysteresis), not far above.
    tight = optimize(_quiet_day(colocate_max_busy=0.15))
    assert names(tight.colocate) == [("sim-coder-7b-debate", "sim-minilm-embed", "sim-vlm-3b-detect")]
    kept = optimize(_quiet_day(colocate_max_busy=0.15, incumbent_colocate=(
        (by_name["sim-llama-8b-chat"], by_name["sim-minilm-embed"]),)))
    assert names(kept.colocate) == [("sim-coder-7b-debate", "sim-vlm-3b-detect"),
                                    ("sim-llama-8b-chat", "sim-minilm-embed")]
    over = optimize(_quiet_day(colocate_max_busy=0.15, incumbent_colocate=(
        (by_name["sim-llama-8b-chat"], by_name["sim-vlm-3b-detect"]),)))
    assert names(over.colocate) == names(tight.colocate)


# --- the simulator -----------------------------------------------------------------------------------


def _smoke(duration_s: float, **control):
    """The smoke scenario with day-mix's latency margin (sharing needs room in the latency bounds)."""
    doc = short(smoke_document(), duration_s)
    doc["spec"]["control"].update({"latency_planning_margin": 0.2, **control})
    return parse(doc)


def test_instances_that_share_gpus_serve_slower_in_the_simulator() -> None:
    scenario = _smoke(600.0, colocate_max_busy=1.0)
    solution, hardware, perf = _planned(scenario, "murakkab")
    assert solution.colocate, solution.notes
    apart = replace(solution, colocate=())

    def run(plan):
        sim = Simulator(fluid(scenario), ScriptedPolicy([(0.0, plan)], inputs=_inputs(scenario, perf)), perf=perf,
                        hardware=hardware)
        return sim, sim.run()

    shared_sim, shared = run(solution)
    apart_sim, alone = run(apart)
    assert shared_sim._sharing() and not apart_sim._sharing()
    assert shared["gpu_hours"] < alone["gpu_hours"] and shared["energy_mwh"] < alone["energy_mwh"]
    assert shared["requests"]["served"] == pytest.approx(alone["requests"]["served"])
    # Same requests, same pools, slower service where GPUs are shared: fewer (or as many) within their bound.
    assert shared["requests"]["met_slo"] < alone["requests"]["met_slo"]
    grouped = {c for g in solution.colocate for c in g}
    assert all(u >= apart_sim.utilization.get(c, 0.0) for c, u in shared_sim.utilization.items() if c in grouped)


def test_the_murakkab_policy_co_locates_when_the_scenario_asks() -> None:
    plain, _ = run_simulation(_smoke(1800.0), "murakkab", plots=False)
    scenario = _smoke(1800.0, colocate_max_busy=0.3)
    shared, sim = run_simulation(scenario, "murakkab", plots=False)
    assert sim.policy.inputs.colocate_max_busy == pytest.approx(0.3)
    assert shared["gpu_hours"] < plain["gpu_hours"]
    assert shared["requests"]["dropped"] <= plain["requests"]["dropped"] + 1.0  # moves are make before break
    # The optimizer let only sharing that keeps every demand's wait quantile: attainment barely moves.
    assert shared["slo_attainment"]["overall"] >= plain["slo_attainment"]["overall"] - 1e-3


def test_scenario_co_location_limit_is_validated() -> None:
    from controller.simulator.scenario import ScenarioError
    doc = short(smoke_document(), 600.0)
    doc["spec"]["control"]["colocate_max_busy"] = 1.5
    with pytest.raises(ScenarioError, match="colocate_max_busy"):
        parse(doc)
