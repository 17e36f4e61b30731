"""What one invocation of an executor costs on a device, in the judge's terms (roofline, not the catalog's
latencies): model shapes, the work per stage, and the engine profile of an instance.

- Model shapes are the published configurations of the models the simulated executors imitate (each
  cited). The catalog's ``sim`` latencies, the planner's inputs, are not used.
- Work: the prompt and output tokens of one invocation and how many sequences it decodes side by side.
  LLM stages take a request's trace token counts where the trace has them (``context_tokens`` as the
  prompt, ``generated_tokens`` capped by ``max_tokens``); otherwise per-task typical sizes (below).
- Engine profile on a GPU configuration (hardware, tensor-parallel size ``tp``): an iteration streams the
  weights and the batch's KV cache from device memory (``MEMORY_BANDWIDTH_EFFICIENCY`` of the bandwidth,
  split over ``tp`` devices), does ``2 * parameters`` FLOPs per sequence, pays the host overhead and, with
  ``tp > 1``, two all-reduces per layer (latency plus activations over the links). Prefill does
  ``2 * parameters`` FLOPs per prompt token at ``PREFILL_FLOPS_EFFICIENCY``.
- CPU executors under vLLM use the profiles measured here (``controller.simulator.judge.measured``);
  tools are first-come first-served servers (``controller.simulator.judge.tools``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.workflow.catalog import ExecutorSpec
from controller.simulator.judge.batching import EngineProfile
from controller.simulator.judge.hardware import (
    ALLREDUCE_LATENCY_S, DECODE_FLOPS_EFFICIENCY, DEVICE_RATES, GPU_MEMORY_UTILIZATION, ITERATION_OVERHEAD_S,
    MAX_NUM_SEQS, MEMORY_BANDWIDTH_EFFICIENCY, PREFILL_FLOPS_EFFICIENCY,
)


@dataclass(frozen=True)
class ModelShape:
    parameters: float
    bytes_per_parameter: float  # weights as served (bf16 2, fp8 1)
    layers: int
    hidden: int
    kv_bytes_per_token: float  # K and V of every layer, bf16
    fp8_compute: bool = False


def _kv(layers: int, kv_heads: int, head_dim: int) -> float:
    return 2.0 * layers * kv_heads * head_dim * 2.0


# Published configurations (Hugging Face config.json of each model; parameter counts from the model cards).
MODEL_SHAPES: dict[str, ModelShape] = {
    # openai/whisper-large-v3: 1.55B, 32 encoder and 32 decoder layers, d_model 1280, 20 heads (fp16).
    "sim-whisper-large-v3": ModelShape(1.55e9, 2, 64, 1280, _kv(32, 20, 64)),
    # Qwen/Qwen2.5-VL-3B-Instruct: 3.75B with the vision tower, 36 layers, hidden 2048, 2 KV heads of 128.
    "sim-vlm-3b-detect": ModelShape(3.75e9, 2, 36, 2048, _kv(36, 2, 128)),
    # Qwen/Qwen2.5-VL-32B-Instruct: 33.5B, 64 layers, hidden 5120, 8 KV heads of 128; served in FP8.
    "sim-vlm-32b-detect": ModelShape(33.5e9, 1, 64, 5120, _kv(64, 8, 128), fp8_compute=True),
    # meta-llama/Llama-3.1-8B-Instruct: 8.03B, 32 layers, hidden 4096, 8 KV heads of 128 (bf16).
    "sim-llama-8b-chat": ModelShape(8.03e9, 2, 32, 4096, _kv(32, 8, 128)),
    # meta-llama/Llama-3.1-70B-Instruct: 70.6B, 80 layers, hidden 8192, 8 KV heads of 128 (bf16).
    "sim-llama-70b-chat": ModelShape(70.6e9, 2, 80, 8192, _kv(80, 8, 128)),
    # Qwen/Qwen2.5-Coder-7B-Instruct: 7.62B, 28 layers, hidden 3584, 4 KV heads of 128 (bf16).
    "sim-coder-7b-debate": ModelShape(7.62e9, 2, 28, 3584, _kv(28, 4, 128)),
    # sentence-transformers/all-MiniLM-L6-v2: 22.7M, 6 layers, hidden 384 (an encoder: no KV cache kept).
    "sim-minilm-embed": ModelShape(22.7e6, 2, 6, 384, 0.0),
}

# Typical sizes where a trace gives none (estimates): a RAG or video answer reads about 1,200 prompt tokens
# (question, five ~200-token passages or a transcript and object list); a debater reads 800 and writes 400 per
# round; a minute of audio is two 30 s windows of 1,500 encoder frames (Whisper) and about 200 output tokens;
# a video frame is about 384 vision tokens (Qwen2.5-VL's video preprocessing allows 768 tokens of 28x28-pixel
# patches per pair of frames: VIDEO_MAX_PIXELS = 768 * 28 * 28, temporal patch 2) and a detection names objects
# in about 30 tokens; a passage to embed is about 128 tokens, a question 32.
CHAT_PROMPT_TOKENS = 1200
DEBATE_PROMPT_TOKENS = 800
DEBATE_TOKENS_PER_ROUND = 400
AUDIO_PROMPT_TOKENS = 3000
AUDIO_OUTPUT_TOKENS = 200
FRAME_PROMPT_TOKENS = 384
FRAME_OUTPUT_TOKENS = 30
PASSAGE_TOKENS = 128
QUESTION_TOKENS = 32
DEFAULT_MAX_TOKENS = 256
MAX_PROMPT_TOKENS = 16384  # longer trace prompts are cut (the engines' max_model_len)
LLM_TASKS = ("chat", "code-generation")


@dataclass(frozen=True)
class Work:
    """One invocation: prompt tokens and output tokens per sequence, sequences side by side."""

    prompt_tokens: int
    output_tokens: int
    sequences: int = 1
    rounds: int = 1  # debate rounds run one after another (each a prefill and a decode)


def _knob(knobs: Mapping[str, Any], name: str, default: int) -> int:
    value = knobs.get(name, default)
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return default


def stage_work(task: str, knobs: Mapping[str, Any], items: float, context_tokens: int = 0,
               generated_tokens: int = 0) -> Work:
    """The judge's work for one invocation of a stage (``items``: elements a batched call carries)."""
    n_items = max(1, int(round(items)))
    if task == "chat":
        cap = _knob(knobs, "max_tokens", DEFAULT_MAX_TOKENS)
        prompt = min(context_tokens, MAX_PROMPT_TOKENS) if context_tokens > 0 else CHAT_PROMPT_TOKENS
        output = min(generated_tokens, cap) if generated_tokens > 0 else cap
        return Work(prompt, max(1, output))
    if task == "code-generation":
        prompt = min(context_tokens, MAX_PROMPT_TOKENS) if context_tokens > 0 else DEBATE_PROMPT_TOKENS
        per_round = min(generated_tokens, 1024) if generated_tokens > 0 else DEBATE_TOKENS_PER_ROUND
        return Work(prompt, max(1, per_round), sequences=_knob(knobs, "debaters", 2),
                    rounds=_knob(knobs, "rounds", 1))
    if task == "speech-to-text":
        return Work(AUDIO_PROMPT_TOKENS, AUDIO_OUTPUT_TOKENS)
    if task == "object-detection":
        return Work(FRAME_PROMPT_TOKENS * n_items, FRAME_OUTPUT_TOKENS * n_items)
    if task == "embed":
        return Work(PASSAGE_TOKENS if n_items > 1 else QUESTION_TOKENS, 0, sequences=n_items)
    return Work(CHAT_PROMPT_TOKENS, DEFAULT_MAX_TOKENS)


