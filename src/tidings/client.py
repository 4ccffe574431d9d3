"""``tidings.Client``: an asyncio client of the native protocol (SPEC 6.1).

::

    async with Client("ws://127.0.0.1:8000/ws") as client:
        async with client.subscribe("chat/room1") as sub:
            await client.publish("chat/room1", {"text": "hi"})
            async for pub in sub:
                print(pub.offset, pub.data)

Design, and why:

- One reader task per connection reads every frame and dispatches it without
  awaiting: replies resolve the request with the same ``id``; publications go
  to the bounded buffer of every subscription whose pattern matches the
  channel (once per subscription); messages, queue items and join/leave
  events go to their own buffers. Nothing a consumer does can stall the
  reader, so a slow ``async for`` never delays the replies of other calls.
- The socket can drop at any time. Unless ``close()`` was called (or
  ``reconnect=False``, or the server closed with 1008 policy violation, which
  a retry would only repeat), the client reconnects with exponential backoff
  and full jitter, re-subscribes every active subscription and re-issues
  every ``pull``. An exact channel subscribed with ``recover=True`` asks for
  what it missed from its last position (``recover: {offset, epoch}``); the
  replayed publications come first, then live ones.
- Every publication is yielded at most once per subscription and in order:
  an offset not above the last one seen on that channel in the same epoch is
  dropped. A jump in offsets is a gap: an exact recoverable subscription
  repairs it by re-subscribing with ``recover`` (the server replays from
  history); others count it in ``Subscription.gaps`` and log a warning.
- Buffers are bounded (``buffer_size``). When a subscription's buffer is
  full, an exact recoverable subscription stops taking live publications and,
  once its consumer has drained half the buffer, recovers them from history,
  so nothing is lost while history covers the gap. Other subscriptions drop
  their oldest publication (counted in ``Subscription.dropped``).
- ``close()`` ends every iterator: what was already received is still yielded,
  then ``StopAsyncIteration``. Pending requests fail with ``ClientClosed``.
  Every wait inside is bounded. When the client stops for another reason (the
  connection was lost and no reconnect is allowed), iterators raise
  ``ClientError`` after their buffered items instead of ending silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Generic, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from tidings.exceptions import ClientClosed, ClientError, ReplyError
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import is_pattern, pattern_matches
from tidings.protocol.native import dumps, loads
from tidings.types import HistoryPage, Member, Publication, StreamPos

__all__ = ["Client", "ClientTimeout", "Item", "MemberEvent", "Message", "Subscription"]

log = logging.getLogger("tidings.client")

T = TypeVar("T")

_CLOSE_TIMEOUT: Final = 2.0  # bounded wait for the websocket closing handshake
_NO_RECONNECT: Final = frozenset({1008})  # policy violation: retrying would repeat it
_MAX_TRACKED_CHANNELS: Final = 10_000  # per-channel positions kept by a pattern subscription


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

    __slots__ = ("_client", "_generation", "attempt", "data", "id", "queue")

    def __init__(
        self, client: Client, queue: str, item_id: str, data: Any, attempt: int, generation: int
    ) -> None:
        self._client = client
        self._generation = generation
        self.queue = queue
        self.id = item_id
        self.data = data
        self.attempt = attempt

    async def ack(self) -> None:
        """Mark the item done: the server removes it from the queue."""
        await self._client._settle(self, {"type": "ack", "queue": self.queue, "item": self.id})

    async def nack(self, delay: float = 0.0, *, requeue: bool = True) -> None:
        """Give the item back (redelivered after ``delay`` s) or dead-letter it."""
        if delay < 0:
            raise ValueError("delay must be >= 0")
        await self._client._settle(self, {"type": "nack", "queue": self.queue, "item": self.id,
                                          "delay": delay, "requeue": requeue})

    def __repr__(self) -> str:
        return f"Item({self.queue!r}, {self.id!r}, attempt={self.attempt})"


class _Inbox(Generic[T]):
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

    def __aiter__(self) -> _Inbox[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()


class _Pending:
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


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: not every failed request has a waiter left."""
    if not future.cancelled():
        future.exception()


