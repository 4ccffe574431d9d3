"""Presence on JetStream: the members part of :class:`tidings.brokers.nats.broker.NatsBroker`.

Stream ``<prefix>_P`` keeps one message per member subject
``<prefix>.p.<channel token>.<conn token>`` with ``max_age = presence_ttl``;
each node rewrites its own members every third of the TTL and after every
reconnect, so the members of a node killed -9 expire within the TTL.
"""

from __future__ import annotations

import asyncio

import orjson

from tidings.brokers.nats.subjects import NatsLink, NatsSubjects
from tidings.brokers.nats.wire import REQUEST_TIMEOUT
from tidings.exceptions import BrokerUnavailable
from tidings.types import Member

__all__ = ["NatsPresence"]


class NatsPresence:
    """The PresenceStore of a NATS broker: a part it owns and delegates to."""

    __slots__ = ("link", "own", "replicas", "subjects", "ttl")

    def __init__(self, link: NatsLink, subjects: NatsSubjects, *, ttl: float,
                 replicas: int) -> None:
        self.link = link
        self.subjects = subjects
        self.ttl = ttl
        self.replicas = replicas
        self.own: dict[str, dict[str, Member]] = {}  # this node's members, for refreshes

    async def setup(self) -> None:
        """Create the stream unless it exists (again after a reconnect)."""
        await self.link.ensure_stream({
            "name": self.subjects.presence_stream, "subjects": [self.subjects.under("p")],
            "retention": "limits", "storage": "memory", "discard": "old",
            "max_msgs_per_subject": 1, "max_age": int(self.ttl * 1e9),
            "num_replicas": self.replicas,
        })

    async def add_member(self, channel: str, member: Member) -> None:
        self.own.setdefault(channel, {})[member.conn_id] = member
        if not self.link.health().up or not self.link.jetstream:
            # written at the refresh after the reconnect; without JetStream there
            # is no store (members() says NotAvailable), join/leave events still go
            return
        await self.write(channel, member)

    async def write(self, channel: str, member: Member) -> None:
        """Store (or refresh) one member: its subject's one message, TTL from now."""
        try:
            msg = await self.link.client.request(self.subjects.member(channel, member.conn_id),
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
        ours = self.own.get(channel)
        if ours is not None:
            ours.pop(conn_id, None)
            if not ours:
                del self.own[channel]
        if self.link.connected and not self.link.jetstream:
            return  # no store without JetStream (see add_member)
        self.link.require_jetstream("presence")
        await self.link.purge(self.subjects.presence_stream,
                              self.subjects.member(channel, conn_id))

    async def members(self, channel: str) -> list[Member]:
        self.link.require_jetstream("presence")
        out: list[Member] = []
        for msg in await self.link.scan(self.subjects.presence_stream,
                                        self.subjects.member(channel), "last_per_subject"):
            if msg.data:
                d = orjson.loads(msg.data)
                out.append(Member(d["conn_id"], d.get("user"), d.get("info")))
        return out

    async def refresh(self) -> None:
        """Write this node's members again (their TTL starts over; after a
        reconnect, a server that lost them has them back)."""
        if not self.link.jetstream:
            return
        for channel, members in list(self.own.items()):
            for member in list(members.values()):
                try:
                    await self.write(channel, member)
                except BrokerUnavailable:
                    return

    async def beat(self) -> None:
        """Refresh every third of the TTL, until cancelled (the broker's close)."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            if self.link.health().up:
                await self.refresh()

    async def withdraw(self) -> None:
        """Closing: take this node's members out of the store (best effort), and
        forget them."""
        if self.link.connected and self.link.jetstream:
            for channel, members in list(self.own.items()):
                for conn_id in list(members):
                    try:
                        await self.link.purge(self.subjects.presence_stream,
                                              self.subjects.member(channel, conn_id))
                    except Exception:
                        break
        self.own.clear()
