"""Tools (document loaders, retrieval, sandboxes, OpenCV) as first-come first-served servers.

A tool instance serves ``servers`` invocations at once (its ``max_concurrency``); the rest queue in
arrival order. Service times are lognormal with the catalog's ``expected_latency_s`` as the mean and a
coefficient of variation of ``SERVICE_CV`` (an estimate: tool run times vary with their inputs). The
catalog figure is the only source for tools here; it is the same number the planner reads, so tools are
where the judge and the planner agree by construction (their queueing is still the judge's own).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

SERVICE_CV = 0.5


class ToolServer:
    """One tool instance, with the same interface as ``BatchEngine``."""

    __slots__ = ("servers", "mean_s", "rng", "now_s", "_running", "_waiting", "_head", "busy_s", "sequence_s",
                 "slowdown", "_sigma", "_mu")

    def __init__(self, servers: int, mean_s: float, rng: np.random.Generator, now_s: float = 0.0) -> None:
        self.servers = max(1, int(servers))
        self.mean_s = max(1e-6, float(mean_s))
        self.rng = rng
        self.now_s = now_s
        self._running: list[tuple[float, int]] = []  # (finish_s, request_id)
        self._waiting: list[tuple[int, float]] = []  # (request_id, work_s)
        self._head = 0
        self.busy_s = 0.0  # time with at least one invocation running
        self.sequence_s = 0.0  # integral of running invocations
        self.slowdown = 1.0
        self._sigma = math.sqrt(math.log(1.0 + SERVICE_CV ** 2))
        self._mu = math.log(self.mean_s) - self._sigma ** 2 / 2.0

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting) - self._head

    @property
    def outstanding(self) -> int:
        return self.running + self.waiting

    def idle(self) -> bool:
        return not self._running and self.waiting == 0

    def set_slowdown(self, slowdown: float) -> None:
        self.slowdown = slowdown

    def submit(self, now_s: float, request_id: int, prompt_tokens: int = 0, output_tokens: int = 0,
               sequences: int = 1) -> None:
        work_s = float(self.rng.lognormal(self._mu, self._sigma))
        self._waiting.append((request_id, work_s))
        self._start()

    def next_event_s(self) -> float:
        return self._running[0][0] if self._running else math.inf

    def advance(self, to_s: float) -> list[tuple[int, float]]:
        done: list[tuple[int, float]] = []
        while self._running and self._running[0][0] <= to_s + 1e-12:
            finish_s, request_id = self._running[0]
            self._progress(max(finish_s, self.now_s))
            heapq.heappop(self._running)
            done.append((request_id, finish_s))
            self._start()
        self._progress(max(to_s, self.now_s))
        return done

    def _progress(self, to_s: float) -> None:
        dt = to_s - self.now_s
        if dt > 0 and self._running:
            self.busy_s += dt
            self.sequence_s += dt * len(self._running)
        self.now_s = to_s

    def _start(self) -> None:
        while len(self._running) < self.servers and self._head < len(self._waiting):
            request_id, work_s = self._waiting[self._head]
            self._head += 1
            heapq.heappush(self._running, (self.now_s + work_s * self.slowdown, request_id))
        if self._head > 256 and self._head * 2 > len(self._waiting):
            del self._waiting[:self._head]
            self._head = 0
