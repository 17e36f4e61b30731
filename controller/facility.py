"""The controller's MQTT shell: facility signals in, autopilot decisions and the controller's status out.

It subscribes to the facility topics (``common.mqtt.facility``): a rack's power budget becomes that rack's
budget in the autopilot (``AutopilotShell.set_budget``, as ``murakkabctl power budget set --rack`` does; the
retained one arrives on subscribe, so it applies at controller start), a rack's cooling state and the grid's
price and carbon go to the autopilot's reactions (``set_rack_cooling``, ``set_grid``). Every payload is decoded
strictly; a bad one is counted in ``murakkab_facility_messages_total{topic_kind,result}``, logged once per topic
and interval, and ignored. A rack message the autopilot refuses because no node of the rack is known yet (the
retained budget at start arrives before the agents register) is held, the latest per rack and kind, and tried
again every second until a node of the rack is known.

It publishes every autopilot event to ``controller/events`` as it is recorded, and the controller's status,
retained, on ``controller/status``, with the last will ``offline``.

Nothing here is on the ZeroMQ control path: the link publishes without waiting and reconnects on its own, so
a broker that is down or slow changes nothing for agents and murakkabctl.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from common.mqtt.facility import (
    COOLING, EVENTS_TOPIC, GRID, GRID_TOPIC, MAX_FACILITY_PAYLOAD_BYTES, OFFLINE, POWER_BUDGET, STATUS_TOPIC,
    ControllerEvent, ControllerStatus, GridSignal, RackCooling, RackPowerBudget, parse_facility_topic, rack_filter,
    valid_rack,
)
from common.mqtt.link import MqttLink
from common.mqtt.payloads import PayloadError, decode_json
from common.mqtt.settings import MqttSettings
from common.transport import RateLimitedLog

log = logging.getLogger("murakkab.controller.facility")

MODELS: dict[str, Any] = {POWER_BUDGET: RackPowerBudget, COOLING: RackCooling, GRID: GridSignal}
RETRY_HELD_S = 1.0
BAD_LOG_INTERVAL_S = 60.0
SOURCE = "facility (MQTT)"


class FacilityShell:
    def __init__(self, controller: Any, settings: MqttSettings, *,
                 link_factory: Callable[..., Any] = MqttLink) -> None:
        self.c = controller
        self.settings = settings
        self.client_id = f"murakkab-controller-{socket.gethostname()}"[:128]
        self.link = link_factory(settings, self.client_id, will=self._will(), on_connected=self._on_connected)
        self.bad_log = RateLimitedLog(log, BAD_LOG_INTERVAL_S)
        # (kind, rack) -> (apply it again, what it is, topic, payload): refused because no node of the rack is known yet
        self.held: dict[tuple[str, str], tuple[Callable[[], Any], str, str, bytes]] = {}
        self._observing: Any = None  # the AutopilotShell whose event_observers holds ours
        # topic -> the payload last applied from it: the broker re-sends retained messages on every reconnect,
        # and the same budget again is no new decision (no budget-set event, no replan)
        self.applied: dict[str, bytes] = {}
        self.link.subscribe(self.link.topic(*rack_filter(POWER_BUDGET)), self.on_message)
        self.link.subscribe(self.link.topic(*rack_filter(COOLING)), self.on_message)
        self.link.subscribe(self.link.topic(*GRID_TOPIC), self.on_message)

    # --- lifecycle ------------------------------------------------------------------------------

    def _will(self) -> tuple[str, bytes, bool]:
        """The last will, as the link takes it: ``offline``, retained, on the status topic."""
        return (self.link_topic(*STATUS_TOPIC), OFFLINE, True)

    def link_topic(self, *parts: str) -> str:
        return "/".join((self.settings.topic_prefix.rstrip("/"), *parts))

    def attach(self) -> None:
        """Publish the autopilot's events from now on (called once the workload service exists)."""
        shell = self._autopilot()
        observers = getattr(shell, "event_observers", None)
        if observers is not None and self.publish_event not in observers:
            observers.append(self.publish_event)
            self._observing = shell

    async def run(self) -> None:
        """Until cancelled. The link never raises on broker errors; anything else is logged and the link restarted,
        so this task can never end the controller."""
        self.attach()
        retry = asyncio.create_task(self._retry_held())
        try:
            while True:
                try:
                    await self.link.run()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("the MQTT link stopped; restarting it in 5 s (the control plane is unaffected)")
                await asyncio.sleep(5.0)
        finally:
            retry.cancel()
            await asyncio.gather(retry, return_exceptions=True)

    async def close(self) -> None:
        """Say ``offline`` on the status topic (a clean disconnect sends no last will), briefly, best effort."""
        if self._observing is not None:
            try:
                self._observing.event_observers.remove(self.publish_event)
            except ValueError:
                pass
            self._observing = None
        if getattr(self.link, "connected", False):
            self.link.publish(self.link.topic(*STATUS_TOPIC), OFFLINE, retain=True, qos=1)
            await asyncio.sleep(0.1)  # let the link hand it to the broker before it is cancelled

    def _on_connected(self, *_: Any) -> None:
        status = ControllerStatus(epoch=self.c.epoch, started_at_unix_s=float(self.c.to_unix(self.c.started_s) or 0),
                                  agent_endpoint=self.c.agent_endpoint, admin_endpoint=self.c.admin_endpoint)
        self.link.publish(self.link.topic(*STATUS_TOPIC), status.model_dump(mode="json"), retain=True, qos=1)

    # --- outbound -------------------------------------------------------------------------------

    def publish_event(self, event: dict[str, Any]) -> None:
        """An autopilot event as it is recorded (``AutopilotShell.event_observers``): never raises."""
        try:
            payload = ControllerEvent(**event, epoch=self.c.epoch).model_dump(mode="json")
            self.link.publish(self.link.topic(*EVENTS_TOPIC), payload, qos=1)
        except Exception:
            log.exception("could not publish autopilot event %r", event.get("kind"))

    # --- inbound --------------------------------------------------------------------------------

    def _count(self, kind: str, result: str) -> None:
        self.c.metrics.facility_messages.labels(kind, result).inc()

    def _bad(self, topic: str, kind: str, result: str, text: str) -> None:
        self._count(kind, result)
        self.bad_log.warning(topic[:300], f"{kind} message refused ({result})", f"{text[:500]}; ignored")

    def _autopilot(self) -> Any:
        workloads = getattr(self.c, "workloads", None)
        return getattr(workloads, "autopilot", None)

    def on_message(self, topic: str, raw: bytes) -> None:
        """The link's handler for every facility topic: never raises."""
        kind = "unknown"
        try:
            parsed = parse_facility_topic(topic, self.settings.topic_prefix)
            if parsed is None:
                self._bad(topic, kind, "bad_topic", "not a facility topic")
                return
            kind, rack = parsed
            self._handle(topic, kind, rack, bytes(raw))
        except Exception:
            self._count(kind, "error")
            log.exception("facility message on %s could not be handled; ignored", topic[:300])

    def _handle(self, topic: str, kind: str, rack: str | None, raw: bytes) -> None:
        if self.applied.get(topic) == raw:
            self._count(kind, "unchanged")
            return
        if rack is not None and not valid_rack(rack):
            self._bad(topic, kind, "bad_rack", f"rack name {rack[:64]!r} is not a node label value (1-253 letters, "
                                               "digits, '.', '_' or '-', starting with a letter or digit)")
            return
        if kind == POWER_BUDGET and raw == b"":  # a retained budget deleted: the rack has none
            payload: Any = RackPowerBudget(power_budget_w=None)
        else:
            try:
                payload = decode_json(raw, MODELS[kind], MAX_FACILITY_PAYLOAD_BYTES)
            except PayloadError as exc:
                reason = str(getattr(exc, "reason", "invalid"))
                self._bad(topic, kind, reason, str(getattr(exc, "message", exc)))
                return
        shell = self._autopilot()
        if shell is None:
            self._bad(topic, kind, "no_autopilot", f"this controller runs no autopilot (planner "
                                                    f"{self.c.settings.planner}); facility signals have no effect")
            return
        apply, what = self._action(shell, kind, rack, payload)
        if apply is None:
            self._bad(topic, kind, "unavailable", f"the autopilot has no reaction to {what} yet")
            return
        if rack is not None:
            self.held.pop((kind, rack), None)  # a newer message replaces one held for the rack
        error = apply()
        if error is None:
            self.applied[topic] = raw
            self._count(kind, "applied")
            log.info("facility: %s", what)
        elif rack is not None:
            self.held[(kind, rack)] = (apply, what, topic, raw)
            self._count(kind, "held")
            self.bad_log.warning(topic[:300], f"{kind} message held",
                                 f"{what} refused for now ({getattr(error, 'message', error)}); tried again every "
                                 f"{RETRY_HELD_S:g} s until a node of rack {rack} is known")
        else:
            self._bad(topic, kind, "refused", f"{what} refused: {getattr(error, 'message', error)}")

    def _action(self, shell: Any, kind: str, rack: str | None,
                payload: Any) -> tuple[Callable[[], Any] | None, str]:
        if kind == POWER_BUDGET:
            watts = payload.power_budget_w
            what = f"rack {rack} power budget " + ("cleared" if watts is None else f"{watts:g} W")
            return (lambda: shell.set_budget(rack, watts, source=SOURCE)), what
        if kind == COOLING:
            what = f"rack {rack} cooling {payload.state}" + (
                "" if payload.inlet_c is None else f" (inlet {payload.inlet_c:g} C)")
            if not hasattr(shell, "set_rack_cooling"):
                return None, what
            return (lambda: shell.set_rack_cooling(rack, payload.state, payload.inlet_c, source=SOURCE)), what
        what = f"grid price {payload.price_usd_per_mwh:g} USD/MWh, carbon {payload.carbon_g_per_kwh:g} g/kWh"
        if not hasattr(shell, "set_grid"):
            return None, what
        return (lambda: shell.set_grid(payload.price_usd_per_mwh, payload.carbon_g_per_kwh, source=SOURCE)), what

    async def _retry_held(self) -> None:
        while True:
            await asyncio.sleep(RETRY_HELD_S)
            self.retry_held()

    def retry_held(self) -> None:
        """Apply again each held rack message; one that now applies is no longer held."""
        for key, (apply, what, topic, raw) in list(self.held.items()):
            try:
                error = apply()
            except Exception:
                log.exception("facility: %s failed; dropped", what)
                self.held.pop(key, None)
                continue
            if error is None and self.held.get(key, (None,))[0] is apply:
                self.held.pop(key, None)
                self.applied[topic] = raw
                self._count(key[0], "applied")
                log.info("facility: %s (held until a node of the rack was known)", what)
