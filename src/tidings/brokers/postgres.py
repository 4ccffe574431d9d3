"""``postgresql://`` (and ``postgres://``): publications through PostgreSQL.

URL: ``postgresql://user:pass@host:5432/db?prefix=tidings&presence_ttl=30&queue_max_len=1000000``
(``pool_size``, ``spill_ttl``, ``unlogged`` too; other query parameters go to asyncpg).

Design (details in docs/brokers-postgres.md):

- One function call per batch of publications, one round trip, one
  transaction (:mod:`tidings.brokers.postgres_schema`): per channel an upsert
  of its meta row (``top = top + n RETURNING``) assigns consecutive offsets,
  the history rows are inserted and the rows that left the size window are
  deleted by offset range, and the message is ``NOTIFY``-ed before commit. The
  row lock orders concurrent publishers of one channel on every node, and
  PostgreSQL delivers notifications in commit order, so delivery order is
  offset order. Publishes issued while a batch is on the wire go in the next
  one; consecutive ones of one channel are one message.
- Live delivery: a listener connection of its own (not from the pool)
  ``LISTEN``s to hashed names: one per exact channel, one of 64 buckets of the
  first level for a pattern (all 64 for a pattern starting with a wildcard);
  every publication is notified on its channel's name and its bucket, and
  exact filtering (:func:`~tidings.protocol.pattern_matches`) on receipt
  delivers each once.
- Messages over the NOTIFY payload limit go by reference: the body is written
  to a spill table in the same transaction and the notification carries its
  id; receivers read it (in order: later messages wait behind it).
- Presence: rows with an expiry (server clock) that each node refreshes every
  ``presence_ttl / 3`` s; a node killed -9 loses its members within the TTL.
- Work queues: :mod:`tidings.brokers.postgres_queue` (``FOR UPDATE SKIP LOCKED``).
- Faults: ``health()`` goes down when the listener connection is lost or stops
  answering; a reconnect loop with exponential backoff and full jitter
  recreates the schema if it is gone, LISTENs again and re-adds this node's
  members. While down, calls raise ``BrokerUnavailable`` only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from tidings.brokers.base import (
    BrokerHandler,
    BrokerHealth,
    Capabilities,
    HistoryOptions,
    PipelinedBroker,
    PublishDone,
    PublishOutcome,
    transition,
)
from tidings.brokers.postgres_queue import PostgresQueueStore
from tidings.brokers.postgres_schema import (
    NOTIFY_LIMIT,
    SEP,
    Names,
    decode_data,
    encode_data,
    schema_lock_key,
    schema_sql,
)
from tidings.exceptions import BrokerUnavailable
from tidings.protocol.names import is_pattern, pattern_matches
from tidings.types import HistoryPage, Member, Publication, StreamPos

__all__ = ["PostgresBroker", "parse_publications"]

log = logging.getLogger("tidings.brokers.postgres")

T = TypeVar("T")

_HEALTH_CHECK = 5.0  # seconds between pings on a quiet listener connection
_GROUP_MAX = 256
_BATCH_MAX = 4096  # publications per function call
# what a lost or refusing server raises
_DOWN = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
         asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, TimeoutError,
         ConnectionError)
_SCHEMA_GONE = (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError)

_PUBLISH = "SELECT r_first, r_epoch FROM {p}_publish($1::text[], $2::int[], $3::int[], " \
           "$4::bigint[], $5::text[], $6::text, $7::text[])"


def _publication(channel: str, offset: int, epoch: str, ts: str | int, sender: str,
                 raw: str) -> Publication:
    text = raw[1:] if raw[:1] == "j" else None  # kept: sent as is
    return Publication(channel, decode_data(raw), offset, epoch, sender or None, int(ts),
                       text=text)


def _head_channel(msg: str, start: int) -> tuple[str, int]:
    """The length-prefixed channel at ``start``; (channel, index after its SEP)."""
    end = msg.index(SEP, start)
    n = int(msg[start:end])
    return msg[end + 1:end + 1 + n], end + 2 + n


def parse_publications(msg: str) -> tuple[str, list[Publication]]:
    """The channel and publications of a ``P`` message (see postgres_schema)."""
    i = msg.index(SEP, 1)
    first = int(msg[1:i])
    j = msg.index(SEP, i + 1)
    epoch = msg[i + 1:j]
    channel, pos = _head_channel(msg, j + 1)
    return channel, parse_body(channel, first, epoch, msg, pos)


def parse_body(channel: str, first: int, epoch: str, body: str,
               pos: int = 0) -> list[Publication]:
    """The publications of a group's body (from ``pos``): offsets from ``first``."""
    out: list[Publication] = []
    size = len(body)
    offset = first
    while pos < size:
        ts_end = body.index(SEP, pos)
        sender_end = body.index(SEP, ts_end + 1)
        len_end = body.index(SEP, sender_end + 1)
        end = len_end + 1 + int(body[sender_end + 1:len_end])
        out.append(_publication(channel, offset, epoch, body[pos:ts_end],
                                body[ts_end + 1:sender_end], body[len_end + 1:end]))
        offset += 1
        pos = end + 1
    return out


