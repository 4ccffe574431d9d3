"""How the Redis broker meets Redis: one server, or a Redis Cluster.

The broker (:mod:`tidings.brokers.redis.broker`) keeps what does not depend on
the deployment: interest, the grouped publish, delivery, health and reconnects.
A topology holds the connections and says how a publication travels:

- :class:`ServerTopology`, one Redis server: one lean subscriber connection
  (:mod:`tidings.brokers.redis.resp`) for every channel and pattern, one lean
  connection for the publish scripts, pipelined;
- :class:`ClusterTopology`, a Redis Cluster: every key of a channel carries the
  channel as hash tag, so its offset, history, presence and shard channel live
  on one shard and the publish script stays single-slot; exact subscriptions use
  sharded pub/sub (SPUBLISH / SSUBSCRIBE), so pub/sub capacity grows with the
  shards; sharded pub/sub has no patterns, so the script also PUBLISHes on
  classic pub/sub, which pattern subscribers PSUBSCRIBE to (turn it off with
  ``?patterns=off`` when no client subscribes with wildcards); the subscriber
  holds one connection per master plus a classic one, and a reconnect re-maps
  every shard channel to its (maybe new) owner.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tidings.brokers.redis.keys import RedisKeys
from tidings.brokers.redis.resp import RespConnection, RespPubSub, bulk
from tidings.brokers.redis.wire import GROUP_BYTES, GROUP_MAX
from tidings.exceptions import BrokerUnavailable

__all__ = ["ClusterTopology", "RedisHost", "ServerTopology", "Topology"]

log = logging.getLogger("tidings.brokers.redis.broker")

HEALTH_CHECK = 5.0  # seconds between PINGs on an idle subscriber connection
MAX_CONNECTIONS = 64  # per shard, for commands (subscribers have their own)


class RedisHost(Protocol):
    """What a topology uses of its broker."""

    keys: RedisKeys
    redis_url: str
    meta_ttl: int
    publish_lua: str
    exact: set[str]  # exact channels subscribed
    patterns: dict[bytes, str]  # glob (prefixed) -> MQTT pattern

    @property
    def client(self) -> Any: ...

    @property
    def node(self) -> str: ...

    @property
    def script(self) -> Any: ...

    def deliver(self, kind: str, pattern: bytes | None, raw_channel: bytes,
                data: Any) -> None: ...

    def script_call(self, args: tuple[Any, ...], client: Any) -> Any: ...

    async def call(self, method: str, *args: Any) -> Any: ...


class Topology(Protocol):
    """The connections of a Redis broker and how publications travel on them."""

    def make_client(self) -> Any:
        """The redis-py client for commands."""
        ...

    @property
    def subscribed(self) -> bool:
        """True while the subscriber connection(s) are open."""
        ...

    async def open_pubsub(self) -> None:
        """(Re)open the subscriber connection(s) and subscribe all the host wants."""

    async def close_pubsubs(self) -> None: ...

    async def read(self) -> None:
        """Deliver until a subscriber connection is lost (then raise)."""

    async def sub_exact(self, channel: str) -> None: ...

    async def unsub_exact(self, channel: str) -> None: ...

    async def psubscribe(self, glob: bytes) -> None: ...

    async def punsubscribe(self, glob: bytes) -> None: ...

    def sub_key(self, channel: str) -> bytes:
        """The pub/sub channel a subscription to ``channel`` is confirmed for."""
        ...

    def channel_of(self, raw_channel: bytes) -> str: ...

    def targets(self, channel: str) -> list[bytes]:
        """Leading script arguments: the classic and the shard channel to publish on."""
        ...

    async def run_scripts(self, batch: list[tuple[Any, ...]]) -> list[Any]:
        """One batch of publish script calls; a result per publish, errors as values."""
        ...

    async def publish_event(self, channel: str, payload: bytes) -> None: ...

    async def close(self) -> None:
        """Close every connection of the topology."""


class ServerTopology:
    """One Redis server."""

    def __init__(self, host: RedisHost) -> None:
        self.host = host
        self.pubsub: RespPubSub | None = None
        self.publisher: RespConnection | None = None  # lean connection for EVALSHA batches
        self.pong_at = 0.0
        # (channel, history size, ttl) -> its EVALSHA prefix: argument count, packed
        self.evalsha_heads: dict[tuple[str, int, int], tuple[int, bytes]] = {}

    @property
    def subscribed(self) -> bool:
        return self.pubsub is not None

    def make_client(self) -> Any:
        return aioredis.Redis.from_url(
            self.host.redis_url, socket_connect_timeout=2, health_check_interval=5,
            socket_keepalive=True,
            # one quick retry covers pooled connections left stale by a Redis restart
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )

    async def open_pubsub(self) -> None:
        """(Re)open the subscriber connection(s) and subscribe everything we want."""
        if self.host.client is None:
            raise BrokerUnavailable("not connected")
        pubsub = RespPubSub(await RespConnection.open(self.host.redis_url, on_push=self.on_push))
        await pubsub.subscribe(self.host.keys.inbox(self.host.node), self.host.keys.all,
                               *(self.host.keys.chan(c) for c in self.host.exact))
        if self.host.patterns:
            await pubsub.psubscribe(*self.host.patterns)
        await self.close_pubsubs()
        self.pubsub = pubsub

    async def close_pubsubs(self) -> None:
        old, self.pubsub = self.pubsub, None
        if old is not None:
            try:
                await old.aclose()
            except Exception:  # the old connection is dead anyway
                pass

    async def read(self) -> None:
        """Wait while the subscriber connection delivers (``on_push``); raise when
        it is lost or stops answering PINGs (a silent network failure)."""
        pubsub = self.pubsub
        if pubsub is None:
            raise RedisConnectionError("no subscriber connection")
        pinged: float | None = None
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(pubsub.conn.lost), HEALTH_CHECK)
            except TimeoutError:
                if pinged is not None and self.pong_at < pinged:  # no answer in 5 s
                    pubsub.conn.close()
                    raise RedisConnectionError("Redis stopped answering PING") from None
                pinged = time.monotonic()
                pubsub.ping()
                continue
            raise RedisConnectionError("connection to Redis lost")

    def on_push(self, reply: Any) -> None:
        """A pub/sub push from the lean subscriber connection."""
        try:
            kind = reply[0]
            if kind == b"message":
                self.host.deliver("message", None, reply[1], reply[2])
            elif kind == b"pmessage":
                self.host.deliver("pmessage", reply[1], reply[2], reply[3])
            elif kind == b"pong":
                self.pong_at = time.monotonic()
            elif isinstance(kind, bytes) and len(reply) == 3:  # (un)subscribe confirmations
                self.host.deliver(kind.decode(), None, reply[1], reply[2])
            else:
                log.warning("unexpected reply on the Redis subscriber connection: %r", reply)
        except Exception:  # one bad message must not stop the connection
            log.exception("cannot deliver a message from Redis")

    async def sub_exact(self, channel: str) -> None:
        if self.pubsub is not None:
            await self.pubsub.subscribe(self.host.keys.chan(channel))

    async def unsub_exact(self, channel: str) -> None:
        if self.pubsub is not None:
            await self.pubsub.unsubscribe(self.host.keys.chan(channel))

    async def psubscribe(self, glob: bytes) -> None:
        if self.pubsub is not None:
            await self.pubsub.psubscribe(glob)

    async def punsubscribe(self, glob: bytes) -> None:
        if self.pubsub is not None:
            await self.pubsub.punsubscribe(glob)

    def sub_key(self, channel: str) -> bytes:
        return self.host.keys.chan(channel)

    def channel_of(self, raw_channel: bytes) -> str:
        return self.host.keys.channel_of(raw_channel)

    def targets(self, channel: str) -> list[bytes]:
        return [self.host.keys.chan(channel), b""]

    async def publish_event(self, channel: str, payload: bytes) -> None:
        await self.host.call("publish", self.host.keys.chan(channel), payload)

    async def close(self) -> None:
        await self.close_pubsubs()
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    async def run_scripts(self, batch: list[tuple[Any, ...]]) -> list[Any]:
        """One batch of EVALSHA calls: one write on the lean publisher connection,
        a result per publish in order (errors as values).

        Consecutive publishes to one channel (with the same history settings) go
        as one call, up to ``GROUP_MAX`` of them: Redis runs the script once,
        they get consecutive offsets, and subscribers get them in one message.
        Plain EVALSHA: a ``Script`` object would first ask ``SCRIPT EXISTS``;
        the script is loaded whenever the connection is (re)opened instead."""
        # the epoch a channel gets if its state is missing: one fresh value per
        # batch is enough (it only has to differ from that channel's last epoch)
        epoch = bulk((secrets.token_hex(4),))
        heads = self.evalsha_heads
        if len(heads) > 10_000:
            heads.clear()
        parts: list[bytes] = []
        sizes: list[int] = []  # publishes per call
        i, total = 0, len(batch)
        while i < total:
            channel, _, _, _, size, ttl_ms = batch[i]
            j, group_bytes = i, 0
            entries = []
            while j < total and j - i < GROUP_MAX and group_bytes < GROUP_BYTES:
                other, data, sender, ts, other_size, other_ttl = batch[j]
                if j > i and (other != channel or other_size != size or other_ttl != ttl_ms):
                    break
                sender_b = sender.encode()
                ts_b = b"%d" % ts
                entries.append(b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
                    len(data), data, len(sender_b), sender_b, len(ts_b), ts_b))
                group_bytes += len(data)
                j += 1
            key = (channel, size, ttl_ms)
            head = heads.get(key)
            if head is None:  # the command up to the publications, packed once
                fixed = ["EVALSHA", self.host.script.sha, 2, self.host.keys.meta(channel),
                         self.host.keys.stream(channel), *self.targets(channel), size, ttl_ms,
                         self.host.meta_ttl]
                head = heads[key] = (len(fixed) + 1, bulk(fixed))  # + 1: the epoch
            parts.append(b"*%d\r\n" % (head[0] + 3 * (j - i)))
            parts.append(head[1])
            parts.append(epoch)
            parts.extend(entries)
            sizes.append(j - i)
            i = j
        conn = self.publisher
        if conn is None or not conn.is_open:
            conn = await RespConnection.open(self.host.redis_url)
            loaded = (await conn.execute([["SCRIPT", "LOAD", self.host.publish_lua]]))[0]
            if isinstance(loaded, Exception):
                conn.close()
                raise loaded
            self.publisher = conn
        replies = await conn.execute_packed(b"".join(parts), len(sizes))
        results: list[Any] = []
        for n, reply in zip(sizes, replies, strict=True):
            if isinstance(reply, Exception):
                results.extend([reply] * n)
            else:
                first, channel_epoch = reply
                results.extend([(int(first) + k, channel_epoch) for k in range(n)])
        return results



class ClusterTopology:
    """A Redis Cluster (``redis+cluster://``)."""

    def __init__(self, host: RedisHost) -> None:
        self.host = host
        parts = urlsplit(host.redis_url)
        self.host_addr = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.patterns_on = "patterns=off" not in host.redis_url
        self.pubsub: Any = None  # the classic connection: patterns, inboxes
        self.shards: dict[str, Any] = {}  # node name -> its sharded pubsub
        self.shard_of: dict[str, str] = {}  # exact channel -> node name
        self.shard_names: dict[bytes, str] = {}  # shard channel -> channel

    @property
    def subscribed(self) -> bool:
        return self.pubsub is not None

    def make_client(self) -> Any:
        return RedisCluster(host=self.host_addr, port=self.port, socket_connect_timeout=2,
                            max_connections=MAX_CONNECTIONS)

    async def run_scripts(self, batch: list[tuple[Any, ...]]) -> list[Any]:
        """Cluster pipelines refuse EVALSHA: run the scripts routed to the shard
        that owns each channel, channels concurrently, and one channel's
        publishes one after another so they keep the order they were made in."""
        limit = asyncio.Semaphore(MAX_CONNECTIONS // 2)
        results: list[Any] = [None] * len(batch)
        by_channel: dict[str, list[int]] = {}
        for i, args in enumerate(batch):
            by_channel.setdefault(args[0], []).append(i)

        async def run(indices: list[int]) -> None:
            async with limit:
                for i in indices:
                    try:
                        results[i] = await self.host.script_call(batch[i], self.host.client)
                    except Exception as exc:  # handed to that publish's caller
                        results[i] = exc

        await asyncio.gather(*(run(ix) for ix in by_channel.values()))
        return results

    def targets(self, channel: str) -> list[bytes]:
        classic = self.host.keys.chan(channel) if self.patterns_on else b""
        return [classic, self.host.keys.shard_chan(channel)]

    async def publish_event(self, channel: str, payload: bytes) -> None:
        await self.host.call("spublish", self.host.keys.shard_chan(channel), payload)
        if self.patterns_on:
            await self.host.call("publish", self.host.keys.chan(channel), payload)

    def sub_key(self, channel: str) -> bytes:
        return self.host.keys.shard_chan(channel)

    def channel_of(self, raw_channel: bytes) -> str:
        name = self.shard_names.get(raw_channel)
        return name if name is not None else self.host.keys.channel_of(raw_channel)

    def node_client(self, host: str, port: int) -> aioredis.Redis:
        return aioredis.Redis(host=host, port=port, socket_connect_timeout=2,
                              socket_keepalive=True)

    async def open_pubsub(self) -> None:
        client = self.host.client
        if client is None:
            raise BrokerUnavailable("not connected")
        await client.initialize()  # refresh the slot map (it may have changed)
        await self.close_pubsubs()
        node = client.get_random_node()
        classic = self.node_client(node.host, node.port).pubsub()
        await classic.subscribe(self.host.keys.inbox(self.host.node), self.host.keys.all)
        if self.host.patterns:
            await classic.psubscribe(*self.host.patterns)
        self.pubsub = classic
        for master in client.get_primaries():
            self.shards[master.name] = self.node_client(master.host, master.port).pubsub()
        self.shard_of.clear()
        for channel in self.host.exact:
            await self.sub_exact(channel)

    async def close_pubsubs(self) -> None:
        pubsubs = [self.pubsub, *self.shards.values()]
        self.pubsub = None
        self.shards = {}
        for pubsub in pubsubs:
            if pubsub is None:
                continue
            try:
                await pubsub.aclose()
            except Exception:  # already dead
                pass

    async def read(self) -> None:
        async def read(pubsub: Any) -> None:
            while True:
                if not pubsub.subscribed:
                    await asyncio.sleep(0.05)  # nothing to read yet on this shard
                    continue
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    self.dispatch(message)

        async with asyncio.TaskGroup() as group:  # the first failure stops them all
            for pubsub in (self.pubsub, *self.shards.values()):
                group.create_task(read(pubsub))

    async def sub_exact(self, channel: str) -> None:
        client = self.host.client
        if client is None:
            raise BrokerUnavailable("not connected")
        shard = self.host.keys.shard_chan(channel)
        owner = client.get_node_from_key(shard.decode())
        pubsub = self.shards.get(owner.name)
        if pubsub is None:
            raise BrokerUnavailable(f"no subscriber connection to {owner.name}")
        self.shard_names[shard] = channel
        self.shard_of[channel] = owner.name
        await pubsub.ssubscribe(shard)

    async def unsub_exact(self, channel: str) -> None:
        shard = self.host.keys.shard_chan(channel)
        owner = self.shard_of.pop(channel, None)
        pubsub = self.shards.get(owner) if owner is not None else None
        if pubsub is not None:
            await pubsub.sunsubscribe(shard)
        self.shard_names.pop(shard, None)

    async def psubscribe(self, glob: bytes) -> None:
        if self.pubsub is not None:
            await self.pubsub.psubscribe(glob)

    async def punsubscribe(self, glob: bytes) -> None:
        if self.pubsub is not None:
            await self.pubsub.punsubscribe(glob)

    async def close(self) -> None:
        await self.close_pubsubs()

    def dispatch(self, message: dict[str, Any]) -> None:
        kind = "message" if message["type"] == "smessage" else message["type"]
        self.host.deliver(kind, message.get("pattern"), message["channel"], message["data"])
