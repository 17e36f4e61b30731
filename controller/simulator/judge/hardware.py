"""What the judge knows about devices beyond ``common.devices.gpu_specs``: bandwidth, compute, links, loading.

Spec values are from NVIDIA's datasheets (dense tensor throughput, no sparsity); efficiencies and
overheads are estimates from public measurements, each cited. Nothing here comes from the
planner's performance model (``policies.perf_model``), which has its own, different numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceRates:
    memory_bandwidth_bytes_per_s: float
    bf16_flops: float  # dense
    fp8_flops: float | None  # dense; None: no FP8 tensor cores (FP8 weights are upcast)
    link_bytes_per_s: float  # per GPU, to its tensor-parallel peers
    load_bytes_per_s: float  # weights from local NVMe into device memory at engine start


# Datasheets: NVIDIA H100 Tensor Core GPU datasheet (SXM5: 3.35 TB/s HBM3, 989 TFLOPS BF16 and 1,979 FP8 dense,
# NVLink 900 GB/s); NVIDIA A100 datasheet (80 GB SXM: 2,039 GB/s, 312 TFLOPS BF16, NVLink 600 GB/s); NVIDIA L4
# datasheet (300 GB/s GDDR6, 121 TFLOPS BF16 and 242.5 FP8 dense, PCIe Gen4 x16 64 GB/s).
# Loading: safetensors from a local NVMe drive, about 2-3 GB/s per engine in practice (vLLM's model loader reads
# the files once and copies them to the device; a Gen4 NVMe reads about 7 GB/s sequentially, shared by the
# engines starting on a host). Estimate: 2.5 GB/s.
DEVICE_RATES: dict[str, DeviceRates] = {
    "h100": DeviceRates(3.35e12, 989e12, 1979e12, 900e9, 2.5e9),
    "a100": DeviceRates(2.039e12, 312e12, None, 600e9, 2.5e9),
    "l4": DeviceRates(300e9, 121e12, 242.5e12, 64e9, 2.5e9),
}

# Achieved shares of the peaks (estimates from public measurements):
# - decode streams the weights once per iteration; Databricks ("LLM Inference Performance Engineering: Best
#   Practices", 2023) measured model bandwidth utilisation of about 60 % at small batch on A100 and H100;
MEMORY_BANDWIDTH_EFFICIENCY = 0.6
# - prefill and encoders are dense GEMMs; about half of peak is what serving engines reach (model FLOPs
#   utilisation 40-60 % in vLLM and TensorRT-LLM prefill measurements, e.g. the Sarathi-Serve paper, OSDI 2024);
PREFILL_FLOPS_EFFICIENCY = 0.5
# - decode's per-sequence matrix work runs at low efficiency (skinny GEMMs): 25 % of peak (estimate).
DECODE_FLOPS_EFFICIENCY = 0.25
# Per-iteration host overhead (scheduling, sampling, kernel launches with CUDA graphs): about 2 ms (vLLM's
# V1 engine blog post, 2025, reports CPU overhead of a few ms per step before its optimisations; estimate).
ITERATION_OVERHEAD_S = 0.002
# One all-reduce of a small message over NVLink: about 10 us (NCCL latency; estimate); two per layer.
ALLREDUCE_LATENCY_S = 10e-6
# Engine process start before weights load (CUDA context, graph capture, warm-up): about 20 s for vLLM on a GPU
# (estimate: vLLM logs 10-30 s of graph capture and profiling on H100 hosts).
GPU_ENGINE_START_BASE_S = 20.0
# vLLM's default share of device memory for weights, activations and KV cache (--gpu-memory-utilization).
GPU_MEMORY_UTILIZATION = 0.9
# vLLM's default most sequences in one batch (--max-num-seqs).
MAX_NUM_SEQS = 256
