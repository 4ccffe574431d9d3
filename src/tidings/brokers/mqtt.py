"""``mqtt://`` (and ``mqtts://``): publications over an MQTT 5 server (Mosquitto).

URL: ``mqtt://user:pass@host:1883?prefix=tidings&qos=1&keepalive=15``.

Design:

- Live fan-out with native wildcards: channel ``a/b`` is the topic
  ``<prefix>/c/a/b`` and a pattern maps level for level (``a/+`` ->
  ``<prefix>/c/a/+``, ``a/#`` -> ``<prefix>/c/a/#``, which also matches
  ``a``, as tidings patterns do). A node subscribes only to what its clients
  want (interest routing). Valid channel names hold no ``+``, ``#``, NUL or
  empty level; what else Mosquitto refuses in a topic (control characters,
  surrogates, Unicode non-characters) is escaped as ``%XX`` / ``%uXXXXXX``
  (and ``%`` itself as ``%25``), which keeps names one to one and levels
  intact. The prefix keeps every channel, ``$`` ones included, away from the
  server's ``$SYS`` topics; each
  message carries its channel and is filtered exactly on receipt with
  :func:`~tidings.protocol.pattern_matches` (this keeps tidings' rule that a
  first-level wildcard skips ``$`` channels, which a prefixed topic loses).
- Each subscription has an MQTT 5 subscription identifier; a message that
  several subscriptions of the node match is accepted only through the one
  with the lowest identifier, so it is delivered once whether the server
  sends one copy or one per subscription.
- QoS 1 (``?qos=``) for publications and always for node messages: the
  server acknowledges every publish, and delivers to a subscriber at least
  once while it stays connected.
- Direct messages: each node subscribes to ``<prefix>/n/<node id>`` (its
  inbox) and ``<prefix>/a`` (every node).
- Positions, history, presence and shared work queues are not offered
  (``capabilities``): MQTT has no per-topic counter and no stored stream;
  MQTT 5 shared subscriptions balance deliveries but have no per-item
  requeue, delay, dead letter, lease or length, so queues stay in process.
- Faults: aiomqtt does not reconnect by itself. A loop does: when the
  connection drops ``health()`` goes down (reported once), publishes raise
  :class:`~tidings.exceptions.BrokerUnavailable` (the hub delivers locally),
  and the loop reconnects (clean start) with exponential backoff and full
  jitter, subscribes everything again and only then reports up (once).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tidings.brokers.base import (
    BrokerHandler,
    BrokerHealth,
    Capabilities,
    HistoryOptions,
    transition,
)
from tidings.brokers.plain_wire import (
    encode_event,
    encode_publication,
    parse_event,
    parse_publication,
)
from tidings.exceptions import BrokerUnavailable
from tidings.protocol.names import is_pattern, pattern_matches
from tidings.types import Publication

__all__ = ["MqttBroker", "escape_level", "escape_topic"]

log = logging.getLogger("tidings.brokers.mqtt")

_CONNECT_TIMEOUT = 5.0
_FIRST_ID = 3  # 1: the node's inbox, 2: every node
# what Mosquitto refuses in a topic (it drops the connection: "malformed packet"):
# control characters, UTF-16 surrogates and Unicode non-characters; and '%',
# so that an escaped name never equals another name as written
_REFUSED = re.compile(
    "[%\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}-{chr(p * 0x10000 + 0xFFFF)}" for p in range(1, 17))
    + "]")
_LEVEL = re.compile("[/+#]")


class _NoPendingWarnings(logging.Filter):
    """aiomqtt warns whenever more than 10 publishes await their PUBACK; a hub
    keeps many in flight on purpose, so those lines are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pending publish calls" not in record.getMessage()


driver_log = logging.getLogger("tidings.brokers.mqtt.aiomqtt")
driver_log.addFilter(_NoPendingWarnings())


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"%{code:02X}" if code < 0x100 else f"%u{code:06X}"


def escape_topic(channel: str) -> str:
    """A channel (or pattern) as topic levels the server accepts: one to one,
    since an escape always starts with '%' and a literal '%' is escaped."""
    return _REFUSED.sub(_escaped, channel)


