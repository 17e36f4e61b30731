"""Per-invocation energy from cumulative device energy counters: a pure ledger.

A device reports joules consumed since some origin (NVML's total energy, RAPL, the sim
GPU's integral). Whenever the runtime reads a device (an invocation starts or ends on
it, or the periodic sample comes round) it hands the reading to the ledger; the delta
since the previous reading of that device is split equally among the invocations that
were active on it during that interval. An invocation's energy is the sum of its shares
over all its devices. Energy drawn while nothing runs is nobody's; a counter that goes
backwards (a driver reload) contributes nothing for that interval.

Equal shares are a modeling choice: the counter cannot tell which request burned what,
and concurrent requests on one engine share its batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _DeviceAccount:
    last_j: float | None = None
    active: set[str] = field(default_factory=set)


class EnergyLedger:
    """Attributes device energy to invocations; the caller supplies every reading (no I/O here)."""

    def __init__(self) -> None:
        self._devices: dict[int, _DeviceAccount] = {}
        self._shares_j: dict[str, float] = {}
        self._devices_of: dict[str, tuple[int, ...]] = {}

    def observe(self, device_index: int, energy_j: float | None) -> None:
        """A reading of ``device_index``'s cumulative counter; None (unreadable) is skipped."""
        if energy_j is None:
            return
        account = self._devices.setdefault(device_index, _DeviceAccount())
        if account.last_j is not None and account.active:
            delta_j = energy_j - account.last_j
            if delta_j > 0:
                share_j = delta_j / len(account.active)
                for invocation in account.active:
                    self._shares_j[invocation] += share_j
        account.last_j = energy_j

    def begin(self, invocation: str, readings: dict[int, float | None]) -> None:
        """``invocation`` starts on the devices in ``readings`` (device index -> counter now)."""
        if invocation in self._devices_of:
            raise ValueError(f"invocation {invocation!r} already began")
        self._devices_of[invocation] = tuple(sorted(readings))
        self._shares_j[invocation] = 0.0
        for index, energy_j in readings.items():
            self.observe(index, energy_j)  # the interval before belongs to those already running
            self._devices.setdefault(index, _DeviceAccount()).active.add(invocation)

    def finish(self, invocation: str, readings: dict[int, float | None]) -> float | None:
        """``invocation`` ends; returns its joules, or None when it ran on no device."""
        devices = self._devices_of.pop(invocation, None)
        if devices is None:
            raise ValueError(f"invocation {invocation!r} never began")
        for index in devices:
            self.observe(index, readings.get(index))
            self._devices[index].active.discard(invocation)
        total_j = self._shares_j.pop(invocation)
        return total_j if devices else None

    def active(self, device_index: int) -> frozenset[str]:
        account = self._devices.get(device_index)
        return frozenset(account.active) if account else frozenset()

    def __len__(self) -> int:
        return len(self._devices_of)