def gpu_profile(exe: ExecutorSpec, hardware: str, tp: int, memory_total_bytes: int) -> EngineProfile | None:
    """The engine profile of an instance of a GPU executor at full clock; None for unknown models or hardware."""
    shape = MODEL_SHAPES.get(exe.name)
    rates = DEVICE_RATES.get(hardware)
    if shape is None or rates is None or tp < 1:
        return None
    bandwidth = rates.memory_bandwidth_bytes_per_s * MEMORY_BANDWIDTH_EFFICIENCY * tp
    flops_peak = rates.fp8_flops if shape.fp8_compute and rates.fp8_flops else rates.bf16_flops
    weights_bytes = shape.parameters * shape.bytes_per_parameter
    allreduce_base_s = 2 * shape.layers * ALLREDUCE_LATENCY_S if tp > 1 else 0.0
    allreduce_per_token_s = (2 * shape.layers * shape.hidden * 2.0 * 2.0 * (tp - 1) / tp / rates.link_bytes_per_s
                             if tp > 1 else 0.0)
    free_bytes = memory_total_bytes * tp * GPU_MEMORY_UTILIZATION - weights_bytes
    if free_bytes <= 0:
        return None
    kv_tokens = int(free_bytes / shape.kv_bytes_per_token) if shape.kv_bytes_per_token > 0 else 10_000_000
    return EngineProfile(
        iteration_base_s=ITERATION_OVERHEAD_S + allreduce_base_s + weights_bytes / bandwidth,
        per_sequence_s=2.0 * shape.parameters / (flops_peak * DECODE_FLOPS_EFFICIENCY * tp) + allreduce_per_token_s,
        per_context_token_s=shape.kv_bytes_per_token / bandwidth,
        prefill_base_s=ITERATION_OVERHEAD_S + allreduce_base_s,
        prefill_per_token_s=2.0 * shape.parameters / (flops_peak * PREFILL_FLOPS_EFFICIENCY * tp)
        + allreduce_per_token_s,
        max_num_seqs=MAX_NUM_SEQS,
        kv_capacity_tokens=max(1, kv_tokens))


def memory_bound_share(profile: EngineProfile, sequences: int = 8, kv_tokens: float = 8 * 1500.0) -> float:
    """Share of a decode iteration spent streaming memory at a typical batch (drives power-cap slowdown)."""
    total = profile.iteration_s(sequences, kv_tokens)
    memory = profile.iteration_base_s - ITERATION_OVERHEAD_S + profile.per_context_token_s * kv_tokens
    return min(1.0, max(0.0, memory / total)) if total > 0 else 0.0


def weights_bytes(exe: ExecutorSpec) -> float:
    """What an engine loads at start: the model's weights (shape table), else the catalog's memory figure."""
    shape = MODEL_SHAPES.get(exe.name)
    if shape is not None:
        return shape.parameters * shape.bytes_per_parameter
    per_device = max(exe.resources.gpu_memory_bytes, exe.sim.memory_bytes if exe.sim else 0)
    return float(per_device * exe.resources.gpu_count or exe.resources.memory_bytes)


def unloaded_latency_s(profile: EngineProfile, work: Work) -> float:
    """One invocation alone on an idle instance."""
    one = profile.unloaded_latency_s(work.prompt_tokens, work.output_tokens, work.sequences)
    return one * work.rounds if math.isfinite(one) else one
