"""Work queues held in memory, shared by the nodes of one process: the relay's store.

:class:`MemoryQueues` is the state: per queue a FIFO of waiting items, the
items leased to nodes (item -> node, leased-at, deliveries), delayed items and
the fetches blocked waiting for an item. Every operation takes the node it acts
for; :meth:`MemoryQueues.store` gives one node's
:class:`~tidings.brokers.base.QueueStore` view of it. The relay behind
``ipc://`` (``tidings serve --workers N``) holds one and serves it to its
workers, so a push on one worker reaches a puller on another; the state lives
in the relay's process and is lost when it stops.

The semantics are the Redis store's (:mod:`tidings.brokers.redis.queue`), op
for op, minus the I/O:

- push appends (a new id) behind a length bound (waiting + in flight; a push
  beyond it raises :class:`~tidings.exceptions.QueueFull`); a dead-letter
  queue is trimmed from its oldest end instead;
- fetch leases the oldest waiting items to the node, waiting up to ``block``
  seconds for the first (woken by a push or a requeue);
- ack removes items; requeue checks that the node holds the lease, then puts
  the item back at the tail (new id), in the delayed set, or in
  ``<queue>.dead``; claim takes over leases older than ``min_idle`` (attempts
  = carried attempts + deliveries of the lease; out of attempts -> dead);
- :meth:`MemoryQueues.drop_node` is what Redis cannot do: the relay knows
  when a worker is gone, so its leases go back to the front of their queues at
  once (attempt counted) instead of waiting for the lease to expire.

Nothing here suspends except a blocking fetch, so every other operation is
atomic with respect to the event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from tidings.brokers.base import QueueStoreStats, StoredItem
from tidings.exceptions import QueueFull

__all__ = ["DEFAULT_MAX_LEN", "MemoryQueueStore", "MemoryQueues"]

DEFAULT_MAX_LEN = 1_000_000
MAX_BLOCK = 60.0  # longest a fetch waits, whatever it asks for


class _Entry:
    __slots__ = ("attempts", "data", "deliveries", "enqueued", "id", "leased", "node")

    def __init__(self, item_id: str, data: Any, attempts: int, enqueued: float) -> None:
        self.id = item_id
        self.data = data
        self.attempts = attempts  # deliveries before the current lease
        self.enqueued = enqueued
        self.node: str | None = None  # the lease: which node, since when, how many times
        self.leased = 0.0
        self.deliveries = 0


class _Fetch:
    """A fetch blocked waiting for an item."""

    __slots__ = ("fut", "node", "released")

    def __init__(self, node: str, fut: asyncio.Future[None]) -> None:
        self.node = node
        self.fut = fut
        self.released = False

    def wake(self) -> None:
        if not self.fut.done():
            self.fut.set_result(None)


class _Queue:
    __slots__ = ("delayed", "fetches", "leased", "max_attempts", "waiting")

    def __init__(self) -> None:
        self.waiting: OrderedDict[str, _Entry] = OrderedDict()  # front = next out
        self.leased: OrderedDict[str, _Entry] = OrderedDict()  # oldest lease first
        self.delayed: list[tuple[float, int, _Entry]] = []  # heap by due time
        self.fetches: set[_Fetch] = set()
        self.max_attempts: int | None = None  # as last told by a claim

    def wake(self) -> None:
        for fetch in self.fetches:
            fetch.wake()


def _is_dead(queue: str) -> bool:
    return queue.endswith(".dead") and len(queue) > 5


class MemoryQueues:
    """Queues shared by every node of this process (see the module docstring)."""

    def __init__(self, *, max_len: int = DEFAULT_MAX_LEN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_len = max_len
        self._clock = clock
        self._queues: dict[str, _Queue] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count()  # ties in the delayed heap

    def store(self, node: str) -> MemoryQueueStore:
        """The :class:`~tidings.brokers.base.QueueStore` of node ``node``."""
        return MemoryQueueStore(self, node)

    def _q(self, queue: str) -> _Queue:
        q = self._queues.get(queue)
        if q is None:
            q = self._queues[queue] = _Queue()
        return q

    def _forget(self, queue: str, q: _Queue) -> None:
        """Drop the record of a queue that holds nothing (names are client-chosen)."""
        if not (q.waiting or q.leased or q.delayed or q.fetches) and q.max_attempts is None:
            self._queues.pop(queue, None)

    def _new_id(self) -> str:
        return str(next(self._ids))

    # -- items ------------------------------------------------------------------------

    def push(self, queue: str, data: Any) -> str:
        q = self._q(queue)
        if _is_dead(queue):  # dead letters are trimmed, never refused
            while (self.max_len > 0 and q.waiting
                   and len(q.waiting) + len(q.leased) >= self.max_len):
                q.waiting.popitem(last=False)
        elif self.max_len > 0 and len(q.waiting) + len(q.leased) >= self.max_len:
            raise QueueFull(f"queue {queue!r} holds {self.max_len} items")
        return self._append(queue, q, data, 0)

    def _append(self, queue: str, q: _Queue, data: Any, attempts: int) -> str:
        entry = _Entry(self._new_id(), data, attempts, self._clock())
        q.waiting[entry.id] = entry
        q.wake()
        return entry.id

    def _bury(self, queue: str, entry: _Entry, attempts: int) -> None:
        """Move an item to ``<queue>.dead``, shaped as the in-process queue does it;
        a dead-letter queue does not dead-letter again: the item is dropped."""
        if _is_dead(queue):
            return
        self.push(f"{queue}.dead", {"id": entry.id, "data": entry.data,
                                    "attempts": attempts, "queue": queue})

    def _lease(self, q: _Queue, entry: _Entry, node: str) -> None:
        entry.node = node
        entry.leased = self._clock()
        entry.deliveries += 1
        q.leased[entry.id] = entry
        q.leased.move_to_end(entry.id)

    def fetch_nowait(self, node: str, queue: str, count: int) -> list[StoredItem]:
        """Lease up to ``count`` waiting items to ``node``, oldest first."""
        q = self._queues.get(queue)
        out: list[StoredItem] = []
        if q is None:
            return out
        while q.waiting and len(out) < count:
            _, entry = q.waiting.popitem(last=False)
            entry.deliveries = 0
            self._lease(q, entry, node)
            out.append(StoredItem(entry.id, entry.data, entry.attempts))
        self._forget(queue, q)
        return out

    async def fetch(self, node: str, queue: str, count: int, *,
                    block: float) -> list[StoredItem]:
        """``fetch_nowait``, waiting up to ``block`` s (at most ``MAX_BLOCK``) for the
        first item; returns ``[]`` early when ``release`` is called for the node."""
        items = self.fetch_nowait(node, queue, count)
        if items or block <= 0 or count <= 0:
            return items
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(block, MAX_BLOCK)
        q = self._q(queue)
        while True:
            fetch = _Fetch(node, loop.create_future())
            q.fetches.add(fetch)
            timer = loop.call_at(deadline, fetch.wake)
            try:
                await fetch.fut
            finally:
                timer.cancel()
                q.fetches.discard(fetch)
            if fetch.released:
                self._forget(queue, q)
                return []
            items = self.fetch_nowait(node, queue, count)
            if items or loop.time() >= deadline:
                return items
            q = self._q(queue)  # (forgotten while empty: a fresh record)

    def ack(self, queue: str, item_ids: Sequence[str]) -> int:
        """Remove items; returns how many were in flight (leased to any node).

        Like ``XACK`` + ``XDEL``: an acked id is removed even when it was waiting
        (given back after its node dropped off, then acked by that node after all).
        """
        q = self._queues.get(queue)
        if q is None:
            return 0
        n = 0
        for item_id in item_ids:
            if q.leased.pop(item_id, None) is not None:
                n += 1
            else:
                q.waiting.pop(item_id, None)
        self._forget(queue, q)
        return n

    def requeue(self, node: str, queue: str, item_id: str, attempts: int, *,
                delay: float = 0.0, dead: bool = False) -> bool:
        q = self._queues.get(queue)
        entry = q.leased.get(item_id) if q is not None else None
        if q is None or entry is None or entry.node != node:
            return False
        del q.leased[item_id]
        if dead:
            self._bury(queue, entry, attempts)
        elif delay > 0:
            heapq.heappush(q.delayed, (self._clock() + delay, next(self._seq), entry))
            entry.attempts, entry.node = attempts, None
        else:
            self._append(queue, q, entry.data, attempts)
        self._forget(queue, q)
        return True

    def claim(self, node: str, queue: str, *, min_idle: float, count: int,
              max_attempts: int) -> list[StoredItem]:
        """Lease to ``node`` up to ``count`` items leased ``min_idle`` s ago or more
        (oldest lease first); an item out of attempts goes to ``<queue>.dead``."""
        q = self._q(queue)
        q.max_attempts = max_attempts
        out: list[StoredItem] = []
        limit = self._clock() - min_idle
        expired: list[_Entry] = []
        for entry in q.leased.values():
            if entry.leased > limit or len(expired) >= count:
                break
            expired.append(entry)
        for entry in expired:
            attempts = entry.attempts + entry.deliveries
            if attempts >= max_attempts:
                del q.leased[entry.id]
                self._bury(queue, entry, attempts)
            else:
                self._lease(q, entry, node)
                out.append(StoredItem(entry.id, entry.data, attempts))
        return out

    def release_delayed(self, queue: str) -> float | None:
        """Delayed items that are due wait again (at the tail, new ids); returns
        the seconds until the next one is due, None if none is delayed."""
        q = self._queues.get(queue)
        if q is None:
            return None
        now = self._clock()
        while q.delayed and q.delayed[0][0] <= now:
            _, _, entry = heapq.heappop(q.delayed)
            self._append(queue, q, entry.data, entry.attempts)
        due = max(0.0, q.delayed[0][0] - now) if q.delayed else None
        self._forget(queue, q)
        return due

    def stats(self, queue: str) -> QueueStoreStats:
        q = self._queues.get(queue)
        if q is None:
            return QueueStoreStats()
        age = 0.0
        if q.waiting:
            age = max(0.0, self._clock() - next(iter(q.waiting.values())).enqueued)
        return QueueStoreStats(len(q.waiting), len(q.leased), len(q.delayed), age)

    def release(self, node: str, queue: str) -> None:
        """``node`` stopped fetching ``queue``: its blocked fetches return ``[]``."""
        q = self._queues.get(queue)
        if q is None:
            return
        for fetch in list(q.fetches):
            if fetch.node == node:
                fetch.released = True
                fetch.wake()

    def drop_node(self, node: str) -> int:
        """``node`` is gone: every item it leased goes back to the front of its
        queue (oldest lease first), with the delivery counted; an item out of
        attempts (as the queue's last claim said) goes to ``<queue>.dead``.
        Its blocked fetches return ``[]``. Returns how many items it held."""
        n = 0
        for queue, q in list(self._queues.items()):
            for fetch in list(q.fetches):
                if fetch.node == node:
                    fetch.released = True
                    fetch.wake()
            held = [e for e in q.leased.values() if e.node == node]
            n += len(held)
            self._front(queue, q, held, counted=True)
        return n

    def unfetch(self, node: str, queue: str, item_ids: Sequence[str]) -> None:
        """Undo a fetch whose items never reached ``node``: back to the front,
        not counted as a delivery."""
        q = self._queues.get(queue)
        if q is not None:
            held = [e for i in item_ids if (e := q.leased.get(i)) is not None and e.node == node]
            self._front(queue, q, held, counted=False)

    def _front(self, queue: str, q: _Queue, entries: list[_Entry], *, counted: bool) -> None:
        back: list[_Entry] = []
        for entry in entries:
            del q.leased[entry.id]
            if counted:
                entry.attempts += entry.deliveries
            entry.node, entry.deliveries = None, 0
            if (counted and q.max_attempts is not None
                    and entry.attempts >= q.max_attempts):
                self._bury(queue, entry, entry.attempts)
            else:
                back.append(entry)
        for entry in reversed(back):
            q.waiting[entry.id] = entry
            q.waiting.move_to_end(entry.id, last=False)
        if back:
            q.wake()

    def queues(self) -> list[str]:
        """Names of the queues that hold something (or have a fetch waiting)."""
        return sorted(self._queues)


class MemoryQueueStore:
    """One node's :class:`~tidings.brokers.base.QueueStore` view of :class:`MemoryQueues`."""

    def __init__(self, queues: MemoryQueues, node: str) -> None:
        self.queues = queues
        self.node = node

    async def push(self, queue: str, data: Any) -> str:
        return self.queues.push(queue, data)

    async def fetch(self, queue: str, count: int, *, block: float) -> list[StoredItem]:
        return await self.queues.fetch(self.node, queue, count, block=block)

    async def ack(self, queue: str, item_ids: Sequence[str]) -> int:
        return self.queues.ack(queue, item_ids)

    async def requeue(self, queue: str, item_id: str, attempts: int, *,
                      delay: float = 0.0, dead: bool = False) -> bool:
        return self.queues.requeue(self.node, queue, item_id, attempts, delay=delay,
                                   dead=dead)

    async def claim(self, queue: str, *, min_idle: float, count: int,
                    max_attempts: int) -> list[StoredItem]:
        return self.queues.claim(self.node, queue, min_idle=min_idle, count=count,
                                 max_attempts=max_attempts)

    async def release_delayed(self, queue: str) -> float | None:
        return self.queues.release_delayed(queue)

    async def stats(self, queue: str) -> QueueStoreStats:
        return self.queues.stats(queue)

    async def release(self, queue: str) -> None:
        self.queues.release(self.node, queue)
