"""``ipc:///abs/path/relay.sock``: the workers of one host, through the built-in relay.

``tidings serve --workers N`` starts a :class:`tidings.brokers.ipc.relay.Relay` in the
supervisor and gives every worker an ``ipc://`` URL to its Unix socket. The
relay owns offsets, history and presence (one :class:`MemoryBus`); this
broker is a thin, pipelined client of it: every call is one request frame
with an id, many calls share the socket without waiting for each other, and
replies are matched by id. Publications, events and node messages pushed by
the relay are handed to the hub in the order they arrive, which is the
relay's per-channel offset order.

Faults. When the relay goes away (or stops answering for ``timeout``
seconds) the broker reports down once, fails the calls in flight and every
new call with :class:`~tidings.exceptions.BrokerUnavailable` at once, and
reconnects in the background with exponential backoff and jitter. On
reconnect it registers the node again, then restores every pattern the hub
still wants and every presence member it added (announcing them with
``join``, since the relay said ``leave`` when the link dropped) before it
reports up. Interest changes made while down are remembered, so they are
part of the restore even though the call raised.

Work queues. :meth:`IpcBroker.queue_store` is a thin proxy of the relay's
in-memory store (:mod:`tidings.brokers.memory_queue`), so the workers share
their queues: a push on one worker reaches a puller on any other. The items
live in the relay's process: they survive a worker's crash (its leases go back
at once) but not the relay (after a relay restart the queues are empty). While
the relay is unreachable every queue call raises ``BrokerUnavailable`` at once.

URL options: ``?timeout=SECONDS`` (default 5): how long a request may go
unanswered before the link is declared dead.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from tidings.brokers.base import (
    BrokerHandler,
    BrokerHealth,
    HistoryOptions,
    PublishDone,
    QueueStoreStats,
    StoredItem,
)
from tidings.brokers.ipc.wire import (
    READ_CHUNK,
    FrameReader,
    FrameWriter,
    dumps,
    pack_data,
    unpack_item,
    unpack_publication,
    unpack_publications,
)
from tidings.exceptions import BrokerError, BrokerUnavailable, QueueFull
from tidings.types import HistoryPage, Member, Publication, StreamPos

__all__ = ["IpcBroker", "IpcQueueStore"]

log = logging.getLogger("tidings.brokers.ipc.broker")

_WRITE_HIGH = 4 << 20  # queued request bytes before callers wait for the socket
_WRITE_LIMIT = 1 << 62  # the worker side never drops itself; it waits (drain) instead


class _Link:
    """One connection to the relay and the requests in flight on it."""

    __slots__ = ("dead", "last_rx", "out", "pending", "reader", "task", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.out = FrameWriter(writer.transport, _WRITE_LIMIT)
        # id -> (future, loop time sent); insertion order = age order
        self.pending: dict[int, tuple[asyncio.Future[Any], float]] = {}
        self.task: asyncio.Task[None] | None = None
        self.dead = False  # frames still buffered on a dead link are not delivered
        self.last_rx = asyncio.get_running_loop().time()  # when the relay last sent bytes

    def fail(self, exc: BaseException) -> None:
        pending, self.pending = self.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def abort(self) -> None:
        self.writer.transport.abort()


class _PublishRun:
    """Consecutive ``publish_then`` calls of one event-loop turn to one channel,
    with one sender and history setting: one ``pubm`` request at the end of
    the turn (when the turn's frames are written anyway), or before any other
    request, so the relay gets every request in the order it was made."""

    __slots__ = ("channel", "dones", "link", "rows", "sender", "size", "ttl")

    def __init__(self, link: _Link, channel: str, sender: str | None, size: int | None,
                 ttl: float | None) -> None:
        self.link = link
        self.channel = channel
        self.sender = sender
        self.size = size
        self.ttl = ttl
        self.rows: list[tuple[orjson.Fragment, bool]] = []  # (encoded data, base64)
        self.dones: list[tuple[PublishDone, Any]] = []  # (callback, the caller's data)

    def settle(self, reply: asyncio.Future[Any]) -> None:
        """The relay's answer: each publish its publication (consecutive
        offsets from the first), or the error."""
        if reply.cancelled():
            outcome: BaseException | None = BrokerUnavailable("the publish was cancelled")
        else:
            outcome = reply.exception()
        if outcome is not None:
            for done, _ in self.dones:
                done(outcome)
            return
        first, epoch, ts = reply.result()
        channel, sender = self.channel, self.sender
        for i, (done, data) in enumerate(self.dones):
            done(Publication(channel, data, first + i, epoch, sender, ts))


class IpcBroker:
    """Client of the single-host relay; see the module docstring."""

    def __init__(self, url: str, *, backoff_base: float = 0.05, backoff_cap: float = 2.0
                 ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ipc" or parts.netloc not in ("", "localhost"):
            raise ValueError(f"an ipc broker URL is ipc:///absolute/path.sock, not {url!r}")
        if not parts.path.startswith("/"):
            raise ValueError(f"the ipc socket path must be absolute in {url!r}")
        query = parse_qs(parts.query)
        self.url = url
        self.path = parts.path
        self.timeout = float(query.get("timeout", ["5"])[0])
        if self.timeout <= 0:
            raise ValueError("the ipc timeout must be positive")
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._token = secrets.token_hex(8)  # tells the relay "my reconnection", not a clash
        self._node: str | None = None
        self._handler: BrokerHandler | None = None
        self._link: _Link | None = None
        self._next_id = 0
        self._up = False
        self._reason = "not connected"
        self._closed = True
        self._patterns: set[str] = set()
        self._members: dict[str, dict[str, Member]] = {}
        self._reconnect_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._queue_store: IpcQueueStore | None = None
        self._run: _PublishRun | None = None  # publish_then calls waiting for the turn's end

    def queue_store(self) -> IpcQueueStore:
        """Work queues held by the relay, shared by every worker on it."""
        if self._queue_store is None:
            self._queue_store = IpcQueueStore(self)
        return self._queue_store

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        """Register ``node_id`` at the relay; raises BrokerUnavailable if it is not there.

        Failing fast here (rather than retrying in the background) turns a
        wrong socket path into a clear startup error instead of a node that
        silently never joins the others.
        """
        if not self._closed:
            raise RuntimeError("this ipc broker is already connected")
        self._node, self._handler, self._closed = node_id, handler, False
        try:
            await self._open(announce=False)
        except (OSError, TimeoutError, BrokerUnavailable) as exc:
            self._closed = True
            raise BrokerUnavailable(f"cannot reach the relay at {self.path}: {exc}") from exc
        except BaseException:
            self._closed = True
            raise
        self._watchdog_task = asyncio.get_running_loop().create_task(self._watchdog())

    async def close(self) -> None:
        """Leave the relay (it drops our subscriptions and members). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._up = False
        self._reason = "closed"
        for task in (self._reconnect_task, self._watchdog_task):
            if task is not None:
                task.cancel()
        link, self._link = self._link, None
        if link is not None:
            link.fail(BrokerUnavailable("the ipc broker was closed"))
            link.out.flush()
            link.writer.close()
            if link.task is not None:
                await asyncio.wait([link.task], timeout=1.0)
                if not link.task.done():
                    link.abort()
                    await asyncio.wait([link.task], timeout=1.0)
        for task in (self._reconnect_task, self._watchdog_task):
            if task is not None and not task.done():
                await asyncio.wait([task], timeout=1.0)
        self._reconnect_task = self._watchdog_task = None

    def health(self) -> BrokerHealth:
        return BrokerHealth(self._up, self._reason)

    async def _open(self, *, announce: bool) -> None:
        """Connect, say hello, restore interest and presence, then report up."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(self.path, limit=READ_CHUNK), self.timeout)
        loop = asyncio.get_running_loop()
        link = _Link(reader, writer)
        link.task = loop.create_task(self._read_loop(link))
        # A relay that accepts but never answers must not stall us: abort the link
        # after ``timeout`` of silence (not of total time: a big restore may take longer).
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal timer
            if loop.time() - link.last_rx > self.timeout:
                link.abort()
            else:
                timer = loop.call_at(link.last_rx + self.timeout + 0.01, check)

        timer = loop.call_later(self.timeout, check)
        try:
            await self._rpc(link, "hello", self._node, self._token)
            await self._restore(link, announce)
        except BaseException:
            link.abort()
            raise
        finally:
            timer.cancel()

    async def _restore(self, link: _Link, announce: bool) -> None:
        """Send every wanted pattern and member; mark up with no await after the last check.

        The hub may change its interest while this runs (its calls raise since
        we are still down, but the sets here record them), so loop until one
        pass finds nothing new to send.
        """
        sent_patterns: set[str] = set()
        sent_members: dict[tuple[str, str], Member] = {}
        while True:
            want_patterns = set(self._patterns)
            want_members = {(channel, conn_id): member
                            for channel, members in self._members.items()
                            for conn_id, member in members.items()}
            ops: list[tuple[Any, ...]] = []
            ops += [("sub", p) for p in want_patterns - sent_patterns]
            ops += [("unsub", p) for p in sent_patterns - want_patterns]
            ops += [("madd", ch, m.conn_id, m.user, m.info, announce)
                    for (ch, cid), m in want_members.items() if sent_members.get((ch, cid)) != m]
            ops += [("mrem", ch, cid) for (ch, cid) in sent_members.keys() - want_members.keys()]
            if not ops:
                break
            await asyncio.gather(*(self._rpc(link, *op) for op in ops))
            sent_patterns, sent_members = want_patterns, want_members
        if self._closed:
            raise BrokerUnavailable("closed while connecting")
        self._link = link
        self._up, self._reason = True, ""
        if self._handler is not None:
            self._handler.on_broker_state(BrokerHealth(True))

    def _lost(self, link: _Link, reason: str) -> None:
        """A link died: fail its requests; if it was the live one, go down and reconnect."""
        link.dead = True
        link.fail(BrokerUnavailable(reason))
        if link is not self._link:
            return
        self._link = None
        was_up, self._up, self._reason = self._up, False, reason
        if self._closed:
            return
        if was_up and self._handler is not None:
            self._handler.on_broker_state(BrokerHealth(False, reason))
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closed:
            delay = min(self.backoff_cap, self.backoff_base * 2 ** min(attempt, 16))
            await asyncio.sleep(random.uniform(delay / 2, delay))  # jitter: no herd
            attempt += 1
            try:
                await self._open(announce=True)
            except (OSError, TimeoutError, BrokerError) as exc:
                self._reason = f"relay unreachable: {exc}"
                log.debug("reconnect %d to %s failed: %s", attempt, self.path, exc)
            else:
                log.debug("reconnected to %s after %d attempts", self.path, attempt)
                return

    async def _watchdog(self) -> None:
        """Declare the link dead when a request waited ``timeout`` and the relay sent
        nothing at all meanwhile (a relay busy with a backlog keeps sending replies,
        so a long queue is not mistaken for a hung relay)."""
        tick = min(1.0, self.timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            link = self._link
            if link is None or not link.pending:
                continue
            _, sent = next(iter(link.pending.values()))
            if loop.time() - max(sent, link.last_rx) > self.timeout:
                self._lost(link, f"the relay did not answer within {self.timeout:g} s")
                link.abort()

    async def _read_loop(self, link: _Link) -> None:
        frames = FrameReader()
        loop = asyncio.get_running_loop()
        reason = "the relay closed the connection"
        try:
            while True:
                data = await link.reader.read(READ_CHUNK)
                if not data:
                    break
                link.last_rx = loop.time()
                self._dispatch_read(link, frames.feed(data))
        except (ConnectionError, OSError) as exc:
            reason = f"connection to the relay lost: {exc}"
        except ValueError as exc:
            reason = f"bad frame from the relay: {exc}"
            link.abort()
        finally:
            self._lost(link, reason)
            link.writer.close()

    def _dispatch_read(self, link: _Link, msgs: list[Any]) -> None:
        """One read's frames, in order; consecutive publications of one channel
        reach the hub as one batch (one fan-out: one write per subscriber for
        all of them, as a local producer's burst gets)."""
        run: list[Publication] = []
        for msg in msgs:
            head = msg[0]
            if head == "p" or head == "P":
                try:
                    pubs = ([unpack_publication(msg, 1)] if head == "p"
                            else unpack_publications(msg))
                except (ValueError, TypeError):  # (base64's errors are ValueErrors)
                    log.exception("node %s: bad publication frame from the relay", self._node)
                    continue
                if run and pubs and run[0].channel != pubs[0].channel:
                    self._deliver_run(link, run)
                    run = []
                run += pubs
                continue
            if run:
                self._deliver_run(link, run)
                run = []
            self._dispatch(link, msg)
        if run:
            self._deliver_run(link, run)

    def _deliver_run(self, link: _Link, pubs: list[Publication]) -> None:
        handler = self._handler
        if handler is None or link.dead:  # (a link still restoring does deliver)
            return
        try:
            if len(pubs) == 1:
                handler.on_publication(pubs[0])
            else:
                handler.on_publications(pubs)
        except Exception:  # the handler must not raise; never let it kill the link
            log.exception("handler of node %s failed on a relay frame", self._node)

    def _dispatch(self, link: _Link, msg: Any) -> None:
        head = msg[0]
        if type(head) is int:
            entry = link.pending.pop(head, None)
            if entry is not None and not entry[0].done():
                if msg[1]:
                    entry[0].set_result(msg[2])
                else:
                    entry[0].set_exception(BrokerError(f"relay refused: {msg[2]}"))
            return
        handler = self._handler
        if handler is None or link.dead:  # (a link still restoring does deliver)
            return
        try:
            if head == "e":
                handler.on_event(msg[1], msg[2])
            elif head == "n":
                handler.on_node_message(_unpack_payload(msg[1], msg[2]))
        except Exception:  # the handler must not raise; never let it kill the link
            log.exception("handler of node %s failed on a relay frame", self._node)

    # -- requests --------------------------------------------------------------------------

    def _rpc(self, link: _Link, op: str, *args: Any) -> asyncio.Future[Any]:
        """Send one request on ``link``; the future resolves with the relay's reply.
        Publishes still waiting in a run go first: requests keep their order."""
        if self._run is not None:
            self._send_run()
        self._next_id += 1
        rid = self._next_id
        frame = dumps([rid, op, *args])  # encode first: unencodable data raises here
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        link.pending[rid] = (fut, loop.time())
        link.out.send(frame)
        return fut

    async def _call(self, op: str, *args: Any) -> Any:
        link = self._link
        if link is None or not self._up:
            raise BrokerUnavailable(self._reason or "the relay is unreachable")
        fut = self._rpc(link, op, *args)
        if link.out.backlog() > _WRITE_HIGH:  # the relay reads slower than we write
            try:
                await link.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise BrokerUnavailable(str(exc)) from exc
        return await fut

    # -- pub/sub ---------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
        text: str | None = None,
    ) -> Publication:
        packed, b64 = pack_data(data)
        size, ttl = (history.size, history.ttl) if history is not None else (None, None)
        offset, epoch, ts = await self._call("pub", channel, packed, b64, sender, size, ttl)
        return Publication(channel, data, offset, epoch, sender, ts)

    def publish_then(self, channel: str, data: Any, *, sender: str | None = None,
                     history: HistoryOptions | None = None, text: str | None = None,
                     done: PublishDone) -> None:
        """Start ``publish`` without waiting (a PipelinedPublisher): the relay
        answers a link's requests in order, so ``done`` gets the outcomes in
        the order the publishes started, and a producer's burst reaches the
        relay, and the other workers, together instead of one round trip at a
        time. Publishes of one turn to one channel join a run (one request,
        see :class:`_PublishRun`), sent when the turn ends."""
        link = self._link
        if link is None or not self._up:
            done(BrokerUnavailable(self._reason or "the relay is unreachable"))
            return
        packed, b64 = pack_data(data)
        # encoded now: unencodable data raises to this caller, not to the whole run
        encoded = orjson.Fragment(dumps(packed))
        size, ttl = (history.size, history.ttl) if history is not None else (None, None)
        run = self._run
        if run is not None and (run.link is not link or run.channel != channel
                                or run.sender != sender or run.size != size
                                or run.ttl != ttl):
            self._send_run()
            run = None
        if run is None:
            run = self._run = _PublishRun(link, channel, sender, size, ttl)
            asyncio.get_running_loop().call_soon(self._end_of_turn)
        run.rows.append((encoded, b64))
        run.dones.append((done, data))

    def _end_of_turn(self) -> None:
        """The turn that started a run is over: send it, and write the link's
        frames now rather than a turn later (a lone publish waits no longer
        than it did before runs)."""
        run = self._run
        self._send_run()
        if run is not None and not run.link.dead:
            run.link.out.flush()

    def _send_run(self) -> None:
        """The waiting run as one request (a lone publish as a plain ``pub``)."""
        run, self._run = self._run, None
        if run is None:
            return
        link = run.link
        if link.dead or link is not self._link:  # lost meanwhile: its requests failed too
            failure = BrokerUnavailable(self._reason or "the relay is unreachable")
            for done, _ in run.dones:
                done(failure)
            return
        if len(run.rows) == 1:
            (data, b64), = run.rows
            future = self._rpc(link, "pub", run.channel, data, b64, run.sender, run.size,
                               run.ttl)
        else:
            future = self._rpc(link, "pubm", run.channel, run.sender, run.size, run.ttl,
                               run.rows)
        future.add_done_callback(run.settle)

    async def publish_event(self, channel: str, frame: str) -> None:
        await self._call("ev", channel, frame)

    # Interest and members are recorded before the call and whatever its outcome
    # (down, or closed between a hub's stop and start): the record is what a
    # (re)connection restores, so it must follow the hub's view exactly.

    async def subscribe(self, pattern: str) -> None:
        if pattern in self._patterns:
            return
        self._patterns.add(pattern)
        if not self._closed:
            await self._call("sub", pattern)

    async def unsubscribe(self, pattern: str) -> None:
        if pattern not in self._patterns:
            return
        self._patterns.discard(pattern)
        if not self._closed:
            await self._call("unsub", pattern)

    async def send_node(self, node_id: str, payload: bytes) -> None:
        await self._call("node", node_id, *pack_data(payload))

    async def send_all(self, payload: bytes) -> None:
        await self._call("all", *pack_data(payload))

    # -- history ---------------------------------------------------------------------------

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        offset, epoch = (since.offset, since.epoch) if since is not None else (None, None)
        rows, last, current, recovered = await self._call(
            "hist", channel, offset, epoch, limit, reverse)
        return HistoryPage([unpack_publication(row) for row in rows], last, current, recovered)

    async def remove_history(self, channel: str) -> None:
        await self._call("rmhist", channel)

    async def position(self, channel: str) -> StreamPos:
        offset, epoch = await self._call("pos", channel)
        return StreamPos(offset, epoch)

    # -- presence --------------------------------------------------------------------------

    async def add_member(self, channel: str, member: Member) -> None:
        self._members.setdefault(channel, {})[member.conn_id] = member
        if not self._closed:
            await self._call("madd", channel, member.conn_id, member.user, member.info, False)

    async def remove_member(self, channel: str, conn_id: str) -> None:
        members = self._members.get(channel)
        if members is not None:
            members.pop(conn_id, None)
            if not members:
                del self._members[channel]
        if not self._closed:
            await self._call("mrem", channel, conn_id)

    async def members(self, channel: str) -> list[Member]:
        rows = await self._call("mems", channel)
        return [Member(conn_id, user, info) for conn_id, user, info in rows]


