"""One engine instance under continuous batching, request by request, in virtual time.

The model (vLLM's scheduler, simplified; it shares nothing with the planner's formulas):

- The engine runs iterations. An iteration with ``n`` running sequences holding ``kv`` tokens of
  KV cache takes ``iteration_s(n, kv) = iteration_base_s + per_sequence_s * n + per_context_token_s * kv``
  times the instance's ``slowdown`` (power cap, heat, co-located tenants); each running sequence
  gains one output token per iteration. Throughput ``n / iteration_s`` saturates at
  ``1 / per_sequence_s`` as the batch grows, and every request's latency grows with it.
- Prefill: an admitted request's prompt costs ``prefill_base_s + prefill_per_token_s * tokens`` of
  engine time, done first-come first-served before decoding resumes (work-conserving, like a
  prefill-prioritising scheduler; with chunked prefill the same work is spread over mixed
  iterations, which moves the same total time around). A request that generates nothing (an
  embedding, an encoder) is done when its prefill is.
- Admission: a waiting request joins the batch (FCFS) when fewer than ``max_num_seqs`` run and its
  whole KV footprint (prompt + output tokens, times its ``sequences``) fits in what the running
  ones leave of ``kv_capacity_tokens``; otherwise it waits. A request larger than the whole cache
  is admitted alone (it would be rejected by a real engine at its ``max_model_len``; scenarios keep
  token counts inside it).
- ``sequences``: one request may decode several sequences side by side (a debate's agents, a
  mapped stage's items): it counts that many in ``n`` and finishes when its output is done.

Progress is tracked with two clocks so that an event costs O(log n): ``prefill_done_s`` of engine
work (advancing while prefill work is queued) and ``iterations`` (advancing otherwise, at
``1 / (slowdown * iteration_s)`` per second). A decoding request finishes when ``iterations``
passes the value it joined at plus its output tokens. Between events nothing changes, so the
engine's next event time is exact.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

EPS = 1e-9


@dataclass(frozen=True)
class EngineProfile:
    """Iteration-time constants of one engine instance (see the module doc)."""

    iteration_base_s: float
    per_sequence_s: float
    per_context_token_s: float
    prefill_base_s: float
    prefill_per_token_s: float
    max_num_seqs: int
    kv_capacity_tokens: int

    def __post_init__(self) -> None:
        for name in ("iteration_base_s", "per_sequence_s", "per_context_token_s", "prefill_base_s",
                     "prefill_per_token_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite non-negative number, got {value}")
        if self.iteration_base_s + self.per_sequence_s <= 0:
            raise ValueError("an iteration must take some time: iteration_base_s + per_sequence_s > 0")
        if self.max_num_seqs < 1 or self.kv_capacity_tokens < 1:
            raise ValueError("max_num_seqs and kv_capacity_tokens must be at least 1")

    def iteration_s(self, sequences: int, kv_tokens: float) -> float:
        return self.iteration_base_s + self.per_sequence_s * sequences + self.per_context_token_s * kv_tokens

    def unloaded_latency_s(self, prompt_tokens: int, output_tokens: int, sequences: int = 1) -> float:
        """One request alone on an idle engine (what an SLO's "best achievable" is measured from)."""
        prefill = self.prefill_base_s + self.prefill_per_token_s * prompt_tokens * sequences
        if output_tokens <= 0:
            return prefill
        kv = (prompt_tokens + output_tokens / 2.0) * sequences
        return prefill + output_tokens * self.iteration_s(sequences, kv)


@dataclass
class _Request:
    request_id: int
    prompt_tokens: int
    output_tokens: int
    sequences: int
    kv_tokens: int  # reserved while it runs
    submitted_s: float


class BatchEngine:
    """One instance: submit requests, ask for the next event, advance the clock, collect completions."""

    __slots__ = ("profile", "slowdown", "now_s", "iterations", "prefill_done_s", "prefill_queued_s",
                 "_decoding", "_prefilling", "_waiting", "_waiting_head", "running_sequences", "running_kv_tokens",
                 "running", "busy_s", "sequence_s", "_seq")

    def __init__(self, profile: EngineProfile, now_s: float = 0.0, slowdown: float = 1.0) -> None:
        self.profile = profile
        self.slowdown = slowdown
        self.now_s = now_s
        self.iterations = 0.0  # virtual: output tokens every running sequence has gained
        self.prefill_done_s = 0.0  # virtual: prefill work done, in engine seconds at slowdown 1
        self.prefill_queued_s = 0.0  # prefill work admitted so far
        self._decoding: list[tuple[float, int, _Request]] = []  # (iterations at which it is done, seq, request)
        self._prefilling: list[tuple[float, int, _Request]] = []  # prefill-only: (prefill_done_s when done, ...)
        self._waiting: list[_Request] = []
        self._waiting_head = 0
        self.running_sequences = 0
        self.running_kv_tokens = 0
        self.running = 0
        self.busy_s = 0.0  # time with work in the engine
        self.sequence_s = 0.0  # integral of running sequences over time (mean batch = sequence_s / busy_s)
        self._seq = 0

    # --- what is inside ---------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting) - self._waiting_head

    @property
    def outstanding(self) -> int:
        """Requests in the engine: running or waiting (what a least-loaded dispatcher compares)."""
        return self.running + self.waiting

    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0

    # --- events -------------------------------------------------------------------------------------

    def submit(self, now_s: float, request_id: int, prompt_tokens: int, output_tokens: int,
               sequences: int = 1) -> None:
        """A request arrives (call ``advance(now_s)`` first when time has passed)."""
        if now_s > self.now_s + EPS:
            raise ValueError(f"advance the engine to {now_s} before submitting (it is at {self.now_s})")
        sequences = max(1, int(sequences))
        kv = (max(0, int(prompt_tokens)) + max(0, int(output_tokens))) * sequences
        self._waiting.append(_Request(request_id, max(0, int(prompt_tokens)), max(0, int(output_tokens)),
                                      sequences, kv, now_s))
        self._admit()

    def set_slowdown(self, slowdown: float) -> None:
        """From now on every iteration and prefill takes ``slowdown`` times as long (advance first)."""
        if not slowdown > 0:
            raise ValueError(f"slowdown must be positive, got {slowdown}")
        self.slowdown = slowdown

    def next_event_s(self) -> float:
        """When the next request finishes (inf when nothing runs)."""
        if self.prefill_done_s < self.prefill_queued_s - EPS:
            target = self.prefill_queued_s
            if self._prefilling:
                target = min(target, self._prefilling[0][0])
            return self.now_s + (target - self.prefill_done_s) * self.slowdown
        if self._prefilling:  # done within rounding
            return self.now_s
        if self._decoding:
            remaining = max(0.0, self._decoding[0][0] - self.iterations)
            step_s = self.profile.iteration_s(self.running_sequences, self._kv_now()) * self.slowdown
            return self.now_s + remaining * step_s
        return math.inf

    def advance(self, to_s: float) -> list[tuple[int, float]]:
        """Run until ``to_s``; returns (request_id, finished_s) of every request that finished."""
        done: list[tuple[int, float]] = []
        while True:
            at_s = self.next_event_s()
            if at_s > to_s + EPS:
                break
            self._progress(max(at_s, self.now_s))
            self._finish(done)
            self._admit()
        self._progress(max(to_s, self.now_s))
        return done

    # --- internals ------------------------------------------------------------------------------------

    def _kv_now(self) -> float:
        return self.running_kv_tokens * 0.75  # the cache fills as sequences decode: about 3/4 of the reservation

    def _progress(self, to_s: float) -> None:
        dt = to_s - self.now_s
        if dt <= 0:
            return
        if self.running > 0:
            self.busy_s += dt
            self.sequence_s += dt * self.running_sequences
        remaining = dt
        backlog_s = (self.prefill_queued_s - self.prefill_done_s) * self.slowdown
        if backlog_s > EPS:
            spent = min(remaining, backlog_s)
            self.prefill_done_s += spent / self.slowdown
            remaining -= spent
        if remaining > 0 and self._decoding:
            step_s = self.profile.iteration_s(self.running_sequences, self._kv_now()) * self.slowdown
            self.iterations += remaining / step_s
        self.now_s = to_s

    def _finish(self, done: list[tuple[int, float]]) -> None:
        while self._prefilling and self._prefilling[0][0] <= self.prefill_done_s + EPS:
            _, _, request = heapq.heappop(self._prefilling)
            self._release(request)
            done.append((request.request_id, self.now_s))
        if self.prefill_done_s >= self.prefill_queued_s - EPS:
            while self._decoding and self._decoding[0][0] <= self.iterations + 1e-6:
                _, _, request = heapq.heappop(self._decoding)
                self._release(request)
                done.append((request.request_id, self.now_s))

    def _release(self, request: _Request) -> None:
        self.running -= 1
        self.running_sequences -= request.sequences
        self.running_kv_tokens -= request.kv_tokens

    def _admit(self) -> None:
        profile = self.profile
        while self._waiting_head < len(self._waiting):
            request = self._waiting[self._waiting_head]
            if self.running > 0 and (
                    self.running_sequences + request.sequences > profile.max_num_seqs
                    or self.running_kv_tokens + request.kv_tokens > profile.kv_capacity_tokens):
                break
            self._waiting_head += 1
            self.running += 1
            self.running_sequences += request.sequences
            self.running_kv_tokens += request.kv_tokens
            work_s = profile.prefill_base_s + profile.prefill_per_token_s * request.prompt_tokens * request.sequences
            self.prefill_queued_s += work_s
            self._seq += 1
            if request.output_tokens <= 0:
                heapq.heappush(self._prefilling, (self.prefill_queued_s, self._seq, request))
            else:
                # Its decode starts when the prefill backlog (its own included) is done; iterations do not
                # advance until then, so it joins at today's count.
                heapq.heappush(self._decoding, (self.iterations + request.output_tokens, self._seq, request))
        if self._waiting_head > 256 and self._waiting_head * 2 > len(self._waiting):
            del self._waiting[:self._waiting_head]
            self._waiting_head = 0


def closed_loop_latency_s(profile: EngineProfile, concurrency: int, prompt_tokens: int, output_tokens: int,
                          requests: int = 200) -> float:
    """Mean latency when ``concurrency`` clients each send a new request as soon as their last one returns
    (how a concurrency sweep measures an engine), over ``requests`` requests after a warm-up."""
    engine = BatchEngine(profile)
    sent: dict[int, float] = {}
    next_id = 0
    for _ in range(concurrency):
        engine.submit(0.0, next_id, prompt_tokens, output_tokens)
        sent[next_id] = 0.0
        next_id += 1
    latencies: list[float] = []
    warmup = concurrency * 2
    while len(latencies) < requests + warmup:
        at_s = engine.next_event_s()
        if not math.isfinite(at_s):
            break
        for request_id, finished_s in engine.advance(at_s):
            latencies.append(finished_s - sent.pop(request_id))
            engine.submit(finished_s, next_id, prompt_tokens, output_tokens)
            sent[next_id] = finished_s
            next_id += 1
    measured = latencies[warmup:] or latencies
    return sum(measured) / len(measured)
