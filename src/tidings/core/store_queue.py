"""Work queues whose items live in a broker's :class:`QueueStore` (Redis, or the
``ipc://`` relay of ``tidings serve --workers N``), shared by every node: the
consumer logic of :class:`tidings.core.queue.WorkQueue`, with the store as the
source and sink of items. See docs/queues.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import Any

from tidings.brokers.base import QueueStore, QueueStoreStats, StoredItem
from tidings.core.queue import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_VISIBILITY,
    Consumer,
    QueueHost,
    QueueItem,
    WorkQueue,
)
from tidings.exceptions import HubError

__all__ = ["StoreQueue"]

log = logging.getLogger("tidings.core.queue")


class StoreQueue(WorkQueue):
    """A queue whose items live in a :class:`QueueStore` shared by every node.

    The consumer side is :class:`WorkQueue`'s (credit, round robin, per-consumer
    in-flight, visibility timers); only the source and sink of items change.
    While this node has consumers with free credit, one fetch loop leases
    exactly that many items from the store (backpressure reaches the store:
    a node never holds items its consumers cannot take), and also claims items
    whose lease expired on any node (a node died holding them) and makes due
    delayed items waiting again. Acks go to the store in one batch per
    event-loop turn; requeues (nack, timeout, a consumer leaving) go back
    through the store atomically, to whichever node has room first.

    ``len()``, ``in_flight`` and ``oldest_age()`` are the store's view across
    every node as of the last :meth:`refresh` (``/metrics`` and
    ``queue_stats`` refresh first); ``local_in_flight`` is this node's.
    """

    shared = True  # a push is a round trip to the store
    BLOCK = 1.0  # longest blocking read: bounds how late a cancelled loop notices
    POLL_DELAYED = 1.0  # how often due delayed items are looked for, at most

    def __init__(self, queues: QueueHost, name: str, store: QueueStore, *,
                 visibility_timeout: float = DEFAULT_VISIBILITY,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        super().__init__(queues, name, visibility_timeout=visibility_timeout,
                         max_attempts=max_attempts)
        self._store = store
        self._fetcher: asyncio.Task[None] | None = None
        self._credit = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._acks: list[str] = []
        self._acked: asyncio.Future[None] | None = None
        self._backlog: deque[tuple[str, int, float, bool]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._snapshot = QueueStoreStats()
        # a lease expires a little after the visibility timeout, so the node
        # holding an item requeues it itself (its timer fires first) unless it died
        vt = visibility_timeout
        self.lease: float | None = vt + min(1.0, max(0.1, vt / 2)) if vt > 0 else None
        self._claim_every = min(5.0, max(0.05, self.lease / 4)) if self.lease else 0.0
        self._next_claim = 0.0
        self._next_promote = 0.0

    # -- producing ------------------------------------------------------------------

    async def push(self, data: Any) -> str:
        if self._queues.closed:
            raise HubError("the hub is closed")
        if self._queues.types.active:
            data, _ = self._queues.types.check(self.name, data, None)
        item_id = await self._store.push(self.name, data)
        self.pushed += 1
        return item_id

    def push_nowait(self, data: Any) -> str:
        raise HubError("a queue in a shared store is pushed to with `await queue.push()`")

    def append(self, data: Any) -> str:
        raise HubError("a queue in a shared store is pushed to with `await queue.push()`")

    # -- settling ------------------------------------------------------------------

    def ack(self, item_id: str) -> bool:
        if not super().ack(item_id):
            return False
        self._acks.append(item_id)
        if self._acked is None:
            self._acked = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._flush_acks)
        return True

    async def ack_wait(self, item_id: str) -> bool:
        if not self.ack(item_id):
            return False
        if self._acked is not None:
            await asyncio.shield(self._acked)
        return True

    def _flush_acks(self) -> None:
        ids, self._acks = self._acks, []
        done, self._acked = self._acked, None
        self._spawn(self._send_acks(ids, done))

    async def _send_acks(self, ids: list[str], done: asyncio.Future[None] | None) -> None:
        try:
            await self._store.ack(self.name, ids)
        except Exception as exc:  # the items stay leased and come back: at-least-once
            log.warning("acking %d item(s) of %s failed: %s", len(ids), self.name, exc)
        finally:
            if done is not None and not done.done():
                done.set_result(None)

    def nack(self, item_id: str, *, delay: float = 0.0, requeue: bool = True) -> bool:
        item = self._in_flight.pop(item_id, None)
        if item is None:
            return False
        self._release(item)
        if not requeue or item.attempts >= self.max_attempts:
            self._dead_letter(item)
        elif delay > 0:
            self.redelivered += 1
            self._give_back(item, delay=delay)
            self._next_promote = 0.0  # look for it when it is due (at most POLL later)
        else:
            self._requeue(item, front=False)
        self._dispatch()
        return True

    def _put_back(self, item: QueueItem, *, front: bool) -> None:
        """Back to the store (timeout, nack, consumer gone): the node with free
        credit first gets it, this one or another."""
        self._give_back(item)

    def _dead_letter(self, item: QueueItem) -> None:
        self.dead_lettered += 1
        self._give_back(item, dead=True)

    def _give_back(self, item: QueueItem, *, delay: float = 0.0, dead: bool = False) -> None:
        """Queue a requeue; one sender per queue sends them in order, so a consumer
        leaving with 1,000 items costs one connection, and their order holds."""
        self._backlog.append((item.id, item.attempts, delay, dead))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_back())
            self._tasks.add(self._sender)
            self._sender.add_done_callback(self._tasks.discard)

    async def _send_back(self) -> None:
        try:
            while self._backlog:
                item_id, attempts, delay, dead = self._backlog.popleft()
                try:
                    await self._store.requeue(self.name, item_id, attempts, delay=delay,
                                              dead=dead)
                except Exception as exc:  # still leased to us: back when the lease expires
                    log.warning("giving item %s of %s back failed: %s", item_id, self.name,
                                exc)
        finally:
            self._sender = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def remove_consumer(self, consumer: Consumer) -> None:
        """Forget a consumer; what it held goes back to the store, oldest first."""
        for item in self._take_back(consumer):
            self._requeue(item, front=False)
        self._dispatch()

    # -- fetching --------------------------------------------------------------------

    def _dispatch(self) -> None:
        super()._dispatch()
        # fetched for a consumer that is gone or shrank meanwhile: back to the store
        # now, rather than held here while its lease runs
        while self._ready:
            self._give_back(self._ready.popleft())
        self._wake()

    def _wake(self) -> None:
        self._credit.set()
        if self._fetcher is None and self._consumers and not self._queues.closed:
            self._fetcher = asyncio.get_running_loop().create_task(
                self._fetch_loop(), name=f"tidings-queue-{self.name}")

    def _want(self) -> int:
        return sum(max(0, c.free) for c in self._consumers)

    async def _fetch_loop(self) -> None:
        backoff = 0.05
        try:
            while not self._queues.closed and self._consumers:
                want = self._want()
                if want <= 0:
                    self._credit.clear()
                    await self._credit.wait()
                    continue
                try:
                    stored = await self._fetch(want)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # store down: retry; say so once per outage
                    (log.warning if backoff == 0.05 else log.debug)(
                        "fetching from %s failed: %s", self.name, exc)
                    await asyncio.sleep(random.uniform(0, backoff))  # full jitter
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                for s in stored:
                    if s.id in self._in_flight:  # our own lease, claimed back: still ours
                        continue
                    item = QueueItem(self, s.id, s.data)
                    item.attempts = s.attempts
                    self._ready.append(item)
                if stored:
                    self._dispatch()
        finally:
            if self._fetcher is asyncio.current_task():
                self._fetcher = None

    async def _fetch(self, want: int) -> list[StoredItem]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        out: list[StoredItem] = []
        if self.lease is not None and now >= self._next_claim:
            self._next_claim = now + self._claim_every
            out += await self._store.claim(self.name, min_idle=self.lease, count=want,
                                           max_attempts=self.max_attempts)
        if now >= self._next_promote:
            due = await self._store.release_delayed(self.name)
            self._next_promote = now + min(self.POLL_DELAYED,
                                           due if due is not None else self.POLL_DELAYED)
        if len(out) >= want:
            return out
        block = 0.0
        if not out:
            block = min(self.BLOCK, self._next_promote - now,
                        self._next_claim - now if self.lease is not None else self.BLOCK)
            block = max(0.001, block)
        return out + await self._store.fetch(self.name, want - len(out), block=block)

    # -- stats -----------------------------------------------------------------------

    async def refresh(self) -> None:
        self._snapshot = await self._store.stats(self.name)

    def __len__(self) -> int:
        return self._snapshot.length

    @property
    def in_flight(self) -> int:
        return self._snapshot.in_flight

    def oldest_age(self) -> float:
        return self._snapshot.oldest_age

    def stats(self) -> dict[str, Any]:
        snap = self._snapshot
        return {
            "queue": self.name,
            "length": snap.length,
            "in_flight": snap.in_flight,
            "delayed": snap.delayed,
            "consumers": len(self._consumers),
            "oldest_age": round(snap.oldest_age, 3),
            "local_in_flight": len(self._in_flight),
            "pushed": self.pushed,
            "acked": self.acked,
            "redelivered": self.redelivered,
            "dead_lettered": self.dead_lettered,
        }

    # -- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop fetching. Items in flight stay leased in the store (redelivered
        when the lease expires) unless their consumers leave first and give
        them back; requeues already under way still run (see ``aclose``)."""
        super().close()
        if self._fetcher is not None:
            self._fetcher.cancel()
        self._credit.set()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close, then wait (bounded) for pending acks and requeues to reach the store."""
        self.close()
        fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            try:
                await asyncio.wait_for(fetcher, timeout)
            except (asyncio.CancelledError, Exception):
                pass
        if self._acked is not None:
            self._flush_acks()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        try:
            await self._store.release(self.name)
        except Exception:  # the store is going away too
            pass