def _publication(raw: Any) -> Publication:
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
        self, client: Client, pattern: str, *, join_leave: bool, recover: bool, buffer_size: int
    ) -> None:
        self._client = client
        self.pattern = pattern
        self.join_leave = join_leave
        self.recover = recover
        self.dropped = 0
        self.gaps = 0
        self.recoveries = 0
        self._exact = not is_pattern(pattern)
        self._inbox: _Inbox[Publication] = _Inbox(buffer_size)
        self._events: _Inbox[MemberEvent] = _Inbox(buffer_size)
        self._positions: dict[str, StreamPos] = {}  # last publication taken, per channel
        self._entered = False
        self._active = False
        self._confirmed: asyncio.Future[None] | None = None
        self._recovering = False  # live publications ignored until a recover reply
        self._resync_inflight = False  # a subscribe request is on its way
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
    def _recoverable(self) -> bool:
        return self._exact and self.recover

    # -- context manager and iteration -------------------------------------------

    async def __aenter__(self) -> Subscription:
        client = self._client
        client._check_usable()
        if self._entered:
            raise ClientError("a Subscription can be entered only once")
        if self.pattern in client._subs:
            raise ClientError(f"this client is already subscribed to {self.pattern!r}")
        self._entered = True
        self._active = True
        confirmed = self._confirmed = client._future()
        client._subs[self.pattern] = self
        try:
            ws = client._ws
            if client._link_up and ws is not None:
                # otherwise the next (re)connection subscribes everything in ``_subs``
                with contextlib.suppress(ConnectionClosed):  # the reconnection retries it
                    await client._send_subscribe(self, ws)
            await asyncio.wait_for(asyncio.shield(confirmed), client.request_timeout)
        except TimeoutError:
            self._deactivate()
            raise ClientTimeout(
                f"subscribe {self.pattern!r}: no reply within {client.request_timeout} s"
            ) from None
        except BaseException:
            self._deactivate()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        was_active = self._active
        self._deactivate()
        client = self._client
        ws = client._ws
        if was_active and client._link_up and ws is not None and not client._stopped:
            try:
                await client._call(ws, {"type": "unsubscribe", "channel": self.pattern})
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
        return self._events

    # -- called by the client's reader (synchronous, in frame order) --------------

    def _deactivate(self, error: ClientError | None = None) -> None:
        self._active = False
        client = self._client
        if client._subs.get(self.pattern) is self:
            del client._subs[self.pattern]
        confirmed = self._confirmed
        if confirmed is not None and not confirmed.done():
            confirmed.set_exception(error or ClientClosed("the client was closed"))
        self._inbox.close(error)
        self._events.close(error)

    def _recover_from(self) -> StreamPos | None:
        if not self._recoverable:
            return None
        return self._positions.get(self.pattern)

    def _offer(self, pub: Publication) -> None:
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
                    if self._recoverable:
                        self._begin_recovery(f"offsets {last.offset + 1}-{pub.offset - 1} missing")
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
            if self._recoverable:
                self._begin_recovery("buffer full")
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

    def _begin_recovery(self, why: str) -> None:
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
            and not self._resync_inflight
            and len(inbox) <= (inbox.size or 0) // 2
        ):
            self._client._resync(self)

    def _on_subscribed(self, sent_recover: bool, result: Any) -> None:
        self._resync_inflight = False
        if not self._active:
            return
        if not isinstance(result, dict):
            raise TypeError("a subscribe result must be a JSON object")
        self._recovering = False
        for raw in result.get("publications") or ():
            self._offer(_publication(raw))
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

    def _on_subscribe_error(self, exc: ReplyError) -> None:
        self._resync_inflight = False
        if not self._active:
            return
        confirmed = self._confirmed
        if confirmed is not None and not confirmed.done():
            confirmed.set_exception(exc)  # raised by __aenter__
            return
        log.warning("subscription %r refused on re-subscribe: %s", self.pattern, exc)
        self._deactivate(ClientError(f"subscription {self.pattern!r} ended: {exc}"))


