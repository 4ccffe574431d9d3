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
from typing import Any

import orjson
from redis.exceptions import RedisError

from tidings.brokers.base import BrokerHealth
from tidings.exceptions import BrokerUnavailable
from tidings.types import Member

__all__ = ["RedisPresence"]

log = logging.getLogger("tidings.brokers.redis.broker")


class RedisPresence:
    """Mixin: the PresenceStore methods; the broker provides what is declared here."""

    _client: Any
    _health: BrokerHealth
    _closing: bool
    _members: dict[str, dict[str, Member]]  # our own members, for heartbeats
    presence_ttl: float

    def _presence_keys(self, channel: str) -> tuple[str, str]:
        raise NotImplementedError

    async def _call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    async def add_member(self, channel: str, member: Member) -> None:
        self._members.setdefault(channel, {})[member.conn_id] = member
        data_key, expiry_key = self._presence_keys(channel)
        client = self._client
        if client is None or not self._health.up:
            return  # recorded at the next refresh after reconnect
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(data_key, member.conn_id, orjson.dumps(member.to_dict()))
                pipe.zadd(expiry_key, {member.conn_id: time.time() + self.presence_ttl})
                pipe.expire(data_key, int(self.presence_ttl * 2) + 1)
                pipe.expire(expiry_key, int(self.presence_ttl * 2) + 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def remove_member(self, channel: str, conn_id: str) -> None:
        ours = self._members.get(channel)
        if ours is not None:
            ours.pop(conn_id, None)
            if not ours:
                del self._members[channel]
        data_key, expiry_key = self._presence_keys(channel)
        await self._call("hdel", data_key, conn_id)
        await self._call("zrem", expiry_key, conn_id)

    async def members(self, channel: str) -> list[Member]:
        data_key, expiry_key = self._presence_keys(channel)
        client = self._client
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

    async def _refresh_members(self) -> None:
        """Push our members' expiry forward (and re-add them after a Redis restart)."""
        client = self._client
        if client is None or not self._members:
            return
        deadline = time.time() + self.presence_ttl
        try:
            async with client.pipeline(transaction=False) as pipe:
                for channel, members in self._members.items():
                    data_key, expiry_key = self._presence_keys(channel)
                    for member in members.values():
                        pipe.hset(data_key, member.conn_id, orjson.dumps(member.to_dict()))
                    pipe.zadd(expiry_key, dict.fromkeys(members, deadline))
                    pipe.zremrangebyscore(expiry_key, "-inf", time.time())
                    pipe.expire(data_key, int(self.presence_ttl * 2) + 1)
                    pipe.expire(expiry_key, int(self.presence_ttl * 2) + 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("presence refresh failed: %s", exc)

    async def _beat(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.presence_ttl / 3)
            if self._health.up:
                await self._refresh_members()
