"""History and positions on JetStream: the history part of
:class:`tidings.brokers.nats.broker.NatsBroker` (design in docs/brokers-nats.md).

This part keeps the history stream ``<prefix>_H``: it creates it, raises its
per-subject bound when a publish asks for more history, and reads a
channel's tail from the stream leader (``STREAM.MSG.GET last_by_subj``) for
positions and for the publisher's compare-and-set; a channel without a
message gets an epoch marker first. History reads the subject's messages
through a short-lived push consumer and applies the channel's window
(``T-H``) on read.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time

import orjson

from tidings.brokers.nats.subjects import NatsLink, NatsSubjects
from tidings.brokers.nats.wire import (
    REQUEST_TIMEOUT,
    JetStreamError,
    Tail,
    parse_headers,
    unpack_records,
)
from tidings.exceptions import BrokerUnavailable
from tidings.types import HistoryPage, Publication, StreamPos

__all__ = ["NatsHistory"]


class NatsHistory:
    """The HistoryStore of a NATS broker (a part it owns and delegates to), and
    the keeper of its history stream."""

    __slots__ = ("cap", "failover", "history_max", "link", "meta_ttl", "replicas", "subjects")

    def __init__(self, link: NatsLink, subjects: NatsSubjects, *, history_max: int,
                 meta_ttl: float, replicas: int, failover: float) -> None:
        self.link = link
        self.subjects = subjects
        self.history_max = history_max  # the stream's initial max_msgs_per_subject
        self.meta_ttl = meta_ttl  # its max_age: how long an idle channel keeps its position
        self.replicas = replicas
        self.failover = failover
        self.cap = 0  # max_msgs_per_subject of the stream as this node last set it

    async def setup(self) -> None:
        """Create the stream unless it exists (again after a reconnect)."""
        subjects = self.subjects
        await self.link.ensure_stream({
            "name": subjects.stream, "subjects": [subjects.under("h")],
            "retention": "limits", "storage": "file", "discard": "old",
            "max_msgs_per_subject": max(self.history_max, self.cap, 1),
            "max_age": int(self.meta_ttl * 1e9), "num_replicas": self.replicas,
            "duplicate_window": int(max(self.failover, 1.0) * 2e9),
            "republish": {"src": subjects.under("h"), "dest": subjects.under("c")},
        })
        self.cap = max(self.history_max, self.cap, 1)

    async def raise_cap(self, cap: int) -> None:
        """Let the stream keep at least ``cap`` messages per channel."""
        stream = self.subjects.stream
        info = await self.link.api(f"STREAM.INFO.{stream}")
        config = info["config"]
        if int(config.get("max_msgs_per_subject", 0)) < cap:
            config["max_msgs_per_subject"] = cap
            await self.link.api(f"STREAM.UPDATE.{stream}", config)
        self.cap = max(self.cap, cap)

    async def tail(self, channel: str) -> Tail | None:
        """The channel's last stream message (read from the stream leader)."""
        try:
            reply = await self.link.api(f"STREAM.MSG.GET.{self.subjects.stream}",
                                        {"last_by_subj": self.subjects.hist(channel)})
        except JetStreamError as exc:
            if exc.code == 404:
                return None
            raise BrokerUnavailable(str(exc)) from exc
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"read the tail of {channel!r}: {exc!r}") from exc
        message = reply["message"]
        hdrs = parse_headers(base64.b64decode(message.get("hdrs", "")))
        size, _, ttl = hdrs.get("T-H", "0,0").partition(",")
        return Tail(int(message["seq"]), int(hdrs.get("T-O", "1")), int(hdrs.get("T-N", "1")),
                     hdrs.get("T-E", ""), int(size), int(ttl or 0))

    async def mark(self, channel: str, offset: int, expected: int) -> Tail | None:
        """Write an epoch marker (no publication) where the channel has no message:
        its epoch is then fixed before anything is published."""
        epoch = secrets.token_hex(4)
        try:
            msg = await self.link.client.request(
                self.subjects.hist(channel), b"", timeout=REQUEST_TIMEOUT, headers={
                    "Nats-Expected-Last-Subject-Sequence": str(expected),
                    "T-O": str(offset + 1), "T-E": epoch, "T-N": "0", "T-H": "0,0"})
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"mark {channel!r}: {exc!r}") from exc
        reply = orjson.loads(msg.data)
        if reply.get("error"):
            return await self.tail(channel)  # someone else wrote first
        return Tail(int(reply["seq"]), offset + 1, 0, epoch, 0, 0)

    async def current(self, channel: str) -> Tail:
        """The channel's tail (an epoch marker is written when it has none),
        retried like the link's ``scan`` while a cluster fails over."""
        deadline = time.monotonic() + self.failover
        while True:
            try:
                tail = await self.tail(channel)
                while tail is None:
                    tail = await self.mark(channel, 0, 0)
                return tail
            except BrokerUnavailable:
                if (not self.link.health().up or time.monotonic() > deadline
                        or self.link.closing):
                    raise
                await asyncio.sleep(0.1)

    # -- the HistoryStore ---------------------------------------------------------------

    async def position(self, channel: str) -> StreamPos:
        self.link.require_jetstream("positions")
        tail = await self.current(channel)
        return StreamPos(tail.last, tail.epoch)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        self.link.require_jetstream("history")
        tail = await self.current(channel)
        top, epoch = tail.last, tail.epoch
        if since is not None:
            if since.epoch != epoch:
                return HistoryPage([], top, epoch, False)
            if since.offset >= top:
                return HistoryPage([], top, epoch, True)
        pubs: list[Publication] = []
        if tail.size > 0 and tail.ttl_ms > 0 and tail.count > 0:
            horizon = int(time.time() * 1000) - tail.ttl_ms
            low = top - tail.size
            for msg in await self.link.scan(self.subjects.stream, self.subjects.hist(channel)):
                hdrs = msg.headers or {}
                if hdrs.get("T-E") != epoch or msg.metadata.sequence.stream > tail.seq:
                    continue
                first, count = int(hdrs.get("T-O", "1")), int(hdrs.get("T-N", "1"))
                if count == 0 or first + count - 1 <= low:
                    continue
                pubs.extend(p for p in unpack_records(channel, first, epoch, msg.data)
                            if p.offset > low and p.ts >= horizon)
        recovered = True
        if since is not None:
            first_kept = pubs[0].offset if pubs else top + 1
            if since.offset + 1 < first_kept:
                recovered = False
            pubs = [p for p in pubs if p.offset > since.offset]
        if reverse:
            pubs.reverse()
        if limit is not None:
            pubs = pubs[:limit]
        return HistoryPage(pubs, top, epoch, recovered)

    async def remove_history(self, channel: str) -> None:
        """Purge the channel's messages and mark a new epoch at its offset (the
        broker then drops the publisher's cached tail of the channel)."""
        self.link.require_jetstream("history")
        tail = await self.current(channel)
        await self.link.purge(self.subjects.stream, self.subjects.hist(channel))
        await self.mark(channel, tail.last, 0)
