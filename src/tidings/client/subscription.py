"""The pieces of :class:`tidings.Client` a caller holds: subscriptions, their
bounded buffers, direct messages, join/leave events and queue items.

Kept apart from the connection logic in :mod:`tidings.client.client`; see its
docstring for the design (ordering, deduplication, recovery, buffers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

from websockets.exceptions import ConnectionClosed

from tidings.exceptions import ClientClosed, ClientError, ReplyError
from tidings.protocol.names import is_pattern
from tidings.types import Publication, StreamPos

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__all__ = ["ClientLink", "ClientTimeout", "Inbox", "Item", "MemberEvent", "Message", "Subscription",
           "publication_from", "retrieve"]

log = logging.getLogger("tidings.client.client")

T = TypeVar("T")

_MAX_TRACKED_CHANNELS: Final = 10_000  # per-channel positions kept by a pattern subscription


class ClientLink(Protocol):
    """What a :class:`Subscription` and an :class:`Item` need of their client
    (:class:`tidings.Client` implements it): the small API the two modules talk
    through. Not for applications: these are the client's own moving parts."""

    subscriptions: dict[str, Subscription]
    ws: ClientConnection | None
    link_up: bool
    stopped: bool
    request_timeout: float

    def check_usable(self) -> None: ...

    def new_future(self) -> asyncio.Future[Any]: ...

    async def call_on(self, ws: ClientConnection, frame: dict[str, Any],
                      deadline: float | None = None) -> Any: ...

    async def send_subscribe(self, sub: Subscription,
                             ws: ClientConnection) -> asyncio.Future[Any]: ...

    def resync(self, sub: Subscription) -> None: ...

    async def settle(self, item: Item, frame: dict[str, Any]) -> None: ...


class ClientTimeout(ClientError, TimeoutError):
    """A request got no reply, or the client was not connected, in time.

    Both a :class:`ClientError` (everything the client raises is one) and a
    :class:`TimeoutError` (what ``asyncio`` code usually catches for timeouts).
    """


@dataclass(frozen=True, slots=True)
class Message:
    """A direct message (``message`` frame): ``sender`` is its ``from`` field,
    the sender's conn_id or ``"server"``."""

    sender: str
    data: Any


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A ``join`` or ``leave`` frame of a subscription made with ``join_leave=True``."""

    kind: str  # "join" or "leave"
    channel: str
    conn_id: str
    user: str | None = None


class Item:
    """A work-queue item delivered to this client; settle it with ``ack`` or ``nack``.

    Items are held by the connection that received them: if that connection
    drops, the server hands them out again (at-least-once), so settling an item
    from a lost connection raises :class:`ClientError` instead of acking
    someone else's lease.
    """

    __slots__ = ("_client", "attempt", "data", "generation", "id", "queue")

    def __init__(
        self, client: ClientLink, queue: str, item_id: str, data: Any, attempt: int, generation: int
    ) -> None:
        self._client = client
        self.generation = generation
        self.queue = queue
        self.id = item_id
        self.data = data
        self.attempt = attempt

    async def ack(self) -> None:
        """Mark the item done: the server removes it from the queue."""
        await self._client.settle(self, {"type": "ack", "queue": self.queue, "item": self.id})

    async def nack(self, delay: float = 0.0, *, requeue: bool = True) -> None:
        """Give the item back (redelivered after ``delay`` s) or dead-letter it."""
        if delay < 0:
            raise ValueError("delay must be >= 0")
        await self._client.settle(self, {"type": "nack", "queue": self.queue, "item": self.id,
                                          "delay": delay, "requeue": requeue})

    def __repr__(self) -> str:
        return f"Item({self.queue!r}, {self.id!r}, attempt={self.attempt})"


class Inbox(Generic[T]):
    """A bounded buffer with one wake-up event; an async iterator of its items.

    Closing keeps what is buffered (it is still yielded), then ends the
    iteration, or raises ``error`` when one was given.
    """

    __slots__ = ("_closed", "_error", "_items", "_wakeup", "size")

    def __init__(self, size: int | None) -> None:
        self.size = size
        self._items: deque[T] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._error: ClientError | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def full(self) -> bool:
        return self.size is not None and len(self._items) >= self.size

    def put(self, item: T) -> None:
        if self._closed:
            return
        self._items.append(item)
        self._wakeup.set()

    def put_dropping_oldest(self, item: T) -> bool:
        """Put ``item``; True if the oldest item had to go to make room."""
        dropped = self.full()
        if dropped:
            self._items.popleft()
        self.put(item)
        return dropped

    def clear(self) -> None:
        self._items.clear()

    def close(self, error: ClientError | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = error
        self._wakeup.set()

    async def get(self) -> T:
        while True:
            if self._items:
                return self._items.popleft()
            if self._closed:
                if self._error is not None:
                    raise ClientError(str(self._error))
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def __aiter__(self) -> Inbox[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()


class Pending:
    """A request waiting for its reply, matched by ``id``.

    ``on_result``/``on_error`` run inside the reader, before the next frame is
    read: a subscribe reply's replayed publications must reach the buffer
    before the live ones that follow it on the socket.
    """

    __slots__ = ("future", "on_error", "on_result")

    def __init__(
        self,
        future: asyncio.Future[Any],
        on_result: Callable[[Any], None] | None,
        on_error: Callable[[ReplyError], None] | None,
    ) -> None:
        self.future = future
        self.on_result = on_result
        self.on_error = on_error

    def resolve(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: not every failed request has a waiter left."""
    if not future.cancelled():
        future.exception()


