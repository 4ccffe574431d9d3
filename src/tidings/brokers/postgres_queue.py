"""Work queues in PostgreSQL, shared by every node of a ``postgresql://`` broker.

One table holds the items of every queue (``<prefix>_queue``, index on
``(queue, state, id)``) and one the count of each (``<prefix>_qmeta``). An
item is waiting (``w``), leased to a node (``l``, with ``owner`` and
``leased_at``), or delayed (``d``, with ``due``). The hub keeps the consumer
logic (credit, round robin, visibility timers); this store is only the source
and sink of items, with the semantics of the Redis store
(:mod:`tidings.brokers.redis_queue`):

- push: batched like the Redis pushes (the pushes made while the previous batch
  was on the wire go in one function call, in order); the count row refuses a
  push at the bound (``?queue_max_len=``, default 1,000,000 items per queue)
  with :class:`~tidings.exceptions.QueueFull` instead of dropping old items;
  dead-letter queues are trimmed to the bound instead. Each push NOTIFYs the
  queue's wake-up name, which blocked fetches LISTEN to.
- fetch: ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)``: the
  oldest waiting items, each leased to exactly one node even when several
  fetch at once; waits up to ``block`` s for a wake-up when there is none.
- ack: delete the leased rows (any node may ack, as ``XACK`` does).
- requeue (tail, delay, dead letter) checks that this node still holds the
  lease, in one function, atomically: nothing lost, nothing duplicated.
- claim: leases older than ``min_idle`` s (their node died or hung) move to
  this node, those out of attempts go to ``<queue>.dead`` instead.

Item ids are row ids; an item going back to the tail gets a new one (as a new
stream entry does in Redis). Attempts: ``attempts`` (carried over requeues)
plus ``deliveries`` (leases since then) - what a claim reports.
Durability is PostgreSQL's: items survive a server restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from tidings.brokers.base import QueueStoreStats, StoredItem
from tidings.brokers.postgres_schema import decode_data, encode_data
from tidings.exceptions import BrokerUnavailable, QueueFull

if TYPE_CHECKING:
    from tidings.brokers.postgres import PostgresBroker

__all__ = ["DEFAULT_MAX_LEN", "PostgresQueueStore"]

log = logging.getLogger("tidings.brokers.postgres")

DEFAULT_MAX_LEN = 1_000_000
_PUSH_MAX = 2048  # pushes per function call


class PostgresQueueStore:
    """The :class:`~tidings.brokers.base.QueueStore` of a :class:`PostgresBroker`."""

    def __init__(self, broker: PostgresBroker, *, max_len: int = DEFAULT_MAX_LEN) -> None:
        self._broker = broker
        self.max_len = max_len
        p = broker.prefix
        self._p = p
        self._pending: list[tuple[str, str, asyncio.Future[int | None]]] = []
        self._flushing = False
        self._sql = {
            "push": f"SELECT r_id FROM {p}_push($1::text[], $2::text[], $3::bigint, "
                    f"$4::text[])",
            "fetch": f"WITH s AS (SELECT id FROM {p}_queue WHERE queue = $1 AND state = 'w' "
                     f"ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) "
                     f"UPDATE {p}_queue AS q SET state = 'l', owner = $3, "
                     f"leased_at = {p}_now(), deliveries = q.deliveries + 1 FROM s "
                     f"WHERE q.id = s.id RETURNING q.id, q.data, q.attempts, q.dead_of, "
                     f"q.dead_id, q.dead_x",
            "ack": f"WITH d AS (DELETE FROM {p}_queue WHERE queue = $1 "
                   f"AND id = ANY($2::bigint[]) AND state = 'l' RETURNING 1), "
                   f"u AS (UPDATE {p}_qmeta SET n = greatest(n - (SELECT count(*) FROM d), 0) "
                   f"WHERE queue = $1) SELECT count(*) FROM d",
            "requeue": f"SELECT {p}_requeue($1, $2, $3, $4, $5, $6, $7, $8)",
            "claim": f"SELECT * FROM {p}_claim($1, $2, $3, $4, $5, $6, $7)",
            "promote": f"SELECT {p}_promote($1, $2)",
            "stats": f"SELECT count(*) FILTER (WHERE state = 'w') AS waiting, "
                     f"count(*) FILTER (WHERE state = 'l') AS leased, "
                     f"count(*) FILTER (WHERE state = 'd') AS delayed, "
                     f"{p}_now() - min(enq) FILTER (WHERE state = 'w') AS age "
                     f"FROM {p}_queue WHERE queue = $1",
        }

    @property
    def _consumer(self) -> str:
        return self._broker.node_id or "anonymous"

    @staticmethod
    def _is_dead(queue: str) -> bool:
        return queue.endswith(".dead") and len(queue) > 5

    @staticmethod
    def _item(row: Any, attempts: int) -> StoredItem:
        from_data = decode_data(row[1])
        if row[3] is not None:  # a dead letter: the shape the memory queue gives it too
            from_data = {"id": row[4], "data": from_data, "attempts": int(row[5]),
                         "queue": row[3]}
        return StoredItem(str(row[0]), from_data, attempts)

    # -- push ---------------------------------------------------------------------------

    async def push(self, queue: str, data: Any) -> str:
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pending.append((queue, encode_data(data), future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush_all())
        result = await future
        if result is None:
            raise QueueFull(f"queue {queue!r} holds {self.max_len} items")
        return str(result)

    async def _flush_all(self) -> None:
        try:
            await asyncio.sleep(0)  # let the pushes of this turn join the batch
            while self._pending:
                batch = self._pending[:_PUSH_MAX]
                del self._pending[:_PUSH_MAX]
                await self._flush(batch)
        finally:
            self._flushing = False

    async def _flush(self, batch: list[tuple[str, str, asyncio.Future[int | None]]]) -> None:
        # sorted by queue (stable): nodes lock count rows in one order, no deadlock;
        # the order within a queue is kept
        order = sorted(range(len(batch)), key=lambda i: batch[i][0])
        queues = [batch[i][0] for i in order]
        datas = [batch[i][1] for i in order]
        wakes = [self._broker.names.queue(q) for q in queues]
        try:
            rows = await self._broker.run(lambda conn: conn.fetch(
                self._sql["push"], queues, datas, self.max_len, wakes))
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, BrokerUnavailable)
                                         else BrokerUnavailable(str(exc)))
            return
        for i, row in zip(order, rows, strict=True):
            future = batch[i][2]
            if not future.done():
                future.set_result(row[0])

    # -- lease --------------------------------------------------------------------------

    async def _take(self, queue: str, count: int) -> list[StoredItem]:
        rows = await self._broker.run(lambda conn: conn.fetch(
            self._sql["fetch"], queue, count, self._consumer))
        rows = sorted(rows, key=lambda r: r[0])
        return [self._item(row, int(row[2])) for row in rows]

    async def fetch(self, queue: str, count: int, *, block: float) -> list[StoredItem]:
        if count <= 0:
            return []
        if block <= 0:
            return await self._take(queue, count)
        waiter = await self._broker.watch_queue(queue)  # LISTEN before looking
        waiter.clear()
        items = await self._take(queue, count)
        if items:
            return items
        try:
            await asyncio.wait_for(waiter.wait(), block)
        except TimeoutError:
            return []
        return await self._take(queue, count)

    async def ack(self, queue: str, item_ids: Sequence[str]) -> int:
        ids = [int(i) for i in item_ids if i.isdigit()]
        if not ids:
            return 0
        n = await self._broker.run(lambda conn: conn.fetchval(self._sql["ack"], queue, ids))
        return int(n)

    async def requeue(self, queue: str, item_id: str, attempts: int, *,
                      delay: float = 0.0, dead: bool = False) -> bool:
        if not item_id.isdigit():
            return False
        # a dead-letter queue does not dead-letter again: "x" drops
        mode = ("x" if self._is_dead(queue) else "d") if dead else ("z" if delay > 0 else "q")
        done = await self._broker.run(lambda conn: conn.fetchval(
            self._sql["requeue"], queue, int(item_id), self._consumer, mode, attempts,
            float(delay), self.max_len, self._broker.names.queue(queue)))
        return bool(done)

    async def claim(self, queue: str, *, min_idle: float, count: int,
                    max_attempts: int) -> list[StoredItem]:
        rows = await self._broker.run(lambda conn: conn.fetch(
            self._sql["claim"], queue, self._consumer, float(min_idle), count, max_attempts,
            "x" if self._is_dead(queue) else "d", self.max_len))
        return [self._item(row, int(row[2])) for row in rows]

    async def release_delayed(self, queue: str) -> float | None:
        due = await self._broker.run(lambda conn: conn.fetchval(
            self._sql["promote"], queue, self._broker.names.queue(queue)))
        return None if due is None else float(due)

    async def stats(self, queue: str) -> QueueStoreStats:
        row = await self._broker.run(lambda conn: conn.fetchrow(self._sql["stats"], queue))
        return QueueStoreStats(int(row["waiting"]), int(row["leased"]), int(row["delayed"]),
                               max(0.0, float(row["age"] or 0.0)))

    async def release(self, queue: str) -> None:
        try:
            await self._broker.unwatch_queue(queue)
        except (BrokerUnavailable, asyncpg.PostgresError):
            pass

    async def close(self) -> None:
        """Fail pushes still queued (the broker closes the connections)."""
        for _, _, future in self._pending:
            if not future.done():
                future.set_exception(BrokerUnavailable("closed"))
        self._pending.clear()

