"""History on Redis: the streams part of :class:`tidings.brokers.redis.broker.RedisBroker`.

A channel's history is a stream whose entry ids are ``<offset>-1``, written by
the publish script (:mod:`tidings.brokers.redis.wire`) together with the
offset, so history and live never disagree; the channel's meta hash holds its
offset ``o`` and epoch ``e``.
"""

from __future__ import annotations

import secrets

from redis.exceptions import RedisError

from tidings.brokers.redis.keys import RedisKeys, RedisLink
from tidings.brokers.redis.wire import publication_from
from tidings.exceptions import BrokerUnavailable
from tidings.types import HistoryPage, StreamPos

__all__ = ["RedisHistory"]


class RedisHistory:
    """The HistoryStore of a Redis broker: a part it owns and delegates to."""

    __slots__ = ("keys", "link", "meta_ttl")

    def __init__(self, link: RedisLink, keys: RedisKeys, meta_ttl: int) -> None:
        self.link = link
        self.keys = keys
        self.meta_ttl = meta_ttl

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        client = self.link.client
        if client is None:
            raise BrokerUnavailable("not connected")
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hmget(self.keys.meta(channel), "o", "e")
                if since is not None:
                    pipe.xrange(self.keys.stream(channel), f"{since.offset + 1}-0", "+")
                else:
                    pipe.xrange(self.keys.stream(channel), "-", "+")
                (raw_offset, raw_epoch), entries = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        if raw_epoch is None:  # never published, or the state was lost: start an epoch
            epoch = await self.ensure_epoch(channel)
            return HistoryPage([], 0, epoch, since is None or since.offset == 0)
        offset, epoch = int(raw_offset or 0), raw_epoch.decode()
        pubs = [publication_from(channel, int(entry_id.split(b"-", 1)[0]), epoch,
                                 fields[b"t"], fields[b"s"], fields[b"d"])
                for entry_id, fields in entries]
        recovered = True
        if since is not None:
            if since.epoch != epoch:
                recovered, pubs = False, []
            elif since.offset < offset:
                first = pubs[0].offset if pubs else offset + 1
                recovered = since.offset + 1 >= first
        if reverse:
            pubs.reverse()
        if limit is not None:
            pubs = pubs[:limit]
        return HistoryPage(pubs, offset, epoch, recovered)

    async def ensure_epoch(self, channel: str) -> str:
        key = self.keys.meta(channel)
        await self.link.call("hsetnx", key, "e", secrets.token_hex(4))
        await self.link.call("expire", key, self.meta_ttl)
        raw = await self.link.call("hget", key, "e")
        return str(raw.decode()) if raw is not None else ""

    async def remove_history(self, channel: str) -> None:
        await self.link.call("delete", self.keys.stream(channel))
        await self.link.call("hset", self.keys.meta(channel), "e", secrets.token_hex(4))

    async def position(self, channel: str) -> StreamPos:
        raw_offset, raw_epoch = await self.link.call("hmget", self.keys.meta(channel), "o", "e")
        if raw_epoch is None:
            return StreamPos(0, await self.ensure_epoch(channel))
        return StreamPos(int(raw_offset or 0), raw_epoch.decode())
