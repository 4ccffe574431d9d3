"""``nats://``: publications over NATS, positions and history in JetStream.

URL: ``nats://host:4222[,host2:4222]?prefix=tidings&replicas=1&presence_ttl=30``
(``nats+tls://`` for TLS; also ``meta_ttl``, ``history_max``, ``queue_max_len``,
``randomize=0``, ``failover``). Every server of the list is a candidate for the first
connection and for every reconnect.

Design (docs/brokers-nats.md has the long version):

- Subjects. A channel's levels become subject tokens (``chat/room1`` ->
  ``<prefix>.c.chat.room1``), each token percent-escaped
  (:func:`~tidings.brokers.nats.subjects.token_for`): everything but
  ``A-Z a-z 0-9 _ - ~`` is written as ``%XX`` of its UTF-8 bytes, so ``.``,
  ``*``, ``>``, spaces and ``%`` never reach NATS raw and every valid channel
  round-trips. Patterns: ``+`` -> ``*``, ``#`` -> ``>`` plus the parent
  subject (``a/#`` also matches ``a``); every message is filtered exactly on
  receipt with :func:`pattern_matches` and is accepted through one
  subscription only (no duplicates when several match).
- Positions and history: one JetStream stream ``<prefix>_H`` on
  ``<prefix>.h.>``. A publish goes to ``<prefix>.h.<tokens>`` carrying its
  offset and epoch in headers (``T-O``, ``T-E``) and
  ``Nats-Expected-Last-Subject-Sequence`` = the stream sequence of the
  channel's last message: a compare-and-set. A wrong-sequence answer (another
  node published first) reloads the channel's last message and tries again,
  so offsets are +1 and in one order across nodes. Publishes queued while
  one is in flight go together in the next message (``T-N`` publications at
  consecutive offsets). A channel with no message gets a fresh epoch (its
  state was never there, purged, expired or lost with the server's storage).
- Live delivery: the stream republishes every stored message to
  ``<prefix>.c.<tokens>`` (``RePublish``, NATS >= 2.9), in stream order,
  after it is stored (after the quorum commit on a cluster): subscribers get
  offset order per channel, and only publications that got their offset.
- Window: the physical bound is the stream's ``max_msgs_per_subject`` (raised
  when a publish asks for more history) and ``max_age`` (``meta_ttl``,
  default 7 days, which also bounds how long an idle channel keeps its
  position); the logical window (the channel's ``size`` and ``ttl``) travels
  in header ``T-H`` of each message and is applied on read, so channels with
  different history settings share one stream.
- Events (join/leave) are core messages on the live subject (header ``T-V``);
  node messages go to ``<prefix>.n.<node>`` and ``<prefix>.all``.
- Presence: stream ``<prefix>_P`` (one message per member subject,
  ``max_age`` = ``presence_ttl``), refreshed by each node every third of the
  TTL, so a node killed -9 loses its members within the TTL.
- Work queues: :mod:`tidings.brokers.nats.queue`.
- Faults: nats-py reconnects to any server of the list and restores the core
  subscriptions; ``on_broker_state`` is called once per transition; while
  down every call raises :class:`BrokerUnavailable`. A server without
  JetStream still carries pub/sub (offset 0, epoch ""), and history,
  positions and presence raise :class:`NotAvailable`.

Layout: this module holds the connection, interest, receiving, faults and the
JetStream plumbing (``api``, ``ensure_stream``, ``scan``, ``purge``); it is the
:class:`~tidings.brokers.nats.subjects.NatsLink` of the parts it owns and
delegates to: ``publisher`` (:mod:`.publishing`: the per-channel
compare-and-set, a concept with state of its own), ``history_store``
(:mod:`.history`: the history stream, tails, epoch markers, reads),
``presence_store`` (:mod:`.presence`) and the queue store (:mod:`.queue`).
All of them name subjects through one ``NatsSubjects`` (:mod:`.subjects`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tidings.brokers.base import (
    BrokerHandler,
    BrokerHealth,
    Capabilities,
    HistoryOptions,
    PipelinedBroker,
    PublishDone,
)
from tidings.brokers.nats.history import NatsHistory
from tidings.brokers.nats.presence import NatsPresence
from tidings.brokers.nats.publishing import FAILOVER, NatsPublisher
from tidings.brokers.nats.queue import NatsQueueStore
from tidings.brokers.nats.subjects import NatsSubjects
from tidings.brokers.nats.wire import (
    REQUEST_TIMEOUT,
    SCAN_TIMEOUT,
    STREAM_NAME_IN_USE,
    STREAM_NOT_FOUND,
    JetStreamError,
    unpack_records,
)
from tidings.exceptions import BrokerUnavailable, NotAvailable
from tidings.protocol.names import is_pattern, pattern_matches
from tidings.types import HistoryPage, Member, StreamPos

__all__ = ["NatsBroker"]

log = logging.getLogger("tidings.brokers.nats")

_FULL = Capabilities(positions=True, history=True, presence=True, queues=True, direct=True)
_CORE_ONLY = Capabilities(direct=True)


class NatsBroker(PipelinedBroker):
    """Broker, HistoryStore, PresenceStore and QueueStoreProvider on NATS JetStream.

    The broker holds the connection, the subscriptions and the JetStream
    plumbing (it is the :class:`~tidings.brokers.nats.subjects.NatsLink` of its
    parts); publishing, history and presence are parts it owns and delegates to.
    """

    capabilities: Capabilities = _FULL
    pipelined = True

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.prefix = query.pop("prefix", "tidings")
        if not self.prefix or not all(c.isalnum() or c in "_-" for c in self.prefix):
            raise ValueError(f"NATS prefix must be letters, digits, '_' or '-': {self.prefix!r}")
        self.replicas = int(query.pop("replicas", "1"))
        self.presence_ttl = float(query.pop("presence_ttl", "30"))
        self.meta_ttl = float(query.pop("meta_ttl", str(7 * 86400)))
        self.history_max = int(query.pop("history_max", "1000"))
        self.queue_max_len = int(query.pop("queue_max_len", "1000000"))
        # randomize=0: try the servers in the order given (tests pin a node to one)
        self.randomize = query.pop("randomize", "1") not in ("0", "false", "no")
        self.failover = float(query.pop("failover", str(FAILOVER)))
        scheme = "tls" if parts.scheme in ("tls", "nats+tls") else "nats"
        auth, _, hosts = parts.netloc.rpartition("@")
        self.servers = [f"{scheme}://{auth + '@' if auth else ''}{h or '127.0.0.1:4222'}"
                        for h in hosts.split(",")]
        # the parts: subject names, and the history, presence and publish paths on them
        self.subjects = NatsSubjects(self.prefix)
        self.stream = self.subjects.stream
        self.presence_stream = self.subjects.presence_stream
        self.history_store = NatsHistory(self, self.subjects, history_max=self.history_max,
                                         meta_ttl=self.meta_ttl, replicas=self.replicas,
                                         failover=self.failover)
        self.presence_store = NatsPresence(self, self.subjects, ttl=self.presence_ttl,
                                           replicas=self.replicas)
        self.publisher = NatsPublisher(self, self.subjects, self.history_store,
                                       failover=self.failover)
        self._node = ""
        self._handler: BrokerHandler | None = None
        self._nc: NatsClient | None = None
        self._health = BrokerHealth(False, "not connected")
        self._closing = False
        self._js = False
        self._subs: dict[str, list[Subscription]] = {}  # pattern -> its NATS subscriptions
        self._node_subs: list[Subscription] = []
        self._barrier_subject = ""
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: NatsQueueStore | None = None

    def queue_store(self) -> NatsQueueStore:
        """Work queues in a JetStream work-queue stream (:mod:`.queue`)."""
        if self._queues is None:
            self._queues = NatsQueueStore(self, self.subjects, replicas=self.replicas,
                                          max_len=self.queue_max_len)
        return self._queues

    # -- the parts' stores and publish path -----------------------------------------

    def publish_then(self, channel: str, data: Any, *, sender: str | None = None,
                     history: HistoryOptions | None = None, text: str | None = None,
                     done: PublishDone) -> None:
        """``done`` gets the publication (or BrokerUnavailable), in the order the
        publishes of one channel were started (:mod:`.publishing`)."""
        self.publisher.publish_then(channel, data, sender=sender, history=history, text=text,
                                    done=done)

    async def history(self, channel: str, *, since: StreamPos | None = None,
                      limit: int | None = None, reverse: bool = False) -> HistoryPage:
        return await self.history_store.history(channel, since=since, limit=limit,
                                                reverse=reverse)

    async def remove_history(self, channel: str) -> None:
        await self.history_store.remove_history(channel)
        self.publisher.forget(channel)

    async def position(self, channel: str) -> StreamPos:
        return await self.history_store.position(channel)

    async def add_member(self, channel: str, member: Member) -> None:
        await self.presence_store.add_member(channel, member)

    async def remove_member(self, channel: str, conn_id: str) -> None:
        await self.presence_store.remove_member(channel, conn_id)

    async def members(self, channel: str) -> list[Member]:
        return await self.presence_store.members(channel)

    # -- lifecycle ----------------------------------------------------------------

    @property
    def client(self) -> NatsClient:
        """The NATS connection (for the queue store); BrokerUnavailable when down."""
        nc = self._nc
        if nc is None or not self._health.up:
            raise BrokerUnavailable(self._health.reason or "not connected")
        return nc

    @property
    def node_id(self) -> str:
        return self._node

    @property
    def jetstream(self) -> bool:
        return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._health.up

    @property
    def closing(self) -> bool:
        return self._closing

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        self._node = node_id
        self._handler = handler
        self._closing = False
        self._loop = asyncio.get_running_loop()
        try:
            nc = await nats.connect(
                servers=self.servers, name=f"tidings-{node_id}", connect_timeout=2,
                allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                ping_interval=2, max_outstanding_pings=2, dont_randomize=not self.randomize,
                disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                error_cb=self._on_error, closed_cb=self._on_closed,
            )
        except Exception as exc:
            raise BrokerUnavailable(f"cannot reach NATS at {', '.join(self.servers)}: {exc}"
                                    ) from exc
        self._nc = nc
        self._barrier_subject = nc.new_inbox()
        self._node_subs = [
            await nc.subscribe(self.subjects.node(node_id), cb=self._on_node),
            await nc.subscribe(self.subjects.all, cb=self._on_node),
            await nc.subscribe(self._barrier_subject, cb=self._on_barrier),
        ]
        for pattern in list(self._subs):
            self._subs[pattern] = await self._nats_subscribe(pattern)
        await nc.flush()
        deadline = time.monotonic() + 10
        while True:
            try:
                await self._setup_jetstream()
                break
            except BrokerUnavailable:
                if time.monotonic() > deadline:
                    await nc.close()
                    self._nc = None
                    raise
                await asyncio.sleep(0.2)  # a cluster electing its JetStream leaders
        self._set_health(BrokerHealth(True))
        self._heartbeat = self._loop.create_task(self.presence_store.beat(),
                                                 name=f"tidings-nats-{node_id}")

    async def _setup_jetstream(self) -> None:
        """Create (or update) the streams; without JetStream only pub/sub is on."""
        try:
            await self.history_store.setup()
            await self.presence_store.setup()
            self._js = True
            if self._queues is not None:
                await self._queues.setup()
        except nats.errors.NoRespondersError as exc:
            if self._js:
                raise BrokerUnavailable(f"JetStream: {exc}") from exc
            log.warning("JetStream is not enabled on %s: pub/sub only", ", ".join(self.servers))
            self._js = False
            self.capabilities = _CORE_ONLY
            return
        except BrokerUnavailable:
            raise
        except Exception as exc:  # e.g. 503: no JetStream leader yet
            raise BrokerUnavailable(f"JetStream setup failed: {exc}") from exc
        self._js = True
        self.capabilities = _FULL

    async def ensure_stream(self, config: dict[str, Any]) -> None:
        """Create the stream unless it exists (an existing one is left as it is:
        an update needs every replica up, a reconnect must not)."""
        try:
            await self.api(f"STREAM.INFO.{config['name']}")
            return
        except JetStreamError as exc:
            if exc.err_code != STREAM_NOT_FOUND:
                raise
        try:
            await self.api(f"STREAM.CREATE.{config['name']}", config)
        except JetStreamError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:  # created by another node meanwhile
                raise

    async def api(self, what: str, body: dict[str, Any] | None = None, *,
                  timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """One JetStream API request; raises JetStreamError for an error answer."""
        nc = self._nc
        if nc is None:
            raise BrokerUnavailable("not connected")
        msg = await nc.request(f"$JS.API.{what}", orjson.dumps(body) if body else b"",
                               timeout=timeout)
        reply: dict[str, Any] = orjson.loads(msg.data)
        err = reply.get("error")
        if err:
            raise JetStreamError(int(err.get("code", 0)), int(err.get("err_code", 0)),
                                 str(err.get("description", "")))
        return reply

    def require_jetstream(self, feature: str) -> None:
        """``BrokerUnavailable`` while down, ``NotAvailable(feature)`` without JetStream."""
        if not self._health.up or self._nc is None:
            raise BrokerUnavailable(self._health.reason or "NATS unreachable")
        if not self._js:
            raise NotAvailable(feature, "nats (JetStream is not enabled on the server)")

    async def purge(self, stream: str, subject: str) -> None:
        """Drop the stream's messages on ``subject`` (a filter)."""
        try:
            await self.api(f"STREAM.PURGE.{stream}", {"filter": subject})
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"purge {subject}: {exc!r}") from exc

    async def scan(self, stream: str, subject: str, policy: str = "all") -> list[Msg]:
        """Every message of ``stream`` on ``subject`` (a filter), oldest first,
        through a short-lived push consumer (``policy``: all, last_per_subject).

        Tried again (for up to ``failover`` s) when the consumer goes silent or
        JetStream does not answer: on a cluster that just lost a server, the
        consumer may have been placed on the lost peer, or the meta leader is
        being elected. While the connection is down it raises at once."""
        deadline = time.monotonic() + self.failover
        while True:
            try:
                return await self._scan_once(stream, subject, policy)
            except (TimeoutError, BrokerUnavailable) as exc:
                if not self._health.up or time.monotonic() > deadline or self._closing:
                    if isinstance(exc, BrokerUnavailable):
                        raise
                    raise BrokerUnavailable(f"read {subject}: no answer") from exc
                await asyncio.sleep(0.1)

    async def _scan_once(self, stream: str, subject: str, policy: str) -> list[Msg]:
        nc = self.client
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_msgs_limit=-1, pending_bytes_limit=-1)
        name = ""
        try:
            reply = await self.api(f"CONSUMER.CREATE.{stream}", timeout=SCAN_TIMEOUT, body={
                "stream_name": stream, "config": {
                "deliver_subject": inbox, "filter_subject": subject,
                "deliver_policy": policy, "ack_policy": "none", "replay_policy": "instant",
                "mem_storage": True, "num_replicas": 1,
                "inactive_threshold": int(10e9)}})
            name = reply["name"]
            out: list[Msg] = []
            pending = int(reply.get("num_pending", 0))
            while pending > 0:
                msg = await sub.next_msg(timeout=SCAN_TIMEOUT)
                if not msg.reply:
                    continue  # a status message
                out.append(msg)
                pending = msg.metadata.num_pending
            return out
        except (BrokerUnavailable, NotAvailable, TimeoutError):
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"read {subject}: {exc!r}") from exc
        finally:
            try:
                await sub.unsubscribe()
                if name:
                    await nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"")
            except Exception:  # the consumer goes away by itself (inactive_threshold)
                pass

    async def close(self) -> None:
        if self._closing and self._nc is None:
            return
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            try:
                await self._heartbeat
            except (asyncio.CancelledError, Exception):
                pass
            self._heartbeat = None
        for task in list(self._tasks):
            task.cancel()
        await self.presence_store.withdraw()
        if self._queues is not None:
            await self._queues.close()
        nc, self._nc = self._nc, None
        if nc is not None:
            try:
                await nc.close()
            except Exception:  # closing a broken connection: nothing to save
                pass
        self._subs.clear()
        self._node_subs.clear()
        self._health = BrokerHealth(False, "closed")

    def health(self) -> BrokerHealth:
        return self._health

    def _set_health(self, health: BrokerHealth) -> None:
        changed = health.up != self._health.up
        self._health = health
        if changed and self._handler is not None and not self._closing:
            self._handler.on_broker_state(health)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self._set_health(BrokerHealth(False, "NATS unreachable (reconnecting)"))

    async def _on_reconnected(self) -> None:
        """Back on some server of the list: streams again (a server may have lost
        them), every channel tail reloaded, our members written again."""
        if self._closing:
            return
        self.publisher.forget_all()
        self.spawn(self._after_reconnect())

    async def _after_reconnect(self) -> None:
        self._set_health(BrokerHealth(True))  # core pub/sub is back (nats-py resubscribed)
        deadline = time.monotonic() + 30
        while not self._closing and self._nc is not None and self._nc.is_connected:
            try:
                await self._setup_jetstream()
                break
            except BrokerUnavailable as exc:
                if time.monotonic() > deadline:
                    log.warning("JetStream not ready after the reconnect: %s", exc)
                    break
                await asyncio.sleep(0.2)  # JetStream elects its leaders after a restart
        if not self._closing:
            await self.presence_store.refresh()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)

    async def _on_closed(self) -> None:
        if not self._closing:
            self._set_health(BrokerHealth(False, "NATS connection closed"))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task of the broker (cancelled when it closes)."""
        task = (self._loop or asyncio.get_running_loop()).create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- receiving ------------------------------------------------------------------

    async def _on_node(self, msg: Msg) -> None:
        if self._handler is not None:
            self._handler.on_node_message(msg.data)

    async def _on_live(self, pattern: str, msg: Msg) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            channel = self.subjects.channel_of(msg.subject)
            if pattern != self._first_match(channel):
                return  # a false positive of a wider subject, or another subscription's
            hdrs = msg.headers or {}
            if "T-V" in hdrs:
                handler.on_event(channel, msg.data.decode())
                return
            count = int(hdrs.get("T-N", "1"))
            if count == 0:
                return  # an epoch marker
            if "T-L" in hdrs:  # published without JetStream: no position
                pubs = unpack_records(channel, 0, "", msg.data)
                for pub in pubs:
                    pub.offset = 0
            else:
                first, epoch = int(hdrs["T-O"]), hdrs["T-E"]
                pubs = unpack_records(channel, first, epoch, msg.data)
                self.publisher.observed(channel, int(hdrs.get("Nats-Sequence", "0")),
                                        first + count - 1, epoch)
            if len(pubs) == 1:
                handler.on_publication(pubs[0])
            elif pubs:
                handler.on_publications(pubs)
        except Exception:  # one bad message must not stop the subscription
            log.exception("cannot deliver a message from NATS on %s", msg.subject)

    def _first_match(self, channel: str) -> str | None:
        """The one subscription a message for ``channel`` is accepted through."""
        best = channel if channel in self._subs else None
        for pattern in self._subs:
            if is_pattern(pattern) and pattern_matches(pattern, channel) and (
                    best is None or pattern < best):
                best = pattern
        return best

    # -- interest ---------------------------------------------------------------------

    async def _nats_subscribe(self, pattern: str) -> list[Subscription]:
        nc = self._nc
        assert nc is not None
        cb = partial(self._on_live, pattern)
        return [await nc.subscribe(subject, cb=cb, pending_msgs_limit=-1,
                                   pending_bytes_limit=-1)
                for subject in self.subjects.live_for(pattern)]

    async def subscribe(self, pattern: str) -> None:
        """Subscribe and flush, so the server has the interest before this returns
        (a history read right after cannot miss a publication)."""
        if pattern in self._subs:
            return
        self._subs[pattern] = []
        nc = self._nc
        if nc is None:
            return
        self._subs[pattern] = await self._nats_subscribe(pattern)
        if self._health.up:
            await self._barrier(f"subscribe to {pattern!r}")

    async def _barrier(self, what: str) -> None:
        """Wait until the server has processed everything sent so far: a message
        to our own inbox, queued behind the SUBs, comes back. (nats-py's
        ``flush()`` writes its PING ahead of commands still in its buffer, so a
        PONG does not prove a SUB arrived.)"""
        nc = self.client
        token = secrets.token_hex(6)
        waiter = (self._loop or asyncio.get_running_loop()).create_future()
        self._barriers[token] = waiter
        try:
            await nc.publish(self._barrier_subject, token.encode())
            await asyncio.wait_for(waiter, REQUEST_TIMEOUT)
        except Exception as exc:
            raise BrokerUnavailable(f"{what}: {exc!r}") from exc
        finally:
            self._barriers.pop(token, None)

    async def _on_barrier(self, msg: Msg) -> None:
        waiter = self._barriers.pop(msg.data.decode(), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def unsubscribe(self, pattern: str) -> None:
        subs = self._subs.pop(pattern, None)
        for sub in subs or ():
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is gone: so is the subscription
                pass

    async def send_node(self, node_id: str, payload: bytes) -> None:
        await self.publish_core(self.subjects.node(node_id), payload)

    async def send_all(self, payload: bytes) -> None:
        await self.publish_core(self.subjects.all, payload)

    async def publish_event(self, channel: str, frame: str) -> None:
        await self.publish_core(self.subjects.live(channel), frame.encode(), {"T-V": "1"})

    async def publish_core(self, subject: str, payload: bytes,
                           headers: dict[str, str] | None = None) -> None:
        """One core NATS message (no JetStream); ``BrokerUnavailable`` on failure."""
        nc = self.client
        try:
            await nc.publish(subject, payload, headers=headers)
        except Exception as exc:
            raise BrokerUnavailable(f"publish to {subject}: {exc}") from exc
