"""Simulated engines: the latency and device load of a model, without the model.

A sim component runs on simulated GPUs only. While it serves invocations it raises its
GPUs' utilization to the executor's ``sim.utilization`` (several sim components on one
GPU add up, capped at 1; a GPU whose configured background load is higher keeps that),
so the sim GPU's power, temperature and energy counter move as a loaded GPU's would, and
per-invocation energy is measured from that counter exactly as on real hardware. When it
is idle the GPU returns to the load it had before.

Latency = (latency_s + latency_per_item_s * items) * knob factors * slowdown, where ``items``
is the length of the largest list input and the slowdown is that of the executor's work
(``sim.memory_bound_share`` of it bandwidth-bound) at the clock the sim GPU settles on under
its power cap and temperature (``GpuSpec.slowdown``): a capped GPU is slower, as a real one
is, and decode-heavy work less so. Outputs come from ``sim_outputs`` and say they are simulated.

A sim engine runs inside the agent, as the agent's user (root where the agent is): it is the
agent's own code and runs no code from a catalog or a model, so unlike vLLM and tools it has
no privileges to drop.

A sim GPU that falls off the bus takes its engine down with it (exit code 1, as a CUDA
process dies on Xid 79); ``kill`` simulates any other crash.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from agent.components.engines.base import Engine, EngineContext, EngineError
from agent.components.sim_outputs import simulated_outputs
from agent.devices.sim import SimGpu
from common.devices.physics import operating_point
from common.workflow.catalog import SimEngineSpec

CRASH_EXIT_CODE = 1


class _SharedLoad:
    """The utilization that sim components drive on one GPU; restores the GPU's own load when idle."""

    def __init__(self, gpu: SimGpu) -> None:
        self.gpu = gpu
        self.baseline = gpu.utilization
        self.baseline_share = gpu.memory_bound_share
        self.active: dict[int, tuple[float, float]] = {}  # token -> (utilization, bandwidth-bound share)

    def set(self, token: int, utilization: float | None, now_s: float, memory_bound_share: float = 0.0) -> None:
        self.gpu.advance(max(now_s, self.gpu.now_s))  # energy so far accrues at the old load
        if utilization is None:
            self.active.pop(token, None)
        else:
            self.active[token] = (utilization, memory_bound_share)
        total = sum(u for u, _ in self.active.values())
        if total <= self.baseline:
            self.gpu.set_utilization(self.baseline, self.baseline_share)
        else:  # the work mix is the utilization-weighted mean of the components' shares
            share = sum(u * m for u, m in self.active.values()) / total
            self.gpu.set_utilization(min(1.0, total), share)
        if not self.active:
            _LOADS.pop(self.gpu, None)  # idle again: the next user sees whatever load the GPU has then


_LOADS: weakref.WeakKeyDictionary[SimGpu, _SharedLoad] = weakref.WeakKeyDictionary()


def _load_of(gpu: SimGpu) -> _SharedLoad:
    load = _LOADS.get(gpu)
    if load is None:
        load = _LOADS[gpu] = _SharedLoad(gpu)
    return load


