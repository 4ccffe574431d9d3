"""The queue-store conformance suite: the QueueStore contract, node against node.

Import its tests into a module that defines the ``world`` fixture (see
:mod:`tidings.testing`); they skip unless the broker has a shared queue store.
Each test uses its own queue names, so one broker may serve them all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest

from tidings.brokers.base import QueueStore, StoredItem
from tidings.core.queue import Consumer, QueueItem
from tidings.hub import Hub
from tidings.testing.support import World, requires, started

__all__ = [
    "collector",
    "fresh",
    "test_a_node_dying_with_items_in_flight",
    "test_claim_expired_leases_of_a_dead_node",
    "test_delayed_requeue",
    "test_exactly_once_across_two_nodes",
    "test_nack_with_delay",
    "test_push_fetch_ack_fifo",
    "test_python_consumers_and_backpressure_across_nodes",
    "test_requeue_is_atomic_and_only_by_the_holder",
    "until",
]


def store_of(hub: Hub) -> QueueStore:
    requires(hub, "queues")
    store = hub.queues.store
    assert store is not None, "a broker stating queues must give the hub its store"
    return store


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def test_push_fetch_ack_fifo(world: World) -> None:
    (hub,) = await started(world, 1)
    store, jobs = store_of(hub), fresh("jobs")
    assert hub.queue(jobs).shared  # the hub's queues live in the store
    ids = [await store.push(jobs, i) for i in range(5)]
    assert len(set(ids)) == 5
    items = await store.fetch(jobs, 3, block=0)
    assert [i.data for i in items] == [0, 1, 2]
    assert [i.id for i in items] == ids[:3]
    assert all(i.attempts == 0 for i in items)
    s = await store.stats(jobs)
    assert (s.length, s.in_flight) == (2, 3)
    assert await store.ack(jobs, [i.id for i in items]) == 3
    assert await store.ack(jobs, [items[0].id]) == 0  # twice: nothing
    s = await store.stats(jobs)
    assert (s.length, s.in_flight) == (2, 0)
    assert [i.data for i in await store.fetch(jobs, 10, block=0)] == [3, 4]


async def test_requeue_is_atomic_and_only_by_the_holder(world: World) -> None:
    h1, h2 = await started(world)
    a, b, jobs = store_of(h1), store_of(h2), fresh("jobs")
    await a.push(jobs, "x")
    (item,) = await a.fetch(jobs, 1, block=0)
    assert not await b.requeue(jobs, item.id, 1)  # b does not hold it
    assert await a.requeue(jobs, item.id, 1)
    assert not await a.requeue(jobs, item.id, 1)  # gone from a's leases: no duplicate
    s = await a.stats(jobs)
    assert (s.length, s.in_flight) == (1, 0)
    (again,) = await b.fetch(jobs, 1, block=0)
    assert (again.data, again.attempts) == ("x", 1)  # attempts travel with the item
    assert await b.requeue(jobs, again.id, 2, dead=True)
    (letter,) = await b.fetch(f"{jobs}.dead", 1, block=0)
    assert letter.data == {"id": again.id, "data": "x", "attempts": 2, "queue": jobs}
    # a dead-letter queue does not dead-letter again
    assert await b.requeue(f"{jobs}.dead", letter.id, 5, dead=True)
    assert (await b.stats(f"{jobs}.dead")).length == 0


async def test_claim_expired_leases_of_a_dead_node(world: World) -> None:
    h1, h2 = await started(world)
    dead_node, live, jobs = store_of(h1), store_of(h2), fresh("jobs")
    if not getattr(live, "lease_expiry", True):
        pytest.skip(f"leases do not expire by time on the {h1.broker_name} broker: its "
                    "server gives a dead node's items back when the connection closes")
    for i in range(3):
        await dead_node.push(jobs, i)
    held = await dead_node.fetch(jobs, 3, block=0)
    assert len(held) == 3
    assert await live.claim(jobs, min_idle=0.5, count=10, max_attempts=5) == []  # fresh
    await asyncio.sleep(0.6)  # the leases age: a timer, not a condition
    claimed = await live.claim(jobs, min_idle=0.5, count=10, max_attempts=5)
    assert sorted((c.data, c.attempts) for c in claimed) == [(0, 1), (1, 1), (2, 1)]
    assert not await dead_node.requeue(jobs, held[0].id, 1)  # its lease is gone
    await asyncio.sleep(0.6)
    # out of attempts (delivered twice, max 2): dead-lettered instead of claimed
    assert await live.claim(jobs, min_idle=0.5, count=10, max_attempts=2) == []
    s = await live.stats(jobs)
    assert (s.length, s.in_flight) == (0, 0)
    assert (await live.stats(f"{jobs}.dead")).length == 3


async def test_delayed_requeue(world: World) -> None:
    (hub,) = await started(world, 1)
    store, jobs = store_of(hub), fresh("later")
    await store.push(jobs, "a")
    (item,) = await store.fetch(jobs, 1, block=0)
    assert await store.requeue(jobs, item.id, 1, delay=0.5)
    assert (await store.stats(jobs)).delayed == 1
    assert await store.fetch(jobs, 1, block=0) == []  # not due yet
    deadline = time.monotonic() + 10
    got: list[StoredItem] = []
    while not got and time.monotonic() < deadline:
        wait = await store.release_delayed(jobs)
        got = await store.fetch(jobs, 1, block=0)
        if not got:
            await asyncio.sleep(min(wait or 0.05, 0.1))
    assert [(i.data, i.attempts) for i in got] == [("a", 1)]


async def test_exactly_once_across_two_nodes(world: World) -> None:
    h1, h2 = await started(world, queue_visibility_timeout=5)
    store_of(h1)
    name, n = fresh("work"), 200
    got: dict[str, list[QueueItem]] = {"a": [], "b": []}
    done = asyncio.Event()

    def deliver(side: str, item: QueueItem) -> None:
        got[side].append(item)
        asyncio.get_running_loop().create_task(item.ack())
        if len(got["a"]) + len(got["b"]) == n:
            done.set()

    h1.queue(name).add_consumer(Consumer(lambda i: deliver("a", i), 8))
    h2.queue(name).add_consumer(Consumer(lambda i: deliver("b", i), 8))
    for i in range(n):
        await (h1 if i % 2 else h2).queue(name).push(i)
    await asyncio.wait_for(done.wait(), 30)
    data = sorted(i.data for side in got.values() for i in side)
    assert data == list(range(n))  # every item, exactly once


# --- the hub's StoreQueue on the store: what queue users see -----------------------------


def collector(max_in_flight: int) -> tuple[Consumer, list[QueueItem]]:
    """A consumer that holds at most ``max_in_flight`` items, and what it got."""
    got: list[QueueItem] = []
    return Consumer(got.append, max_in_flight), got


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for ``predicate()`` to hold, checking every 10 ms; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_node_dying_with_items_in_flight(world: World) -> None:
    """Nothing graceful reaches the server: the other node gets the items when the
    lease (visibility timeout + margin) expires, or when the server sees the
    node's connection go (brokers whose leases do not expire by time)."""
    a, b = await started(world, queue_visibility_timeout=0.5)
    store_of(a)
    jobs = fresh("jobs")
    ca, got_a = collector(10)
    a.queue(jobs).add_consumer(ca)
    for i in range(10):
        await a.queue(jobs).push(i)
    await until(lambda: len(got_a) == 10, "a's items")
    a.queues.close()  # crash: timers and fetching stop, no requeue, no ack
    await a.broker.close()
    cb, got_b = collector(10)
    b.queue(jobs).add_consumer(cb)
    await until(lambda: len(got_b) == 10, "b gets them")
    assert sorted(i.data for i in got_b) == list(range(10))
    attempts = [i.attempts for i in got_b]
    if getattr(store_of(b), "lease_expiry", True):
        assert attempts == [2] * 10, attempts
    else:  # the server counts its deliveries, also one a window gave back unseen
        assert min(attempts) == 2, attempts
    for item in got_b:
        assert await item.ack()
    await b.queue(jobs).refresh()
    assert (len(b.queue(jobs)), b.queue(jobs).in_flight) == (0, 0)