def _message_channel(msg: str) -> str | None:
    """The channel a ``P`` or ``E`` message (or its head) is about."""
    kind = msg[:1]
    if kind == "E":
        return _head_channel(msg, 1)[0]
    if kind == "P":
        i = msg.index(SEP, 1)
        j = msg.index(SEP, i + 1)
        return _head_channel(msg, j + 1)[0]
    return None


def _encode_node(payload: bytes) -> str:
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        return "b" + base64.b64encode(payload).decode()
    return "t" + text


# channel, data, encoded data, JSON text, history size, ttl ms, ts, sender, callback
_Pending = tuple[str, Any, str, str | None, int, int, int, str, PublishDone]


class _Run:
    """Consecutive publications of one channel published as one group."""

    __slots__ = ("channel", "fields", "members", "nbytes", "room", "size", "ttl_ms")

    def __init__(self, channel: str, size: int, ttl_ms: int) -> None:
        self.channel = channel
        self.size = size
        self.ttl_ms = ttl_ms
        self.members: list[int] = []  # indexes in the batch
        self.fields: list[str] = []
        self.nbytes = 0
        # what the body may take for the message to stay inline: the head holds
        # the channel, the first offset and the epoch; a publication bigger than
        # that still goes alone, by reference
        self.room = NOTIFY_LIMIT - 80 - len(channel.encode())


