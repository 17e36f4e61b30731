"""The placer's working types (``policies.placement``): what one instance of a config needs
(``_Need``), a device and what this placement has put on it so far, with its predicted draw (``_Dev``),
and the fits the placer weighs for one device and for one node (``_DevFit``, ``_Fit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from common.devices.gpu_specs import GpuSpec
from common.workflow.catalog import ExecutorSpec
from policies.fleet import DeviceKey, DeviceState
from policies.model import InstanceConfig

_GIB = float(1 << 30)


# --- what one instance of a config needs ----------------------------------------------------


@dataclass(frozen=True)
class _Need:
    config: InstanceConfig
    executor: ExecutorSpec
    on_gpu: bool
    memory_bytes_per_device: int
    host_memory_bytes: int
    cpu_weight: float  # host cores charged (cpu configs only)
    needs_cpu_device: bool
    busy_w_per_device: float | None  # from the perf model; None: the worst case (the power limit)
    idle_w_per_device: float | None
    cpu_power_w: float | None  # cpu configs: from the perf model; None: share of the package

    def describe(self) -> str:
        c = self.config
        if not self.on_gpu:
            text = f"{self.cpu_weight:g} cpu core(s)" + (" and a cpu device" if self.needs_cpu_device else "")
        else:
            cap = f" at {c.power_cap_w:g} W" if c.power_cap_w is not None else " uncapped"
            text = f"{c.tp} {c.hardware} GPU(s) with {self.memory_bytes_per_device / _GIB:.1f} GiB free each{cap}"
        if self.host_memory_bytes:
            text += f", {self.host_memory_bytes / _GIB:.1f} GiB host memory"
        return text


@dataclass
class _Dev:
    """A GPU (or cpu device) and what this placement has put on it so far."""

    node: str
    state: DeviceState
    rack: str | None
    spec: GpuSpec | None
    idle_w: float
    default_limit_w: float | None
    limit_c: float
    foreign_bytes: int
    used_bytes: int = 0
    dyn_w: float = 0.0
    limit_w: float | None = None  # fixed by the first instance placed on it
    loaded_idle_w: float = 0.0  # idle with an engine loaded (a CUDA context held); 0: idle_w
    floor_w: float = 0.0  # the most any instance on it is modeled to draw at its cap (may exceed the cap)
    configs: list[InstanceConfig] = field(default_factory=list)  # of the instances placed on it

    @property
    def instances(self) -> int:
        return len(self.configs)

    @property
    def key(self) -> DeviceKey:
        return self.node, self.state.index

    @property
    def free_bytes(self) -> int:
        return self.state.memory_total_bytes - self.foreign_bytes - self.used_bytes

    def power_w(self, instances: int, dyn_w: float, limit_w: float | None, floor_w: float | None = None) -> float:
        """Predicted draw: loaded idle plus the instances' dynamic power, held to the power limit, except
        that bandwidth-bound work draws what the model says even above a deep cap (its memory power is
        not the SM clock's to cut: 301 W at a 200 W limit on an H100)."""
        if instances == 0:
            return self.idle_w
        draw = max(self.loaded_idle_w, self.idle_w) + dyn_w
        if limit_w is None:
            return draw
        return min(draw, max(limit_w, self.floor_w if floor_w is None else floor_w))


class _DevFit(NamedTuple):
    limit_w: float | None  # the GPU's power limit with the instance
    power_w: float  # its predicted draw
    temperature_c: float | None  # its predicted steady temperature; None: unknown


@dataclass(frozen=True)
class _Fit:
    """One way to put an instance on a node: devices, and their power and temperature afterwards."""

    devices: tuple[int, ...]
    limit_w: float | None
    delta_w: float  # added to the rack
    temperature_after_c: float  # hottest of the devices; -inf when unknown or cpu
    shares: bool
    with_partner: bool = False  # every device holds instances of the config's co-location group only
