"""``nats://``: publications over NATS, positions and history in JetStream.

URL: ``nats://host:4222[,host2:4222]?prefix=tidings&replicas=1&presence_ttl=30``
(``tls://`` too; also ``meta_ttl``, ``history_max``, ``queue_max_len``,
``randomize=0``, ``failover``). Every server of the list is a candidate for the first
connection and for every reconnect.

Design (docs/brokers-nats.md has the long version):

- Subjects. A channel's levels become subject tokens (``chat/room1`` ->
  ``<prefix>.c.chat.room1``), each token percent-escaped
  (:func:`token_for`): everything but ``A-Z a-z 0-9 _ - ~`` is written as
  ``%XX`` of its UTF-8 bytes, so ``.``, ``*``, ``>``, spaces and ``%`` never
  reach NATS raw and every valid channel round-trips. Patterns: ``+`` -> ``*``,
  ``#`` -> ``>`` plus the parent subject (``a/#`` also matches ``a``); every
  message is filtered exactly on receipt with :func:`pattern_matches` and is
  accepted through one subscription only (no duplicates when several match).
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
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
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
)
from tidings.brokers.nats.history import NatsHistory
from tidings.brokers.nats.presence import NatsPresence
from tidings.brokers.nats.publishing import FAILOVER, STATE_CACHE_MAX, ChanState, NatsPublishing
from tidings.brokers.nats.queue import NatsQueueStore
from tidings.brokers.nats.subjects import channel_of_tokens, subjects_for, token_for
from tidings.brokers.nats.wire import (
    REQUEST_TIMEOUT,
    STREAM_NAME_IN_USE,
    STREAM_NOT_FOUND,
    JetStreamError,
    unpack_records,
)
from tidings.exceptions import BrokerUnavailable
from tidings.protocol.names import is_pattern, pattern_matches
from tidings.types import Member

__all__ = ["NatsBroker"]

log = logging.getLogger("tidings.brokers.nats")

_FULL = Capabilities(positions=True, history=True, presence=True, queues=True, direct=True)
_CORE_ONLY = Capabilities(direct=True)


class NatsBroker(NatsPublishing, NatsPresence, NatsHistory):
    """Broker, HistoryStore, PresenceStore and QueueStoreProvider on NATS JetStream."""

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
        self.stream = f"{self.prefix}_H"
        self.presence_stream = f"{self.prefix}_P"
        self._node = ""
        self._handler: BrokerHandler | None = None
        self._nc: NatsClient | None = None
        self._health = BrokerHealth(False, "not connected")
        self._closing = False
        self._js = False
        self._chans: dict[str, ChanState] = {}
        self._hsubj: dict[str, str] = {}
        self._csubj: dict[str, str] = {}  # live subject tokens -> channel
        self._subs: dict[str, list[Subscription]] = {}  # pattern -> its NATS subscriptions
        self._node_subs: list[Subscription] = []
        self._barrier_subject = ""
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._members: dict[str, dict[str, Member]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cap = 0  # max_msgs_per_subject of the history stream
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: NatsQueueStore | None = None

    def queue_store(self) -> NatsQueueStore:
        """Work queues in a JetStream work-queue stream (:mod:`.nats_queue`)."""
        if self._queues is None:
            self._queues = NatsQueueStore(self, max_len=self.queue_max_len)
        return self._queues

    # -- names ------------------------------------------------------------------

    def _live(self, channel: str) -> str:
        return f"{self.prefix}.c.{subjects_for(channel)[0]}"

    def _hist(self, channel: str) -> str:
        subject = self._hsubj.get(channel)
        if subject is None:
            if len(self._hsubj) > STATE_CACHE_MAX:
                self._hsubj.clear()
            subject = self._hsubj[channel] = f"{self.prefix}.h.{subjects_for(channel)[0]}"
        return subject

    def _channel_of(self, subject: str) -> str:
        tokens = subject[len(self.prefix) + 3:]
        channel = self._csubj.get(tokens)
        if channel is None:
            if len(self._csubj) > STATE_CACHE_MAX:
                self._csubj.clear()
            channel = self._csubj[tokens] = channel_of_tokens(tokens)
        return channel

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
            await nc.subscribe(f"{self.prefix}.n.{token_for(node_id)}", cb=self._on_node),
            await nc.subscribe(f"{self.prefix}.all", cb=self._on_node),
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
        self._heartbeat = self._loop.create_task(self._beat(), name=f"tidings-nats-{node_id}")

    async def _setup_jetstream(self) -> None:
        """Create (or update) the streams; without JetStream only pub/sub is on."""
        try:
            await self.ensure_stream({
                "name": self.stream, "subjects": [f"{self.prefix}.h.>"],
                "retention": "limits", "storage": "file", "discard": "old",
                "max_msgs_per_subject": max(self.history_max, self._cap, 1),
                "max_age": int(self.meta_ttl * 1e9), "num_replicas": self.replicas,
                "duplicate_window": int(max(self.failover, 1.0) * 2e9),
                "republish": {"src": f"{self.prefix}.h.>", "dest": f"{self.prefix}.c.>"},
            })
            self._cap = max(self.history_max, self._cap, 1)
            await self.ensure_stream({
                "name": self.presence_stream, "subjects": [f"{self.prefix}.p.>"],
                "retention": "limits", "storage": "memory", "discard": "old",
                "max_msgs_per_subject": 1, "max_age": int(self.presence_ttl * 1e9),
                "num_replicas": self.replicas,
            })
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
        if self._nc is not None and self._health.up and self._js:
            for channel, members in list(self._members.items()):
                for conn_id in list(members):
                    try:
                        await self._purge(self.presence_stream,
                                          self._member_subject(channel, conn_id))
                    except Exception:
                        break
        self._members.clear()
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
        for state in self._chans.values():
            state.seq = None
        self._spawn(self._after_reconnect())

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
            await self._refresh_members()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)

    async def _on_closed(self) -> None:
        if not self._closing:
            self._set_health(BrokerHealth(False, "NATS connection closed"))

    def _spawn(self, coro: Any) -> None:
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
            channel = self._channel_of(msg.subject)
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
                seq = int(hdrs.get("Nats-Sequence", "0"))
                state = self._chans.get(channel)
                if state is not None and state.seq is not None and seq > state.seq:
                    state.seq, state.offset, state.epoch = seq, first + count - 1, epoch
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
        return [await nc.subscribe(f"{self.prefix}.c.{s}", cb=cb, pending_msgs_limit=-1,
                                   pending_bytes_limit=-1)
                for s in subjects_for(pattern)]

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
        await self._core(f"{self.prefix}.n.{token_for(node_id)}", payload)

    async def send_all(self, payload: bytes) -> None:
        await self._core(f"{self.prefix}.all", payload)

    async def publish_event(self, channel: str, frame: str) -> None:
        await self._core(self._live(channel), frame.encode(), {"T-V": "1"})

    async def _core(self, subject: str, payload: bytes,
                    headers: dict[str, str] | None = None) -> None:
        nc = self.client
        try:
            await nc.publish(subject, payload, headers=headers)
        except Exception as exc:
            raise BrokerUnavailable(f"publish to {subject}: {exc}") from exc