def escape_level(name: str) -> str:
    """A name (a node id) as one topic level MQTT accepts."""
    return _LEVEL.sub(_escaped, escape_topic(name))


class MqttBroker:
    """Broker (live pub/sub, direct messages) on an MQTT 5 server."""

    capabilities = Capabilities(positions=False, history=False, presence=False, queues=False,
                                direct=True)
    name = "mqtt"

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.prefix = query.get("prefix", "tidings")
        if not self.prefix or any(c in self.prefix for c in "/+#\x00") or self.prefix[0] == "$":
            raise ValueError(f"MQTT prefix {self.prefix!r} must be one plain topic level")
        self.qos = int(query.get("qos", "1"))
        if self.qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        self.keepalive = int(query.get("keepalive", "15"))
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.tls = parts.scheme == "mqtts"
        self._node = ""
        self._handler: BrokerHandler | None = None
        self._client: aiomqtt.Client | None = None
        self._ids: dict[str, int] = {}  # pattern -> subscription identifier
        self._exact: set[str] = set()
        self._patterns: set[str] = set()
        self._next_id = _FIRST_ID
        self._health = BrokerHealth(False, "not connected")
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._topics: dict[str, str] = {}

    # -- names ----------------------------------------------------------------

    def topic(self, pattern: str) -> str:
        """The MQTT topic (filter) of a channel (pattern)."""
        topic = self._topics.get(pattern)
        if topic is None:
            if len(self._topics) > 10_000:
                self._topics.clear()
            topic = self._topics[pattern] = f"{self.prefix}/c/{escape_topic(pattern)}"
        return topic

    def _inbox(self, node_id: str) -> str:
        return f"{self.prefix}/n/{escape_level(node_id)}"

    @property
    def _all(self) -> str:
        return f"{self.prefix}/a"

    # -- lifecycle ----------------------------------------------------------------

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        self._node = node_id
        self._handler = handler
        self._closing = False
        try:
            client = await self._open()
        except Exception as exc:
            raise BrokerUnavailable(
                f"cannot reach the MQTT server at {self.host}:{self.port}: {exc}") from exc
        self._client = client
        self._set_health(BrokerHealth(True))
        self._runner = asyncio.get_running_loop().create_task(
            self._run(client), name=f"tidings-mqtt-{node_id}")

    def _make_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host, self.port, username=self.username, password=self.password,
            identifier=f"{self.prefix}-{self._node}", protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True, keepalive=self.keepalive, timeout=_CONNECT_TIMEOUT,
            max_inflight_messages=1000, logger=driver_log,
            tls_params=aiomqtt.TLSParameters() if self.tls else None)

    async def _open(self) -> aiomqtt.Client:
        """Connect and subscribe the inbox and every pattern wanted."""
        client = self._make_client()
        await client.__aenter__()
        try:
            await self._subscribe(client, self._inbox(self._node), 1)
            await self._subscribe(client, self._all, 2)
            for pattern, sid in list(self._ids.items()):
                await self._subscribe(client, self.topic(pattern), sid)
        except BaseException:
            await self._drop(client)
            raise
        return client

    async def _subscribe(self, client: aiomqtt.Client, topic: str, sid: int) -> None:
        props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
        props.SubscriptionIdentifier = sid
        result = await client.subscribe(topic, qos=max(1, self.qos), properties=props)
        for code in result:
            value = code if isinstance(code, int) else code.value
            if value >= 0x80:
                raise BrokerUnavailable(f"the MQTT server refused the subscription to "
                                        f"{topic!r}: {code}")

    @staticmethod
    async def _drop(client: aiomqtt.Client) -> None:
        try:
            await client.__aexit__(None, None, None)
        except Exception:  # the connection is broken already
            pass

    async def _run(self, client: aiomqtt.Client) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                async for message in client.messages:
                    self._on_message(message)
                reason = "MQTT connection closed"
            except aiomqtt.MqttError as exc:
                reason = f"MQTT connection lost: {exc}"
            if self._stopping():
                return
            self._client = None
            self._set_health(BrokerHealth(False, reason))
            await self._drop(client)
            while not self._closing:  # reconnect with exponential backoff, full jitter
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, 5.0)
                try:
                    client = await self._open()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._set_health(BrokerHealth(False, f"MQTT server unreachable: {exc}"))
                    continue
                backoff = 0.1
                self._client = client
                self._set_health(BrokerHealth(True))
                break

    async def close(self) -> None:
        self._closing = True
        task, self._runner = self._runner, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        client, self._client = self._client, None
        if client is not None:
            await self._drop(client)
        self._health = BrokerHealth(False, "closed")

    def health(self) -> BrokerHealth:
        return self._health

    def _stopping(self) -> bool:
        return self._closing

    def _set_health(self, health: BrokerHealth) -> None:
        self._health = transition(self._handler, self._health, health)

    # -- receiving -----------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        handler = self._handler
        payload = message.payload
        if handler is None or not isinstance(payload, (bytes, bytearray)):
            return
        body = bytes(payload)
        try:
            kind = body[:1]
            if kind == b"N":
                handler.on_node_message(body[1:])
                return
            ids = getattr(message.properties, "SubscriptionIdentifier", None) or []
            if kind == b"P":
                pub = parse_publication(body)
                if self._accepted(pub.channel, ids):
                    handler.on_publication(pub)
            elif kind == b"E":
                channel, frame = parse_event(body)
                if self._accepted(channel, ids):
                    handler.on_event(channel, frame)
        except Exception:  # one bad message must not stop the connection
            log.exception("cannot deliver a message from MQTT")

    def _accepted(self, channel: str, ids: list[int]) -> bool:
        """True for the one copy of a message that arrived through the lowest
        subscription of ours that matches ``channel`` exactly."""
        best = self._ids.get(channel) if channel in self._exact else None
        for pattern in self._patterns:
            if pattern_matches(pattern, channel):
                sid = self._ids[pattern]
                if best is None or sid < best:
                    best = sid
        return best is not None and best in ids

    # -- publishing ----------------------------------------------------------------

    async def _send(self, topic: str, body: bytes, qos: int) -> None:
        client = self._client
        if client is None or not self._health.up:
            raise BrokerUnavailable(self._health.reason or "MQTT server unreachable")
        try:
            await client.publish(topic, body, qos=qos)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"publish to MQTT failed: {exc}") from exc

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
        text: str | None = None,
    ) -> Publication:
        """Fan out; no position (offset 0, epoch ""), no history (``capabilities``)."""
        ts = int(time.time() * 1000)
        await self._send(self.topic(channel),
                         encode_publication(channel, data, text, sender, ts), self.qos)
        return Publication(channel, data, 0, "", sender, ts, text=text)

    async def publish_event(self, channel: str, frame: str) -> None:
        await self._send(self.topic(channel), encode_event(channel, frame), self.qos)

    async def send_node(self, node_id: str, payload: bytes) -> None:
        await self._send(self._inbox(node_id), b"N" + payload, 1)

    async def send_all(self, payload: bytes) -> None:
        await self._send(self._all, b"N" + payload, 1)

    # -- interest ---------------------------------------------------------------------

    async def subscribe(self, pattern: str) -> None:
        """Subscribe and wait for the SUBACK. The interest is recorded first,
        so a reconnect restores it even if this subscribe fails."""
        if pattern in self._ids:
            return
        sid = self._next_id
        self._next_id = sid + 1 if sid < 268_435_455 else _FIRST_ID
        self._ids[pattern] = sid
        (self._patterns if is_pattern(pattern) else self._exact).add(pattern)
        client = self._client
        if client is not None and self._health.up:
            try:
                await self._subscribe(client, self.topic(pattern), sid)
            except aiomqtt.MqttError as exc:
                raise BrokerUnavailable(f"MQTT subscribe to {pattern!r} failed: {exc}") from exc

    async def unsubscribe(self, pattern: str) -> None:
        if self._ids.pop(pattern, None) is None:
            return
        self._exact.discard(pattern)
        self._patterns.discard(pattern)
        client = self._client
        if client is not None and self._health.up:
            try:
                await client.unsubscribe(self.topic(pattern))
            except aiomqtt.MqttError as exc:
                raise BrokerUnavailable(
                    f"MQTT unsubscribe from {pattern!r} failed: {exc}") from exc
