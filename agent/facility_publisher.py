"""The agent's MQTT side: its node's telemetry and status on the broker, for facility systems and dashboards.

With ``[mqtt] enabled = true`` the agent runs one ``MqttLink`` (client id = node name) beside the ZeroMQ
control path and independent of it:

- ``PREFIX/nodes/NODE/status`` (QoS 1, retained): ``{"state": "online", "node", "at_unix_s"}`` on every
  (re)connect; the last will, set at connect, is the same with ``"state": "offline"``, so the broker says
  ``offline`` when the agent's connection dies; a clean stop publishes ``offline`` itself first.
- ``PREFIX/nodes/NODE/telemetry`` (QoS 0, every heartbeat interval): ``NodeTelemetry`` from the agent's latest
  device samples.

The link publishes without waiting and reconnects on its own: a broker that is down or slow costs the agent
nothing but dropped telemetry (counted in ``link.dropped``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from common.mqtt.link import MqttLink
from common.mqtt.payloads import DeviceTelemetry, NodeStatus, NodeTelemetry
from common.mqtt.settings import MqttSettings

log = logging.getLogger("murakkab.agent.mqtt")


class FacilityPublisher:
    def __init__(self, settings: MqttSettings, node: str, *, interval_s: float,
                 devices: Callable[[], Mapping[int, Any]], samples: Callable[[], Mapping[int, Any]],
                 link_factory: Callable[..., Any] = MqttLink) -> None:
        self.settings = settings
        self.node = node
        self.interval_s = interval_s
        self._devices = devices  # index -> Device (with .info)
        self._samples = samples  # index -> common.protocol.DeviceTelemetry
        self.status_topic = self._topic("status")
        self.telemetry_topic = self._topic("telemetry")
        will = (self.status_topic, lambda: self._status("offline"), True)  # stamped at each connect
        self.link = link_factory(settings, node, will=will, on_connected=self._on_connected)

    def _topic(self, kind: str) -> str:
        return "/".join((self.settings.topic_prefix.rstrip("/"), "nodes", self.node, kind))

    def _status(self, state: str) -> bytes:
        return NodeStatus(state=state, node=self.node, at_unix_s=time.time()).model_dump_json().encode()  # type: ignore[arg-type]

    def _on_connected(self) -> None:
        self.link.publish(self.status_topic, self._status("online"), retain=True, qos=1)

    def telemetry(self) -> NodeTelemetry:
        devices = self._devices()
        rows = []
        for index, sample in sorted(self._samples().items()):
            info = getattr(devices.get(index), "info", None)
            rows.append(DeviceTelemetry(
                index=index, kind=str(getattr(info, "kind", "gpu")), model=str(getattr(info, "model", "")),
                power_w=_nonneg(sample.power_w), energy_j=_nonneg(sample.energy_j),
                temperature_c=_finite(sample.temperature_c), power_limit_w=_nonneg(sample.power_limit_w),
                utilization_pct=_pct(sample.utilization_pct), memory_used_bytes=max(0, int(sample.memory_used_bytes)),
                throttle_reasons=[str(r) for r in sample.throttle_reasons]))
        return NodeTelemetry(node=self.node, sent_at_unix_s=time.time(), devices=rows)

    def publish_telemetry(self) -> bool:
        """One telemetry message, if the link is up (one skipped while it is down counts in ``link.dropped``);
        never raises."""
        if not self.link.connected:
            self.link.dropped += 1
            return False
        try:
            payload = self.telemetry().model_dump_json().encode()
        except Exception:
            log.exception("could not build the MQTT telemetry message")
            return False
        return self.link.publish(self.telemetry_topic, payload, qos=0)

    async def run(self) -> None:
        """Until cancelled: the link, and telemetry every interval. It never returns (the agent's run() ends when
        any of its tasks does) and never raises but for cancellation."""
        link_task: asyncio.Task[None] | None = asyncio.create_task(self.link.run())
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                self.publish_telemetry()
                if link_task is not None and link_task.done():  # the link never ends on broker errors: a bug
                    error = None if link_task.cancelled() else link_task.exception()
                    log.error("the MQTT link ended (%r); MQTT is off until the agent restarts, the control plane "
                              "is unaffected", error)
                    link_task = None
        finally:
            if link_task is not None:
                link_task.cancel()
                await asyncio.gather(link_task, return_exceptions=True)

    async def close(self) -> None:
        """A clean stop: say ``offline`` (a clean disconnect sends no last will), briefly, best effort."""
        try:
            if self.link.connected:
                self.link.publish(self.status_topic, self._status("offline"), retain=True, qos=1)
                await asyncio.sleep(0.1)
        except Exception:
            log.exception("could not say offline on %s", self.status_topic)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") and value >= -1e12 else None


def _nonneg(value: Any) -> float | None:
    value = _finite(value)
    return None if value is None else max(0.0, value)


def _pct(value: Any) -> float | None:
    value = _finite(value)
    return None if value is None else min(100.0, max(0.0, value))
