"""One MQTT client connection that keeps itself up: reconnects, resubscribes, and publishes without blocking.

``MqttLink.run()`` is a task that lives until cancelled. It connects with aiomqtt, (re)subscribes every filter
registered with ``subscribe()``, hands each message to the handlers whose filter matches it, and sends what
``publish()`` queued. When the broker cannot be reached, refuses the login or drops the connection, the link
logs ``broker unreachable`` once for that outage, waits a capped, fully jittered exponential delay
(``common.transport.backoff_delays``) and tries again; on recovery it logs ``connected`` and calls
``on_connected`` (where a daemon publishes its retained status). Broker errors never escape ``run()``.

``publish()`` is synchronous and never blocks or raises: it queues the message for the running link (a bounded
queue) and returns False, counting the message in ``dropped``, when the link is not connected or the queue is
full. Nothing here is on the ZeroMQ control path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any

import aiomqtt

from common.mqtt.settings import MqttSettings
from common.transport import backoff_delays

log = logging.getLogger("murakkab.mqtt")

Handler = Callable[[str, bytes], None]

QUEUE_MAX = 1000
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
KEEPALIVE_S = 30
MAX_INCOMING_QUEUED = 10_000


def _quiet_disconnect_future(client: aiomqtt.Client) -> None:
    """Retrieve the error aiomqtt leaves on its disconnect future (an aborted or lost connection), so asyncio
    does not log "Future exception was never retrieved" after the link has already said the broker is gone."""
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future):
        future.add_done_callback(lambda f: f.cancelled() or f.exception())


def encode_payload(payload: bytes | str | dict[str, Any]) -> bytes:
    """bytes as they are, str as UTF-8, a dict as compact JSON (no NaN or infinity: raises ValueError)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload, separators=(",", ":"), allow_nan=False, sort_keys=False).encode("utf-8")