class PostgresBroker(PipelinedBroker):
    """Broker, HistoryStore, PresenceStore and QueueStoreProvider on PostgreSQL."""

    capabilities = Capabilities(positions=True, history=True, presence=True, queues=True,
                                direct=True)

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError("not a PostgreSQL URL (postgresql://...)")
        # what the hub logs: the password masked
        self.url = (urlunsplit(parts._replace(netloc=parts.netloc.replace(
            f":{parts.password}@", ":***@"))) if parts.password else url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.prefix = query.pop("prefix", "tidings")
        self.names = Names(self.prefix)
        self.presence_ttl = float(query.pop("presence_ttl", "30"))
        self.queue_max_len = int(query.pop("queue_max_len", "1000000"))
        self.pool_size = int(query.pop("pool_size", "4"))
        self.spill_ttl = float(query.pop("spill_ttl", "60"))
        self.unlogged = query.pop("unlogged", "0").lower() in ("1", "true", "yes", "on")
        self.dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))
        self.node_id = ""
        self._handler: BrokerHandler | None = None
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listener_lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self._listening: dict[str, int] = {}  # LISTEN name -> how many interests want it
        self._exact: set[str] = set()
        self._patterns: set[str] = set()
        self._members: dict[str, dict[str, Member]] = {}  # our own, for refreshes
        self._health = BrokerHealth(False, "not connected")
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: list[_Pending] = []
        self._flush_scheduled = False
        self._flushing = False
        self._backlog: deque[tuple[str, str]] = deque()  # messages behind a spilled one
        self._resolving = False
        self._resolvers: set[asyncio.Task[None]] = set()
        self._swept_history = 0.0
        self._queue_waiters: dict[str, asyncio.Event] = {}
        self._queues: PostgresQueueStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sql_publish = _PUBLISH.replace("{p}", self.prefix)

    def queue_store(self) -> PostgresQueueStore:
        """Work queues in a table shared by every node on this database
        (see :mod:`tidings.brokers.postgres_queue`)."""
        if self._queues is None:
            self._queues = PostgresQueueStore(self, max_len=self.queue_max_len)
        return self._queues

    # -- connections ------------------------------------------------------------------

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        self.node_id = node_id
        self._handler = handler
        self._closing = False
        self._loop = asyncio.get_running_loop()
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.pool_size, timeout=5,
                command_timeout=30, reset=_no_reset)
            await self._ensure_schema()
            await self._open_listener()
        except (*_DOWN, asyncpg.PostgresError) as exc:
            await self._drop_connections()
            raise BrokerUnavailable(f"cannot reach PostgreSQL at {self._safe_dsn}: "
                                    f"{exc}") from exc
        self._set_health(BrokerHealth(True))
        loop = self._loop
        self._tasks = [loop.create_task(self._watch(), name=f"tidings-pg-{node_id}"),
                       loop.create_task(self._beat(), name=f"tidings-pg-beat-{node_id}")]

    async def migrate(self) -> None:
        """Create the tables and functions if missing, then let go
        (``tidings migrate --broker postgresql://...``; connect does it too)."""
        try:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=1,
                                                   timeout=5)
            await self._ensure_schema()
        except _DOWN as exc:
            raise BrokerUnavailable(f"cannot reach PostgreSQL at {self._safe_dsn}: "
                                    f"{exc}") from exc
        finally:
            await self._drop_connections()

    @property
    def _safe_dsn(self) -> str:
        parts = urlsplit(self.dsn)
        host = parts.hostname or ""
        return f"{host}:{parts.port or 5432}{parts.path}"

    async def _ensure_schema(self) -> None:
        """Create the tables and functions if they are missing (idempotent), under
        an advisory lock so that nodes starting together do not race."""
        pool = self._require_pool()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", schema_lock_key(self.prefix))
            await conn.execute(schema_sql(self.prefix, unlogged=self.unlogged))

    async def _open_listener(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn, timeout=5)
        try:
            for name in (self.names.node(self.node_id), self.names.all, *self._listening):
                await conn.add_listener(name, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        old, self._listener = self._listener, conn
        self._lost = asyncio.Event()
        lost = self._lost
        conn.add_termination_listener(lambda _conn: lost.set())
        if old is not None:
            old.terminate()

    async def _drop_connections(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()

    def _require_pool(self) -> asyncpg.Pool:
        pool = self._pool
        if pool is None:
            raise BrokerUnavailable("not connected")
        return pool

    async def run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``work`` on a pooled connection; connection failures as
        ``BrokerUnavailable``, and a missing schema (dropped under us) made again
        once. For the queue store too."""
        for attempt in range(2):
            pool = self._require_pool()
            try:
                async with pool.acquire() as conn:
                    return await work(conn)
            except _SCHEMA_GONE:
                if attempt:
                    raise
                await self._ensure_schema_or_unavailable()
            except _DOWN as exc:
                raise BrokerUnavailable(f"PostgreSQL unreachable: {exc}") from exc
        raise AssertionError("unreachable")

    async def _ensure_schema_or_unavailable(self) -> None:
        try:
            await self._ensure_schema()
        except _DOWN as exc:
            raise BrokerUnavailable(f"PostgreSQL unreachable: {exc}") from exc

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._tasks, *self._resolvers]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        if self._pool is not None and self._health.up and self._members:
            try:
                await asyncio.wait_for(self.run(partial(_delete_members, self)), 5)
            except (BrokerUnavailable, TimeoutError, asyncpg.PostgresError):
                pass
        self._members.clear()
        if self._queues is not None:
            await self._queues.close()
        await self._drop_connections()
        for waiter in self._queue_waiters.values():
            waiter.set()
        self._health = BrokerHealth(False, "closed")

    def health(self) -> BrokerHealth:
        return self._health

    def _stopped(self) -> bool:
        return self._closing

    def _set_health(self, health: BrokerHealth) -> None:
        self._health = transition(self._handler, self._health, health)

    async def _watch(self) -> None:
        """Wait while the listener works; on loss, reconnect with backoff."""
        while not self._closing:
            try:
                await self._supervise()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopped():
                    return
                self._set_health(BrokerHealth(False, f"PostgreSQL unreachable: {exc}"))
            backoff = 0.1
            while not self._closing:  # exponential backoff, full jitter
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, 5.0)
                try:
                    await self._reopen()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("PostgreSQL reconnect failed: %s", exc)
                    continue
                self._set_health(BrokerHealth(True))
                await self._refresh_members()
                for waiter in self._queue_waiters.values():
                    waiter.set()  # blocked fetches look again
                break

    async def _supervise(self) -> None:
        while True:
            lost = self._lost
            try:
                await asyncio.wait_for(lost.wait(), _HEALTH_CHECK)
            except TimeoutError:
                listener = self._listener
                if listener is None:
                    raise ConnectionError("no listener connection") from None
                async with self._listener_lock:
                    await asyncio.wait_for(listener.fetchval("SELECT 1"), _HEALTH_CHECK)
                continue
            raise ConnectionError("listener connection to PostgreSQL lost")

    async def _reopen(self) -> None:
        pool = self._require_pool()
        await pool.expire_connections()  # the pooled ones died with the server
        await self._ensure_schema()
        async with self._listener_lock:
            await self._open_listener()

    # -- receiving --------------------------------------------------------------------

    def _on_notify(self, _conn: object, _pid: int, name: str, payload: str) -> None:
        """A notification (on the event loop, from the listener connection)."""
        try:
            if self._backlog:  # a spilled message is being read: keep the order
                self._backlog.append((name, payload))
                return
            if payload[:1] == "@":
                self._backlog.append((name, payload))
                if not self._resolving:
                    self._resolving = True
                    task = asyncio.get_running_loop().create_task(self._resolve())
                    self._resolvers.add(task)
                    task.add_done_callback(self._resolvers.discard)
                return
            self._handle(name, payload)
        except Exception:  # one bad message must not stop the listener
            log.exception("cannot deliver a notification from PostgreSQL")

    async def _resolve(self) -> None:
        """Read spilled bodies in order; deliver what waited behind them."""
        try:
            while self._backlog:
                name, payload = self._backlog[0]
                if payload[:1] == "@":
                    sep = payload.index(SEP)
                    spill_id, head = int(payload[1:sep]), payload[sep + 1:]
                    if self._wanted(name, head):
                        body = await self._spilled(spill_id)
                        payload = head + body if body is not None else ""
                    else:
                        payload = ""
                self._backlog.popleft()
                if payload:
                    try:
                        self._handle(name, payload)
                    except Exception:
                        log.exception("cannot deliver a notification from PostgreSQL")
        finally:
            self._resolving = False

    async def _spilled(self, spill_id: int) -> str | None:
        sql = f"SELECT body FROM {self.prefix}_spill WHERE id = $1"
        for _ in range(50):
            try:
                body: str | None = await self.run(lambda conn: conn.fetchval(sql, spill_id))
                if body is None:
                    log.warning("spilled message %d is gone (older than spill_ttl)", spill_id)
                return body
            except BrokerUnavailable:
                if self._closing:
                    return None
                await asyncio.sleep(0.1)
        log.warning("cannot read spilled message %d: PostgreSQL unreachable", spill_id)
        return None

    def _wanted(self, name: str, msg: str) -> bool:
        kind = self.names.kind(name)
        if kind in ("n", "a", "q"):
            return True
        channel = _message_channel(msg)
        return channel is not None and self._accepts(kind, channel)

    def _accepts(self, kind: str, channel: str) -> bool:
        """Exactly once per node: through the channel's own name when no pattern
        of ours matches it, else through its bucket."""
        matched = False
        for pattern in self._patterns:
            if pattern_matches(pattern, channel):
                matched = True
                break
        if kind == "t":
            return matched
        return not matched and channel in self._exact

    def _handle(self, name: str, msg: str) -> None:
        handler = self._handler
        if handler is None:
            return
        kind = self.names.kind(name)
        first = msg[:1]
        if kind == "q":
            waiter = self._queue_waiters.get(name)
            if waiter is not None:
                waiter.set()
            return
        if first == "N":
            body = msg[2:]
            handler.on_node_message(base64.b64decode(body) if msg[1:2] == "b"
                                    else body.encode())
            return
        if first == "P":
            channel, pubs = parse_publications(msg)
            if not self._accepts(kind, channel):
                return
            if len(pubs) == 1:
                handler.on_publication(pubs[0])
            else:
                handler.on_publications(pubs)
        elif first == "E":
            channel, pos = _head_channel(msg, 1)
            if self._accepts(kind, channel):
                handler.on_event(channel, msg[pos:])
        else:
            log.warning("unexpected notification on %s: %.40r", name, msg)

    # -- interest ---------------------------------------------------------------------

    async def _listen(self, names: Sequence[str]) -> None:
        async with self._listener_lock:
            for name in names:
                count = self._listening.get(name, 0)
                self._listening[name] = count + 1
                listener = self._listener
                if count == 0 and listener is not None and self._health.up:
                    try:
                        await listener.add_listener(name, self._on_notify)
                    except (*_DOWN, asyncpg.PostgresError) as exc:
                        # the reconnect LISTENs to everything in _listening
                        log.debug("LISTEN %s failed: %s", name, exc)

    async def _unlisten(self, names: Sequence[str]) -> None:
        async with self._listener_lock:
            for name in names:
                count = self._listening.get(name, 0)
                if count > 1:
                    self._listening[name] = count - 1
                    continue
                self._listening.pop(name, None)
                listener = self._listener
                if count == 1 and listener is not None and self._health.up:
                    try:
                        await listener.remove_listener(name, self._on_notify)
                    except (*_DOWN, asyncpg.PostgresError) as exc:
                        log.debug("UNLISTEN %s failed: %s", name, exc)

    def _pattern_names(self, pattern: str) -> list[str]:
        head = pattern.split("/", 1)[0]
        if head in ("+", "#"):
            return self.names.tops()
        return [self.names.top(head)]

    async def subscribe(self, pattern: str) -> None:
        """LISTEN before returning, so a history read made right after cannot
        miss a publication that is not delivered live."""
        if is_pattern(pattern):
            if pattern in self._patterns:
                return
            self._patterns.add(pattern)
            await self._listen(self._pattern_names(pattern))
        else:
            if pattern in self._exact:
                return
            self._exact.add(pattern)
            await self._listen([self.names.exact(pattern)])

    async def unsubscribe(self, pattern: str) -> None:
        if is_pattern(pattern):
            if pattern not in self._patterns:
                return
            self._patterns.discard(pattern)
            await self._unlisten(self._pattern_names(pattern))
        elif pattern in self._exact:
            self._exact.discard(pattern)
            await self._unlisten([self.names.exact(pattern)])

    async def watch_queue(self, queue: str) -> asyncio.Event:
        """The event set when an item of ``queue`` may be waiting (LISTENed once)."""
        name = self.names.queue(queue)
        waiter = self._queue_waiters.get(name)
        if waiter is None:
            waiter = self._queue_waiters[name] = asyncio.Event()
            await self._listen([name])
        return waiter

    async def unwatch_queue(self, queue: str) -> None:
        name = self.names.queue(queue)
        waiter = self._queue_waiters.pop(name, None)
        if waiter is not None:
            waiter.set()
            await self._unlisten([name])

    # -- publishing -------------------------------------------------------------------

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
        """``publish_soon`` with a callback: ``done`` gets the publication or
        ``BrokerUnavailable``, in the order the publishes were started."""
        if not self._health.up:
            done(BrokerUnavailable(self._health.reason or "PostgreSQL unreachable"))
            return
        size, ttl_ms = 0, 0
        if history is not None and history.enabled:
            size, ttl_ms = history.size, int(history.ttl * 1000)
        encoded = encode_data(data) if text is None else "j" + text
        self._pending.append((channel, data, encoded, text, size, ttl_ms,
                              int(time.time() * 1000), sender or "", done))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        if self._pending and not self._flushing:
            self._flushing = True
            (self._loop or asyncio.get_running_loop()).create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """One batch on the wire at a time: what queues up meanwhile goes in the
        next, bigger, one; batches commit in the order they were made."""
        try:
            while self._pending:
                batch = self._pending[:_BATCH_MAX]
                del self._pending[:_BATCH_MAX]
                await self._settle(batch)
        finally:
            self._flushing = False

    async def _settle(self, batch: list[_Pending]) -> None:
        # groups: runs of one channel with the same history settings, each small
        # enough to notify inline; then sorted by channel (stable), so that two
        # nodes' batches lock meta rows in one order (no deadlock)
        runs: list[_Run] = []
        last: dict[str, _Run] = {}
        for i, (channel, _, encoded, _, size, ttl_ms, ts, sender, _) in enumerate(batch):
            field = f"{ts}{SEP}{sender}{SEP}{len(encoded)}{SEP}{encoded}"
            nbytes = len(field) + 1 if field.isascii() else len(field.encode()) + 1
            run = last.get(channel)
            if (run is None or run.size != size or run.ttl_ms != ttl_ms
                    or len(run.members) >= _GROUP_MAX or run.nbytes + nbytes > run.room):
                run = _Run(channel, size, ttl_ms)
                runs.append(run)
                last[channel] = run
            run.members.append(i)
            run.fields.append(field)
            run.nbytes += nbytes
        runs.sort(key=lambda r: r.channel)
        chans = [r.channel for r in runs]
        counts = [len(r.members) for r in runs]
        sizes = [r.size for r in runs]
        ttls = [r.ttl_ms for r in runs]
        targets = [self.names.targets(r.channel) for r in runs]
        bodies = [SEP.join(r.fields) for r in runs]
        epoch = secrets.token_hex(4)
        try:
            rows = await self.run(lambda conn: conn.fetch(
                self._sql_publish, chans, counts, sizes, ttls, targets, epoch, bodies))
            failure: BaseException | None = None
        except Exception as exc:
            rows, failure = [], exc
        outcomes: list[PublishOutcome | None] = [None] * len(batch)
        if failure is not None:
            down = BrokerUnavailable(f"publish failed: {failure}")
            outcomes = [down] * len(batch)
        else:
            for run, row in zip(runs, rows, strict=True):
                channel, first, channel_epoch = run.channel, row[0], row[1]
                for k, i in enumerate(run.members):
                    _, data, _, text, _, _, ts, sender, _ = batch[i]
                    outcomes[i] = Publication(channel, data, first + k, channel_epoch,
                                              sender or None, ts, text=text)
        for item, outcome in zip(batch, outcomes, strict=True):
            try:
                item[8](outcome if outcome is not None else BrokerUnavailable("lost"))
            except Exception:  # one caller's bug must not cost the others their answer
                log.exception("publish callback failed")

    async def publish_event(self, channel: str, frame: str) -> None:
        head = f"E{len(channel)}{SEP}{channel}{SEP}"
        await self._send(self.names.targets(channel).split(" "), head, frame)

    async def send_node(self, node_id: str, payload: bytes) -> None:
        await self._send([self.names.node(node_id)], "N", _encode_node(payload))

    async def send_all(self, payload: bytes) -> None:
        await self._send([self.names.all], "N", _encode_node(payload))

    async def _send(self, names: list[str], head: str, body: str) -> None:
        if not self._health.up:
            raise BrokerUnavailable(self._health.reason or "PostgreSQL unreachable")
        sql = f"SELECT {self.prefix}_send($1::text[], $2::text, $3::text)"
        await self.run(lambda conn: conn.execute(sql, names, head, body))

    # -- history ----------------------------------------------------------------------

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        p = self.prefix
        after = since.offset if since is not None else 0
        rows_sql = (f"SELECT first_o, body FROM {p}_history WHERE channel = $1 "
                    f"AND last_o > $2 AND last_o > $3 AND exp > $4 ORDER BY first_o")

        async def read(conn: asyncpg.Connection) -> tuple[Any, list[Any]]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                meta = await conn.fetchrow(
                    f"SELECT top, epoch, size, ({p}_now() * 1000)::bigint AS now "
                    f"FROM {p}_meta WHERE channel = $1", channel)
                if meta is None:
                    return None, []
                low = meta["top"] - meta["size"]
                return meta, await conn.fetch(rows_sql, channel, after, low, meta["now"])

        meta, rows = await self.run(read)
        if meta is None:  # never published, or the state was lost: start an epoch
            epoch = await self._ensure_epoch(channel)
            return HistoryPage([], 0, epoch, since is None or since.offset == 0)
        offset, epoch = int(meta["top"]), str(meta["epoch"])
        low = max(after, offset - int(meta["size"]))
        pubs = [pub for row in rows
                for pub in parse_body(channel, int(row["first_o"]), epoch, row["body"])
                if pub.offset > low]
        recovered = True
        if since is not None:
            if since.epoch != epoch:
                recovered, pubs = False, []
            elif since.offset < offset:
                first = pubs[0].offset if pubs else offset + 1
                recovered = since.offset + 1 >= first
        if reverse:
            pubs.reverse()
        if limit is not None:
            pubs = pubs[:limit]
        return HistoryPage(pubs, offset, epoch, recovered)

    async def _ensure_epoch(self, channel: str) -> str:
        p = self.prefix
        sql = (f"WITH i AS (INSERT INTO {p}_meta (channel, top, epoch) VALUES ($1, 0, $2) "
               f"ON CONFLICT (channel) DO NOTHING RETURNING epoch) "
               f"SELECT epoch FROM i UNION ALL SELECT epoch FROM {p}_meta WHERE channel = $1 "
               f"LIMIT 1")
        epoch: str = await self.run(lambda conn: conn.fetchval(sql, channel,
                                                               secrets.token_hex(4)))
        return epoch

    async def remove_history(self, channel: str) -> None:
        p = self.prefix

        async def remove(conn: asyncpg.Connection) -> None:
            # the meta row first, as publishes do: one lock order, no deadlock
            async with conn.transaction():
                await conn.execute(
                    f"INSERT INTO {p}_meta AS m (channel, top, epoch) VALUES ($1, 0, $2) "
                    f"ON CONFLICT (channel) DO UPDATE SET epoch = EXCLUDED.epoch",
                    channel, secrets.token_hex(4))
                await conn.execute(f"DELETE FROM {p}_history WHERE channel = $1", channel)

        await self.run(remove)

    async def position(self, channel: str) -> StreamPos:
        sql = f"SELECT top, epoch FROM {self.prefix}_meta WHERE channel = $1"
        row = await self.run(lambda conn: conn.fetchrow(sql, channel))
        if row is None:
            return StreamPos(0, await self._ensure_epoch(channel))
        return StreamPos(int(row["top"]), str(row["epoch"]))

    # -- presence ---------------------------------------------------------------------

    async def add_member(self, channel: str, member: Member) -> None:
        self._members.setdefault(channel, {})[member.conn_id] = member
        if self._pool is None or not self._health.up:
            return  # written at the refresh after the reconnect
        p = self.prefix
        sql = (f"INSERT INTO {p}_presence (channel, conn_id, node, member, expires) "
               f"VALUES ($1, $2, $3, $4, {p}_now() + $5) ON CONFLICT (channel, conn_id) "
               f"DO UPDATE SET node = EXCLUDED.node, member = EXCLUDED.member, "
               f"expires = EXCLUDED.expires")
        text = orjson.dumps(member.to_dict()).decode()
        await self.run(lambda conn: conn.execute(sql, channel, member.conn_id, self.node_id,
                                                 text, self.presence_ttl))

    async def remove_member(self, channel: str, conn_id: str) -> None:
        ours = self._members.get(channel)
        if ours is not None:
            ours.pop(conn_id, None)
            if not ours:
                del self._members[channel]
        sql = f"DELETE FROM {self.prefix}_presence WHERE channel = $1 AND conn_id = $2"
        await self.run(lambda conn: conn.execute(sql, channel, conn_id))

    async def members(self, channel: str) -> list[Member]:
        p = self.prefix
        sql = (f"SELECT member FROM {p}_presence WHERE channel = $1 AND expires > {p}_now() "
               f"ORDER BY conn_id")
        rows = await self.run(lambda conn: conn.fetch(sql, channel))
        out: list[Member] = []
        for row in rows:
            item = orjson.loads(row["member"])
            out.append(Member(item["conn_id"], item.get("user"), item.get("info")))
        return out

    async def _refresh_members(self) -> None:
        """Push our members' expiry forward (and write them again if the rows
        were lost), in one statement."""
        if not self._members or self._pool is None:
            return
        channels, conn_ids, texts = [], [], []
        for channel, members in self._members.items():
            for member in members.values():
                channels.append(channel)
                conn_ids.append(member.conn_id)
                texts.append(orjson.dumps(member.to_dict()).decode())
        p = self.prefix
        sql = (f"INSERT INTO {p}_presence (channel, conn_id, node, member, expires) "
               f"SELECT c, i, $4, m, {p}_now() + $5 FROM unnest($1::text[], $2::text[], "
               f"$3::text[]) AS u(c, i, m) ON CONFLICT (channel, conn_id) DO UPDATE SET "
               f"node = EXCLUDED.node, member = EXCLUDED.member, expires = EXCLUDED.expires")
        try:
            await self.run(lambda conn: conn.execute(sql, channels, conn_ids, texts,
                                                     self.node_id, self.presence_ttl))
        except (BrokerUnavailable, asyncpg.PostgresError) as exc:
            log.debug("presence refresh failed: %s", exc)

    async def _beat(self) -> None:
        """Refresh our members; sweep expired rows (one node at a time)."""
        interval = max(0.05, min(self.presence_ttl / 3, 10.0))
        while not self._closing:
            await asyncio.sleep(interval)
            if not self._health.up:
                continue
            await self._refresh_members()
            try:
                await self.run(self._sweep)
            except (BrokerUnavailable, asyncpg.PostgresError) as exc:
                log.debug("sweep failed: %s", exc)

    async def _sweep(self, conn: asyncpg.Connection) -> None:
        p = self.prefix
        async with conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)",
                                       schema_lock_key(self.prefix) + 1):
                return
            await conn.execute(f"DELETE FROM {p}_presence WHERE expires < {p}_now()")
            await conn.execute(f"DELETE FROM {p}_spill WHERE created < {p}_now() - $1",
                               self.spill_ttl)
            now = time.monotonic()
            if now - self._swept_history >= 60:  # a scan of the table: once a minute
                self._swept_history = now
                # rows a publish holds are skipped: the sweep never waits, so it
                # cannot deadlock with a publish trimming the same channel
                await conn.execute(
                    f"DELETE FROM {p}_history WHERE ctid = ANY(ARRAY(SELECT ctid FROM "
                    f"{p}_history WHERE exp < ({p}_now() * 1000) FOR UPDATE SKIP LOCKED))")


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Pooled connections keep no session state (no LISTEN, no session lock, no
    SET), so asyncpg's reset query on each release (a round trip per batch)
    is skipped; an open transaction is still rolled back by the pool."""


async def _delete_members(broker: PostgresBroker, conn: asyncpg.Connection) -> None:
    await conn.execute(f"DELETE FROM {broker.prefix}_presence WHERE node = $1",
                       broker.node_id)