async def test_nack_with_delay(world: World) -> None:
    (hub,) = await started(world, 1)
    store_of(hub)
    q = hub.queue(fresh("later"))
    c, got = collector(5)
    q.add_consumer(c)
    await q.push("a")
    await until(lambda: len(got) == 1, "the item")
    assert q.nack(got[0].id, delay=0.4)
    await asyncio.sleep(0.1)
    await q.refresh()
    assert q.stats()["delayed"] == 1
    assert len(got) == 1
    await until(lambda: len(got) == 2, "the item again", 5)
    assert (got[1].data, got[1].attempts) == ("a", 2)


async def test_python_consumers_and_backpressure_across_nodes(world: World) -> None:
    a, b = await started(world)
    store_of(a)
    jobs = fresh("jobs")
    ca, got_a = collector(1)
    cb, got_b = collector(3)
    a.queue(jobs).add_consumer(ca)
    b.queue(jobs).add_consumer(cb)
    for i in range(10):
        await a.queue(jobs).push(i)
    await until(lambda: len(got_a) + len(got_b) == 4, "4 items out")
    await asyncio.sleep(0.2)  # time for a wrong fifth delivery to show
    assert (len(got_a), len(got_b)) == (1, 3)  # nobody holds more than it can take
    await b.queue(jobs).refresh()
    stats = b.queue(jobs).stats()
    held = 3 if getattr(store_of(b), "in_flight_local", False) else 4  # b's, or everyone's
    assert (stats["length"], stats["in_flight"]) == (6, held), stats