class IpcQueueStore:
    """The :class:`~tidings.brokers.base.QueueStore` of an :class:`IpcBroker`: each
    call is one request to the relay, whose node for the leases is this broker's."""

    def __init__(self, broker: IpcBroker) -> None:
        self._broker = broker

    async def _call(self, op: str, *args: Any) -> Any:
        try:
            return await self._broker._call(op, *args)
        except BrokerUnavailable:
            raise
        except BrokerError as exc:
            head, _, rest = str(exc).partition("QueueFull: ")
            if rest and head == "relay refused: ":
                raise QueueFull(rest) from None
            raise

    async def push(self, queue: str, data: Any) -> str:
        item_id = await self._call("qpush", queue, *pack_data(data))
        return str(item_id)

    async def fetch(self, queue: str, count: int, *, block: float) -> list[StoredItem]:
        # a blocked fetch is a request without an answer for a while: keep it well
        # inside the silence after which the watchdog declares the relay dead
        block = min(block, self._broker.timeout / 2)
        rows = await self._call("qfetch", queue, count, block)
        return [unpack_item(row) for row in rows]

    async def ack(self, queue: str, item_ids: Sequence[str]) -> int:
        if not item_ids:
            return 0
        return int(await self._call("qack", queue, list(item_ids)))

    async def requeue(self, queue: str, item_id: str, attempts: int, *,
                      delay: float = 0.0, dead: bool = False) -> bool:
        return bool(await self._call("qreq", queue, item_id, attempts, delay, dead))

    async def claim(self, queue: str, *, min_idle: float, count: int,
                    max_attempts: int) -> list[StoredItem]:
        rows = await self._call("qclaim", queue, min_idle, count, max_attempts)
        return [unpack_item(row) for row in rows]

    async def release_delayed(self, queue: str) -> float | None:
        due = await self._call("qdelay", queue)
        return None if due is None else float(due)

    async def stats(self, queue: str) -> QueueStoreStats:
        length, in_flight, delayed, age = await self._call("qstats", queue)
        return QueueStoreStats(int(length), int(in_flight), int(delayed), float(age))

    async def release(self, queue: str) -> None:
        await self._call("qrel", queue)


def _unpack_payload(value: str, b64: bool) -> bytes:
    return base64.b64decode(value) if b64 else value.encode()