def knob_text(value: Any) -> str:
    """How a knob value is written as a key of ``knob_latency_factors`` (YAML keys are text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def items_in(inputs: dict[str, Any]) -> int:
    return max((len(v) for v in inputs.values() if isinstance(v, list)), default=0)


class SimEngine(Engine):
    simulated = True

    def __init__(self, ctx: EngineContext, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ctx)
        if ctx.executor.sim is None:
            raise EngineError("engine_failed", f"executor {ctx.executor.name} has no 'sim' section", retryable=False)
        self.spec: SimEngineSpec = ctx.executor.sim
        self.clock = clock
        self.gpus: list[SimGpu] = []
        self._ready_at_s: float | None = None
        self._memory_held = False
        self._busy = 0
        self._exit_code: int | None = None
        self._stopped = False

    # --- lifecycle ---------------------------------------------------------------------

    def _log(self, text: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with open(self.ctx.log_path, "a", encoding="utf-8") as log:
            log.write(f"{stamp} sim engine {self.ctx.component_id}: {text}\n")

    async def start(self) -> None:
        not_sim = [d for d in self.ctx.devices if not isinstance(d, SimGpu)]
        if not_sim:
            names = ", ".join(f"device {d.info.index} ({d.info.kind}, backend {d.info.backend})" for d in not_sim)
            raise EngineError("engine_failed", f"a sim engine runs on simulated GPUs only, but was given {names}",
                              retryable=False)
        self.gpus = [d for d in self.ctx.devices if isinstance(d, SimGpu)]
        for gpu in self.gpus:
            if gpu.lost:
                raise EngineError("engine_failed", f"simulated GPU {gpu.info.index} has fallen off the bus",
                                  retryable=False)
            free_bytes = gpu.info.memory_total_bytes - gpu.memory_used_bytes
            if self.spec.memory_bytes > free_bytes:
                raise EngineError("engine_failed", f"needs {self.spec.memory_bytes} bytes on simulated GPU "
                                  f"{gpu.info.index}, which has {free_bytes} free", retryable=False)
        for gpu in self.gpus:
            gpu.set_memory_used(gpu.memory_used_bytes + self.spec.memory_bytes)
        self._memory_held = True
        self._ready_at_s = self.clock() + self.spec.startup_s
        self._log(f"starting on simulated GPU(s) {[g.info.index for g in self.gpus]}; "
                  f"ready in {self.spec.startup_s:g} s; holding {self.spec.memory_bytes} bytes each")

    async def probe(self) -> bool:
        return (self._ready_at_s is not None and self.clock() >= self._ready_at_s
                and self.exit_code() is None and not self._stopped)

    def exit_code(self) -> int | None:
        if self._exit_code is None and not self._stopped:
            lost = [g.info.index for g in self.gpus if g.lost]
            if lost:
                self._exit_code = CRASH_EXIT_CODE
                self._log(f"simulated GPU(s) {lost} fell off the bus (Xid 79); engine exits with code "
                          f"{CRASH_EXIT_CODE}")
                self._release_devices()
        return self._exit_code

    def kill(self, code: int = -9) -> None:
        """Simulate the engine's process dying (tests, fault drills)."""
        if self._exit_code is None:
            self._exit_code = code
            self._log(f"killed; exit code {code}")
            self._release_devices()

    def _release_devices(self) -> None:
        now_s = self.clock()
        if self._busy:
            for gpu in self.gpus:
                _load_of(gpu).set(id(self), None, now_s)
        self._busy = 0
        if self._memory_held:
            for gpu in self.gpus:
                if not gpu.lost:
                    gpu.set_memory_used(max(0, gpu.memory_used_bytes - self.spec.memory_bytes))
            self._memory_held = False

    async def stop(self, grace_s: float) -> None:
        if not self._stopped:
            self._stopped = True
            self._release_devices()
            self._log("stopped")

    # --- invocations -------------------------------------------------------------------

    def latency_s(self, inputs: dict[str, Any], knobs: dict[str, Any]) -> float:
        """The modeled service time of one invocation on the GPUs' current operating point."""
        latency_s = self.spec.latency_s + self.spec.latency_per_item_s * items_in(inputs)
        for knob, value in knobs.items():
            latency_s *= self.spec.knob_latency_factors.get(knob, {}).get(knob_text(value), 1.0)
        slowdown = 1.0
        share = self.spec.memory_bound_share
        for gpu in self.gpus:
            busy = gpu.utilization >= self.spec.utilization
            point = operating_point(gpu.spec, max(gpu.utilization, self.spec.utilization), gpu.power_limit_w,
                                    gpu.temperature_c, gpu.memory_bound_share if busy else share)
            if point.sm_clock_mhz > 0:
                slowdown = max(slowdown, gpu.spec.slowdown(point.sm_clock_mhz, share))
        return latency_s * slowdown

    async def invoke(self, task: str, inputs: dict[str, Any], knobs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if self.exit_code() is not None or self._stopped:
            raise EngineError("engine_failed", f"sim engine {self.ctx.component_id} is not running", retryable=True)
        now_s = self.clock()
        if self._busy == 0:
            for gpu in self.gpus:
                _load_of(gpu).set(id(self), self.spec.utilization, now_s, self.spec.memory_bound_share)
        self._busy += 1
        try:
            latency_s = self.latency_s(inputs, knobs)
            await asyncio.sleep(min(latency_s, timeout_s))
            if self.exit_code() is not None:
                raise EngineError("engine_failed", f"sim engine {self.ctx.component_id} crashed mid-call",
                                  retryable=True)
            if latency_s > timeout_s:
                raise EngineError("timeout", f"simulated latency {latency_s:.3f} s exceeds the {timeout_s:g} s "
                                  "timeout", retryable=False)
        finally:
            if self._busy > 0:
                self._busy -= 1
                if self._busy == 0:
                    for gpu in self.gpus:
                        _load_of(gpu).set(id(self), None, self.clock())
        return simulated_outputs(task, self.ctx.executor.name, inputs, knobs)
