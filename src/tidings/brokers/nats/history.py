"""History and positions on JetStream: the history part of
:class:`tidings.brokers.nats.NatsBroker` (design in docs/brokers-nats.md).

The channel's tail is read from the stream leader (``STREAM.MSG.GET
last_by_subj``); a channel without a message gets an epoch marker first.
History reads the subject's messages through a short-lived push consumer and
applies the channel's window (``T-H``) on read.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tidings.brokers.base import BrokerHealth
from tidings.brokers.nats.wire import (
    REQUEST_TIMEOUT,
    SCAN_TIMEOUT,
    JetStreamError,
    Tail,
    parse_headers,
    unpack_records,
)
from tidings.exceptions import BrokerUnavailable, NotAvailable
from tidings.types import HistoryPage, Publication, StreamPos

__all__ = ["NatsHistory"]


class NatsHistory:
    """Mixin: the HistoryStore methods; the broker provides what is declared here."""

    stream: str
    failover: float
    _health: BrokerHealth
    _closing: bool
    _js: bool
    _nc: NatsClient | None
    _chans: dict[str, Any]

    if TYPE_CHECKING:
        @property
        def client(self) -> NatsClient: ...

        def _hist(self, channel: str) -> str: ...

        async def api(self, what: str, body: dict[str, Any] | None = None, *,
                      timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]: ...

    async def _tail(self, channel: str) -> Tail | None:
        """The channel's last stream message (read from the stream leader)."""
        try:
            reply = await self.api(f"STREAM.MSG.GET.{self.stream}",
                                   {"last_by_subj": self._hist(channel)})
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

    async def _mark(self, channel: str, offset: int, expected: int) -> Tail | None:
        """Write an epoch marker (no publication) where the channel has no message:
        its epoch is then fixed before anything is published."""
        epoch = secrets.token_hex(4)
        try:
            msg = await self.client.request(
                self._hist(channel), b"", timeout=REQUEST_TIMEOUT, headers={
                    "Nats-Expected-Last-Subject-Sequence": str(expected),
                    "T-O": str(offset + 1), "T-E": epoch, "T-N": "0", "T-H": "0,0"})
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"mark {channel!r}: {exc!r}") from exc
        reply = orjson.loads(msg.data)
        if reply.get("error"):
            return await self._tail(channel)  # someone else wrote first
        return Tail(int(reply["seq"]), offset + 1, 0, epoch, 0, 0)

    # -- history ------------------------------------------------------------------------

    def _need_js(self, feature: str) -> None:
        if not self._health.up or self._nc is None:
            raise BrokerUnavailable(self._health.reason or "NATS unreachable")
        if not self._js:
            raise NotAvailable(feature, "nats (JetStream is not enabled on the server)")

    async def _current(self, channel: str) -> Tail:
        """The channel's tail (an epoch marker is written when it has none),
        retried like :meth:`scan` while a cluster fails over."""
        deadline = time.monotonic() + self.failover
        while True:
            try:
                tail = await self._tail(channel)
                while tail is None:
                    tail = await self._mark(channel, 0, 0)
                return tail
            except BrokerUnavailable:
                if not self._health.up or time.monotonic() > deadline or self._closing:
                    raise
                await asyncio.sleep(0.1)

    async def position(self, channel: str) -> StreamPos:
        self._need_js("positions")
        tail = await self._current(channel)
        return StreamPos(tail.last, tail.epoch)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        self._need_js("history")
        tail = await self._current(channel)
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
            for msg in await self.scan(self.stream, self._hist(channel)):
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
        """Purge the channel's messages and mark a new epoch at its offset."""
        self._need_js("history")
        tail = await self._current(channel)
        await self._purge(self.stream, self._hist(channel))
        await self._mark(channel, tail.last, 0)
        state = self._chans.get(channel)
        if state is not None:
            state.seq = None

    async def _purge(self, stream: str, subject: str) -> None:
        try:
            await self.api(f"STREAM.PURGE.{stream}", {"filter": subject})
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"purge {subject}: {exc!r}") from exc

    async def scan(self, stream: str, subject: str, policy: str = "all") -> list[Msg]:
        """Every message of ``stream`` on ``subject`` (a filter), oldest first,
        through a short-lived push consumer (``policy``: all, last_per_subject).

        Tried again (for up to ``failover`` s) when the consumer goes silent or
        JetStream does not answer: on a cluster that just lost a server, the
        consumer may have been placed on the lost peer, or the meta leader is
        being elected. While the connection is down it raises at once."""
        deadline = time.monotonic() + self.failover
        while True:
            try:
                return await self._scan_once(stream, subject, policy)
            except (TimeoutError, BrokerUnavailable) as exc:
                if not self._health.up or time.monotonic() > deadline or self._closing:
                    if isinstance(exc, BrokerUnavailable):
                        raise
                    raise BrokerUnavailable(f"read {subject}: no answer") from exc
                await asyncio.sleep(0.1)

    async def _scan_once(self, stream: str, subject: str, policy: str) -> list[Msg]:
        nc = self.client
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_msgs_limit=-1, pending_bytes_limit=-1)
        name = ""
        try:
            reply = await self.api(f"CONSUMER.CREATE.{stream}", timeout=SCAN_TIMEOUT, body={
                "stream_name": stream, "config": {
                "deliver_subject": inbox, "filter_subject": subject,
                "deliver_policy": policy, "ack_policy": "none", "replay_policy": "instant",
                "mem_storage": True, "num_replicas": 1,
                "inactive_threshold": int(10e9)}})
            name = reply["name"]
            out: list[Msg] = []
            pending = int(reply.get("num_pending", 0))
            while pending > 0:
                msg = await sub.next_msg(timeout=SCAN_TIMEOUT)
                if not msg.reply:
                    continue  # a status message
                out.append(msg)
                pending = msg.metadata.num_pending
            return out
        except (BrokerUnavailable, NotAvailable, TimeoutError):
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"read {subject}: {exc!r}") from exc
        finally:
            try:
                await sub.unsubscribe()
                if name:
                    await nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"")
            except Exception:  # the consumer goes away by itself (inactive_threshold)
                pass