class MqttLink:
    def __init__(self, settings: MqttSettings, client_id: str, *, will: tuple[str, bytes | Callable[[], bytes], bool] | None = None,
                 on_connected: Callable[[], None] | None = None, queue_max: int = QUEUE_MAX) -> None:
        self.settings = settings
        self.client_id = client_id
        self.will = will
        self.on_connected = on_connected
        self.queue_max = queue_max
        self.connected = False
        self.dropped = 0  # publish() calls refused (not connected, queue full, unencodable)
        self.published = 0  # messages handed to the broker
        self.received = 0
        self.handler_errors = 0
        self.connects = 0  # successful connections so far (1 after the first, 2 after one recovery, ...)
        self._handlers: list[tuple[str, Handler]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str, bytes, int, bool]] | None = None
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- API ------------------------------------------------------------------------------------

    def topic(self, *parts: str) -> str:
        return self.settings.topic_prefix.rstrip("/") + "/" + "/".join(parts)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Call ``handler(topic, payload)`` for every message matching ``topic_filter`` (before or after run())."""
        self._handlers.append((topic_filter, handler))
        client, loop = self._client, self._loop
        if client is not None and self.connected and loop is not None:
            def start() -> None:
                task = loop.create_task(self._subscribe_one(client, topic_filter))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._call_in_loop(start)

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], *, retain: bool = False,
                qos: int = 0) -> bool:
        """Queue a message for the broker; False (counted in ``dropped``) when it cannot be. Never raises."""
        try:
            queue, loop = self._queue, self._loop
            if not self.connected or queue is None or loop is None or loop.is_closed():
                self.dropped += 1
                return False
            item = (topic, encode_payload(payload), int(qos), bool(retain))
            if queue.qsize() >= self.queue_max:
                self.dropped += 1
                return False
            if self._in_loop(loop):
                queue.put_nowait(item)
            else:
                loop.call_soon_threadsafe(self._put_from_thread, item)
            return True
        except Exception as exc:  # an unencodable payload, a closed loop: refused, never raised
            self.dropped += 1
            log.debug("MQTT publish on %s refused: %s", topic[:200], exc)
            return False

    def abort(self) -> None:
        """Drop the connection without an MQTT DISCONNECT, as a crashed process does (the broker then sends
        the last will), and stop the link. For tests and fault drills."""
        client = self._client
        try:
            sock = client._client.socket() if client is not None else None  # paho's socket
            if sock is not None:
                import socket as socket_module
                sock.shutdown(socket_module.SHUT_RDWR)
        except Exception as exc:
            log.debug("MQTT abort: %s", exc)
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        """Until cancelled: connect, subscribe, dispatch and send; reconnect with backoff. Never raises on
        broker errors."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self._queue is None:
            self._queue = asyncio.Queue()
        delays = None
        outage = False
        where = f"{self.settings.host}:{self.settings.port}"
        try:
            while True:
                reason = ""
                try:
                    async with self._make_client() as client:
                        self._client = client
                        _quiet_disconnect_future(client)
                        for topic_filter in dict.fromkeys(f for f, _ in self._handlers):
                            await client.subscribe(topic_filter, qos=1)
                        self.connected = True
                        self.connects += 1
                        delays = None
                        if outage:
                            log.info("MQTT connected to %s again as %s (broker reachable)", where,
                                     self.settings.username or self.client_id)
                        else:
                            log.info("MQTT connected to %s as %s", where, self.settings.username or self.client_id)
                        outage = False
                        self._connected_callback()
                        await self._serve(client)
                except asyncio.CancelledError:
                    raise
                except aiomqtt.MqttError as exc:
                    reason = str(exc) or type(exc).__name__
                except (OSError, ssl.SSLError, ValueError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                except Exception as exc:  # a bug must not end the daemon's link either
                    reason = f"{type(exc).__name__}: {exc}"
                    log.exception("MQTT link error")
                finally:
                    self.connected = False
                    self._client = None
                if not outage:
                    log.warning("MQTT broker unreachable at %s (%s); retrying with backoff up to %g s; "
                                "the control plane is unaffected", where, reason[:300], self.settings.reconnect_cap_s)
                    outage = True
                if delays is None:
                    delays = backoff_delays(self.settings.reconnect_base_s, self.settings.reconnect_cap_s)
                await asyncio.sleep(next(delays))
        finally:
            self.connected = False
            self._client = None
            for task in list(self._tasks):
                task.cancel()

    # --- internals ------------------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        will = None
        if self.will is not None:
            topic, payload, retain = self.will[0], self.will[1], self.will[2]
            if callable(payload):  # built at each connect, so a timestamp in it says when this session began
                payload = payload()
            will = aiomqtt.Will(topic, encode_payload(payload), qos=1, retain=bool(retain))
        tls_context = None
        if s.tls:
            tls_context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        return aiomqtt.Client(
            s.host, s.port, username=s.username or None, password=s.password(), identifier=self.client_id,
            will=will, tls_context=tls_context, timeout=CONNECT_TIMEOUT_S, keepalive=KEEPALIVE_S,
            clean_session=True, max_queued_incoming_messages=MAX_INCOMING_QUEUED,
            logger=logging.getLogger("murakkab.mqtt.paho"))

    async def _serve(self, client: aiomqtt.Client) -> None:
        reader = asyncio.create_task(self._read(client))
        sender = asyncio.create_task(self._send(client))
        try:
            done, _ = await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, sender):
                task.cancel()
            await asyncio.gather(reader, sender, return_exceptions=True)
        for task in done:
            task.result()  # the MqttError that ended the connection
        raise aiomqtt.MqttError("connection ended")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.received += 1
            topic = message.topic.value
            payload = message.payload
            raw = payload if isinstance(payload, bytes) else (
                payload.encode() if isinstance(payload, str) else b"" if payload is None else str(payload).encode())
            for topic_filter, handler in list(self._handlers):
                if not message.topic.matches(topic_filter):
                    continue
                try:
                    handler(topic, raw)
                except Exception:
                    self.handler_errors += 1
                    log.exception("MQTT handler for %s failed on %s; message ignored", topic_filter, topic[:200])

    async def _send(self, client: aiomqtt.Client) -> None:
        assert self._queue is not None
        while True:
            topic, payload, qos, retain = await self._queue.get()
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=PUBLISH_TIMEOUT_S)
            self.published += 1

    async def _subscribe_one(self, client: aiomqtt.Client, topic_filter: str) -> None:
        try:
            await client.subscribe(topic_filter, qos=1)
        except Exception as exc:  # the next reconnect subscribes it again
            log.debug("MQTT subscribe %s failed: %s", topic_filter, exc)

    def _connected_callback(self) -> None:
        if self.on_connected is None:
            return
        try:
            self.on_connected()
        except Exception:
            log.exception("MQTT on_connected callback failed")

    def _put_from_thread(self, item: tuple[str, bytes, int, bool]) -> None:
        if self._queue is None or self._queue.qsize() >= self.queue_max:
            self.dropped += 1
            return
        self._queue.put_nowait(item)

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._in_loop(loop):
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    @staticmethod
    def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:  # another thread: hand it over with call_soon_threadsafe
            return False