def publication_from(raw: Any) -> Publication:
    """A Publication from a ``publication`` frame or a replayed/history entry."""
    if not isinstance(raw, dict):
        raise TypeError("a publication must be a JSON object")
    channel, offset = raw["channel"], raw["offset"]
    if not isinstance(channel, str) or not isinstance(offset, int):
        raise TypeError("a publication needs a string channel and an integer offset")
    sender = raw.get("sender")
    ts = raw.get("ts", 0)
    return Publication(channel, raw.get("data"), offset, str(raw.get("epoch", "")),
                       sender if isinstance(sender, str) else None,
                       ts if isinstance(ts, int) else 0)


class Subscription:
    """One subscription of a :class:`Client` to a channel or pattern.

    ``async with client.subscribe(p) as sub`` subscribes on enter (raising
    :class:`ReplyError` if the server refuses) and unsubscribes on exit;
    ``async for pub in sub`` yields :class:`tidings.types.Publication` objects.
    With ``join_leave=True``, ``sub.events()`` yields :class:`MemberEvent`
    objects (join/leave) separately, so the publication stream keeps one type.

    Counters: ``dropped`` (publications dropped from a full buffer), ``gaps``
    (publications known to be lost: the server could not recover them),
    ``recoveries`` (times this subscription re-synced from history after a
    gap or a full buffer).
    """

    def __init__(
        self, client: ClientLink, pattern: str, *, join_leave: bool, recover: bool, buffer_size: int
    ) -> None:
        self._client = client
        self.pattern = pattern
        self.join_leave = join_leave
        self.recover = recover
        self.dropped = 0
        self.gaps = 0
        self.recoveries = 0
        self._exact = not is_pattern(pattern)
        self._inbox: Inbox[Publication] = Inbox(buffer_size)
        self.event_inbox: Inbox[MemberEvent] = Inbox(buffer_size)
        self._positions: dict[str, StreamPos] = {}  # last publication taken, per channel
        self._entered = False
        self._active = False
        self._confirmed: asyncio.Future[None] | None = None
        self._recovering = False  # live publications ignored until a recover reply
        self.resync_inflight = False  # a subscribe request is on its way
        self._warned_full = False

    def __repr__(self) -> str:
        return f"<Subscription {self.pattern!r} active={self._active}>"

    @property
    def active(self) -> bool:
        """True between a successful enter and the exit (or the client's close)."""
        return self._active

    @property
    def position(self) -> StreamPos | None:
        """For an exact channel: the position recovery resumes from."""
        return self._positions.get(self.pattern) if self._exact else None

    @property
    def recoverable(self) -> bool:
        return self._exact and self.recover

    # -- context manager and iteration -------------------------------------------

    async def __aenter__(self) -> Subscription:
        client = self._client
        client.check_usable()
        if self._entered:
            raise ClientError("a Subscription can be entered only once")
        if self.pattern in client.subscriptions:
            raise ClientError(f"this client is already subscribed to {self.pattern!r}")
        self._entered = True
        self._active = True
        confirmed = self._confirmed = client.new_future()
        client.subscriptions[self.pattern] = self
        try:
            ws = client.ws
            if client.link_up and ws is not None:
                # otherwise the next (re)connection subscribes everything in ``_subs``
                with contextlib.suppress(ConnectionClosed):  # the reconnection retries it
                    await client.send_subscribe(self, ws)
            await asyncio.wait_for(asyncio.shield(confirmed), client.request_timeout)
        except TimeoutError:
            self.deactivate()
            raise ClientTimeout(
                f"subscribe {self.pattern!r}: no reply within {client.request_timeout} s"
            ) from None
        except BaseException:
            self.deactivate()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        was_active = self._active
        self.deactivate()
        client = self._client
        ws = client.ws
        if was_active and client.link_up and ws is not None and not client.stopped:
            try:
                await client.call_on(ws, {"type": "unsubscribe", "channel": self.pattern})
            except ClientError as exc:  # gone already, connection lost, or closed meanwhile
                log.debug("unsubscribe %r: %s", self.pattern, exc)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Publication:
        if not self._entered:
            raise ClientError("use `async with client.subscribe(...) as sub` before iterating")
        pub = await self._inbox.get()
        self._maybe_resync()
        return pub

    def events(self) -> AsyncIterator[MemberEvent]:
        """Join/leave events of the channels this subscription matches."""
        if not self.join_leave:
            raise ClientError("subscribe with join_leave=True to receive join/leave events")
        return self.event_inbox

    # -- called by the client's reader (synchronous, in frame order) --------------

    def deactivate(self, error: ClientError | None = None) -> None:
        self._active = False
        client = self._client
        if client.subscriptions.get(self.pattern) is self:
            del client.subscriptions[self.pattern]
        confirmed = self._confirmed
        if confirmed is not None and not confirmed.done():
            confirmed.set_exception(error or ClientClosed("the client was closed"))
        self._inbox.close(error)
        self.event_inbox.close(error)

    def recover_from(self) -> StreamPos | None:
        if not self.recoverable:
            return None
        return self._positions.get(self.pattern)

    def offer(self, pub: Publication) -> None:
        """Take one publication, enforcing once-only, in-order delivery."""
        if not self._active or self._recovering:
            return  # while recovering, the recover reply replays what is skipped here
        channel = pub.channel
        last = self._positions.get(channel)
        if last is not None:
            if last.epoch == pub.epoch:
                if pub.offset <= last.offset:
                    return  # seen already (replay overlapping live delivery)
                if pub.offset > last.offset + 1:
                    if self.recoverable:
                        self.begin_recovery(f"offsets {last.offset + 1}-{pub.offset - 1} missing")
                        return
                    self.gaps += 1
                    log.warning("subscription %r: publications %d-%d of %r were lost",
                                self.pattern, last.offset + 1, pub.offset - 1, channel)
            else:
                self.gaps += 1
                log.warning("subscription %r: channel %r changed epoch (%s -> %s); "
                            "its earlier history is gone", self.pattern, channel,
                            last.epoch, pub.epoch)
        if self._inbox.full():
            if self.recoverable:
                self.begin_recovery("buffer full")
                return
            self._inbox.put_dropping_oldest(pub)
            self.dropped += 1
            if not self._warned_full:
                self._warned_full = True
                log.warning("subscription %r: buffer of %s full, dropping the oldest "
                            "publications (consume faster or raise buffer_size)",
                            self.pattern, self._inbox.size)
        else:
            self._warned_full = False
            self._inbox.put(pub)
        if channel not in self._positions and len(self._positions) >= _MAX_TRACKED_CHANNELS:
            del self._positions[next(iter(self._positions))]
        self._positions[channel] = StreamPos(pub.offset, pub.epoch)

    def begin_recovery(self, why: str) -> None:
        if not self._recovering:
            self._recovering = True
            self.recoveries += 1
            log.info("subscription %r: %s; recovering from history", self.pattern, why)
        self._maybe_resync()

    def _maybe_resync(self) -> None:
        """Re-subscribe with ``recover`` once there is room for the replay."""
        inbox = self._inbox
        if (
            self._recovering
            and self._active
            and not self.resync_inflight
            and len(inbox) <= (inbox.size or 0) // 2
        ):
            self._client.resync(self)

    def on_subscribed(self, sent_recover: bool, result: Any) -> None:
        self.resync_inflight = False
        if not self._active:
            return
        if not isinstance(result, dict):
            raise TypeError("a subscribe result must be a JSON object")
        self._recovering = False
        for raw in result.get("publications") or ():
            self.offer(publication_from(raw))
        if sent_recover and result.get("recovered") is False:
            self.gaps += 1
            log.warning("subscription %r: missed publications could not be recovered "
                        "(history too short or reset)", self.pattern)
        offset, epoch = result.get("offset"), result.get("epoch")
        if (
            self._exact
            and not self._recovering
            and isinstance(offset, int)
            and isinstance(epoch, str)
            and epoch
        ):
            # Live publications continue after the channel's position at subscribe time.
            last = self._positions.get(self.pattern)
            if last is None or last.epoch != epoch or last.offset < offset:
                self._positions[self.pattern] = StreamPos(offset, epoch)
        if self._confirmed is not None and not self._confirmed.done():
            self._confirmed.set_result(None)

    def on_subscribe_error(self, exc: ReplyError) -> None:
        self.resync_inflight = False
        if not self._active:
            return
        confirmed = self._confirmed
        if confirmed is not None and not confirmed.done():
            confirmed.set_exception(exc)  # raised by __aenter__
            return
        log.warning("subscription %r refused on re-subscribe: %s", self.pattern, exc)
        self.deactivate(ClientError(f"subscription {self.pattern!r} ended: {exc}"))
