"""Calibrate the simulated GPU model against a real GPU, through the agent's own NVML backend.

    python bench/gpu_calibration.py [--device 0] [--spec h100] [--seconds-per-point 10]
                                    [--caps 700,600,500,400,300,200] [--ramp-s 60] [--out DIR]

Needs a machine where NVML sees an NVIDIA GPU, PyTorch with CUDA, and root (to set power
limits). It runs, in one process:

1. idle: NVML samples with a CUDA context and no kernels (idle power, clock, temperature);
2. a warm-up ramp: a bf16 GEMM loop at the default power limit, temperature every 0.5 s, fitted
   to a first-order model (time constant, steady temperature);
3. a power-cap sweep: for each limit (through ``NvmlGpu.set_power_limit``, the agent's code path),
   a compute-bound bf16 GEMM, a bandwidth-bound GEMV (the shape of LLM decode) and a mix of the
   two (one GEMM and 8 GEMVs per call: held out, the model is not fitted to it), each measured
   over a steady window: median power, SM clock, temperature, throughput, energy per unit of work
   from the energy counter;
4. NVML backend checks: energy counter against integrated power, an out-of-range limit refused,
   limits read back as applied, the default limit restored at the end (also on failure).

It then compares the sim model (``agent/devices/sim.operating_point``) with the measurements
(``common/devices/calibration``) and writes DIR/gpu_calibration.json and DIR/gpu_calibration.png.
``--reanalyse DIR/gpu_calibration.json`` repeats the comparison against the model as it is now,
without a GPU, and rewrites the analysis (and the plot) in place.
``--backend sim --torch-device cpu`` runs the same code path against a simulated GPU and CPU
tensors: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.devices.base import Device, DeviceError, PowerLimitOutOfRange  # noqa: E402
from common.devices.calibration import (  # noqa: E402
    CapPoint,
    calibrated_spec,
    compare,
    comparison_report,
    mixed_share,
    fit_activity,
    fit_dvfs_exponent,
    fit_thermal_ramp,
    fit_thermal_ramp_two_pole,
)
from common.devices.gpu_specs import gpu_spec  # noqa: E402
from common.protocol import DeviceTelemetry  # noqa: E402

SAMPLE_INTERVAL_S = 0.1
MIXED_GEMVS = 8  # GEMVs per GEMM in the mixed workload (about half its uncapped time in each, on an H100)


class Sampler:
    """Samples one device on a thread while the main thread keeps the GPU busy."""

    def __init__(self, device: Device, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.device = device
        self.interval_s = interval_s
        self.samples: list[tuple[float, DeviceTelemetry]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now_s = time.monotonic()
            telemetry = self.device.sample(now_s)
            with self._lock:
                self.samples.append((now_s, telemetry))
            self._stop.wait(self.interval_s)

    def window(self, start_s: float, end_s: float) -> list[tuple[float, DeviceTelemetry]]:
        with self._lock:
            return [(t, s) for t, s in self.samples if start_s <= t <= end_s]


class Workload:
    """A steady kernel loop; ``run`` returns (work units done, seconds) for a wall-clock budget."""

    def __init__(self, name: str, unit: str, torch: Any, device: str, small: bool) -> None:
        self.name, self.unit, self.torch, self.device = name, unit, torch, device
        dtype = torch.bfloat16
        if name == "compute":
            n = 1024 if small else 8192
            self.a = torch.randn(n, n, dtype=dtype, device=device)
            self.b = torch.randn(n, n, dtype=dtype, device=device)
            self.units_per_call = 2.0 * n ** 3 / 1e12  # TFLOP
            self.call = lambda: self.a @ self.b
            self.calls_per_sync = 2 if small else 50
        elif name == "memory":  # decode-shaped GEMV: reads the whole weight matrix once per call
            rows, cols, batch = (2048, 2048, 8) if small else (16384, 16384, 8)
            self.w = torch.randn(rows, cols, dtype=dtype, device=device)
            self.x = torch.randn(cols, batch, dtype=dtype, device=device)
            self.units_per_call = rows * cols * 2 / 1e9  # GB of weights read
            self.call = lambda: self.w @ self.x
            self.calls_per_sync = 2 if small else 200
        if name == "mixed":  # one GEMM and MIXED_GEMVS GEMVs per call: a prefill-and-decode-like mix
            n = 1024 if small else 8192
            rows, cols, batch = (2048, 2048, 8) if small else (16384, 16384, 8)
            self.a = torch.randn(n, n, dtype=dtype, device=device)
            self.b = torch.randn(n, n, dtype=dtype, device=device)
            self.w = torch.randn(rows, cols, dtype=dtype, device=device)
            self.x = torch.randn(cols, batch, dtype=dtype, device=device)
            self.units_per_call = 1.0  # calls
            self.gemm_tflop = 2.0 * n ** 3 / 1e12
            self.gemv_gb = rows * cols * 2 / 1e9 * MIXED_GEMVS

            def call() -> None:
                self.a @ self.b
                for _ in range(MIXED_GEMVS):
                    self.w @ self.x
            self.call = call
            self.calls_per_sync = 2 if small else 10

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def run(self, seconds: float) -> tuple[float, float]:
        self.synchronize()
        start = time.perf_counter()
        calls = 0
        while time.perf_counter() - start < seconds:
            for _ in range(self.calls_per_sync):
                self.call()
            self.synchronize()
            calls += self.calls_per_sync
        return calls * self.units_per_call, time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(window: list[tuple[float, DeviceTelemetry]]) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for _, s in window:
        for r in s.throttle_reasons:
            reasons[r] = reasons.get(r, 0) + 1
    integrated_j = sum((a.power_w + b.power_w) / 2 * (tb - ta) for (ta, a), (tb, b) in zip(window, window[1:]))
    return {
        "power_w": median([s.power_w for _, s in window]),
        "sm_clock_mhz": median([float(s.sm_clock_mhz) for _, s in window if s.sm_clock_mhz is not None]),
        "temperature_c": median([s.temperature_c for _, s in window if s.temperature_c is not None]),
        "utilization_pct": median([s.utilization_pct for _, s in window]),
        "power_limit_w": median([s.power_limit_w for _, s in window if s.power_limit_w is not None]),
        "energy_counter_j": window[-1][1].energy_j - window[0][1].energy_j if len(window) > 1 else float("nan"),
        "integrated_power_j": integrated_j,
        "seconds": window[-1][0] - window[0][0] if len(window) > 1 else 0.0,
        "samples": len(window),
        "throttle_reasons": {r: n / len(window) for r, n in sorted(reasons.items())} if window else {},
    }


def measure(sampler: Sampler, workload: Workload, seconds: float, settle_s: float) -> dict[str, Any]:
    workload.run(settle_s)
    start = time.monotonic()
    units, elapsed = workload.run(seconds)
    end = time.monotonic()
    stats = summarize(sampler.window(start, end))
    stats["throughput"] = units / elapsed
    stats["throughput_unit"] = f"{workload.unit}/s"
    stats["energy_per_unit_j"] = stats["energy_counter_j"] / units if units else float("nan")
    return stats


def open_device(backend: str, index: int, spec_key: str) -> Device:
    if backend == "nvml":
        from agent.devices.nvml import open_nvml_devices
        devices = open_nvml_devices()
        if index >= len(devices):
            raise SystemExit(f"NVML sees {len(devices)} GPU(s); there is no device {index}")
        for other in devices:
            if other is not devices[index]:
                other.close()
        return devices[index]
    from agent.devices.sim import open_sim_devices
    device = open_sim_devices(node_name="calibration", model=spec_key, count=1, seed=0)[0]
    return device


def backend_checks(device: Device) -> dict[str, Any]:
    """The NVML backend's contract on a real device: refusals and read-back."""
    info = device.info
    checks: dict[str, Any] = {"info": asdict(info)}
    low, high = info.power_limit_min_w, info.power_limit_max_w
    if low is None or high is None:
        checks["power_limits"] = "not supported by this device"
        return checks
    try:
        device.set_power_limit(low - 1.0)
        checks["out_of_range_refused"] = False
    except PowerLimitOutOfRange as exc:
        checks["out_of_range_refused"] = True
        checks["out_of_range_message"] = str(exc)
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--spec", default="h100", help="the gpu_specs entry to compare with")
    parser.add_argument("--backend", choices=["nvml", "sim"], default="nvml")
    parser.add_argument("--torch-device", default="cuda")
    parser.add_argument("--seconds-per-point", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--ramp-s", type=float, default=60.0)
    parser.add_argument("--caps", default="", help="comma-separated watts; default: max, 6/7, 5/7 ... of max down to min")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_calibration"))
    parser.add_argument("--reanalyse", metavar="JSON", help="compare a stored run with the model as it is now")
    args = parser.parse_args()
    if args.reanalyse:
        return reanalyse(Path(args.reanalyse))

    import torch

    spec = gpu_spec(args.spec)
    device = open_device(args.backend, args.device, args.spec)
    info = device.info
    print(f"device {info.model} ({info.uuid}), backend {info.backend}, simulated={info.simulated}, "
          f"limits {info.power_limit_min_w}-{info.power_limit_max_w} W (default {info.power_limit_default_w} W)",
          flush=True)
    default_w = info.power_limit_default_w
    if args.caps:
        caps = [float(c) for c in args.caps.split(",")]
    elif info.power_limit_max_w is not None and info.power_limit_min_w is not None:
        high, low = info.power_limit_max_w, info.power_limit_min_w
        caps = sorted({round(max(low, high * f)) for f in (1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, low / high)}, reverse=True)
    else:
        caps = []
    small = not args.torch_device.startswith("cuda")
    result: dict[str, Any] = {
        "command": " ".join(["python"] + sys.argv),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": getattr(torch.version, "cuda", None),
        "simulated": info.simulated,
        "spec_key": spec.key,
        "spec": {k: v for k, v in asdict(spec).items() if k != "sources"},
    }
    if args.torch_device.startswith("cuda"):
        result["torch_device_name"] = torch.cuda.get_device_name(0)
    try:
        import pynvml
        result["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
    except Exception as exc:  # noqa: BLE001 - informational only
        result["driver"] = f"unknown ({exc})"
    result["backend_checks"] = backend_checks(device)
    workloads = {name: Workload(name, unit, torch, args.torch_device, small)
                 for name, unit in (("compute", "TFLOP"), ("memory", "GB"), ("mixed", "call"))}
    result["mixed_workload"] = {"gemm_tflop_per_call": workloads["mixed"].gemm_tflop,
                                "gemv_gb_per_call": workloads["mixed"].gemv_gb}
    points: list[CapPoint] = []
    sweep: list[dict[str, Any]] = []
    limit_errors: list[str] = []
    try:
        with Sampler(device) as sampler:
            # 1. idle with a context
            workloads["compute"].synchronize()
            time.sleep(args.idle_s)
            now = time.monotonic()
            result["idle"] = summarize(sampler.window(now - args.idle_s, now))
            print(f"idle: {result['idle']['power_w']:.1f} W, {result['idle']['sm_clock_mhz']:.0f} MHz, "
                  f"{result['idle']['temperature_c']:.0f} C", flush=True)
            # 2. warm-up ramp at the default limit
            if default_w is not None:
                device.set_power_limit(default_w)
            ramp_start = time.monotonic()
            workloads["compute"].run(args.ramp_s)
            ramp = sampler.window(ramp_start, time.monotonic())
            times = [t - ramp_start for t, s in ramp if s.temperature_c is not None]
            temps = [s.temperature_c for _, s in ramp if s.temperature_c is not None]
            fit = fit_thermal_ramp(times, temps)
            two_pole = fit_thermal_ramp_two_pole(times, temps)
            result["ramp"] = {"times_s": times, "temperatures_c": temps, "power_w": [s.power_w for _, s in ramp],
                              "summary": summarize(ramp), "fit": asdict(fit) if fit else None,
                              "two_pole_fit": asdict(two_pole) if two_pole else None}
            print(f"ramp: {temps[0] if temps else 'n/a'} -> {temps[-1] if temps else 'n/a'} C, fit {fit}", flush=True)
            # 3. power-cap sweep
            for cap_w in caps or [None]:
                applied = None
                if cap_w is not None:
                    try:
                        applied = device.set_power_limit(cap_w)
                    except DeviceError as exc:
                        limit_errors.append(f"{cap_w:g} W: {exc}")
                        print(f"cap {cap_w:g} W refused: {exc}", flush=True)
                        continue
                for name, workload in workloads.items():
                    stats = measure(sampler, workload, args.seconds_per_point, args.settle_s)
                    stats.update(workload=name, requested_limit_w=cap_w, applied_limit_w=applied)
                    sweep.append(stats)
                    points.append(CapPoint(
                        workload=name, power_limit_w=float(stats["power_limit_w"]), power_w=stats["power_w"],
                        sm_clock_mhz=stats["sm_clock_mhz"], temperature_c=stats["temperature_c"],
                        throughput=stats["throughput"], energy_per_unit_j=stats["energy_per_unit_j"],
                        throttle_reasons=tuple(stats["throttle_reasons"])))
                    print(f"cap {cap_w} W {name:7s}: {stats['power_w']:6.1f} W {stats['sm_clock_mhz']:5.0f} MHz "
                          f"{stats['temperature_c']:4.0f} C {stats['throughput']:8.1f} {workload.unit}/s "
                          f"{stats['energy_per_unit_j']:.3f} J/{workload.unit} "
                          f"counter/integral {stats['energy_counter_j']:.0f}/{stats['integrated_power_j']:.0f} J "
                          f"reasons {stats['throttle_reasons']}", flush=True)
    finally:
        if default_w is not None:
            try:
                result["restored_limit_w"] = device.set_power_limit(default_w)
            except DeviceError as exc:
                result["restored_limit_w"] = f"failed: {exc}"
        device.close()
    result["sweep"] = sweep
    result["limit_errors"] = limit_errors
    result["analysis"] = analyse(spec, points, result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_calibration.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, out / "gpu_calibration.png")
    print(json.dumps(result["analysis"], indent=2, default=str))
    print(f"wrote {out / 'gpu_calibration.json'}")
    return 0


def reanalyse(path: Path) -> int:
    """Recompute a stored run's analysis against the model (gpu_specs, sim) as it is now."""
    result = json.loads(path.read_text())
    spec = gpu_spec(result["spec_key"])
    points = [CapPoint(workload=s["workload"], power_limit_w=float(s["power_limit_w"]), power_w=s["power_w"],
                       sm_clock_mhz=s["sm_clock_mhz"], temperature_c=s["temperature_c"], throughput=s["throughput"],
                       energy_per_unit_j=s["energy_per_unit_j"], throttle_reasons=tuple(s["throttle_reasons"]))
              for s in result["sweep"]]
    result["spec"] = {k: v for k, v in asdict(spec).items() if k != "sources"}
    result["analysis"] = analyse(spec, points, result)
    result["reanalysed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, path.with_suffix(".png"))
    print(json.dumps(result["analysis"], indent=2, default=str))
    print(f"rewrote {path}")
    return 0


WORKLOAD_SHARES = {"compute": 0.0, "memory": 1.0}  # the model's bandwidth-bound share of the pure workloads


def workload_share(name: str, points: list[CapPoint], result: dict[str, Any]) -> float | None:
    """The pure workloads' shares, and the mix's from the pure workloads' uncapped speeds (None: unknown)."""
    if name in WORKLOAD_SHARES:
        return WORKLOAD_SHARES[name]
    mix = result.get("mixed_workload")
    highest_w = max(p.power_limit_w for p in points)
    uncapped = {p.workload: p for p in points if p.power_limit_w == highest_w}
    if mix is None or "compute" not in uncapped or "memory" not in uncapped:
        return None
    return mixed_share(mix["gemm_tflop_per_call"] / uncapped["compute"].throughput,
                       mix["gemv_gb_per_call"] / uncapped["memory"].throughput)


def analyse(spec: Any, points: list[CapPoint], result: dict[str, Any]) -> dict[str, Any]:
    analysis: dict[str, Any] = {}
    idle_w = result["idle"]["power_w"] if "idle" in result else None
    for name in ("compute", "memory", "mixed"):
        mine = [p for p in points if p.workload == name]
        share = workload_share(name, points, result)
        if not mine or share is None:
            continue
        uncapped = max(mine, key=lambda p: p.power_limit_w)
        activity = fit_activity(spec, uncapped, share)
        rows = compare(spec, mine, activity, share)
        analysis[name] = {
            "fitted_activity": activity,
            "memory_bound_share": share,
            "model_as_specified": comparison_report(rows),
            "measured_dvfs_exponent": fit_dvfs_exponent(mine, idle_w if idle_w else spec.idle_power_w,
                                                        spec.max_sm_clock_mhz),
            "energy_per_unit_vs_uncapped": [
                {"power_limit_w": p.power_limit_w, "ratio": p.energy_per_unit_j / uncapped.energy_per_unit_j}
                for p in sorted(mine, key=lambda p: -p.power_limit_w)],
        }
    fit = result.get("ramp", {}).get("fit")
    if fit and idle_w:
        ramp_power = result["ramp"]["summary"]["power_w"]
        idle_temp = result["idle"]["temperature_c"]
        # Steady rise per watt above the idle state: (T_ss - T_idle) / (P_load - P_idle).
        rise = (fit["steady_temperature_c"] - idle_temp) / (ramp_power - idle_w) if ramp_power > idle_w else None
        analysis["thermal"] = {
            "measured_time_constant_s": fit["time_constant_s"],
            "model_time_constant_s": spec.heat_capacity_j_per_k * spec.thermal_resistance_k_per_w,
            "measured_k_per_w": rise,
            "model_k_per_w": spec.thermal_resistance_k_per_w,
            "fit_rms_error_c": fit["rms_error_c"],
            "two_pole_fit": result["ramp"].get("two_pole_fit"),
            "note": "the ramp is shorter than a few time constants when the fitted tau is long; "
                    "treat tau beyond ramp_s / 2 as a lower-confidence extrapolation",
        }
    compute = [p for p in points if p.workload == "compute"]
    if compute and "compute" in analysis:
        k = analysis["compute"]["measured_dvfs_exponent"]
        thermal = analysis.get("thermal", {})
        measured_rise = thermal.get("measured_k_per_w")
        tuned = calibrated_spec(spec, context_idle_power_w=idle_w, dvfs_power_exponent=k,
                                time_constant_s=thermal.get("measured_time_constant_s") if measured_rise else None,
                                steady_rise_k_per_w=measured_rise)
        tuned_activity = fit_activity(tuned, max(compute, key=lambda p: p.power_limit_w))
        analysis["compute"]["model_with_measured_constants"] = comparison_report(compare(tuned, compute, tuned_activity))
        analysis["calibrated_constants"] = {"context_idle_power_w": tuned.busy_idle_power_w,
                                            "dvfs_power_exponent": tuned.dvfs_power_exponent,
                                            "heat_capacity_j_per_k": tuned.heat_capacity_j_per_k,
                                            "thermal_resistance_k_per_w": tuned.thermal_resistance_k_per_w,
                                            "fitted_activity": tuned_activity}
    sweep = result.get("sweep", [])
    ratios = [s["energy_counter_j"] / s["integrated_power_j"] for s in sweep
              if s.get("integrated_power_j") and not math.isnan(s["energy_counter_j"])]
    analysis["energy_counter_vs_integrated_power"] = {"median_ratio": median(ratios), "min": min(ratios, default=None),
                                                      "max": max(ratios, default=None)}
    return analysis


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = result["analysis"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for name, marker in (("compute", "o"), ("memory", "s"), ("mixed", "^")):
        rows = analysis.get(name, {}).get("model_as_specified", {}).get("points", [])
        if not rows:
            continue
        caps = [r["power_limit_w"] for r in rows]
        axes[0][0].plot(caps, [r["measured_power_w"] for r in rows], marker, label=f"{name} measured")
        axes[0][0].plot(caps, [r["model_power_w"] for r in rows], "-", label=f"{name} model")
        axes[0][1].plot(caps, [r["measured_clock_mhz"] for r in rows], marker, label=f"{name} measured")
        axes[0][1].plot(caps, [r["model_clock_mhz"] for r in rows], "-", label=f"{name} model")
        axes[1][0].plot(caps, [r["measured_slowdown"] for r in rows], marker, label=f"{name} measured")
        axes[1][0].plot(caps, [r["model_slowdown"] for r in rows], "-", label=f"{name} model")
    ramp = result.get("ramp", {})
    if ramp.get("times_s"):
        axes[1][1].plot(ramp["times_s"], ramp["temperatures_c"], ".", label="measured")
        fit = ramp.get("fit")
        if fit:
            t0 = ramp["temperatures_c"][0]
            ts = ramp["times_s"]
            axes[1][1].plot(ts, [fit["steady_temperature_c"] + (t0 - fit["steady_temperature_c"])
                                 * math.exp(-t / fit["time_constant_s"]) for t in ts], "-", label="first-order fit")
        two = ramp.get("two_pole_fit")
        if two:
            t0 = ramp["temperatures_c"][0]
            axes[1][1].plot(ts, [t0 + two["fast_rise_c"] * (1 - math.exp(-t / two["fast_time_constant_s"]))
                                 + two["slow_rise_c"] * (1 - math.exp(-t / two["slow_time_constant_s"]))
                                 for t in ts], "--", label="two-pole fit")
    for ax, title, ylabel in ((axes[0][0], "board power", "W"), (axes[0][1], "SM clock", "MHz"),
                              (axes[1][0], "slowdown vs highest limit", "x"), (axes[1][1], "warm-up", "C")):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("power limit (W)" if ax is not axes[1][1] else "seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    label = "SIMULATED device (smoke test)" if result["simulated"] else result.get("torch_device_name", "")
    fig.suptitle(f"Sim GPU model vs {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
