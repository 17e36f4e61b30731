"""Published characteristics of the GPU models the simulator can stand in for.

Two kinds of number live here, and each entry says which is which:

- Spec values: memory size, power-limit range and default, clocks and temperature
  thresholds, as NVIDIA's datasheets and ``nvidia-smi -q`` on the real part report them.
  The ``nvidia-smi -q`` fields quoted are "FB Memory Usage: Total", "Min/Default/Max
  Power Limit", "Max Clocks: SM", "Clocks: SM" at idle, "Power Draw" at idle and
  "GPU Shutdown/Slowdown/Max Operating Temp" (or, on newer drivers, the same thresholds
  as margins: "GPU T.Limit Temp" and "GPU ... T.Limit Temp").
- Engineering estimates: the thermal constants (heat capacity, thermal resistance to
  the inlet air or coolant). No datasheet gives them; they are chosen so full load
  settles where such parts are commonly seen in well-cooled servers (60-75 C) with a
  warm-up time constant near a minute.
- Calibrated on a real H100 SXM (``bench/gpu_calibration.py``, bench/README.md "GPU
  calibration"): the DVFS power exponent (1.42, fitted to a power-cap sweep of a bf16
  GEMM), the idle power with a CUDA context held (122.9 W), the power of bandwidth-bound
  work that the SM clock does not scale (266.7 W at full bandwidth) and the SM clock
  below which bandwidth-bound work slows (460 MHz), the last two fitted to a decode-shaped
  GEMV. The A100 and L4 take the H100's exponent and its shares (memory power as a share
  of TDP less context idle, knee as a share of the max clock): estimates until they are
  measured.

Power of work at activity u (0..1), SM clock f and bandwidth-bound share m (0: compute-bound
like a GEMM or a prefill; 1: bandwidth-bound like LLM decode):

    P(f) = P_ctx + u * (m_f * P_mem * min(1, f / f_knee) + (TDP - P_ctx - m_f * P_mem) * (f / f_max)^k)

with m_f the share of the time the work is bandwidth-bound at clock f (m at f_max; it falls as
the compute-bound part stretches under a cap). At f_max it is P_ctx + u * (TDP - P_ctx) whatever
m is, and at the lowest clock bandwidth-bound work still draws m_f * P_mem: a cap below that
cannot hold (an H100 at a 200 W limit draws 301 W with a GEMV). Time of the work against f_max:

    slowdown(f) = (1 - m) * f_max / f + m * max(1, f_knee / f).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model as the simulator sees it; checked for internal consistency on creation."""

    key: str  # the short name configs use ("h100")
    name: str  # the product name NVML reports (nvmlDeviceGetName)
    memory_total_bytes: int
    tdp_w: float  # the maximum power limit ("Max Power Limit")
    power_limit_min_w: float  # "Min Power Limit"
    power_limit_default_w: float  # "Default Power Limit"
    idle_power_w: float  # "Power Draw" with no kernels running
    max_sm_clock_mhz: int  # "Max Clocks: SM" (the boost clock)
    base_sm_clock_mhz: int  # vendor base clock; informational, the model does not use it
    min_sm_clock_mhz: int  # lowest clock DVFS may choose under a power cap or thermal slowdown
    idle_sm_clock_mhz: int  # "Clocks: SM" at idle
    max_operating_temperature_c: float  # software thermal slowdown begins above this
    slowdown_temperature_c: float  # hardware thermal slowdown (clocks halved) at and above this
    shutdown_temperature_c: float  # the GPU powers off to protect itself
    heat_capacity_j_per_k: float  # estimate: die, package, cold plate or heatsink
    thermal_resistance_k_per_w: float  # estimate: die to inlet air or coolant under normal cooling
    dvfs_power_exponent: float  # SM dynamic power ~ clock**exponent (H100: fitted; 3 would be f*V^2 with V ~ f)
    sources: tuple[str, ...]
    context_idle_power_w: float = 0.0  # idle with a CUDA context held (an idle engine); 0: same as idle_power_w
    memory_power_w: float = 0.0  # bandwidth-bound work at full bandwidth, not scaled by the SM clock
    bandwidth_knee_clock_mhz: float = 0.0  # bandwidth-bound work slows below this SM clock; 0: min clock

    @property
    def busy_idle_power_w(self) -> float:
        """The floor under load: an engine holds a CUDA context, and with one the GPU idles higher."""
        return max(self.context_idle_power_w, self.idle_power_w)

    @property
    def knee_clock_mhz(self) -> float:
        return self.bandwidth_knee_clock_mhz if self.bandwidth_knee_clock_mhz > 0 else float(self.min_sm_clock_mhz)

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.idle_power_w < self.power_limit_min_w <= self.power_limit_default_w <= self.tdp_w:
            problems.append("need 0 < idle power < min limit <= default limit <= max limit")
        if not 0 < self.min_sm_clock_mhz <= self.max_sm_clock_mhz or \
                not self.min_sm_clock_mhz <= self.idle_sm_clock_mhz <= self.max_sm_clock_mhz:
            problems.append("need 0 < min clock <= idle clock <= max clock")
        if not self.max_operating_temperature_c < self.slowdown_temperature_c < self.shutdown_temperature_c:
            problems.append("need max operating < slowdown < shutdown temperature")
        if not 0 <= self.context_idle_power_w < self.power_limit_min_w:
            problems.append("need 0 <= context idle power < min limit")
        if not 0 <= self.memory_power_w < self.tdp_w - self.busy_idle_power_w:
            problems.append("need 0 <= memory power < max limit - context idle power")
        if self.bandwidth_knee_clock_mhz and not self.min_sm_clock_mhz <= self.bandwidth_knee_clock_mhz \
                <= self.max_sm_clock_mhz:
            problems.append("need the bandwidth knee clock within the min and max clocks")
        if self.heat_capacity_j_per_k <= 0 or self.thermal_resistance_k_per_w <= 0 or self.dvfs_power_exponent < 1:
            problems.append("need positive thermal constants and a DVFS exponent >= 1")
        # The lowest clock must fit under the lowest cap at full compute-bound load, or capping could not hold
        # (bandwidth-bound work may exceed it: its memory power is not the SM clock's to cut).
        elif not problems and self.busy_idle_power_w + self.dynamic_power_w(1.0, self.min_sm_clock_mhz) \
                > self.power_limit_min_w:
            problems.append("full load at the minimum clock exceeds the minimum power limit")
        if problems:
            raise ValueError(f"inconsistent GPU spec {self.key!r}: {'; '.join(problems)}")

    # --- the DVFS relation between clock and power ---------------------------------------

    def memory_time_share(self, sm_clock_mhz: float, memory_bound_share: float) -> float:
        """The share of the time bandwidth-bound work takes at this clock (``memory_bound_share`` is the share
        at the max clock; compute-bound work stretches under a cap, so the share falls)."""
        if memory_bound_share <= 0.0 or memory_bound_share >= 1.0:
            return memory_bound_share
        memory = memory_bound_share * max(1.0, self.knee_clock_mhz / max(sm_clock_mhz, 1e-9))
        return memory / self.slowdown(sm_clock_mhz, memory_bound_share)

    def dynamic_power_w(self, utilization: float, sm_clock_mhz: float, memory_bound_share: float = 0.0) -> float:
        """Power above the context idle at this activity, clock and bandwidth-bound share (module doc): the
        memory part is drawn for the share of the time the work is bandwidth-bound at this clock."""
        share = self.memory_time_share(sm_clock_mhz, memory_bound_share)
        memory_w = share * self.memory_power_w
        clock_share = sm_clock_mhz / self.max_sm_clock_mhz
        sm_w = (self.tdp_w - self.busy_idle_power_w - memory_w) * clock_share ** self.dvfs_power_exponent
        return utilization * (memory_w * min(1.0, sm_clock_mhz / self.knee_clock_mhz) + sm_w)

    def clock_for_power_mhz(self, utilization: float, power_w: float, memory_bound_share: float = 0.0) -> float:
        """The highest clock whose total power at this activity stays within ``power_w``: in closed form for
        compute-bound work (unclamped below the min clock), else by bisection (at least the min clock)."""
        headroom_w = max(power_w - self.busy_idle_power_w, 0.0)
        if self.dynamic_power_w(utilization, self.max_sm_clock_mhz, memory_bound_share) <= headroom_w:
            return float(self.max_sm_clock_mhz)
        if memory_bound_share <= 0.0 or self.memory_power_w <= 0.0:
            full_w = utilization * (self.tdp_w - self.busy_idle_power_w)
            if full_w <= 0:
                return float(self.max_sm_clock_mhz)
            return self.max_sm_clock_mhz * (headroom_w / full_w) ** (1.0 / self.dvfs_power_exponent)
        low, high = float(self.min_sm_clock_mhz), float(self.max_sm_clock_mhz)  # power rises with the clock
        if self.dynamic_power_w(utilization, low, memory_bound_share) > headroom_w:
            return low
        for _ in range(40):
            middle = (low + high) / 2.0
            if self.dynamic_power_w(utilization, middle, memory_bound_share) <= headroom_w:
                low = middle
            else:
                high = middle
        return low

    def slowdown(self, sm_clock_mhz: float, memory_bound_share: float = 0.0) -> float:
        """Time of work with this bandwidth-bound share at this SM clock, against the max clock."""
        clock = max(sm_clock_mhz, 1e-9)
        compute = self.max_sm_clock_mhz / clock
        memory = max(1.0, self.knee_clock_mhz / clock)
        return (1.0 - memory_bound_share) * compute + memory_bound_share * memory

    def steady_temperature_c(self, power_w: float, ambient_c: float) -> float:
        """Where the temperature settles at constant power under normal cooling."""
        return ambient_c + power_w * self.thermal_resistance_k_per_w


