"""History on Redis, the streams part of :class:`tidings.brokers.redis.broker.RedisBroker`.

A channel's history is a stream whose entry ids are ``<offset>-1``, written by
the publish script (:mod:`tidings.brokers.redis.wire`) together with the
offset, so history and live never disagree; the channel's meta hash holds its
offset ``o`` and epoch ``e``.
"""

from __future__ import annotations

import secrets
from typing import Any

from redis.exceptions import RedisError

from tidings.brokers.redis.wire import publication_from
from tidings.exceptions import BrokerUnavailable
from tidings.types import HistoryPage, StreamPos

__all__ = ["RedisHistory"]


class RedisHistory:
    """Mixin: the HistoryStore methods; the broker provides what is declared here."""

    _client: Any
    meta_ttl: int

    def _meta(self, channel: str) -> str:
        raise NotImplementedError

    def _stream(self, channel: str) -> str:
        raise NotImplementedError

    async def _call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected")
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hmget(self._meta(channel), "o", "e")
                if since is not None:
                    pipe.xrange(self._stream(channel), f"{since.offset + 1}-0", "+")
                else:
                    pipe.xrange(self._stream(channel), "-", "+")
                (raw_offset, raw_epoch), entries = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        if raw_epoch is None:  # never published, or the state was lost: start an epoch
            epoch = await self._ensure_epoch(channel)
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

    async def _ensure_epoch(self, channel: str) -> str:
        key = self._meta(channel)
        await self._call("hsetnx", key, "e", secrets.token_hex(4))
        await self._call("expire", key, self.meta_ttl)
        raw = await self._call("hget", key, "e")
        return str(raw.decode()) if raw is not None else ""

    async def remove_history(self, channel: str) -> None:
        await self._call("delete", self._stream(channel))
        await self._call("hset", self._meta(channel), "e", secrets.token_hex(4))

    async def position(self, channel: str) -> StreamPos:
        raw_offset, raw_epoch = await self._call("hmget", self._meta(channel), "o", "e")
        if raw_epoch is None:
            return StreamPos(0, await self._ensure_epoch(channel))
        return StreamPos(int(raw_offset or 0), raw_epoch.decode())
