"""Presence on Redis, the members part of :class:`tidings.brokers.redis.broker.RedisBroker`.

Per channel, a hash of member data plus a sorted set of member -> expiry. Each
node refreshes its own members every ``presence_ttl / 3`` seconds (and adds
them again after a Redis restart), so the members of a node that died without
cleanup vanish within ``presence_ttl``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from redis.exceptions import RedisError

from tidings.brokers.redis.keys import RedisKeys, RedisLink
from tidings.exceptions import BrokerUnavailable
from tidings.types import Member

__all__ = ["RedisPresence"]

log = logging.getLogger("tidings.brokers.redis.broker")


class RedisPresence:
    """The PresenceStore of a Redis broker: a part it owns and delegates to."""

    __slots__ = ("keys", "link", "own", "ttl")

    def __init__(self, link: RedisLink, keys: RedisKeys, ttl: float) -> None:
        self.link = link
        self.keys = keys
        self.ttl = ttl
        self.own: dict[str, dict[str, Member]] = {}  # this node's members, for heartbeats

    async def add_member(self, channel: str, member: Member) -> None:
        self.own.setdefault(channel, {})[member.conn_id] = member
        data_key, expiry_key = self.keys.presence(channel)
        client = self.link.client
        if client is None or not self.link.up:
            return  # recorded at the next refresh after reconnect
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(data_key, member.conn_id, orjson.dumps(member.to_dict()))
                pipe.zadd(expiry_key, {member.conn_id: time.time() + self.ttl})
                pipe.expire(data_key, int(self.ttl * 2) + 1)
                pipe.expire(expiry_key, int(self.ttl * 2) + 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def remove_member(self, channel: str, conn_id: str) -> None:
        ours = self.own.get(channel)
        if ours is not None:
            ours.pop(conn_id, None)
            if not ours:
                del self.own[channel]
        data_key, expiry_key = self.keys.presence(channel)
        await self.link.call("hdel", data_key, conn_id)
        await self.link.call("zrem", expiry_key, conn_id)

    async def members(self, channel: str) -> list[Member]:
        data_key, expiry_key = self.keys.presence(channel)
        client = self.link.client
        if client is None:
            raise BrokerUnavailable("not connected")
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.zrangebyscore(expiry_key, time.time(), "+inf")
                pipe.hgetall(data_key)
                alive, data = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        out: list[Member] = []
        for conn_id in alive:
            raw = data.get(conn_id)
            if raw is not None:
                item = orjson.loads(raw)
                out.append(Member(item["conn_id"], item.get("user"), item.get("info")))
        return out

    async def refresh(self) -> None:
        """Push our members' expiry forward (and re-add them after a Redis restart)."""
        client = self.link.client
        if client is None or not self.own:
            return
        deadline = time.time() + self.ttl
        try:
            async with client.pipeline(transaction=False) as pipe:
                for channel, members in self.own.items():
                    data_key, expiry_key = self.keys.presence(channel)
                    for member in members.values():
                        pipe.hset(data_key, member.conn_id, orjson.dumps(member.to_dict()))
                    pipe.zadd(expiry_key, dict.fromkeys(members, deadline))
                    pipe.zremrangebyscore(expiry_key, "-inf", time.time())
                    pipe.expire(data_key, int(self.ttl * 2) + 1)
                    pipe.expire(expiry_key, int(self.ttl * 2) + 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("presence refresh failed: %s", exc)

    async def beat(self) -> None:
        """Refresh this node's members every third of the TTL until the broker closes."""
        while not self.link.closing:
            await asyncio.sleep(self.ttl / 3)
            if self.link.up:
                await self.refresh()
