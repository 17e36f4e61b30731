"""Modeled performance: what an executor does on a hardware type, tensor-parallel size and power cap.

The planner needs latency, capacity, energy and power for configurations nobody has profiled yet
(hardware not present, caps not tried). ``CatalogPerfModel`` derives them from the catalog's own
numbers and the simulated GPU's physical model, and labels every result ``modeled``; learned
predictors replace it where profiles exist. Pure and deterministic: no clocks, no files.

The model, per instance of executor ``e`` on configuration (hardware ``h``, ``tp`` devices, cap ``P``):

- Reference latency ``L0``: the sim section's ``(latency_s + latency_per_item_s * items) * knob factors``
  (as ``agent.components.engines.sim`` computes it), else ``expected_latency_s`` (vLLM and tools). It is
  taken as measured on the reference hardware: the first of ``resources.gpu_models`` that names a known
  hardware type, else ``h100``, at the catalog's ``gpu_count``; CPU executors: the CPU.
- Hardware: ``L = L0 * speed[ref] / speed[h] * (gpu_count / tp) ** TP_SCALING_EXPONENT``.
- Power cap: the GPU's DVFS model (``common.devices.physics.operating_point``) at the executor's utilization
  and bandwidth-bound share (``sim.utilization`` and ``sim.memory_bound_share``; vLLM:
  ``DEFAULT_GPU_UTILIZATION`` and ``DEFAULT_MEMORY_BOUND_SHARE``) and 25 C gives the clock and the
  per-device power under the cap; latency scales by the operating point's slowdown (the sim engine's
  rule: compute-bound work by ``f_max / f``, bandwidth-bound work only below the knee clock), busy
  power is ``tp * power``, idle power ``tp`` times the device's idle with an engine loaded (a CUDA
  context held: 123 W on an H100 against 75 W without). Uncapped means the default power limit.
- Capacity: ``capacity_rps = c_eff / L`` with ``c_eff`` the requests served side by side at latency L:
  GPU sim executors ``max_concurrency`` (the sim engine's service time does not grow with
  concurrency); GPU vLLM ``max_concurrency * VLLM_BATCHING_EFFICIENCY`` (per-request latency grows as
  the batch fills); CPU executors ``min(max_concurrency, max(1, cpu_cores))`` (one invocation per core).
- Energy per request: ``busy_power_w * L / c_eff = busy_power_w / capacity_rps``: the instance's full
  draw while serving, split over the requests in flight at capacity (idle share included at that load).
- CPU executors take ``cpu_cores / cores`` of a CPU device: idle and busy power are that share of the
  package's idle and ``idle + (TDP - idle) * utilization`` (utilization 1: a busy core is fully busy).
- Runs nowhere it does not fit: GPU executors need ``max(gpu_memory_bytes, sim.memory_bytes) *
  gpu_count / tp`` on every device (per-device memory at the catalog's gpu_count, spread over tp),
  a GPU allowed by ``gpu_models``, a cap within the device's range; CPU executors need
  ``resources.memory_bytes`` of the host. ``perf`` returns None then and ``why_not`` says why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from common.devices.gpu_specs import GPU_SPECS, GpuSpec
from common.devices.physics import operating_point
from common.workflow.catalog import ExecutorSpec, knob_settings, option_accuracy, runs_on_gpu  # noqa: F401 (re-exported)
from policies.model import HardwareType, InstanceConfig, Perf

GIB = 1 << 30
REFERENCE_GPU = "h100"  # the sim catalog's latencies are for an H100-class GPU (examples/catalog/sim.yaml)
REFERENCE_TEMPERATURE_C = 25.0  # planning ignores thermal slowdown; placement keeps devices out of it

# Relative single-GPU inference speed (H100 SXM = 1). ESTIMATES, from NVIDIA datasheets: LLM decode is
# memory-bandwidth bound, so the bandwidth ratio bounds it (H100 SXM 3.35 TB/s, A100 80GB SXM 2.04 TB/s,
# L4 300 GB/s: 0.61 and 0.09), and dense BF16 tensor throughput bounds prefill and vision encoders
# (989, 312 and 121 TFLOPS: 0.32 and 0.12). NVIDIA's MLPerf Inference v3.1 datacenter submissions put an
# H100 SXM at roughly 2-4x an A100 per GPU on the LLM benchmarks (FP8 on H100), so 0.6 favours the A100
# somewhat; L4 sits between its two bounds.
RELATIVE_SPEED: dict[str, float] = {"h100": 1.0, "a100": 0.6, "l4": 0.1, "cpu": 1.0}
TP_SCALING_EXPONENT = 0.6  # estimate: doubling tensor parallelism cuts latency ~1.5x (all-reduce overhead)
VLLM_BATCHING_EFFICIENCY = 0.7  # estimate: share of max_concurrency a vLLM engine serves at its typical latency
SIM_BATCHING_EFFICIENCY = 1.0  # the sim engine's latency does not depend on how many requests are in flight
DEFAULT_GPU_UTILIZATION = 0.8  # estimate: utilization of a vLLM engine's GPU while it serves
DEFAULT_MEMORY_BOUND_SHARE = 0.6  # estimate: share of a vLLM engine's device time in bandwidth-bound decode
CPU_BUSY_UTILIZATION = 1.0  # a CPU executor keeps its cores busy while it runs
MAX_TP = 8


def standard_hardware() -> dict[str, HardwareType]:
    """H100, A100, L4 and a CPU server: device facts from ``gpu_specs``, prices per device-hour.

    Prices: AWS EC2 on-demand list prices in us-east-1 as published when each instance type launched,
    divided by the devices per instance; they have moved since (p5 was cut in mid-2024), so treat them
    as estimates and override them per scenario:
    - h100: p5.48xlarge (8x H100 SXM 80GB), $98.32/h (July 2023) -> $12.29 per GPU-hour;
    - a100: p4de.24xlarge (8x A100 SXM 80GB), $40.96/h -> $5.12 per GPU-hour;
    - l4: g6.48xlarge (8x L4), $13.3504/h (April 2024) -> $1.6688 per GPU-hour;
    - cpu: c7i.48xlarge (2x Xeon Platinum 8488C, 96 cores, 384 GiB), $8.568/h, one device = the server.
    The CPU device is the two-socket package: TDP 2 x 350 W (the 48-core Sapphire Rapids SKUs' TDP; the
    8488C is a cloud-only part with no public datasheet) and idle 2 x 70 W (estimate).
    """
    def gpu(spec: GpuSpec, price: float) -> HardwareType:
        return HardwareType(name=spec.key, kind="gpu", memory_bytes=spec.memory_total_bytes,
                            idle_power_w=spec.idle_power_w, max_power_w=spec.tdp_w,
                            min_power_cap_w=spec.power_limit_min_w, price_per_hour_usd=price,
                            loaded_idle_power_w=spec.busy_idle_power_w)

    return {
        "h100": gpu(GPU_SPECS["h100"], 98.32 / 8),
        "a100": gpu(GPU_SPECS["a100"], 40.96 / 8),
        "l4": gpu(GPU_SPECS["l4"], 13.3504 / 8),
        "cpu": HardwareType(name="cpu", kind="cpu", memory_bytes=384 * GIB, idle_power_w=140.0, max_power_w=700.0,
                            min_power_cap_w=None, price_per_hour_usd=8.568, cores=96),
    }


def gpu_activity(executor: ExecutorSpec) -> tuple[float, float]:
    """(utilization, bandwidth-bound share) of an executor's GPU work: its sim section, else the defaults."""
    if executor.sim is not None:
        return executor.sim.utilization, executor.sim.memory_bound_share
    return DEFAULT_GPU_UTILIZATION, DEFAULT_MEMORY_BOUND_SHARE


