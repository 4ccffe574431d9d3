"""Work queues: each item to exactly one consumer, acked, redelivered on failure.

Semantics (memory backend, one process):

- at-least-once: an item leaves the queue only when acked;
- each in-flight item is held by exactly one consumer; a consumer never holds
  more than its ``max_in_flight`` (backpressure: a slow consumer is not handed
  more);
- an item goes back to the front of the queue when its consumer disconnects,
  nacks it, or does not ack it within the visibility timeout; after
  ``max_attempts`` deliveries it moves to the dead-letter queue ``<name>.dead``;
- FIFO apart from redeliveries;
- nothing survives a restart of the process (use a durable broker for that).

Consumers are pushed to (no consumer ever blocks in ``queue.get()``), so
shutdown never hangs on an empty queue.

With a broker that has a :class:`~tidings.brokers.base.QueueStore` (Redis, or
``ipc://``: the relay of ``tidings serve --workers N``),
:class:`tidings.core.store_queue.StoreQueue` keeps this consumer logic and swaps
the local deque for the store, so producers and consumers on different nodes share one queue.
See docs/queues.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from tidings.core.channels import ChannelTypes
from tidings.exceptions import HubError

__all__ = ["DEFAULT_MAX_ATTEMPTS", "DEFAULT_VISIBILITY", "Consumer", "QueueHost", "QueueItem",
           "Waiter", "WorkQueue"]

log = logging.getLogger("tidings.core.queue")

DEFAULT_VISIBILITY = 30.0
DEFAULT_MAX_ATTEMPTS = 5


class QueueItem:
    """One item of a queue, as a consumer sees it."""

    __slots__ = ("_queue", "attempts", "consumer", "data", "enqueued", "id", "timer")

    def __init__(self, queue: WorkQueue, item_id: str, data: Any) -> None:
        self._queue = queue
        self.id = item_id
        self.data = data
        self.attempts = 0
        self.enqueued = time.monotonic()
        self.consumer: Consumer | None = None
        self.timer: asyncio.TimerHandle | None = None

    async def ack(self) -> bool:
        """Mark the item done. False if it was not in flight any more.

        With a durable store this returns once the store has the ack."""
        return await self._queue.ack_wait(self.id)

    async def nack(self, *, delay: float = 0.0, requeue: bool = True) -> bool:
        """Give the item back (after ``delay`` s) or, with ``requeue=False``, dead-letter it."""
        return self._queue.nack(self.id, delay=delay, requeue=requeue)

    def __repr__(self) -> str:
        return f"QueueItem({self._queue.name!r}, {self.id!r}, attempts={self.attempts})"


class Waiter:
    """A Python consumer blocked until an item (or the shutdown) wakes it."""

    __slots__ = ("fut",)

    def __init__(self) -> None:
        self.fut: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)


class QueueHost(Protocol):
    """What a queue needs of the registry holding it (:class:`~tidings.core.queues.WorkQueues`)."""

    node: str
    closed: bool
    waiters: set[Waiter]
    types: ChannelTypes  # what items of each queue must be (hub.queue_type)

    def get(self, name: str) -> WorkQueue:
        """The queue ``name`` of the same registry (its dead-letter queue, say)."""
        ...


class Consumer:
    """Something items are handed to: a websocket connection or a Python iterator."""

    __slots__ = ("deliver", "in_flight", "max_in_flight", "owner")

    def __init__(
        self, deliver: Callable[[QueueItem], None], max_in_flight: int, owner: object = None
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.deliver = deliver
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, QueueItem] = {}
        self.owner = owner

    @property
    def free(self) -> int:
        return self.max_in_flight - len(self.in_flight)


class WorkQueue:
    """A named queue held in this process."""

    shared = False  # items live in this process: a push completes at once

    def __init__(
        self,
        queues: QueueHost,
        name: str,
        *,
        visibility_timeout: float = DEFAULT_VISIBILITY,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self._queues = queues
        self.name = name
        self.visibility_timeout = visibility_timeout
        self.max_attempts = max_attempts
        self._ready: deque[QueueItem] = deque()
        self._in_flight: dict[str, QueueItem] = {}
        self._consumers: deque[Consumer] = deque()
        self._ids = itertools.count(1)
        self._delayed: dict[str, asyncio.TimerHandle] = {}
        self.pushed = 0
        self.acked = 0
        self.redelivered = 0
        self.dead_lettered = 0

    # -- producing ------------------------------------------------------------

    async def push(self, data: Any) -> str:
        """Append an item; returns its id."""
        return self.push_nowait(data)

    def push_nowait(self, data: Any) -> str:
        """Append an item now. On a typed queue (``hub.queue_type``) invalid data
        raises ``ProtocolError(bad_request)`` and nothing is queued."""
        if self._queues.types.active:
            data, _ = self._queues.types.check(self.name, data, None)
        return self.append(data)

    def append(self, data: Any) -> str:
        """Queue ``data`` as it is (no type check: dead letters, redelivery)."""
        if self._queues.closed:
            raise HubError("the hub is closed")
        item = QueueItem(self, f"{self._queues.node}:{next(self._ids)}", data)
        self._ready.append(item)
        self.pushed += 1
        self._dispatch()
        return item.id

    # -- consuming --------------------------------------------------------------

    def add_consumer(self, consumer: Consumer) -> None:
        if consumer not in self._consumers:
            self._consumers.append(consumer)
        self._dispatch()

    def remove_consumer(self, consumer: Consumer) -> None:
        """Forget a consumer; whatever it held goes back to the queue."""
        for item in reversed(self._take_back(consumer)):  # keep their order at the front
            self._requeue(item, front=True)
        self._dispatch()

    def _take_back(self, consumer: Consumer) -> list[QueueItem]:
        """Forget ``consumer``: the items it held, oldest first, out of flight."""
        try:
            self._consumers.remove(consumer)
        except ValueError:
            pass
        items = list(consumer.in_flight.values())
        consumer.in_flight.clear()
        for item in items:
            self._in_flight.pop(item.id, None)
            if item.timer is not None:
                item.timer.cancel()
                item.timer = None
        return items

    def ack(self, item_id: str) -> bool:
        item = self._in_flight.pop(item_id, None)
        if item is None:
            return False
        self._release(item)
        self.acked += 1
        self._dispatch()
        return True

    async def ack_wait(self, item_id: str) -> bool:
        """``ack``, returning when it is recorded (at once here: nothing to wait for)."""
        return self.ack(item_id)

    def nack(self, item_id: str, *, delay: float = 0.0, requeue: bool = True) -> bool:
        item = self._in_flight.pop(item_id, None)
        if item is None:
            return False
        self._release(item)
        if not requeue:
            self._dead_letter(item)
        elif delay > 0:
            self._delayed[item.id] = asyncio.get_running_loop().call_later(
                delay, self._delayed_requeue, item
            )
        else:
            self._requeue(item, front=False)
        self._dispatch()
        return True

    def consumer_of(self, owner: object) -> Consumer | None:
        """The consumer registered for ``owner`` (a connection), if any."""
        for consumer in self._consumers:
            if consumer.owner is owner:
                return consumer
        return None

    def holds(self, owner: object, item_id: str) -> bool:
        """True if ``owner``'s consumer holds ``item_id`` in flight."""
        item = self._in_flight.get(item_id)
        return item is not None and item.consumer is not None and item.consumer.owner is owner

    def remove_owner(self, owner: object) -> None:
        """Remove the consumer of ``owner`` (its items go back to the queue)."""
        consumer = self.consumer_of(owner)
        if consumer is not None:
            self.remove_consumer(consumer)

    async def consume(self, *, max_in_flight: int = 1) -> AsyncIterator[QueueItem]:
        """Items for this Python consumer; ack each with ``await item.ack()``.

        Leaving the loop gives unacked items back. Ends when the hub closes.
        """
        inbox: deque[QueueItem] = deque()
        loop = asyncio.get_running_loop()
        waiter = Waiter()

        def deliver(item: QueueItem) -> None:
            inbox.append(item)
            waiter.wake()

        consumer = Consumer(deliver, max_in_flight)
        self._queues.waiters.add(waiter)
        self.add_consumer(consumer)
        try:
            while not self._queues.closed:
                if inbox:
                    item = inbox.popleft()
                    if item.consumer is consumer:  # not taken back meanwhile
                        yield item
                    continue
                waiter.fut = loop.create_future()
                await waiter.fut
                waiter.fut = None
        finally:
            self._queues.waiters.discard(waiter)
            self.remove_consumer(consumer)

    # -- internals -----------------------------------------------------------------

    def _dispatch(self) -> None:
        ready = self._ready
        consumers = self._consumers
        while ready and consumers:
            for _ in range(len(consumers)):  # round robin over consumers with room
                consumer = consumers[0]
                consumers.rotate(-1)
                if consumer.free > 0:
                    break
            else:
                return
            item = ready.popleft()
            item.attempts += 1
            item.consumer = consumer
            consumer.in_flight[item.id] = item
            self._in_flight[item.id] = item
            if self.visibility_timeout > 0:
                item.timer = asyncio.get_running_loop().call_later(
                    self.visibility_timeout, self._expire, item.id, item.attempts
                )
            try:
                consumer.deliver(item)
            except Exception:  # the consumer's fault, not the producer's: the item
                # stays in flight and comes back after the timeout (or dead-letters)
                log.exception("delivering item %s of %s failed", item.id, self.name)

    def _release(self, item: QueueItem) -> None:
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        if item.consumer is not None:
            item.consumer.in_flight.pop(item.id, None)
            item.consumer = None

    def _expire(self, item_id: str, attempt: int) -> None:
        item = self._in_flight.get(item_id)
        if item is None or item.attempts != attempt:
            return
        item.timer = None
        del self._in_flight[item_id]
        self._release(item)
        self._requeue(item, front=True)
        self._dispatch()

    def _delayed_requeue(self, item: QueueItem) -> None:
        self._delayed.pop(item.id, None)
        self._requeue(item, front=False)
        self._dispatch()

    def _requeue(self, item: QueueItem, *, front: bool) -> None:
        """Back in line (timeout, nack, consumer gone), or dead after too many tries."""
        item.consumer = None
        if item.attempts >= self.max_attempts:
            self._dead_letter(item)
            return
        self.redelivered += 1
        self._put_back(item, front=front)

    def _put_back(self, item: QueueItem, *, front: bool) -> None:
        if front:
            self._ready.appendleft(item)
        else:
            self._ready.append(item)

    def _dead_letter(self, item: QueueItem) -> None:
        self.dead_lettered += 1
        if self.name.endswith(".dead"):
            return  # a dead-letter queue does not dead-letter again
        dead = self._queues.get(f"{self.name}.dead")
        dead.append({"id": item.id, "data": item.data, "attempts": item.attempts,
                          "queue": self.name})

    # -- stats -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def local_in_flight(self) -> int:
        """Items held by this node's consumers."""
        return len(self._in_flight)

    async def refresh(self) -> None:
        """Update what ``stats()`` reports from the store (nothing to do in process)."""

    @property
    def consumers(self) -> int:
        return len(self._consumers)

    def oldest_age(self) -> float:
        if not self._ready:
            return 0.0
        return time.monotonic() - min(item.enqueued for item in (self._ready[0], self._ready[-1]))

    def stats(self) -> dict[str, Any]:
        return {
            "queue": self.name,
            "length": len(self._ready),
            "in_flight": len(self._in_flight),
            "consumers": len(self._consumers),
            "oldest_age": round(self.oldest_age(), 3),
            "pushed": self.pushed,
            "acked": self.acked,
            "redelivered": self.redelivered,
            "dead_lettered": self.dead_lettered,
        }

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._delayed.values():
            handle.cancel()
        self._delayed.clear()
        for item in self._in_flight.values():
            if item.timer is not None:
                item.timer.cancel()
