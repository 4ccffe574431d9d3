"""``redis+cluster://host:port``: the Redis broker on a Redis Cluster.

Same design as :mod:`tidings.brokers.redis.broker`, spread over shards:

- every key of a channel carries the channel as hash tag, so its offset,
  history, presence and shard channel live on one shard and the publish
  script stays single-slot;
- exact subscriptions use sharded pub/sub (SPUBLISH / SSUBSCRIBE): a
  publication only travels to the shard that owns the channel and to the nodes
  subscribed there, so pub/sub capacity grows with the shards;
- sharded pub/sub has no patterns, so the script also PUBLISHes on classic pub/sub,
  which pattern subscribers PSUBSCRIBE to (globs, exact filtering on receipt,
  as on one server). Classic pub/sub crosses the cluster bus; turn it off with
  ``?patterns=off`` when no client subscribes with wildcards;
- direct messages and broadcasts use classic pub/sub.

The subscriber holds one connection per master for sharded messages and one
for classic ones. After a resharding, the reconnect path re-maps every shard
channel to its new owner.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tidings.brokers.redis.broker import RedisBroker
from tidings.exceptions import BrokerUnavailable

__all__ = ["RedisClusterBroker"]

_MAX_CONNECTIONS = 64  # per shard, for commands (subscribers have their own)

class RedisClusterBroker(RedisBroker):
    """Broker, HistoryStore and PresenceStore on a Redis Cluster."""

    def __init__(self, url: str) -> None:
        super().__init__(url.replace("redis+cluster://", "redis://", 1))
        self.url = url
        parts = urlsplit(self.redis_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._patterns_on = "patterns=off" not in url
        self._shards: dict[str, Any] = {}  # node name -> its sharded pubsub
        self._shard_of: dict[str, str] = {}  # exact channel -> node name
        self._shard_names: dict[bytes, str] = {}  # shard channel -> channel

    def _make_client(self) -> Any:
        return RedisCluster(host=self._host, port=self._port, socket_connect_timeout=2,
                            max_connections=_MAX_CONNECTIONS)

    async def _run_scripts(self, batch: list[tuple[Any, ...]]) -> list[Any]:
        """Cluster pipelines refuse EVALSHA: run the scripts routed to the shard
        that owns each channel, channels concurrently, and one channel's
        publishes one after another so they keep the order they were made in."""
        limit = asyncio.Semaphore(_MAX_CONNECTIONS // 2)
        results: list[Any] = [None] * len(batch)
        by_channel: dict[str, list[int]] = {}
        for i, args in enumerate(batch):
            by_channel.setdefault(args[0], []).append(i)

        async def run(indices: list[int]) -> None:
            async with limit:
                for i in indices:
                    try:
                        results[i] = await self._script_call(batch[i], self._client)
                    except Exception as exc:  # handed to that publish's caller
                        results[i] = exc

        await asyncio.gather(*(run(ix) for ix in by_channel.values()))
        return results

    def _targets(self, channel: str) -> list[bytes]:
        classic = self.keys.chan(channel) if self._patterns_on else b""
        return [classic, self.keys.shard_chan(channel)]

    async def publish_event(self, channel: str, frame: str) -> None:
        payload = b"E" + frame.encode()
        await self.call("spublish", self.keys.shard_chan(channel), payload)
        if self._patterns_on:
            await self.call("publish", self.keys.chan(channel), payload)

    def _sub_key(self, channel: str) -> bytes:
        return self.keys.shard_chan(channel)

    def _channel_of(self, raw_channel: bytes) -> str:
        name = self._shard_names.get(raw_channel)
        return name if name is not None else super()._channel_of(raw_channel)

    # -- subscriber connections -------------------------------------------------------

    def _node_client(self, host: str, port: int) -> aioredis.Redis:
        return aioredis.Redis(host=host, port=port, socket_connect_timeout=2,
                              socket_keepalive=True)

    async def _open_pubsub(self) -> None:
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected")
        await client.initialize()  # refresh the slot map (it may have changed)
        await self._close_pubsubs()
        node = client.get_random_node()
        classic = self._node_client(node.host, node.port).pubsub()
        await classic.subscribe(self.keys.inbox(self._node), self.keys.all)
        if self._patterns:
            await classic.psubscribe(*self._patterns)
        self._pubsub = classic
        for master in client.get_primaries():
            self._shards[master.name] = self._node_client(master.host, master.port).pubsub()
        self._shard_of.clear()
        for channel in self._exact:
            await self._sub_exact(channel)

    async def _close_pubsubs(self) -> None:
        pubsubs = [self._pubsub, *self._shards.values()]
        self._pubsub = None
        self._shards = {}
        for pubsub in pubsubs:
            if pubsub is None:
                continue
            try:
                await pubsub.aclose()
            except Exception:  # already dead
                pass

    async def _read(self) -> None:
        async def read(pubsub: Any) -> None:
            while True:
                if not pubsub.subscribed:
                    await asyncio.sleep(0.05)  # nothing to read yet on this shard
                    continue
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._dispatch(message)

        async with asyncio.TaskGroup() as group:  # the first failure stops them all
            for pubsub in (self._pubsub, *self._shards.values()):
                group.create_task(read(pubsub))

    async def _sub_exact(self, channel: str) -> None:
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected")
        shard = self.keys.shard_chan(channel)
        owner = client.get_node_from_key(shard.decode())
        pubsub = self._shards.get(owner.name)
        if pubsub is None:
            raise BrokerUnavailable(f"no subscriber connection to {owner.name}")
        self._shard_names[shard] = channel
        self._shard_of[channel] = owner.name
        await pubsub.ssubscribe(shard)

    async def _unsub_exact(self, channel: str) -> None:
        shard = self.keys.shard_chan(channel)
        owner = self._shard_of.pop(channel, None)
        pubsub = self._shards.get(owner) if owner is not None else None
        if pubsub is not None:
            await pubsub.sunsubscribe(shard)
        self._shard_names.pop(shard, None)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] == "smessage":
            message = {**message, "type": "message"}
        super()._dispatch(message)
