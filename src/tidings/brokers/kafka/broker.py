"""``kafka://``: publications over Kafka (or a Kafka-protocol server: tansu).

URL: ``kafka://host:9092[,host2:9092]?prefix=tidings&retention=604800&replicas=1``
(also ``bus_retention`` s, ``fetch_wait`` ms, ``gap_wait`` s, ``timeout`` s, ``ping`` s).

Design (docs/brokers-kafka.md has the long version and the reasons):

- Pub/sub: Kafka has no wildcard subscriptions of the tidings kind, so one
  single-partition topic ``<prefix>.bus`` carries every live publication,
  join/leave event and node message. Each node reads it from its end with
  no consumer group (assign + seek to end) and keeps what its clients want
  (channels and patterns filtered exactly with
  :func:`~tidings.protocol.pattern_matches`). The cost: every node reads
  every publication of the prefix.
- Positions and history: each channel has its own single-partition topic
  (:func:`~tidings.brokers.kafka.wire.channel_topic`), created on first use.
  A publish appends there first (acks=all): the Kafka offset + 1 is the
  channel offset, dense and in one order whichever node publishes, and the
  topic id is the epoch. Then the publication goes to the bus with its
  offset. Two nodes' bus copies may arrive in either order, so each node
  delivers a channel in offset order (:class:`~tidings.brokers.kafka.wire.ChannelOrder`):
  a gap waits ``gap_wait`` s for the missing copy, then is read from the
  channel topic. History reads the channel topic
  (:mod:`tidings.brokers.kafka.history`).
- Not offered: presence (Kafka has no expiring keys), and shared work queues:
  Kafka commits one offset per partition and group, not single items, and a
  partition belongs to one member of a group at a time, so per-item leases,
  requeues, delays and claims of the QueueStore contract do not map onto it;
  queues stay in process (``capabilities``).
- Faults: a ping (Metadata of the bus topic) every ``ping`` s and any failed
  call mark the broker down (reported once); every call then raises
  :class:`~tidings.exceptions.BrokerUnavailable` and a loop builds new clients
  with exponential backoff and full jitter. The bus topic's id is checked on
  each ping: a server that came back without its topics (memory storage) is
  a restart too, and every cached epoch and cursor is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from tidings.brokers.base import (
    BrokerHandler,
    BrokerHealth,
    Capabilities,
    HistoryOptions,
    transition,
)
from tidings.brokers.kafka.history import epoch_of_id, publications_of, read_history
from tidings.brokers.kafka.link import KafkaLink, KafkaSettings
from tidings.brokers.kafka.wire import (
    ChannelOrder,
    bus_channel,
    bus_publication,
    channel_topic,
    node_record,
    parse_bus_publication,
    parse_node_record,
    valid_prefix,
)
from tidings.brokers.plain_wire import encode_event, encode_publication, parse_event
from tidings.exceptions import BrokerUnavailable
from tidings.protocol.names import is_pattern, pattern_matches
from tidings.types import HistoryPage, Publication, StreamPos

__all__ = ["KafkaBroker"]

log = logging.getLogger("tidings.brokers.kafka")

_FAILURES = (KafkaError, OSError, TimeoutError)
_EPOCHS_MAX = 100_000


class KafkaBroker:
    """Broker and HistoryStore on Kafka (live pub/sub, positions, history, direct)."""

    capabilities = Capabilities(positions=True, history=True, presence=False, queues=False,
                                direct=True)
    name = "kafka"

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.prefix = query.get("prefix", "tidings")
        if not valid_prefix(self.prefix):
            raise ValueError(f"Kafka prefix must be 1-100 of A-Z a-z 0-9 . _ -: {self.prefix!r}")
        hosts = parts.netloc.rpartition("@")[2]
        self.servers = [h if ":" in h else f"{h}:9092" for h in hosts.split(",") if h] or [
            "127.0.0.1:9092"]
        self.timeout = float(query.get("timeout", "5"))
        self.ping_every = float(query.get("ping", "1"))
        self.gap_wait = float(query.get("gap_wait", "0.05"))
        self.fetch_wait_ms = int(query.get("fetch_wait", "100"))
        self.retention = float(query.get("retention", str(7 * 86400)))
        # the bus only has to hold what a node has not read yet
        self.bus_retention = float(query.get("bus_retention", "3600"))
        self.replicas = int(query.get("replicas", "1"))
        self.bus_topic = f"{self.prefix}.bus"
        self._node = ""
        self._handler: BrokerHandler | None = None
        self._link: KafkaLink | None = None
        self._bus_id = ""
        self._health = BrokerHealth(False, "not connected")
        self._closing = False
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._exact: set[str] = set()
        self._patterns: set[str] = set()
        self._epochs: dict[str, tuple[str, int]] = {}  # channel -> (epoch, last offset seen)
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._order = ChannelOrder(self._deliver, self._wait_gap, self._fill_gap)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def _settings(self) -> KafkaSettings:
        return KafkaSettings(self.servers, timeout=self.timeout,
                             fetch_wait_ms=self.fetch_wait_ms,
                             retention_ms=int(self.retention * 1000), replicas=self.replicas,
                             client_id=f"tidings-{self._node}")

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        self._node = node_id
        self._handler = handler
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._lost = asyncio.Event()
        try:
            await self._open()
        except Exception as exc:
            raise BrokerUnavailable(
                f"cannot reach Kafka at {','.join(self.servers)}: {exc!r}") from exc
        self._set_health(BrokerHealth(True))
        self._supervisor = self._loop.create_task(self._supervise(),
                                                  name=f"tidings-kafka-{node_id}")

    async def _open(self) -> None:
        """New clients, the bus topic, reading it from its end; only then current."""
        link = KafkaLink(self._settings())
        try:
            await link.start()
            self._bus_id = await link.ensure(self.bus_topic,
                                             retention_ms=int(self.bus_retention * 1000))
            tp = TopicPartition(self.bus_topic, 0)
            link.bus.assign([tp])
            await asyncio.wait_for(link.bus.seek_to_end(tp), self.timeout)
            await asyncio.wait_for(link.bus.position(tp), self.timeout)
        except BaseException:
            await link.stop()
            raise
        self._epochs.clear()
        self._order.reset()
        self._link = link
        self._reader = self._running().create_task(self._read_bus(link),
                                                   name=f"tidings-kafka-bus-{self._node}")

    async def _drop_link(self) -> None:
        link, self._link = self._link, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if link is not None:
            await link.stop()

    async def _supervise(self) -> None:
        while not self._closing:
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception:  # logged and carried on: the watch never stops silently
                log.exception("node %s: the Kafka connection watch failed", self._node)
                await asyncio.sleep(self.ping_every)

    async def _watch(self) -> None:
        """Wait for a lost connection (a failed call, or a ping), then reconnect."""
        try:
            await asyncio.wait_for(self._lost.wait(), self.ping_every)
            reason = "Kafka connection lost"
        except TimeoutError:
            reason = await self._ping()
            if not reason:
                return
        if self._stopping():
            return
        self._set_health(BrokerHealth(False, reason))
        await self._drop_link()
        await self._reconnect()

    async def _ping(self) -> str:
        """Why the server counts as lost, or "" while it answers as before."""
        link = self._link
        if link is None:
            return "Kafka connection lost"
        try:
            ids = await link.topic_ids([self.bus_topic])
        except (*_FAILURES, BrokerUnavailable) as exc:
            return f"Kafka unreachable: {exc!r}"
        if ids.get(self.bus_topic) != self._bus_id:
            return "Kafka lost its topics (the server restarted)"
        return ""

    async def _reconnect(self) -> None:
        backoff = 0.1
        while not self._closing:  # exponential backoff, full jitter
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 5.0)
            try:
                await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._set_health(BrokerHealth(False, f"Kafka unreachable: {exc!r}"))
                continue
            self._lost.clear()
            self._set_health(BrokerHealth(True))
            return

    async def close(self) -> None:
        self._closing = True
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for pending in list(self._tasks):
            pending.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._drop_link()
        self._health = BrokerHealth(False, "closed")

    def health(self) -> BrokerHealth:
        return self._health

    def _stopping(self) -> bool:
        return self._closing

    def _set_health(self, health: BrokerHealth) -> None:
        self._health = transition(self._handler, self._health, health)

    def _live(self) -> KafkaLink:
        link = self._link
        if link is None or not self._health.up:
            raise BrokerUnavailable(self._health.reason or "Kafka unreachable")
        return link

    def _suspect(self, link: KafkaLink) -> None:
        """A call on ``link`` failed: check the connection now (unless that link
        was replaced meanwhile)."""
        if link is self._link:
            self._lost.set()

    def _failed(self, what: str, exc: BaseException, link: KafkaLink) -> BrokerUnavailable:
        """:meth:`_suspect` ``link``, and the error to raise to the caller."""
        self._suspect(link)
        return BrokerUnavailable(f"{what} failed: {exc!r}")

    def _running(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the Kafka broker is not connected")
        return loop

    def _spawn(self, coro: Any) -> None:
        task = self._running().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- receiving ------------------------------------------------------------------------

    async def _read_bus(self, link: KafkaLink) -> None:
        tp = TopicPartition(self.bus_topic, 0)
        while True:
            try:
                batch = await link.bus.getmany(tp, timeout_ms=1000, max_records=2000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("node %s: reading the Kafka bus failed: %r", self._node, exc)
                self._lost.set()
                return
            for record in batch.get(tp, ()):
                self._on_record(record.value)

    def _on_record(self, body: bytes) -> None:
        handler = self._handler
        if handler is None or not body:
            return
        try:
            kind = body[:1]
            if kind == b"O":
                if self._wanted(bus_channel(body)):
                    self._order.offer(parse_bus_publication(body))
            elif kind == b"E":
                channel, frame = parse_event(body)
                if self._wanted(channel):
                    handler.on_event(channel, frame)
            elif kind == b"N":
                node, payload = parse_node_record(body)
                if node == self._node:
                    handler.on_node_message(payload)
            elif kind == b"A":
                handler.on_node_message(body[1:])
            elif kind == b"X":
                self._epochs.pop(body[1:].decode(), None)
        except Exception:  # one bad record must not stop the reader
            log.exception("cannot deliver a record from the Kafka bus")

    def _deliver(self, pub: Publication) -> None:
        if self._handler is not None:
            self._handler.on_publication(pub)

    def _wait_gap(self, channel: str) -> None:
        self._running().call_later(self.gap_wait, self._order.waited, channel)

    def _fill_gap(self, channel: str, epoch: str, first: int, last: int) -> None:
        self._spawn(self._fill(channel, epoch, first, last))

    async def _fill(self, channel: str, epoch: str, first: int, last: int) -> None:
        pubs: list[Publication] = []
        link = self._link
        if link is not None and self._health.up:
            try:
                records = await link.read(channel_topic(self.prefix, channel), first - 1,
                                          last - 1)
                pubs = publications_of(records, epoch)
            except Exception as exc:  # the gap is then skipped: at most once
                log.warning("node %s: cannot read the gap %d-%d of %r from Kafka: %r",
                            self._node, first, last, channel, exc)
        self._order.filled(channel, epoch, pubs)

    def _wanted(self, channel: str) -> bool:
        if channel in self._exact:
            return True
        return any(pattern_matches(p, channel) for p in self._patterns)

    # -- publishing ----------------------------------------------------------------------

    async def _epoch(self, link: KafkaLink, channel: str) -> str:
        known = self._epochs.get(channel)
        if known is not None:
            return known[0]
        epoch = epoch_of_id(await link.ensure(channel_topic(self.prefix, channel)))
        self._remember(channel, epoch, 0)
        return epoch

    def _remember(self, channel: str, epoch: str, offset: int) -> None:
        if len(self._epochs) >= _EPOCHS_MAX and channel not in self._epochs:
            self._epochs.clear()
        self._epochs[channel] = (epoch, offset)

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
        text: str | None = None,
    ) -> Publication:
        """Append to the channel's topic (the offset), then to the bus (live)."""
        link = self._live()
        ts = int(time.time() * 1000)
        record = encode_publication(channel, data, text, sender, ts)
        window = b"%d,%s" % ((history.size, repr(history.ttl).encode()) if history else
                             (0, b"0"))
        try:
            lock, users = self._lock(channel)
            try:
                async with lock:  # the channel's appends go out in the order of the calls
                    epoch = await self._epoch(link, channel)
                    appended = await link.producer.send(
                        channel_topic(self.prefix, channel), record, partition=0,
                        timestamp_ms=ts, headers=[("w", window)])
            finally:
                self._unlock(channel, users)
            offset = (await asyncio.wait_for(appended, self.timeout)).offset + 1
            epoch = await self._checked_epoch(link, channel, epoch, offset)
        except _FAILURES as exc:
            raise self._failed("publish to Kafka", exc, link) from exc
        pub = Publication(channel, data, offset, epoch, sender, ts, text=text)
        try:
            copy = await link.producer.send(self.bus_topic, bus_publication(offset, epoch, record),
                                            partition=0)
            await asyncio.wait_for(copy, self.timeout)
        except _FAILURES as exc:
            # The channel topic has it: it is published, at that offset. Raising
            # would make the hub deliver it here again without a position, and
            # the channel topic would give it once more. So this node delivers
            # it as its bus copy would have (a late copy is dropped as seen), the
            # other nodes read it from the channel topic at their next gap.
            self._suspect(link)
            log.warning("node %s: the bus copy of %r offset %d failed (%r): other nodes "
                        "get it from the channel topic with the next publication",
                        self._node, channel, offset, exc)
            if self._wanted(channel):
                self._order.offer(pub)
        return pub

    async def _checked_epoch(self, link: KafkaLink, channel: str, epoch: str,
                             offset: int) -> str:
        """``epoch``, unless ``offset`` went back: the topic was made anew (history
        removed by another node) and has another id."""
        known = self._epochs.get(channel)
        if known is not None and known[0] == epoch and offset <= known[1]:
            ids = await link.topic_ids([channel_topic(self.prefix, channel)])
            topic_id = next(iter(ids.values()), "")
            epoch = epoch_of_id(topic_id) if topic_id else epoch
        self._remember(channel, epoch, offset)
        return epoch

    def _lock(self, channel: str) -> tuple[asyncio.Lock, list[int]]:
        entry = self._locks.get(channel)
        if entry is None:
            entry = self._locks[channel] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        return entry

    def _unlock(self, channel: str, users: list[int]) -> None:
        users[0] -= 1
        if users[0] == 0:
            self._locks.pop(channel, None)

    async def _bus(self, body: bytes) -> None:
        link = self._live()
        try:
            await asyncio.wait_for(
                await link.producer.send(self.bus_topic, body, partition=0), self.timeout)
        except _FAILURES as exc:
            raise self._failed("send on the Kafka bus", exc, link) from exc

    async def publish_event(self, channel: str, frame: str) -> None:
        await self._bus(encode_event(channel, frame))

    async def send_node(self, node_id: str, payload: bytes) -> None:
        await self._bus(node_record(node_id, payload))

    async def send_all(self, payload: bytes) -> None:
        await self._bus(b"A" + payload)

    # -- interest ------------------------------------------------------------------------

    async def subscribe(self, pattern: str) -> None:
        """Every node reads the whole bus: interest is only the local filter."""
        (self._patterns if is_pattern(pattern) else self._exact).add(pattern)

    async def unsubscribe(self, pattern: str) -> None:
        self._exact.discard(pattern)
        self._patterns.discard(pattern)
        self._order.forget(self._wanted)

    # -- history (HistoryStore) ----------------------------------------------------------------

    async def _current_epoch(self, link: KafkaLink, channel: str) -> str:
        """The epoch as the server has it now (never from the cache: another
        node may have removed the history a moment ago)."""
        epoch = epoch_of_id(await link.ensure(channel_topic(self.prefix, channel)))
        known = self._epochs.get(channel)
        if known is None or known[0] != epoch:
            self._remember(channel, epoch, 0)
        return epoch

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        link = self._live()
        try:
            epoch = await self._current_epoch(link, channel)
            return await read_history(link, self.prefix, channel, epoch, since=since,
                                      limit=limit, reverse=reverse)
        except _FAILURES as exc:
            raise self._failed("Kafka history read", exc, link) from exc

    async def position(self, channel: str) -> StreamPos:
        link = self._live()
        try:
            epoch = await self._current_epoch(link, channel)
            _, end = await link.offsets(channel_topic(self.prefix, channel))
        except _FAILURES as exc:
            raise self._failed("Kafka position read", exc, link) from exc
        return StreamPos(end, epoch)

    async def remove_history(self, channel: str) -> None:
        """Delete the channel's topic (the next use makes a new one: a new
        epoch, offsets from 1) and tell every node to forget its epoch."""
        link = self._live()
        try:
            await link.delete(channel_topic(self.prefix, channel))
        except _FAILURES as exc:
            raise self._failed("Kafka topic deletion", exc, link) from exc
        self._epochs.pop(channel, None)
        await self._bus(b"X" + channel.encode())