GPU_SPECS: dict[str, GpuSpec] = {
    "h100": GpuSpec(
        key="h100", name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=81559 * MIB,
        tdp_w=700.0, power_limit_min_w=200.0, power_limit_default_w=700.0,
        idle_power_w=75.0,
        max_sm_clock_mhz=1980, base_sm_clock_mhz=1590, min_sm_clock_mhz=345, idle_sm_clock_mhz=345,
        max_operating_temperature_c=87.0, slowdown_temperature_c=89.0, shutdown_temperature_c=92.0,
        # Estimates: settles near 65 C at 700 W with a 25 C inlet; time constant R*C of about 45 s.
        heat_capacity_j_per_k=790.0, thermal_resistance_k_per_w=0.057,
        # Calibrated (bench/results/gpu_calibration): exponent fitted to the GEMM cap sweep; context idle
        # measured; memory power and knee fitted to the GEMV (301 W and 1.33x slowdown at 345 MHz).
        dvfs_power_exponent=1.42, context_idle_power_w=122.9, memory_power_w=266.7, bandwidth_knee_clock_mhz=460.0,
        sources=(
            "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM 80 GB, max TDP up to 700 W (configurable)",
            ("nvidia-smi -q on an H800 SXM5 80GB (the export variant of the H100 SXM5 board; driver 525.105.17): "
             "FB Memory Total 81559 MiB; Min/Default/Max Power Limit 200/700/700 W; Max Clocks SM 1980 MHz; "
             "idle SM 345 MHz; idle Power Draw 74.7 W; GPU Shutdown/Slowdown/Max Operating Temp 92/89/87 C"),
            ("nvidia-smi -q on H100 SXM5 80GB (newer drivers): FB Memory Total 81559 MiB, Min/Default/Max Power "
             "Limit 200/700/700 W, idle Power Draw 71.5-72.0 W, T.Limit margins giving max operating 87 C"),
            "Base clock 1590 MHz: TechPowerUp GPU Database, H100 SXM5 80 GB (not in NVIDIA's datasheet)",
        ),
    ),
    "a100": GpuSpec(
        key="a100", name="NVIDIA A100-SXM4-80GB",
        memory_total_bytes=81920 * MIB,
        tdp_w=400.0, power_limit_min_w=100.0, power_limit_default_w=400.0,
        idle_power_w=60.0,  # nvidia-smi shows 68 W at 0 % with a CUDA context resident; ~60 W without
        max_sm_clock_mhz=1410, base_sm_clock_mhz=1275, min_sm_clock_mhz=210, idle_sm_clock_mhz=210,
        max_operating_temperature_c=85.0, slowdown_temperature_c=89.0, shutdown_temperature_c=92.0,
        # Estimates: ~62 C at 400 W with a 25 C inlet, time constant ~46 s.
        heat_capacity_j_per_k=500.0, thermal_resistance_k_per_w=0.0925,
        # The H100's calibration carried over (estimates): exponent; memory power 0.462 of (TDP - context
        # idle); knee 0.232 of the max clock. Context idle: nvidia-smi's 68.4 W at 0 % with a context.
        dvfs_power_exponent=1.42, context_idle_power_w=68.4, memory_power_w=153.2, bandwidth_knee_clock_mhz=327.0,
        sources=(
            "NVIDIA A100 Tensor Core GPU datasheet: A100 80GB SXM, max TDP 400 W",
            ("nvidia-smi -q on A100-SXM4-80GB (driver 525.60.13): FB Memory Total 81920 MiB; "
             "Min/Default/Max Power Limit 100/400/400 W; Max Clocks SM 1410 MHz; "
             "GPU Shutdown/Slowdown/Max Operating Temp 92/89/85 C; Power Draw 68.4 W at 0 % with a context"),
            ("Base clock 1275 MHz: TechPowerUp GPU Database, A100 SXM4 80 GB; the idle SM clock (210 MHz) "
             "and idle power (60 W) are estimates"),
        ),
    ),
    "l4": GpuSpec(
        key="l4", name="NVIDIA L4",
        memory_total_bytes=23034 * MIB,
        tdp_w=72.0, power_limit_min_w=40.0, power_limit_default_w=72.0,
        idle_power_w=16.0,
        max_sm_clock_mhz=2040, base_sm_clock_mhz=795, min_sm_clock_mhz=210, idle_sm_clock_mhz=210,
        # Derived from the driver's margins: "GPU T.Limit Temp" 53 C at 33 C (max operating 86 C),
        # "Slowdown T.Limit" -2 C and "Shutdown T.Limit" -5 C past it. Approximate to a degree.
        max_operating_temperature_c=86.0, slowdown_temperature_c=88.0, shutdown_temperature_c=91.0,
        # Estimates: a passive single-slot card in server airflow, ~70 C at 72 W, time constant ~38 s.
        heat_capacity_j_per_k=60.0, thermal_resistance_k_per_w=0.625,
        # The H100's calibration carried over (estimates): exponent; context idle 1.2x idle (the H100's
        # is 1.64x, the A100's 1.14x); memory power 0.462 of (TDP - context idle); knee 0.232 of max clock.
        dvfs_power_exponent=1.42, context_idle_power_w=19.2, memory_power_w=24.4, bandwidth_knee_clock_mhz=473.0,
        sources=(
            "NVIDIA L4 Tensor Core GPU datasheet: 24 GB GDDR6, max thermal design power 72 W",
            ("nvidia-smi -q on NVIDIA L4 (driver 550.90.07): FB Memory Total 23034 MiB; "
             "Min/Default/Max Power Limit 40/72/72 W; Max Clocks SM 2040 MHz; idle SM 210 MHz; "
             "idle Power Draw 16.5 W; temperature thresholds as T.Limit margins (see above)"),
            "Base clock 795 MHz: TechPowerUp GPU Database, NVIDIA L4",
        ),
    ),
}


def gpu_spec(name: str) -> GpuSpec:
    """The spec for a model key (case-insensitive), or an error that lists the known keys."""
    try:
        return GPU_SPECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU model {name!r}; known models: {', '.join(sorted(GPU_SPECS))}") from None
