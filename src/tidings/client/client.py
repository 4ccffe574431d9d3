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
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, Final, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from tidings.client.subscription import (
    ClientTimeout,
    Inbox,
    Item,
    MemberEvent,
    Message,
    Pending,
    Subscription,
    publication_from,
    retrieve,
)
from tidings.exceptions import ClientClosed, ClientError, ReplyError
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import pattern_matches
from tidings.protocol.native import dumps, loads
from tidings.types import HistoryPage, Member, StreamPos

__all__ = ["Client", "ClientTimeout", "Item", "MemberEvent", "Message", "Subscription"]

log = logging.getLogger("tidings.client.client")

T = TypeVar("T")

_CLOSE_TIMEOUT: Final = 2.0  # bounded wait for the websocket closing handshake
_NO_RECONNECT: Final = frozenset({1008})  # policy violation: retrying would repeat it


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
        self.ws: ClientConnection | None = None
        self.link_up = False  # socket open and welcomed: requests may be written
        self._ready = asyncio.Event()  # link up and subscriptions restored (or stopped)
        self.stopped = False
        self._closed = False
        self._error: ClientError | None = None
        self._runner: asyncio.Task[None] | None = None
        self.generation = 0
        self._next_id = 0
        self._pending: dict[int, Pending] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self._pulls: dict[str, int] = {}
        self._messages: Inbox[Message] = Inbox(buffer_size)
        self._items: dict[str, Inbox[Item]] = {}
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
        return self._ready.is_set() and not self.stopped

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected (e.g. after a drop); ``ClientTimeout`` past ``timeout``."""
        self.check_usable()
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                raise ClientTimeout(f"not connected within {timeout} s") from None
        self.check_usable()

    def _gone(self) -> bool:
        """``_stopped``, read after an await (a call, so type checkers do not narrow it)."""
        return self.stopped

    def check_usable(self) -> None:
        if self.stopped:
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
        if self.stopped:
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
        ws, self.ws = self.ws, None
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
        if self.stopped:
            return
        self.stopped = True
        self._error = error
        self.link_up = False
        self._ready.set()  # wake waiters: they see ``_stopped``
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.fail(ClientError(str(error)) if error is not None
                       else ClientClosed("the client was closed"))
        for sub in list(self.subscriptions.values()):
            sub.deactivate(error)
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
            if self.stopped:
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
        self.ws = ws
        self.generation += 1
        reader = loop.create_task(self._read_loop(ws), name="tidings-client-reader")
        # Snapshot and flag together (no await between): a subscription entered
        # from now on sends its own subscribe, the ones before are restored here.
        subs = list(self.subscriptions.values())
        pulls = dict(self._pulls)
        self.link_up = True
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
                    futures.append(await self.send_subscribe(sub, ws))
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
        if self.ws is ws and not self.stopped:
            self._ready.set()

    def _link_lost(self, ws: ClientConnection) -> None:
        if self.ws is ws:
            self.ws = None
        self.link_up = False
        if not self.stopped:
            self._ready.clear()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.fail(ClientError("connection lost before the reply"))
        for sub in self.subscriptions.values():
            sub.resync_inflight = False
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
            pub = publication_from(frame)
            for sub in list(self.subscriptions.values()):
                if pattern_matches(sub.pattern, pub.channel):
                    sub.offer(pub)
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
                                             self.generation))
        elif kind in ("join", "leave"):
            channel = frame["channel"]
            member = frame.get("member") or {}
            if not isinstance(channel, str) or not isinstance(member, dict):
                raise TypeError("a join/leave frame needs 'channel' and 'member'")
            user = member.get("user")
            event = MemberEvent(str(kind), channel, str(member.get("conn_id")),
                                user if isinstance(user, str) else None)
            for sub in list(self.subscriptions.values()):
                if sub.join_leave and pattern_matches(sub.pattern, channel):
                    sub.event_inbox.put_dropping_oldest(event)
        elif kind == "lagged":
            dropped = frame.get("dropped", 0)
            self.lagged += dropped if isinstance(dropped, int) else 0
            log.warning("the server dropped %s publications for this slow client", dropped)
            for sub in list(self.subscriptions.values()):
                if sub.recoverable:
                    sub.begin_recovery("the server reported dropped publications")
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

    def new_future(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(retrieve)
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
        future = self.new_future()
        self._pending[rid] = Pending(future, on_result, on_error)
        try:
            await ws.send(dumps({**frame, "id": rid}).decode())
        except ConnectionClosed:
            entry = self._pending.pop(rid, None)
            if entry is not None:
                entry.fail(ClientError("connection lost before the request was sent"))
            raise
        return future

    async def call_on(self, ws: ClientConnection, frame: dict[str, Any],
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
        self.check_usable()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.request_timeout)
            except TimeoutError:
                raise ClientTimeout(
                    f"{frame['type']}: not connected within {self.request_timeout} s"
                ) from None
            self.check_usable()
        ws = self.ws
        if ws is None:
            raise ClientError("connection lost before the request was sent")
        return await self.call_on(ws, frame, deadline)

    async def send_subscribe(self, sub: Subscription, ws: ClientConnection) -> asyncio.Future[Any]:
        frame: dict[str, Any] = {"type": "subscribe", "channel": sub.pattern}
        if sub.join_leave:
            frame["join_leave"] = True
        pos = sub.recover_from()
        if pos is not None:
            frame["recover"] = {"offset": pos.offset, "epoch": pos.epoch}
        sub.resync_inflight = True
        return await self._send(ws, frame, partial(sub.on_subscribed, pos is not None),
                                sub.on_subscribe_error)

    def resync(self, sub: Subscription) -> None:
        """Re-subscribe ``sub`` with ``recover`` now, if the link is up (else the
        reconnection does it)."""
        ws = self.ws
        if not self.link_up or ws is None:
            return
        sub.resync_inflight = True

        async def resync() -> None:
            with contextlib.suppress(ConnectionClosed):
                await self.send_subscribe(sub, ws)

        task = asyncio.get_running_loop().create_task(resync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, item: Item, frame: dict[str, Any]) -> None:
        self.check_usable()
        if item.generation != self.generation or not self.link_up:
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

    def items(self, queue: str) -> AsyncIterator[Item]:
        """Items of ``queue`` handed to this client (after ``pull``)."""
        return self._item_inbox(queue)

    def _item_inbox(self, queue: str) -> Inbox[Item]:
        inbox = self._items.get(queue)
        if inbox is None:
            inbox = self._items[queue] = Inbox(None)
            if self.stopped:
                inbox.close(self._error)
        return inbox

    # -- one request, one answer: publish, send, presence, history, ping, pull --------

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
        return HistoryPage([publication_from(p) for p in result.get("publications") or ()],
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
