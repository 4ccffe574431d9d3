"""``redis://`` (and ``rediss://``): publications over Redis pub/sub.

URL: ``redis://host:6379/0?prefix=tidings&presence_ttl=30&queue_max_len=1000000``.

Design:

- One Lua script per publication, one round trip: bump the channel's offset
  (creating a new random epoch if the channel's state was lost: a Redis
  restart without persistence, eviction, expiry), append to its history
  stream (explicit stream id ``<offset>-1``, trimmed to the history size,
  ``PEXPIRE`` = history ttl) and ``PUBLISH`` the message, so history and live
  never disagree and offsets are global across nodes. Publishes issued while
  the previous batch is on the wire go out together in one write; consecutive
  ones to one channel are one script call and one message
  (:mod:`tidings.brokers.redis.wire`). History reads: :mod:`tidings.brokers.redis.history`.
- Interest routing: a node SUBSCRIBEs to exact channels and PSUBSCRIBEs to its
  patterns mapped onto globs (``+`` -> ``*``, ``a/#`` -> ``a*``). A glob is
  wider than the MQTT pattern, so every message is filtered exactly on receipt
  and delivered once even when several subscriptions of the node match it.
- Direct messages: each node SUBSCRIBEs to its own inbox channel and to one
  channel shared by all nodes (``send_user``, ``broadcast``, ``disconnect``
  go there and each node picks its own connections: one PUBLISH, O(nodes)
  work in Redis, no routing table that could go stale).
- Presence: a hash (member data) and a sorted set (member -> expiry) per
  channel; each node refreshes the expiry of its own members every
  ``presence_ttl / 3`` s, so the members of a node that died without cleanup
  vanish within ``presence_ttl``.
- Work queues: Redis streams with one consumer group each, shared by every
  node (:mod:`tidings.brokers.redis.queue`, via ``queue_store()``).
- Faults: when Redis is unreachable the node keeps delivering locally (a
  publication made during the outage reaches local subscribers with offset 0,
  epoch "": position unknown), ``health()`` says why, and a reconnect loop with
  exponential backoff and full jitter resubscribes everything on return. Each
  up/down transition is reported once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from redis.exceptions import NoScriptError, RedisError

from tidings.brokers.base import (
    BrokerHandler,
    BrokerHealth,
    HistoryOptions,
    PipelinedBroker,
    PublishDone,
    PublishOutcome,
    transition,
)
from tidings.brokers.redis.history import RedisHistory
from tidings.brokers.redis.keys import RedisKeys
from tidings.brokers.redis.presence import RedisPresence
from tidings.brokers.redis.queue import RedisQueueStore
from tidings.brokers.redis.topology import ServerTopology, Topology
from tidings.brokers.redis.wire import (
    PUBLISH_LUA,
    SEP,
    encode_data,
    publication_from,
    unbatch,
)
from tidings.exceptions import BrokerUnavailable
from tidings.protocol.names import is_pattern, pattern_matches
from tidings.types import HistoryPage, Member, Publication, StreamPos

__all__ = ["RedisBroker", "glob_for"]

log = logging.getLogger("tidings.brokers.redis.broker")

_CONFIRMATIONS = frozenset({"subscribe", "psubscribe", "ssubscribe", "unsubscribe",
                            "punsubscribe", "sunsubscribe"})
_CONFIRM_TIMEOUT = 5.0

_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def glob_for(pattern: str) -> str:
    """The narrowest Redis glob covering an MQTT pattern (exact filtering follows)."""
    levels = pattern.split("/")
    if levels[-1] == "#":
        head = "/".join(lv.translate(_GLOB_SPECIAL) if lv != "+" else "*" for lv in levels[:-1])
        return head + "*"  # 'a/#' -> 'a*' covers 'a' and 'a/...'
    return "/".join(lv.translate(_GLOB_SPECIAL) if lv != "+" else "*" for lv in levels)


class RedisBroker(PipelinedBroker):
    """Broker, HistoryStore and PresenceStore on one Redis server."""

    def __init__(self, url: str,
                 topology: Callable[[RedisBroker], Topology] = ServerTopology) -> None:
        self.url = url
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.prefix = query.pop("prefix", "tidings")
        self.presence_ttl = float(query.pop("presence_ttl", "30"))
        self.meta_ttl = int(query.pop("meta_ttl", str(7 * 86400)))
        self.queue_max_len = int(query.pop("queue_max_len", "1000000"))
        self.redis_url = urlunsplit(parts._replace(query=urlencode(query)))
        # the parts: key names, and the history and presence stores on them
        self.keys = RedisKeys(self.prefix)
        self.history_store = RedisHistory(self, self.keys, self.meta_ttl)
        self.presence_store = RedisPresence(self, self.keys, self.presence_ttl)
        self._node = ""
        self._handler: BrokerHandler | None = None
        self._client: Any = None  # redis.asyncio.Redis or RedisCluster
        self._script: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.exact: set[str] = set()
        self.patterns: dict[bytes, str] = {}  # glob (prefixed) -> MQTT pattern
        self._globs: dict[str, bytes] = {}
        self._health = BrokerHealth(False, "not connected")
        self._closing = False
        # publishes of this turn: script arguments, and (callback, data, text) to answer
        self._pending: list[tuple[tuple[Any, ...], tuple[PublishDone, Any, str | None]]] = []
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._flush_scheduled = False
        self._flushing = False
        self._queues: RedisQueueStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # see RespConnection.loop
        # one server or a cluster: its connections and how a publication travels
        self.topology: Topology = topology(self)

    publish_lua = PUBLISH_LUA


    def queue_store(self) -> RedisQueueStore:
        """Work queues in Redis streams, shared by every node on this Redis
        (see :mod:`tidings.brokers.redis.queue`)."""
        if self._queues is None:
            self._queues = RedisQueueStore(self, max_len=self.queue_max_len)
        return self._queues

    # -- the link its parts use (RedisLink) -------------------------------------------

    @property
    def client(self) -> Any:
        return self._client

    @property
    def up(self) -> bool:
        return self._health.up

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def script(self) -> Any:
        """The publish script as registered with the client (its ``sha``)."""
        return self._script

    @property
    def node(self) -> str:
        """This node's id (empty before ``connect``)."""
        return self._node

    # -- history and presence: the parts ------------------------------------------------

    async def history(self, channel: str, *, since: StreamPos | None = None,
                      limit: int | None = None, reverse: bool = False) -> HistoryPage:
        return await self.history_store.history(channel, since=since, limit=limit,
                                                reverse=reverse)

    async def remove_history(self, channel: str) -> None:
        await self.history_store.remove_history(channel)

    async def position(self, channel: str) -> StreamPos:
        return await self.history_store.position(channel)

    async def add_member(self, channel: str, member: Member) -> None:
        await self.presence_store.add_member(channel, member)

    async def remove_member(self, channel: str, conn_id: str) -> None:
        await self.presence_store.remove_member(channel, conn_id)

    async def members(self, channel: str) -> list[Member]:
        return await self.presence_store.members(channel)

    # -- lifecycle ----------------------------------------------------------------

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        self._node = node_id
        self._handler = handler
        self._closing = False
        self._client = self.topology.make_client()
        self._script = self._client.register_script(self.publish_lua)
        try:
            await self.topology.open_pubsub()
        except (RedisError, OSError) as exc:
            await self._client.aclose()
            self._client = None
            raise BrokerUnavailable(f"cannot reach Redis at {self.redis_url}: {exc}") from exc
        self._set_health(BrokerHealth(True))
        loop = self._loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen(), name=f"tidings-redis-{node_id}")
        self._heartbeat = loop.create_task(self.presence_store.beat(),
                                           name=f"tidings-presence-{node_id}")

    async def close(self) -> None:
        self._closing = True
        for task in (self._listener, self._heartbeat):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._listener = self._heartbeat = None
        if self._client is not None and self._health.up:
            for channel, members in list(self.presence_store.own.items()):
                for conn_id in list(members):
                    try:
                        await self.remove_member(channel, conn_id)
                    except (RedisError, OSError):
                        break
        self.presence_store.own.clear()
        if self._queues is not None:
            await self._queues.close()
        await self.topology.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._health = BrokerHealth(False, "closed")

    def health(self) -> BrokerHealth:
        return self._health

    def _stopping(self) -> bool:
        return self._closing

    def _set_health(self, health: BrokerHealth) -> None:
        self._health = transition(self._handler, self._health, health)

    # -- receiving -----------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                await self.topology.read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping():
                    return
                self._set_health(BrokerHealth(False, f"Redis unreachable: {exc}"))
            while not self._closing:  # reconnect with exponential backoff, full jitter
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, 5.0)
                try:
                    await self.topology.open_pubsub()
                    await self._call_raw("ping")
                except asyncio.CancelledError:
                    raise
                except Exception:
                    continue
                backoff = 0.1
                self._set_health(BrokerHealth(True))
                await self.presence_store.refresh()
                break

    def deliver(self, kind: str, pattern: bytes | None, raw_channel: bytes,
                 data: Any) -> None:
        handler = self._handler
        if handler is None:
            return
        if kind in _CONFIRMATIONS:
            waiter = self._confirm.pop(raw_channel, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if raw_channel == self.keys.inbox(self._node) or raw_channel == self.keys.all:
            handler.on_node_message(data)
            return
        channel = self.topology.channel_of(raw_channel)
        via = self.patterns.get(pattern) if kind == "pmessage" and pattern else channel
        if via is None or via != self._first_match(channel):
            return  # a glob false positive, or a duplicate via another subscription
        kind_byte = data[:1]
        if kind_byte == b"E":
            handler.on_event(channel, data[1:].decode())
        elif kind_byte == b"B":
            handler.on_publications(unbatch(channel, data))
        else:
            offset, epoch, ts, sender, payload = data[1:].split(SEP, 4)
            handler.on_publication(publication_from(channel, int(offset), epoch.decode(), ts,
                                                sender, payload))

    def _first_match(self, channel: str) -> str | None:
        """The one subscription a message for ``channel`` is accepted through."""
        best = channel if channel in self.exact else None
        for pattern in self._globs:
            if pattern_matches(pattern, channel) and (best is None or pattern < best):
                best = pattern
        return best

    # -- publishing ----------------------------------------------------------------

    def publish_then(
        self,
        channel: str,
        data: Any,
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
        text: str | None = None,
        done: PublishDone,
    ) -> None:
        """``publish_soon`` with a callback instead of a future (no future, no
        loop handle per publish): ``done`` gets the publication or
        ``BrokerUnavailable``, in the order the publishes were started, maybe
        before this returns."""
        if not self._health.up:
            done(BrokerUnavailable(self._health.reason or "Redis unreachable"))
            return
        size, ttl_ms = 0, 0
        if history is not None and history.enabled:
            size, ttl_ms = history.size, int(history.ttl * 1000)
        encoded = encode_data(data) if text is None else b"j" + text.encode()
        self._pending.append(((channel, encoded, sender or "", int(time.time() * 1000), size,
                               ttl_ms), (done, data, text)))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        if self._pending and not self._flushing:
            self._flushing = True
            (self._loop or asyncio.get_running_loop()).create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """One batch on the wire at a time: batches reach Redis in the order they
        were made, so publishes from one sender keep their order even when the
        sender does not wait for each reply; what queues up meanwhile goes in
        the next, bigger, batch. (Several batches in flight on the one
        connection would keep the order too, but measured no faster here.)"""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._settle(batch)
        finally:
            self._flushing = False

    async def _settle(self, batch: list[tuple[tuple[Any, ...], tuple[
            PublishDone, Any, str | None]]]) -> None:
        """Run one batch; hand each publish its publication, in order. A NOSCRIPT
        reply (the script cache was flushed: nothing ran) loads it and runs
        those publishes again."""
        args = [call for call, _ in batch]
        try:
            if self._client is None:
                raise BrokerUnavailable("not connected")
            results = await self.topology.run_scripts(args)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                await self._client.script_load(self.publish_lua)
                again = await self.topology.run_scripts([args[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        except Exception as exc:
            results = [exc] * len(batch)
        for (call, (done, data, text)), result in zip(batch, results, strict=True):
            channel = call[0]
            outcome: PublishOutcome
            if isinstance(result, Exception):
                # the listener owns the up/down state (it sees the server go away);
                # the hub falls back to local delivery
                outcome = BrokerUnavailable(f"publish to {channel!r} failed: {result}")
            else:
                offset, epoch = result
                outcome = Publication(channel, data, int(offset), epoch.decode(),
                                      call[2] or None, call[3], text=text)
            try:
                done(outcome)
            except Exception:  # one caller's bug must not cost the others their answer
                log.exception("publish callback failed")

    def script_call(self, args: tuple[Any, ...], client: Any) -> Any:
        """One publish through redis-py (the cluster's path)."""
        channel, data, sender, ts, size, ttl_ms = args
        return self._script(
            keys=[self.keys.meta(channel), self.keys.stream(channel)],
            args=[*self.topology.targets(channel), size, ttl_ms, self.meta_ttl,
                  secrets.token_hex(4), data, sender, ts],
            client=client,
        )

    async def publish_event(self, channel: str, frame: str) -> None:
        await self.topology.publish_event(channel, b"E" + frame.encode())

    async def call(self, method: str, *args: Any) -> Any:
        if not self._health.up:
            raise BrokerUnavailable(self._health.reason or "not connected")
        return await self._call_raw(method, *args)

    async def _call_raw(self, method: str, *args: Any) -> Any:
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected")
        try:
            return await getattr(client, method)(*args)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    # -- interest ---------------------------------------------------------------------

    async def subscribe(self, pattern: str) -> None:
        """Subscribe and wait for Redis to confirm, so that a history read made
        right after cannot miss a publication that is not delivered live."""
        if is_pattern(pattern):
            glob = self.keys.chan(glob_for(pattern))
            self.patterns[glob] = pattern
            self._globs[pattern] = glob
            if self.topology.subscribed and self._health.up:
                await self._confirmed(glob, self.topology.psubscribe(glob))
        else:
            self.exact.add(pattern)
            if self.topology.subscribed and self._health.up:
                await self._confirmed(self.topology.sub_key(pattern),
                                      self.topology.sub_exact(pattern))

    async def _confirmed(self, name: bytes, request: Awaitable[Any]) -> None:
        waiter = self._confirm.get(name)
        if waiter is None or waiter.done():
            waiter = self._confirm[name] = asyncio.get_running_loop().create_future()
        await request
        try:
            await asyncio.wait_for(asyncio.shield(waiter), _CONFIRM_TIMEOUT)
        except TimeoutError:
            self._confirm.pop(name, None)
            log.warning("Redis did not confirm the subscription to %r in time", name)

    async def unsubscribe(self, pattern: str) -> None:
        if is_pattern(pattern):
            glob = self._globs.pop(pattern, None)
            if glob is None:
                return
            self.patterns.pop(glob, None)
            if self.topology.subscribed and self._health.up:
                await self.topology.punsubscribe(glob)
        elif pattern in self.exact:
            self.exact.discard(pattern)
            if self.topology.subscribed and self._health.up:
                await self.topology.unsub_exact(pattern)

    async def send_node(self, node_id: str, payload: bytes) -> None:
        await self.call("publish", f"{self.prefix}:n:{node_id}", payload)

    async def send_all(self, payload: bytes) -> None:
        await self.call("publish", self.keys.all, payload)
