"""Published characteristics of the GPU models the simulator can stand in for.

Two kinds of number live here, and each entry says which is which:

- Spec values: memory size, power-limit range and default, clocks and temperature
  thresholds, as NVIDIA's datasheets and ``nvidia-smi -q`` on the real part report them.
  The ``nvidia-smi -q`` fields quoted are "FB Memory Usage: Total", "Min/Default/Max
  Power Limit", "Max Clocks: SM", "Clocks: SM" at idle, "Power Draw" at idle and
  "GPU Shutdown/Slowdown/Max Operating Temp" (or, on newer drivers, the same thresholds
  as margins: "GPU T.Limit Temp" and "GPU ... T.Limit Temp").
- Engineering estimates: the thermal constants (heat capacity, thermal resistance to
  the inlet air or coolant) and the DVFS power exponent. No datasheet gives them; they
  are chosen so full load settles where such parts are commonly seen in well-cooled
  servers (60-75 C) with a warm-up time constant near a minute. Calibration against a
  real GPU replaces them, and its error is reported with the calibration.
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
    dvfs_power_exponent: float  # estimate: dynamic power ~ clock**exponent (f*V^2 with V tracking f gives 3)
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.idle_power_w < self.power_limit_min_w <= self.power_limit_default_w <= self.tdp_w:
            problems.append("need 0 < idle power < min limit <= default limit <= max limit")
        if not 0 < self.min_sm_clock_mhz <= self.max_sm_clock_mhz or \
                not self.min_sm_clock_mhz <= self.idle_sm_clock_mhz <= self.max_sm_clock_mhz:
            problems.append("need 0 < min clock <= idle clock <= max clock")
        if not self.max_operating_temperature_c < self.slowdown_temperature_c < self.shutdown_temperature_c:
            problems.append("need max operating < slowdown < shutdown temperature")
        if self.heat_capacity_j_per_k <= 0 or self.thermal_resistance_k_per_w <= 0 or self.dvfs_power_exponent < 1:
            problems.append("need positive thermal constants and a DVFS exponent >= 1")
        # The lowest clock must fit under the lowest cap at full load, or capping could not hold.
        elif self.idle_power_w + self.dynamic_power_w(1.0, self.min_sm_clock_mhz) > self.power_limit_min_w:
            problems.append("full load at the minimum clock exceeds the minimum power limit")
        if problems:
            raise ValueError(f"inconsistent GPU spec {self.key!r}: {'; '.join(problems)}")

    # --- the DVFS relation between clock and power ---------------------------------------

    def dynamic_power_w(self, utilization: float, sm_clock_mhz: float) -> float:
        """Power above idle at this activity and clock: (TDP - idle) * u * (f / f_max)^k."""
        share = sm_clock_mhz / self.max_sm_clock_mhz
        return (self.tdp_w - self.idle_power_w) * utilization * share ** self.dvfs_power_exponent

    def clock_for_power_mhz(self, utilization: float, power_w: float) -> float:
        """The highest clock whose total power at this activity stays within ``power_w`` (unclamped)."""
        full_w = self.dynamic_power_w(utilization, self.max_sm_clock_mhz)
        if full_w <= 0:
            return float(self.max_sm_clock_mhz)
        headroom_w = max(power_w - self.idle_power_w, 0.0)
        return self.max_sm_clock_mhz * (headroom_w / full_w) ** (1.0 / self.dvfs_power_exponent)

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
        heat_capacity_j_per_k=790.0, thermal_resistance_k_per_w=0.057, dvfs_power_exponent=3.0,
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
        heat_capacity_j_per_k=500.0, thermal_resistance_k_per_w=0.0925, dvfs_power_exponent=3.0,
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
        heat_capacity_j_per_k=60.0, thermal_resistance_k_per_w=0.625, dvfs_power_exponent=3.0,
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
