"""Publishing on JetStream: the publish path of :class:`tidings.brokers.nats.broker.NatsBroker`.

A part of its own because it is a concept of its own, with state nothing else
owns: what this node knows of each channel's stream tail (:class:`ChanState`),
and the publishes queued behind the one in flight. One message in flight per
channel per node, a compare-and-set on the channel's tail
(``Nats-Expected-Last-Subject-Sequence``), publishes queued meanwhile batched
into the next message, failover retries with ``Nats-Msg-Id`` (design in
docs/brokers-nats.md). The broker tells it what it learns elsewhere: a newer
tail seen live (:meth:`NatsPublisher.observed`), a purge or a reconnect
(:meth:`NatsPublisher.forget`, :meth:`NatsPublisher.forget_all`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tidings.brokers.base import HistoryOptions, PublishDone, PublishOutcome
from tidings.brokers.nats.history import NatsHistory
from tidings.brokers.nats.subjects import STATE_CACHE_MAX, NatsLink, NatsSubjects
from tidings.brokers.nats.wire import WRONG_LAST_SEQUENCE, encode_data, pack_record
from tidings.exceptions import BrokerUnavailable
from tidings.types import Publication

__all__ = ["FAILOVER", "ChanState", "NatsPublisher"]

log = logging.getLogger("tidings.brokers.nats")

_GROUP_MAX = 1000  # publications in one stream message
_GROUP_BYTES = 256 * 1024
_CAS_TRIES = 1000
FAILOVER = 10.0  # seconds a publish is retried while JetStream has no leader (?failover=)
_PUBLISH_TIMEOUT = 2.0


@dataclass(slots=True)
class ChanState:
    """What this node knows of a channel's stream tail (for the compare-and-set)."""

    seq: int | None = None  # stream sequence of the last message; None: unknown
    offset: int = 0  # last offset
    epoch: str = ""
    queue: deque[tuple[bytes, int, int, PublishDone, Any, str | None, str | None, int]] = field(
        default_factory=deque)
    busy: bool = False