def devices_per_instance(executor: ExecutorSpec, config: InstanceConfig, hardware: HardwareType) -> float:
    """Devices one instance takes from the budget: ``tp`` GPUs, or its share of a CPU device's cores."""
    if hardware.kind == "gpu":
        return float(config.tp)
    if hardware.cores <= 0:
        return 1.0
    return min(1.0, executor.resources.cpu_cores / hardware.cores)


def model_memory_bytes(executor: ExecutorSpec) -> int:
    """GPU memory of the whole model: per-device memory at the catalog's gpu_count, times gpu_count."""
    per_device = max(executor.resources.gpu_memory_bytes, executor.sim.memory_bytes if executor.sim else 0)
    return per_device * executor.resources.gpu_count


def knob_factor(executor: ExecutorSpec, knobs: Mapping[str, Any]) -> float:
    """Product of the sim section's latency factors for these knob values (1 for unknown values)."""
    if executor.sim is None:
        return 1.0
    factor = 1.0
    for knob, value in knobs.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        table = executor.sim.knob_latency_factors.get(knob, {})
        if text not in table and isinstance(value, float) and value.is_integer():
            text = str(int(value))
        factor *= table.get(text, 1.0)
    return factor


class CatalogPerfModel:
    """PerfModel from the catalog, per-hardware speed factors and the GPU DVFS model (see module doc)."""

    def __init__(self, hardware: Mapping[str, HardwareType], gpu_specs: Mapping[str, GpuSpec] = GPU_SPECS,
                 relative_speed: Mapping[str, float] = RELATIVE_SPEED) -> None:
        self.hardware = dict(hardware)
        self.gpu_specs = dict(gpu_specs)
        self.relative_speed = dict(relative_speed)
        missing = [h.name for h in self.hardware.values() if h.kind == "gpu" and h.name not in self.relative_speed]
        if missing:
            raise ValueError(f"no relative speed for GPU hardware {', '.join(sorted(missing))}; "
                             f"known: {', '.join(sorted(self.relative_speed))} (pass relative_speed=...)")
        if REFERENCE_GPU not in self.relative_speed:
            raise ValueError(f"relative_speed needs the reference GPU {REFERENCE_GPU!r}")

    # --- what the model needs to know -------------------------------------------------------

    def reference_latency_s(self, executor: ExecutorSpec, knobs: Mapping[str, Any], items: float) -> float | None:
        """Latency on the reference hardware at full clock; None when the catalog gives no number."""
        if executor.sim is not None:
            base = executor.sim.latency_s + executor.sim.latency_per_item_s * max(items, 0.0)
            return base * knob_factor(executor, knobs)
        return executor.expected_latency_s

    def reference_hardware(self, executor: ExecutorSpec) -> str:
        """Where the catalog's latency was measured: the first allowed GPU model we know, else H100."""
        if not runs_on_gpu(executor):
            return "cpu"
        for wanted in executor.resources.gpu_models:
            for name in sorted(self.relative_speed):
                if name != "cpu" and self._matches(wanted, name):
                    return name
        return REFERENCE_GPU

    def _matches(self, wanted: str, hardware_name: str) -> bool:
        wanted = wanted.lower()
        spec = self.gpu_specs.get(hardware_name)
        return wanted in hardware_name.lower() or (spec is not None and wanted in spec.name.lower())

    def why_not(self, executor: ExecutorSpec, config: InstanceConfig) -> str | None:
        """Why the executor cannot run on this configuration, or None when it can."""
        hw = self.hardware.get(config.hardware)
        if hw is None:
            return f"unknown hardware {config.hardware!r}"
        if config.tp < 1:
            return f"tp must be at least 1, got {config.tp}"
        if runs_on_gpu(executor):
            if hw.kind != "gpu":
                return f"a GPU executor cannot run on {hw.kind} hardware {hw.name!r}"
            wanted = executor.resources.gpu_models
            if wanted and not any(self._matches(w, hw.name) for w in wanted):
                return f"gpu_models {'/'.join(wanted)} excludes {hw.name}"
            need = math.ceil(model_memory_bytes(executor) / config.tp)
            if need > hw.memory_bytes:
                return (f"needs {need / GIB:.1f} GiB per device at tp {config.tp}, "
                        f"{hw.name} has {hw.memory_bytes / GIB:.1f} GiB")
            if config.power_cap_w is not None:
                low = hw.min_power_cap_w
                if low is None or not low <= config.power_cap_w <= hw.max_power_w:
                    return (f"power cap {config.power_cap_w:g} W is outside {hw.name}'s range "
                            f"{low if low is not None else 'not cappable'}..{hw.max_power_w:g} W")
        else:
            if hw.kind != "cpu":
                return f"a CPU executor ({executor.engine}) runs on cpu hardware, not {hw.kind} {hw.name!r}"
            if config.tp != 1:
                return "CPU executors run with tp 1"
            if config.power_cap_w is not None:
                return "CPU devices take no power cap here"
            if executor.resources.memory_bytes > hw.memory_bytes:
                return (f"needs {executor.resources.memory_bytes / GIB:.1f} GiB host memory, "
                        f"{hw.name} has {hw.memory_bytes / GIB:.1f} GiB")
        if executor.sim is None and executor.expected_latency_s is None:
            return "no latency to model from (no sim section and no expected_latency_s): profile it"
        return None

    # --- the PerfModel protocol ------------------------------------------------------------

    def perf(self, executor: ExecutorSpec, config: InstanceConfig, knobs: dict[str, Any],
             items: float = 1.0) -> Perf | None:
        if self.why_not(executor, config) is not None:
            return None
        hw = self.hardware[config.hardware]
        base_s = self.reference_latency_s(executor, knobs, items)
        if base_s is None:
            return None
        if hw.kind == "gpu":
            return self._gpu_perf(executor, config, hw, base_s)
        return self._cpu_perf(executor, hw, base_s)

    def _gpu_perf(self, executor: ExecutorSpec, config: InstanceConfig, hw: HardwareType, base_s: float) -> Perf:
        ref = self.reference_hardware(executor)
        speed = self.relative_speed[ref] / self.relative_speed[hw.name]
        tp_factor = (executor.resources.gpu_count / config.tp) ** TP_SCALING_EXPONENT
        utilization, share = gpu_activity(executor)
        slowdown, device_busy_w = self._capped(hw, utilization, config.power_cap_w, share)
        latency_s = base_s * speed * tp_factor * slowdown
        efficiency = SIM_BATCHING_EFFICIENCY if executor.engine == "sim" else VLLM_BATCHING_EFFICIENCY
        in_flight = max(1.0, executor.max_concurrency * efficiency)
        capacity_rps = in_flight / latency_s
        busy_w = config.tp * device_busy_w
        return Perf(latency_s=latency_s, capacity_rps=capacity_rps, energy_j_per_request=busy_w / capacity_rps,
                    busy_power_w=busy_w, idle_power_w=config.tp * hw.instance_idle_power_w,
                    memory_bytes_per_device=math.ceil(model_memory_bytes(executor) / config.tp), source="modeled")

    def _capped(self, hw: HardwareType, utilization: float, cap_w: float | None,
                memory_bound_share: float) -> tuple[float, float]:
        """(latency slowdown, device power) under the cap at this utilization and bandwidth-bound share."""
        spec = self.gpu_specs.get(hw.name)
        if spec is not None:
            limit_w = spec.power_limit_default_w if cap_w is None else cap_w
            point = operating_point(spec, utilization, limit_w, REFERENCE_TEMPERATURE_C, memory_bound_share)
            return point.slowdown, point.power_w
        # No spec: a cube law from the hardware type's own numbers, all of it clock-bound (no knee or floor known).
        idle_w = hw.instance_idle_power_w
        dynamic_w = (hw.max_power_w - idle_w) * utilization
        limit_w = hw.max_power_w if cap_w is None else cap_w
        share = min(1.0, (max(limit_w - idle_w, 1e-9) / dynamic_w) ** (1.0 / 3.0)) if dynamic_w > 0 else 1.0
        return 1.0 / share, idle_w + dynamic_w * share ** 3

    def _cpu_perf(self, executor: ExecutorSpec, hw: HardwareType, base_s: float) -> Perf:
        speed = self.relative_speed.get("cpu", 1.0) / self.relative_speed.get(hw.name, 1.0)
        latency_s = base_s * speed
        cores = executor.resources.cpu_cores
        in_flight = min(float(executor.max_concurrency), max(1.0, cores))
        capacity_rps = in_flight / latency_s
        share = 1.0 if hw.cores <= 0 else min(1.0, cores / hw.cores)
        idle_w = share * hw.idle_power_w
        busy_w = share * (hw.idle_power_w + (hw.max_power_w - hw.idle_power_w) * CPU_BUSY_UTILIZATION)
        return Perf(latency_s=latency_s, capacity_rps=capacity_rps, energy_j_per_request=busy_w / capacity_rps,
                    busy_power_w=busy_w, idle_power_w=idle_w, memory_bytes_per_device=executor.resources.memory_bytes,
                    source="modeled")


