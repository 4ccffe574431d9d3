"""``amqp://`` (and ``amqps://``): publications over a RabbitMQ topic exchange.

URL: ``amqp://user:pass@host:5672/vhost?prefix=tidings&delivery_limit=20&queue_max_len=1000000``
(other query parameters go to aio-pika; ``heartbeat`` defaults to 10 s).

Design:

- Live fan-out: one topic exchange (``<prefix>``). Each node has one queue of
  its own (``<prefix>.node.<node id>``, exclusive and auto-delete: a dead node
  leaves nothing behind) and binds it only to what its clients want
  (interest routing). A channel ``a/b.c`` is the routing key ``c.a.b%2Ec``: a
  level is a word, and ``%``, ``.`` and ``*`` inside a level are escaped, so
  every valid channel round-trips and a literal level never acts as a
  wildcard. Patterns map onto binding keys word for word: ``+`` -> ``*``,
  ``#`` -> ``#`` (``a/#`` -> ``c.a.#`` also matches ``c.a``, as in MQTT).
  Routing keys are at most 255 bytes: a channel whose key would be longer is
  published under ``l.<sha1 of the channel>``; an exact subscription binds
  that key, and a node with any pattern also binds ``l.#`` (a pattern cannot
  be matched against a hash); a pattern whose own key would be too long binds
  its leading words that fit, then ``#``. Every message carries its channel and is
  filtered exactly on receipt with :func:`~tidings.protocol.pattern_matches`
  (this also keeps MQTT's rule that a first-level wildcard skips ``$``
  channels); RabbitMQ puts a message in a queue once however many of its
  bindings match, so nothing is delivered twice.
- Direct messages: each node's queue is also bound to ``n.<node id>`` (its
  inbox) and ``a`` (every node).
- Positions, history and presence: RabbitMQ has no atomic per-channel
  counter, so this broker does not assign offsets (publications carry offset
  0, epoch ""), keeps no history and no presence: ``capabilities`` says so and
  the hub refuses those features with ``not_available``.
- Work queues: quorum queues, shared by every node
  (:mod:`tidings.brokers.rabbitmq_queue`, via ``queue_store()``).
- Faults: one connection per node, named ``tidings <node id>`` (its
  ``connection_name``). When it closes, ``health()`` goes down (reported once),
  publishes raise :class:`~tidings.exceptions.BrokerUnavailable` (the hub then
  delivers locally), and a loop reconnects with exponential backoff and full
  jitter, re-declares the node queue and restores every binding before
  ``health()`` is up again (reported once).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

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
from tidings.brokers.rabbitmq_queue import RabbitMQQueueStore
from tidings.exceptions import BrokerUnavailable
from tidings.protocol.names import is_pattern, pattern_matches
from tidings.types import Publication

__all__ = ["RabbitMQBroker", "binding_key", "routing_key"]

log = logging.getLogger("tidings.brokers.rabbitmq")

MAX_KEY = 255  # AMQP shortstr: routing and binding keys are at most 255 bytes
LONG_KEYS = "l.#"
ALL_NODES = "a"
_ESCAPE = str.maketrans({"%": "%25", ".": "%2E", "*": "%2A", "#": "%23"})
_CONNECT_TIMEOUT = 5.0


def escape_word(level: str) -> str:
    """A channel level as one AMQP word: never a wildcard, never split."""
    return level.translate(_ESCAPE)


def routing_key(channel: str) -> str:
    """The routing key a publication of ``channel`` is published under."""
    key = "c." + ".".join(escape_word(level) for level in channel.split("/"))
    if len(key.encode()) > MAX_KEY:
        return "l." + hashlib.sha1(channel.encode()).hexdigest()
    return key


def binding_key(pattern: str) -> str:
    """The binding key for a channel or MQTT pattern. A pattern whose key would
    be too long binds its longest leading words that fit, then ``#``: wider,
    and narrowed by the exact filter on receipt."""
    if not is_pattern(pattern):
        return routing_key(pattern)
    words = ["*" if lv == "+" else "#" if lv == "#" else escape_word(lv)
             for lv in pattern.split("/")]
    key = "c." + ".".join(words)
    while len(key.encode()) > MAX_KEY:
        words = [*words[:-2], "#"] if words[-1] == "#" else [*words[:-1], "#"]
        key = "c." + ".".join(words)
    return key


def node_key(node_id: str) -> str:
    return "n." + escape_word(node_id)


class RabbitMQBroker:
    """Broker (live pub/sub, direct messages) and QueueStoreProvider on RabbitMQ."""

    capabilities = Capabilities(positions=False, history=False, presence=False, queues=True,
                                direct=True)
    name = "rabbitmq"

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.prefix = query.pop("prefix", "tidings")
        self.delivery_limit = int(query.pop("delivery_limit", "20"))
        self.queue_max_len = int(query.pop("queue_max_len", "1000000"))
        query.setdefault("heartbeat", "10")  # a silent network failure shows within ~20 s
        self._amqp_url = urlunsplit(parts._replace(query=urlencode(query)))
        self._node = ""
        self._handler: BrokerHandler | None = None
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._exact: set[str] = set()
        self._patterns: set[str] = set()
        self._bindings: dict[str, int] = {}  # binding key -> subscriptions needing it
        self._health = BrokerHealth(False, "not connected")
        self._closing = False
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._queues: RabbitMQQueueStore | None = None
        self.generation = 0  # +1 per (re)connection: handles of older ones are void

    def queue_store(self) -> RabbitMQQueueStore:
        """Work queues in quorum queues shared by every node on this RabbitMQ
        (see :mod:`tidings.brokers.rabbitmq_queue`)."""
        if self._queues is None:
            self._queues = RabbitMQQueueStore(self, delivery_limit=self.delivery_limit,
                                              max_len=self.queue_max_len)
        return self._queues

    @property
    def connection(self) -> AbstractConnection:
        """The open connection (for the queue store); BrokerUnavailable while down."""
        conn = self._conn
        if conn is None or conn.is_closed or not self._health.up:
            raise BrokerUnavailable(self._health.reason or "RabbitMQ unreachable")
        return conn

    @property
    def node_queue(self) -> str:
        return f"{self.prefix}.node.{escape_word(self._node)}"

    @property
    def connection_name(self) -> str:
        return f"tidings {self._node}"

    # -- lifecycle ----------------------------------------------------------------

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        self._node = node_id
        self._handler = handler
        self._closing = False
        self._lost = asyncio.Event()
        try:
            await self._open()
        except Exception as exc:
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {self._safe_url}: {exc}") from exc
        self._set_health(BrokerHealth(True))
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"tidings-rabbitmq-{node_id}")

    @property
    def _safe_url(self) -> str:
        parts = urlsplit(self._amqp_url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}:{parts.port or 5672}{parts.path}"

    async def _open(self) -> None:
        """Connect, declare the exchange and this node's queue, restore every
        binding and start consuming; only then is the new connection current."""
        conn = await aio_pika.connect(
            self._amqp_url, timeout=_CONNECT_TIMEOUT,
            client_properties={"connection_name": self.connection_name})
        try:
            channel = await conn.channel(publisher_confirms=False)
            exchange = await channel.declare_exchange(
                self.prefix, aio_pika.ExchangeType.TOPIC, auto_delete=True)
            queue = await channel.declare_queue(self.node_queue, exclusive=True,
                                                auto_delete=True)
            for key in (node_key(self._node), ALL_NODES, *self._bindings):
                await queue.bind(exchange, routing_key=key)
            await queue.consume(self._on_message, no_ack=True)
        except BaseException:
            await conn.close()
            raise
        generation = self.generation + 1
        conn.close_callbacks.add(lambda *_: self._connection_lost(generation))
        channel.close_callbacks.add(lambda *_: self._connection_lost(generation))
        old = self._conn
        self._conn, self._channel, self._exchange, self._queue = conn, channel, exchange, queue
        self.generation = generation
        if old is not None and not old.is_closed:
            await old.close()

    def _connection_lost(self, generation: int) -> None:
        if generation == self.generation and not self._closing:
            self._lost.set()

    async def _supervise(self) -> None:
        backoff = 0.1
        while not self._closing:
            await self._lost.wait()
            if self._stopping():
                return
            self._lost.clear()
            self._set_health(BrokerHealth(False, "RabbitMQ connection lost"))
            old, self._conn = self._conn, None
            if old is not None and not old.is_closed:
                try:
                    await old.close()
                except Exception:  # it is broken already
                    pass
            while not self._closing:  # reconnect with exponential backoff, full jitter
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, 5.0)
                try:
                    await self._open()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._set_health(BrokerHealth(False, f"RabbitMQ unreachable: {exc}"))
                    continue
                backoff = 0.1
                self._lost.clear()
                self._set_health(BrokerHealth(True))
                break

    async def close(self) -> None:
        self._closing = True
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._queues is not None:
            await self._queues.close()
        conn, self._conn = self._conn, None
        self._channel = self._exchange = self._queue = None
        if conn is not None and not conn.is_closed:
            try:
                await conn.close()
            except Exception:  # already broken: nothing to release
                pass
        self._health = BrokerHealth(False, "closed")

    def health(self) -> BrokerHealth:
        return self._health

    def _stopping(self) -> bool:
        return self._closing

    def _set_health(self, health: BrokerHealth) -> None:
        self._health = transition(self._handler, self._health, health)

    # -- receiving -----------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        handler = self._handler
        if handler is None:
            return
        body = message.body
        try:
            kind = body[:1]
            if kind == b"P":
                pub = parse_publication(body)
                if self._wanted(pub.channel):
                    handler.on_publication(pub)
            elif kind == b"E":
                channel, frame = parse_event(body)
                if self._wanted(channel):
                    handler.on_event(channel, frame)
            elif kind == b"N":
                handler.on_node_message(body[1:])
        except Exception:  # one bad message must not stop the consumer
            log.exception("cannot deliver a message from RabbitMQ")

    def _wanted(self, channel: str) -> bool:
        if channel in self._exact:
            return True
        return any(pattern_matches(p, channel) for p in self._patterns)

    # -- publishing ----------------------------------------------------------------

    async def _send(self, key: str, body: bytes) -> None:
        exchange = self._exchange
        if exchange is None or not self._health.up:
            raise BrokerUnavailable(self._health.reason or "RabbitMQ unreachable")
        try:
            await exchange.publish(aio_pika.Message(body), routing_key=key, mandatory=False)
        except Exception as exc:  # aio-pika raises several kinds for a closed channel
            raise BrokerUnavailable(f"publish to RabbitMQ failed: {exc}") from exc

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
        await self._send(routing_key(channel),
                         encode_publication(channel, data, text, sender, ts))
        return Publication(channel, data, 0, "", sender, ts, text=text)

    async def publish_event(self, channel: str, frame: str) -> None:
        await self._send(routing_key(channel), encode_event(channel, frame))

    async def send_node(self, node_id: str, payload: bytes) -> None:
        await self._send(node_key(node_id), b"N" + payload)

    async def send_all(self, payload: bytes) -> None:
        await self._send(ALL_NODES, b"N" + payload)

    # -- interest ---------------------------------------------------------------------

    def _keys_of(self, pattern: str) -> list[str]:
        if not is_pattern(pattern):
            return [routing_key(pattern)]
        return [binding_key(pattern), LONG_KEYS]

    async def subscribe(self, pattern: str) -> None:
        """Bind (and wait for RabbitMQ's bind-ok). The interest is recorded
        first, so a reconnect restores it even if this bind fails."""
        if pattern in self._exact or pattern in self._patterns:
            return
        (self._patterns if is_pattern(pattern) else self._exact).add(pattern)
        for key in self._keys_of(pattern):
            count = self._bindings.get(key, 0)
            self._bindings[key] = count + 1
            if count == 0:
                await self._bind(key, bind=True)

    async def unsubscribe(self, pattern: str) -> None:
        if pattern in self._exact:
            self._exact.discard(pattern)
        elif pattern in self._patterns:
            self._patterns.discard(pattern)
        else:
            return
        for key in self._keys_of(pattern):
            count = self._bindings.get(key, 0) - 1
            if count > 0:
                self._bindings[key] = count
                continue
            self._bindings.pop(key, None)
            await self._bind(key, bind=False)

    async def _bind(self, key: str, *, bind: bool) -> None:
        queue, exchange = self._queue, self._exchange
        if queue is None or exchange is None or not self._health.up:
            return  # restored (or not) when the connection is back
        try:
            if bind:
                await queue.bind(exchange, routing_key=key)
            else:
                await queue.unbind(exchange, routing_key=key)
        except Exception as exc:
            raise BrokerUnavailable(f"RabbitMQ (un)bind of {key!r} failed: {exc}") from exc
