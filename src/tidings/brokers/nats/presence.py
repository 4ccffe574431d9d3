"""Presence on JetStream: the members part of :class:`tidings.brokers.nats.NatsBroker`.

Stream ``<prefix>_P`` keeps one message per member subject
``<prefix>.p.<channel token>.<conn token>`` with ``max_age = presence_ttl``;
each node rewrites its own members every third of the TTL and after every
reconnect, so the members of a node killed -9 expire within the TTL.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tidings.brokers.base import BrokerHealth
from tidings.brokers.nats.subjects import token_for
from tidings.brokers.nats.wire import REQUEST_TIMEOUT
from tidings.exceptions import BrokerUnavailable
from tidings.types import Member

__all__ = ["NatsPresence"]


class NatsPresence:
    """Mixin: the PresenceStore methods; the broker provides what is declared here."""

    prefix: str
    presence_stream: str
    presence_ttl: float
    _health: BrokerHealth
    _js: bool
    _nc: NatsClient | None
    _members: dict[str, dict[str, Member]]

    if TYPE_CHECKING:
        @property
        def client(self) -> NatsClient: ...

        def _need_js(self, feature: str) -> None: ...

        async def _purge(self, stream: str, subject: str) -> None: ...

        async def scan(self, stream: str, subject: str, policy: str = "all") -> list[Msg]: ...

    def _member_subject(self, channel: str, conn_id: str = "*") -> str:
        tail = conn_id if conn_id == "*" else token_for(conn_id)
        return f"{self.prefix}.p.{token_for(channel)}.{tail}"

    async def add_member(self, channel: str, member: Member) -> None:
        self._members.setdefault(channel, {})[member.conn_id] = member
        if not self._health.up or not self._js:
            # written at the refresh after the reconnect; without JetStream there
            # is no store (members() says NotAvailable), join/leave events still go
            return
        await self._write_member(channel, member)

    async def _write_member(self, channel: str, member: Member) -> None:
        try:
            msg = await self.client.request(self._member_subject(channel, member.conn_id),
                                            orjson.dumps(member.to_dict()),
                                            timeout=REQUEST_TIMEOUT)
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"presence in {channel!r}: {exc!r}") from exc
        err = orjson.loads(msg.data).get("error")
        if err:
            raise BrokerUnavailable(f"presence in {channel!r}: {err.get('description')}")

    async def remove_member(self, channel: str, conn_id: str) -> None:
        ours = self._members.get(channel)
        if ours is not None:
            ours.pop(conn_id, None)
            if not ours:
                del self._members[channel]
        if self._nc is not None and self._health.up and not self._js:
            return  # no store without JetStream (see add_member)
        self._need_js("presence")
        await self._purge(self.presence_stream, self._member_subject(channel, conn_id))

    async def members(self, channel: str) -> list[Member]:
        self._need_js("presence")
        out: list[Member] = []
        for msg in await self.scan(self.presence_stream, self._member_subject(channel),
                                   "last_per_subject"):
            if msg.data:
                d = orjson.loads(msg.data)
                out.append(Member(d["conn_id"], d.get("user"), d.get("info")))
        return out

    async def _refresh_members(self) -> None:
        if not self._js:
            return
        for channel, members in list(self._members.items()):
            for member in list(members.values()):
                try:
                    await self._write_member(channel, member)
                except BrokerUnavailable:
                    return

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.presence_ttl / 3)
            if self._health.up:
                await self._refresh_members()
