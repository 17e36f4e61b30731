"""Run a scenario under the fluid judge: tests of the simulator shell, the fluid service model and the
policies' reactions use it for speed and because their expectations are the fluid model's; the request
judge has tests of its own (test_judge.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from controller.simulator.run import run_simulation as _run_simulation
from controller.simulator.scenario import Scenario


def fluid(scenario: Scenario) -> Scenario:
    return dataclasses.replace(scenario, spec=scenario.spec.model_copy(update={"judge": "fluid"}))


def run_simulation(scenario: Scenario, *args: Any, **kwargs: Any) -> Any:
    return _run_simulation(fluid(scenario), *args, **kwargs)
