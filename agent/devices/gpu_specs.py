"""Published characteristics of the GPU models the simulator can stand in for.

Spec-sheet values (memory, TDP, power-limit range, clocks, temperature thresholds)
come from the sources named on each entry. The thermal constants (heat capacity,
thermal resistance to the inlet air or coolant) and the idle power are engineering
estimates, chosen so that full load settles at the temperatures such parts are
commonly seen at in well-cooled servers; they are marked as estimates and are what
calibration against a real GPU corrects.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    memory_total_bytes: int
    tdp_w: float  # the maximum (and default) power limit
    power_limit_min_w: float
    idle_power_w: float  # estimate: drawn with no kernels running, clocks parked
    max_sm_clock_mhz: int
    min_sm_clock_mhz: int  # floor of the DVFS range under power capping
    idle_sm_clock_mhz: int
    max_operating_temperature_c: float  # the driver starts software thermal slowdown here
    slowdown_temperature_c: float  # hardware slowdown
    shutdown_temperature_c: float
    heat_capacity_j_per_k: float  # estimate: heatsink/cold plate and board
    thermal_resistance_k_per_w: float  # estimate: die to inlet under normal cooling
    sources: tuple[str, ...]


GPU_SPECS: dict[str, GpuSpec] = {
    "h100": GpuSpec(
        key="h100", name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=81559 * MIB,  # nvidia-smi "FB Memory Usage: Total" of an H100 SXM5 80GB
        tdp_w=700.0, power_limit_min_w=200.0, idle_power_w=70.0,
        max_sm_clock_mhz=1980, min_sm_clock_mhz=600, idle_sm_clock_mhz=345,
        max_operating_temperature_c=87.0, slowdown_temperature_c=90.0, shutdown_temperature_c=92.0,
        # Settles near 65 C at 700 W with 25 C inlet; time constant R*C of about 45 s.
        heat_capacity_j_per_k=790.0, thermal_resistance_k_per_w=0.057,
        sources=("NVIDIA H100 Tensor Core GPU datasheet (SXM5: 80 GB, up to 700 W)",
                 "nvidia-smi -q on H100 SXM5: Min/Max Power Limit 200/700 W, Max SM clock 1980 MHz, "
                 "GPU Shutdown/Slowdown/Max Operating Temp 92/90/87 C"),
    ),
    "a100": GpuSpec(
        key="a100", name="NVIDIA A100-SXM4-80GB",
        memory_total_bytes=81920 * MIB,
        tdp_w=400.0, power_limit_min_w=100.0, idle_power_w=55.0,
        max_sm_clock_mhz=1410, min_sm_clock_mhz=500, idle_sm_clock_mhz=210,
        max_operating_temperature_c=85.0, slowdown_temperature_c=89.0, shutdown_temperature_c=92.0,
        heat_capacity_j_per_k=500.0, thermal_resistance_k_per_w=0.0925,  # ~62 C at 400 W, tau ~46 s
        sources=("NVIDIA A100 Tensor Core GPU datasheet (SXM4 80 GB: 400 W TDP, boost 1410 MHz)",
                 "nvidia-smi -q on A100-SXM4-80GB: Min/Max Power Limit 100/400 W, "
                 "GPU Shutdown/Slowdown/Max Operating Temp 92/89/85 C"),
    ),
    "l4": GpuSpec(
        key="l4", name="NVIDIA L4",
        memory_total_bytes=23034 * MIB,
        tdp_w=72.0, power_limit_min_w=40.0, idle_power_w=16.0,
        max_sm_clock_mhz=2040, min_sm_clock_mhz=795, idle_sm_clock_mhz=210,
        max_operating_temperature_c=88.0, slowdown_temperature_c=93.0, shutdown_temperature_c=96.0,
        heat_capacity_j_per_k=60.0, thermal_resistance_k_per_w=0.625,  # passive card: ~70 C at 72 W, tau ~38 s
        sources=("NVIDIA L4 Tensor Core GPU datasheet (24 GB GDDR6, 72 W, boost 2040 MHz)",
                 "nvidia-smi -q on L4: Min/Max Power Limit 40/72 W; temperature thresholds are estimates"),
    ),
}


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPU_SPECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU model {name!r}; known: {', '.join(sorted(GPU_SPECS))}") from None