class NatsPublisher:
    """``publish_then`` of a NATS broker: a part it owns and delegates to."""

    __slots__ = ("chans", "failover", "history", "link", "subjects")

    def __init__(self, link: NatsLink, subjects: NatsSubjects, history: NatsHistory, *,
                 failover: float) -> None:
        self.link = link
        self.subjects = subjects
        self.history = history  # the tails, and the stream's bound
        self.failover = failover
        self.chans: dict[str, ChanState] = {}

    def observed(self, channel: str, seq: int, last: int, epoch: str) -> None:
        """A stored message seen live: a newer tail than ours saves a reload."""
        state = self.chans.get(channel)
        if state is not None and state.seq is not None and seq > state.seq:
            state.seq, state.offset, state.epoch = seq, last, epoch

    def forget(self, channel: str) -> None:
        """Drop what we know of the channel's tail (it was purged): the next
        publish reloads it."""
        state = self.chans.get(channel)
        if state is not None:
            state.seq = None

    def forget_all(self) -> None:
        """Drop every tail we know (after a reconnect: the server may have lost them)."""
        for state in self.chans.values():
            state.seq = None

    def publish_then(
        self,
        channel: str,
        data: Any,
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
        text: str | None = None,
        done: PublishDone,
    ) -> None:
        """``done`` gets the publication (or BrokerUnavailable), in the order the
        publishes of one channel were started."""
        link = self.link
        if not link.connected:
            done(BrokerUnavailable(link.health().reason or "NATS unreachable"))
            return
        size, ttl_ms = 0, 0
        if history is not None and history.enabled:
            size, ttl_ms = history.size, int(history.ttl * 1000)
        ts = int(time.time() * 1000)
        payload = encode_data(data, text)
        if not link.jetstream:
            link.spawn(self._publish_core(channel, pack_record(sender, ts, payload),
                                          done, data, text, sender, ts))
            return
        chans = self.chans
        state = chans.get(channel)
        if state is None:
            if len(chans) > STATE_CACHE_MAX:
                for name in [n for n, s in chans.items() if not s.busy]:
                    del chans[name]
            state = chans[channel] = ChanState()
        state.queue.append((pack_record(sender, ts, payload), size, ttl_ms, done, data, text,
                            sender, ts))
        if not state.busy:
            state.busy = True
            link.spawn(self._drain(channel, state))

    async def _publish_core(self, channel: str, record: bytes, done: PublishDone, data: Any,
                            text: str | None, sender: str | None, ts: int) -> None:
        outcome: PublishOutcome
        try:
            await self.link.publish_core(self.subjects.live(channel), record, {"T-L": "1"})
            outcome = Publication(channel, data, 0, "", sender, ts, text=text)
        except BrokerUnavailable as exc:
            outcome = exc
        done(outcome)

    async def _drain(self, channel: str, state: ChanState) -> None:
        """One message in flight per channel: what queues up meanwhile goes next,
        together (consecutive offsets in one stream message)."""
        group: list[tuple[bytes, int, int, PublishDone, Any, str | None, str | None, int]] = []
        try:
            while state.queue:
                first = state.queue[0]
                group = [state.queue.popleft()]
                nbytes = len(first[0])
                while (state.queue and len(group) < _GROUP_MAX and nbytes < _GROUP_BYTES
                       and state.queue[0][1:3] == first[1:3]):
                    item = state.queue.popleft()
                    nbytes += len(item[0])
                    group.append(item)
                outcomes: list[PublishOutcome]
                try:
                    first_offset, epoch = await self._store(channel, state, group)
                    outcomes = [Publication(channel, data, first_offset + i, epoch, sender, ts,
                                            text=text)
                                for i, (_, _, _, _, data, text, sender, ts) in enumerate(group)]
                except BrokerUnavailable as exc:
                    outcomes = [exc] * len(group)
                except Exception as exc:
                    outcomes = [BrokerUnavailable(f"publish to {channel!r} failed: {exc}")
                                ] * len(group)
                for item, outcome in zip(group, outcomes, strict=True):
                    try:
                        item[3](outcome)
                    except Exception:
                        log.exception("publish callback failed")
        except asyncio.CancelledError:  # close(): nobody is left waiting for nothing
            gone = BrokerUnavailable("broker closed")
            for item in (*group, *state.queue):
                try:
                    item[3](gone)
                except Exception:
                    log.exception("publish callback failed")
            state.queue.clear()
            raise
        finally:
            state.busy = False

    async def _store(self, channel: str, state: ChanState, group: Sequence[tuple[Any, ...]]
                     ) -> tuple[int, str]:
        """Append ``group`` at the channel's tail with a compare-and-set.

        A wrong-sequence answer reloads the tail and tries again. No answer (the
        stream's leader is being elected after a server loss, or the ack was
        lost) is retried for up to ``failover`` s (default 10) with the same
        ``Nats-Msg-Id``: if the first attempt was stored, the stream's duplicate
        window answers with that message's sequence instead of storing it twice."""
        size, ttl_ms = group[0][1], group[0][2]
        if size + 1 > self.history.cap:
            await self.history.raise_cap(size + 1)
        body = b"".join(item[0] for item in group)
        subject = self.subjects.hist(channel)
        msg_id = secrets.token_hex(8)
        deadline = time.monotonic() + self.failover
        headers: dict[str, str] | None = None
        for _ in range(_CAS_TRIES):
            if headers is None:
                if state.seq is None:
                    try:
                        await self._load(channel, state)
                    except BrokerUnavailable as exc:
                        if self._retry_until(deadline):
                            await asyncio.sleep(0.05)
                            continue
                        log.warning("publish to %r failed: %s", channel, exc)
                        raise
                assert state.seq is not None
                headers = {"Nats-Expected-Last-Subject-Sequence": str(state.seq),
                           "Nats-Msg-Id": msg_id, "T-O": str(state.offset + 1),
                           "T-E": state.epoch, "T-H": f"{size},{ttl_ms}"}
                if len(group) != 1:
                    headers["T-N"] = str(len(group))
            try:
                msg = await self.link.client.request(subject, body, timeout=_PUBLISH_TIMEOUT,
                                                headers=headers)
                reply = orjson.loads(msg.data)
            except Exception as exc:
                if self._retry_until(deadline):
                    await asyncio.sleep(0.05)
                    continue  # same headers, same message id
                state.seq = None
                log.warning("publish to %r failed: %r", channel, exc)
                raise BrokerUnavailable(f"publish to {channel!r}: {exc!r}") from exc
            err = reply.get("error")
            if err:
                if err.get("err_code") == WRONG_LAST_SEQUENCE:
                    state.seq, headers = None, None
                    continue  # another node appended first: reload the tail
                if err.get("code") == 503 and self._retry_until(deadline):
                    await asyncio.sleep(0.05)
                    continue
                state.seq = None
                log.warning("publish to %r refused: %s", channel, err)
                raise BrokerUnavailable(f"publish to {channel!r}: {err.get('description')}")
            seq = int(reply["seq"])
            first, epoch = int(headers["T-O"]), headers["T-E"]
            if state.seq is None or seq > state.seq:
                state.seq, state.offset, state.epoch = seq, first + len(group) - 1, epoch
            return first, epoch
        raise BrokerUnavailable(f"publish to {channel!r}: too much contention")

    def _retry_until(self, deadline: float) -> bool:
        """Whether a failed JetStream call is worth another try: connected (while
        down every call raises at once), not closing, and within ``failover``."""
        link = self.link
        return link.health().up and not link.closing and time.monotonic() < deadline

    async def _load(self, channel: str, state: ChanState) -> None:
        tail = await self.history.tail(channel)
        if tail is None:  # never published, purged, expired or lost: a new epoch
            state.seq, state.offset, state.epoch = 0, 0, secrets.token_hex(4)
        else:
            state.seq, state.offset, state.epoch = tail.seq, tail.last, tail.epoch
