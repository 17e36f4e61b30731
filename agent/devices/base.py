"""The interface every device backend (nvml, sim, cpu) implements.

A device is sampled with an explicit timestamp so simulated devices advance in
whatever time the caller runs (wall clock in the agent, virtual time in the
cluster simulator) and real devices simply read their counters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from common.protocol import DeviceInfo, DeviceTelemetry


class DeviceError(Exception):
    """A device operation failed; the message is fit to show an operator."""


class PowerLimitOutOfRange(DeviceError):
    pass


class PowerLimitUnsupported(DeviceError):
    pass


class Device(ABC):
    """One compute device on this host."""

    info: DeviceInfo

    @abstractmethod
    def sample(self, now_s: float) -> DeviceTelemetry:
        """Read (or, for sim devices, advance to ``now_s`` and read) the device's state."""

    @abstractmethod
    def set_power_limit(self, power_limit_w: float) -> float:
        """Apply a power limit within the device's constraints and return the applied watts.

        Raises PowerLimitOutOfRange outside [power_limit_min_w, power_limit_max_w] and
        PowerLimitUnsupported where the device has no settable limit.
        """

    def close(self) -> None:
        """Release handles; the default has none."""
