"""The queue-store conformance suite: the QueueStore contract, node against node.

Import its tests into a module that defines the ``world`` fixture (see
:mod:`tidings.testing`); they skip unless the broker has a shared queue store.
Each test uses its own queue names, so one broker may serve them all.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tidings.brokers.base import QueueStore, StoredItem
from tidings.core.queue import Consumer, QueueItem
from tidings.hub import Hub
from tidings.testing.support import World, requires, started

__all__ = [
    "test_claim_expired_leases_of_a_dead_node",
    "test_delayed_requeue",
    "test_exactly_once_across_two_nodes",
    "test_push_fetch_ack_fifo",
    "test_requeue_is_atomic_and_only_by_the_holder",
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