def power_cap_levels(hardware: Mapping[str, HardwareType],
                     fractions: tuple[float, ...] = (1.0, 0.8, 0.65, 0.5)) -> dict[str, tuple[float | None, ...]]:
    """Cap levels per GPU type: uncapped plus each fraction of the TDP that the device allows."""
    levels: dict[str, tuple[float | None, ...]] = {}
    for name, hw in hardware.items():
        if hw.kind != "gpu" or hw.min_power_cap_w is None:
            levels[name] = (None,)
            continue
        caps: list[float | None] = [None]
        for fraction in fractions:
            cap = round(hw.max_power_w * fraction, 1)
            if fraction < 1.0 and cap >= hw.min_power_cap_w and cap not in caps:
                caps.append(cap)
        levels[name] = tuple(caps)
    return levels


_TOKEN = re.compile(r"[a-z0-9]+")
_NOT_A_MODEL = re.compile(r"(nvidia|tesla|geforce|quadro|rtx|sxm\d*|pcie|hbm\d*e?|gddr\d*x?|nvl\d*|simulated)")


def hardware_key(model: str, kind: str = "gpu") -> str:
    """The hardware type key of a device model: "NVIDIA H100 80GB HBM3 (simulated)" -> "h100".

    A gpu_specs key that is a whole word of the name wins; else the first word shaped like a
    model number ("h200", "l40s"); else the whole name, lowercased. Non-GPU devices: their kind.
    """
    if kind != "gpu":
        return kind
    tokens = _TOKEN.findall(model.lower())
    for token in tokens:
        if token in GPU_SPECS:
            return token
    for token in tokens:
        if re.fullmatch(r"[a-z]+\d+[a-z]*", token) and not _NOT_A_MODEL.fullmatch(token):
            return token
    return "-".join(tokens) or "gpu"