class Client:
    """Async client of the native protocol: pub/sub, direct messages, presence,
    history and work queues over one websocket, reconnecting on its own.

    ``url`` is the websocket URL of the native endpoint, e.g.
    ``ws://127.0.0.1:8000/ws``; ``token`` is sent as ``Authorization: Bearer``.
    Backoff between reconnection attempts is random in ``[backoff_min, cap]``
    with ``cap`` doubling from ``backoff_min`` up to ``backoff_max`` (full
    jitter, so clients dropped together do not return together).
    ``request_timeout`` bounds every request (and waiting for the connection
    first). ``buffer_size`` bounds each subscription's, and the messages',
    buffer.

    Counters: ``lagged`` (publications the server said it dropped for this
    client) and ``reconnects``. The server closing with 1008 (policy
    violation) is final; any other drop, including 1000 and 1001, is retried.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        reconnect: bool = True,
        backoff_min: float = 0.2,
        backoff_max: float = 10.0,
        request_timeout: float = 10.0,
        buffer_size: int = 1000,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"url must be a ws:// or wss:// URL, got {url!r}")
        if not 0 < backoff_min <= backoff_max:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        if request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.url = url
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.buffer_size = buffer_size
        self.lagged = 0  # publications the server dropped for this client (``lagged`` frames)
        self.reconnects = 0
        self._token = token
        self._conn_id: str | None = None
        self._node: str | None = None
        self._ws: ClientConnection | None = None
        self._link_up = False  # socket open and welcomed: requests may be written
        self._ready = asyncio.Event()  # link up and subscriptions restored (or stopped)
        self._stopped = False
        self._closed = False
        self._error: ClientError | None = None
        self._runner: asyncio.Task[None] | None = None
        self._generation = 0
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._subs: dict[str, Subscription] = {}
        self._pulls: dict[str, int] = {}
        self._messages: _Inbox[Message] = _Inbox(buffer_size)
        self._items: dict[str, _Inbox[Item]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<Client {self.url} conn_id={self._conn_id} connected={self.connected}>"

    # -- state -------------------------------------------------------------------

    @property
    def conn_id(self) -> str | None:
        """The server's id of the current (or last) connection; it changes on reconnect."""
        return self._conn_id

    @property
    def node(self) -> str | None:
        """The server node holding the current (or last) connection."""
        return self._node

    @property
    def connected(self) -> bool:
        """True while connected with every subscription restored."""
        return self._ready.is_set() and not self._stopped

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected (e.g. after a drop); ``ClientTimeout`` past ``timeout``."""
        self._check_usable()
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                raise ClientTimeout(f"not connected within {timeout} s") from None
        self._check_usable()

    def _gone(self) -> bool:
        """``_stopped``, read after an await (a call, so type checkers do not narrow it)."""
        return self._stopped

    def _check_usable(self) -> None:
        if self._stopped:
            if self._error is not None:
                raise ClientError(str(self._error))
            raise ClientClosed("the client is closed")
        if self._runner is None:
            raise ClientError("not connected: use `async with Client(...)` or `await connect()`")

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (the first attempt raises ``ClientError`` if it fails; later
        drops are retried in the background)."""
        if self._stopped:
            raise ClientClosed("the client is closed")
        if self._runner is None:
            ws = await self._open()
            if self._gone():  # closed while connecting
                await self._close_ws(ws)
                raise ClientClosed("the client is closed")
            self._runner = asyncio.get_running_loop().create_task(
                self._run(ws), name=f"tidings-client-{self.url}"
            )
        await self.wait_connected(self.request_timeout)

    async def close(self) -> None:
        """Close for good: iterators end, pending requests raise ``ClientClosed``.

        Bounded: the closing handshake and the background task get a few
        seconds at most.
        """
        self._closed = True
        self._finish(None)
        ws, self._ws = self._ws, None
        if ws is not None:
            await self._close_ws(ws)
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task() and not runner.done():
            runner.cancel()
            await asyncio.wait({runner}, timeout=_CLOSE_TIMEOUT)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT)

    def _finish(self, error: ClientError | None) -> None:
        """Stop for good (synchronously, so nothing can interleave)."""
        if self._stopped:
            return
        self._stopped = True
        self._error = error
        self._link_up = False
        self._ready.set()  # wake waiters: they see ``_stopped``
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.fail(ClientError(str(error)) if error is not None
                       else ClientClosed("the client was closed"))
        for sub in list(self._subs.values()):
            sub._deactivate(error)
        self._messages.close(error)
        for inbox in self._items.values():
            inbox.clear()  # leases die with the connection: nothing left to ack
            inbox.close(error)

    async def _open(self) -> ClientConnection:
        """Open a socket and read its ``welcome`` frame."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            ws = await connect(
                self.url,
                additional_headers=headers,
                open_timeout=self.request_timeout,
                close_timeout=_CLOSE_TIMEOUT,
                max_size=None,  # a recover reply may replay a long history
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ClientError(f"cannot connect to {self.url}: {exc}") from exc
        try:
            welcome = loads(await asyncio.wait_for(ws.recv(), self.request_timeout))
            if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
                raise ClientError(f"expected a welcome frame, got {welcome!r:.200}")
        except (OSError, TimeoutError, WebSocketException, ProtocolError, ClientError) as exc:
            await self._close_ws(ws)
            if isinstance(exc, ClientError):
                raise
            raise ClientError(f"no welcome from {self.url}: {exc!r}") from exc
        self._conn_id = str(welcome.get("conn_id"))
        self._node = str(welcome.get("node"))
        return ws

    @staticmethod
    async def _close_ws(ws: ClientConnection) -> None:
        try:
            await asyncio.wait_for(ws.close(), _CLOSE_TIMEOUT + 1.0)
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.debug("closing the websocket: %r", exc)

    def _backoff(self, attempt: int) -> float:
        cap = min(self.backoff_max, self.backoff_min * 2 ** min(attempt, 32))
        return random.uniform(self.backoff_min, cap)

    async def _run(self, ws: ClientConnection) -> None:
        """Own the connection: run a session, and reconnect when it drops."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            started = loop.time()
            code, reason = await self._session(ws)
            if self._stopped:
                return
            what = f"connection lost (close code {code}, {reason or 'no reason'})"
            if not self.reconnect:
                self._finish(ClientError(what))
                return
            if code in _NO_RECONNECT:
                self._finish(ClientError(f"{what}; not reconnecting after a policy violation"))
                return
            log.warning("%s; reconnecting", what)
            if loop.time() - started >= self.backoff_max:
                attempt = 0  # it was up for a while: not a flapping server
            while True:
                delay = self._backoff(attempt)
                attempt += 1
                await asyncio.sleep(delay)
                try:
                    ws = await self._open()
                except ClientError as exc:
                    log.info("reconnect attempt %d failed: %s", attempt, exc)
                    continue
                break
            if self._gone():  # closed while reconnecting
                await self._close_ws(ws)
                return
            self.reconnects += 1

    async def _session(self, ws: ClientConnection) -> tuple[int | None, str | None]:
        """Read one connection until it drops; restore subscriptions meanwhile."""
        loop = asyncio.get_running_loop()
        self._ws = ws
        self._generation += 1
        reader = loop.create_task(self._read_loop(ws), name="tidings-client-reader")
        # Snapshot and flag together (no await between): a subscription entered
        # from now on sends its own subscribe, the ones before are restored here.
        subs = list(self._subs.values())
        pulls = dict(self._pulls)
        self._link_up = True
        restore = loop.create_task(self._restore(ws, subs, pulls), name="tidings-client-restore")
        try:
            await reader
        except Exception:  # a bug in dispatch: log it, drop the socket, reconnect
            log.exception("the reader of %s failed", self.url)
        finally:
            restore.cancel()
            reader.cancel()
            self._link_lost(ws)
            await self._close_ws(ws)
        return ws.close_code, ws.close_reason

    async def _restore(
        self, ws: ClientConnection, subs: list[Subscription], pulls: dict[str, int]
    ) -> None:
        futures: list[asyncio.Future[Any]] = []
        try:
            for sub in subs:
                if sub.active:
                    futures.append(await self._send_subscribe(sub, ws))
            for queue, max_ in pulls.items():
                futures.append(await self._send(ws, {"type": "pull", "queue": queue,
                                                     "max": max_}))
        except ConnectionClosed:
            return
        if futures:
            _, late = await asyncio.wait(futures, timeout=self.request_timeout)
            if late:
                log.warning("%d re-subscribe/pull requests got no reply in %s s",
                            len(late), self.request_timeout)
        if self._ws is ws and not self._stopped:
            self._ready.set()

    def _link_lost(self, ws: ClientConnection) -> None:
        if self._ws is ws:
            self._ws = None
        self._link_up = False
        if not self._stopped:
            self._ready.clear()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.fail(ClientError("connection lost before the reply"))
        for sub in self._subs.values():
            sub._resync_inflight = False
        for inbox in self._items.values():
            inbox.clear()  # the server redelivers unacked items of a lost connection

    # -- reading -----------------------------------------------------------------

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                try:
                    frame = loads(raw)
                except ProtocolError:
                    log.warning("ignoring a frame that is not JSON: %.200r", raw)
                    continue
                if not isinstance(frame, dict):
                    log.warning("ignoring a frame that is not an object: %.200r", frame)
                    continue
                try:
                    self._dispatch(frame)
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("ignoring a malformed %r frame: %r", frame.get("type"), exc)
        except ConnectionClosed:
            pass

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "publication":
            pub = _publication(frame)
            for sub in list(self._subs.values()):
                if pattern_matches(sub.pattern, pub.channel):
                    sub._offer(pub)
        elif kind in ("reply", "error", "pong"):
            self._on_answer(kind, frame)
        elif kind == "message":
            sender = frame.get("from")
            if self._messages.put_dropping_oldest(Message(str(sender), frame.get("data"))):
                log.warning("message buffer full: dropped the oldest message")
        elif kind == "item":
            queue, item_id = frame["queue"], frame["item"]
            if not isinstance(queue, str) or not isinstance(item_id, str):
                raise TypeError("an item needs string 'queue' and 'item'")
            attempt = frame.get("attempt", 1)
            # unbounded: the server never sends more than the ``pull`` credit
            self._item_inbox(queue).put(Item(self, queue, item_id, frame.get("data"),
                                             attempt if isinstance(attempt, int) else 1,
                                             self._generation))
        elif kind in ("join", "leave"):
            channel = frame["channel"]
            member = frame.get("member") or {}
            if not isinstance(channel, str) or not isinstance(member, dict):
                raise TypeError("a join/leave frame needs 'channel' and 'member'")
            user = member.get("user")
            event = MemberEvent(str(kind), channel, str(member.get("conn_id")),
                                user if isinstance(user, str) else None)
            for sub in list(self._subs.values()):
                if sub.join_leave and pattern_matches(sub.pattern, channel):
                    sub._events.put_dropping_oldest(event)
        elif kind == "lagged":
            dropped = frame.get("dropped", 0)
            self.lagged += dropped if isinstance(dropped, int) else 0
            log.warning("the server dropped %s publications for this slow client", dropped)
            for sub in list(self._subs.values()):
                if sub._recoverable:
                    sub._begin_recovery("the server reported dropped publications")
        else:
            log.debug("ignoring a %r frame", kind)

    def _on_answer(self, kind: str, frame: dict[str, Any]) -> None:
        rid = frame.get("id")
        entry = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if kind == "error":
            exc = ReplyError(str(frame.get("code")), str(frame.get("message", "")))
            if entry is None:
                log.warning("server error not tied to a request: %s", exc)
                return
            if entry.on_error is not None:
                entry.on_error(exc)
            entry.fail(exc)
            return
        if entry is None:
            log.debug("a %s for no pending request (id %r)", kind, rid)
            return
        result = frame.get("result")
        if entry.on_result is not None:
            try:
                entry.on_result(result)
            except (KeyError, TypeError, ValueError) as exc:
                entry.fail(ClientError(f"malformed reply: {exc!r}"))
                return
        entry.resolve(result)

    # -- writing -----------------------------------------------------------------

    def _future(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        return future

    async def _send(
        self,
        ws: ClientConnection,
        frame: dict[str, Any],
        on_result: Callable[[Any], None] | None = None,
        on_error: Callable[[ReplyError], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Write a request with a fresh id; return the future of its reply."""
        self._next_id += 1
        rid = self._next_id
        future = self._future()
        self._pending[rid] = _Pending(future, on_result, on_error)
        try:
            await ws.send(dumps({**frame, "id": rid}).decode())
        except ConnectionClosed:
            entry = self._pending.pop(rid, None)
            if entry is not None:
                entry.fail(ClientError("connection lost before the request was sent"))
            raise
        return future

    async def _call(self, ws: ClientConnection, frame: dict[str, Any],
                    deadline: float | None = None) -> Any:
        """Send on ``ws`` and wait for the reply until ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.request_timeout
        try:
            future = await self._send(ws, frame)
        except ConnectionClosed:
            raise ClientError("connection lost before the request was sent") from None
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise ClientTimeout(
                f"{frame['type']}: no reply within {self.request_timeout} s"
            ) from None

    async def _request(self, frame: dict[str, Any]) -> Any:
        """Wait for the connection (within the request timeout), send, await the reply."""
        self._check_usable()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.request_timeout)
            except TimeoutError:
                raise ClientTimeout(
                    f"{frame['type']}: not connected within {self.request_timeout} s"
                ) from None
            self._check_usable()
        ws = self._ws
        if ws is None:
            raise ClientError("connection lost before the request was sent")
        return await self._call(ws, frame, deadline)

    async def _send_subscribe(self, sub: Subscription, ws: ClientConnection) -> asyncio.Future[Any]:
        frame: dict[str, Any] = {"type": "subscribe", "channel": sub.pattern}
        if sub.join_leave:
            frame["join_leave"] = True
        pos = sub._recover_from()
        if pos is not None:
            frame["recover"] = {"offset": pos.offset, "epoch": pos.epoch}
        sub._resync_inflight = True
        return await self._send(ws, frame, partial(sub._on_subscribed, pos is not None),
                                sub._on_subscribe_error)

    def _resync(self, sub: Subscription) -> None:
        """Re-subscribe ``sub`` with ``recover`` now, if the link is up (else the
        reconnection does it)."""
        ws = self._ws
        if not self._link_up or ws is None:
            return
        sub._resync_inflight = True

        async def resync() -> None:
            with contextlib.suppress(ConnectionClosed):
                await self._send_subscribe(sub, ws)

        task = asyncio.get_running_loop().create_task(resync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, item: Item, frame: dict[str, Any]) -> None:
        self._check_usable()
        if item._generation != self._generation or not self._link_up:
            raise ClientError(f"item {item.id!r} came on a connection that was lost; "
                              "the server delivers it again")
        await self._request(frame)

    # -- public API --------------------------------------------------------------

    def subscribe(
        self, pattern: str, *, join_leave: bool = False, recover: bool = True
    ) -> Subscription:
        """A subscription to a channel or an MQTT-style pattern (``chat/+``, ``a/#``).

        Use it as ``async with``; one active subscription per pattern and client
        (the server keeps one per connection). ``recover`` applies to exact
        channels: after a reconnect or a gap, missed publications are replayed
        from history. ``join_leave`` asks for join/leave events, read with
        ``Subscription.events()``.
        """
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("pattern must be a non-empty string")
        return Subscription(self, pattern, join_leave=join_leave, recover=recover,
                            buffer_size=self.buffer_size)

    async def publish(self, channel: str, data: Any) -> StreamPos:
        """Publish ``data`` (any JSON value); returns its position in the channel."""
        result = await self._request({"type": "publish", "channel": channel, "data": data})
        return StreamPos(int(result["offset"]), str(result["epoch"]))

    async def send(self, to: str | list[str], data: Any) -> int:
        """Send a direct message to one or many conn_ids; returns how many were reached."""
        targets = [to] if isinstance(to, str) else list(to)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError("to must be a conn_id or a non-empty list of them")
        result = await self._request({"type": "send", "to": to if isinstance(to, str)
                                      else targets, "data": data})
        return int(result["sent"])

    def messages(self) -> AsyncIterator[Message]:
        """Direct messages to this client (from ``send`` or the server), in arrival order.

        One shared buffer: concurrent iterators split the messages between them.
        """
        return self._messages

    async def presence(self, channel: str) -> list[Member]:
        """Connections subscribed to ``channel`` right now, on every node."""
        result = await self._request({"type": "presence", "channel": channel})
        members = result.get("presence") or {}
        out: list[Member] = []
        for conn_id, raw in members.items():
            raw = raw if isinstance(raw, dict) else {}
            out.append(Member(str(raw.get("conn_id", conn_id)), raw.get("user"), raw.get("info")))
        return out

    async def presence_stats(self, channel: str) -> dict[str, int]:
        """``{"num_clients": N, "num_users": M}`` of ``channel``."""
        result = await self._request({"type": "presence_stats", "channel": channel})
        return {str(k): int(v) for k, v in result.items()}

    async def history(
        self,
        channel: str,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        """Kept publications of ``channel`` (after ``since``) and its current position."""
        frame: dict[str, Any] = {"type": "history", "channel": channel}
        if since is not None:
            frame["since"] = {"offset": since.offset, "epoch": since.epoch}
        if limit is not None:
            if limit < 0:
                raise ValueError("limit must be >= 0")
            frame["limit"] = limit
        if reverse:
            frame["reverse"] = True
        result = await self._request(frame)
        return HistoryPage([_publication(p) for p in result.get("publications") or ()],
                           int(result.get("offset", 0)), str(result.get("epoch", "")),
                           bool(result.get("recovered", True)))

    async def ping(self) -> float:
        """Round trip to the server, in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._request({"type": "ping"})
        return loop.time() - start

    async def pull(self, queue: str, max: int = 1) -> None:
        """Become a consumer of ``queue`` with at most ``max`` items in flight.

        Items then arrive in ``items(queue)``; the pull is re-issued after a
        reconnect (unacked items of the lost connection are redelivered).
        """
        if not isinstance(queue, str) or not queue:
            raise ValueError("queue must be a non-empty string")
        if not isinstance(max, int) or max < 1:
            raise ValueError("max must be an integer >= 1")
        self._item_inbox(queue)
        await self._request({"type": "pull", "queue": queue, "max": max})
        self._pulls[queue] = max

    def items(self, queue: str) -> AsyncIterator[Item]:
        """Items of ``queue`` handed to this client (after ``pull``)."""
        return self._item_inbox(queue)

    def _item_inbox(self, queue: str) -> _Inbox[Item]:
        inbox = self._items.get(queue)
        if inbox is None:
            inbox = self._items[queue] = _Inbox(None)
            if self._stopped:
                inbox.close(self._error)
        return inbox
