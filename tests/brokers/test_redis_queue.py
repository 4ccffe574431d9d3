"""The Redis QueueStore (streams + one consumer group per queue) and the hub's
StoreQueue on top of it, against a real Redis: leases, claims of a dead
node's items, atomic requeue, the length bound, delays, a Redis restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.brokers.conftest import REDIS_URL, RedisServer, redis_ping, unavailable
from tests.support import wait_until
from tidings import Hub
from tidings.brokers.redis.queue import RedisQueueStore
from tidings.core.queue import Consumer, QueueItem
from tidings.core.store_queue import StoreQueue
from tidings.exceptions import QueueFull

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_url() -> str:
    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    return f"{REDIS_URL}?prefix=rq{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def nodes(redis_url: str) -> AsyncIterator[Any]:
    hubs: list[Hub] = []

    async def make(**kwargs: Any) -> Hub:
        hub = Hub(redis_url, **kwargs)
        await hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        await hub.stop()


def store_of(hub: Hub) -> RedisQueueStore:
    store = hub.queues.store
    assert isinstance(store, RedisQueueStore)
    return store


def collector(max_in_flight: int) -> tuple[Consumer, list[QueueItem]]:
    got: list[QueueItem] = []
    return Consumer(got.append, max_in_flight), got


async def test_store_is_used_with_redis(nodes: Any) -> None:
    hub = await nodes()
    assert isinstance(hub.queue("jobs"), StoreQueue)
    async with Hub() as memory:
        assert type(memory.queue("jobs")).__name__ == "WorkQueue"


async def test_a_node_dying_with_items_in_flight(nodes: Any) -> None:
    """Nothing graceful reaches Redis: the other node gets the items when the
    lease (visibility timeout + margin) expires."""
    a = await nodes(queue_visibility_timeout=0.5)
    b = await nodes(queue_visibility_timeout=0.5)
    ca, got_a = collector(10)
    a.queue("jobs").add_consumer(ca)
    for i in range(10):
        await a.queue("jobs").push(i)
    await wait_until(lambda: len(got_a) == 10, what="a's items")
    a.queues.close()  # crash: timers and fetching stop, no requeue, no ack
    await a.broker.close()
    started = time.monotonic()
    cb, got_b = collector(10)
    b.queue("jobs").add_consumer(cb)
    await wait_until(lambda: len(got_b) == 10, what="b gets them")
    assert time.monotonic() - started >= 0.4
    assert sorted(i.data for i in got_b) == list(range(10))
    assert all(i.attempts == 2 for i in got_b)
    for item in got_b:
        assert await item.ack()
    await b.queue("jobs").refresh()
    assert (len(b.queue("jobs")), b.queue("jobs").in_flight) == (0, 0)


async def test_length_bound_refuses_pushes(redis_url: str) -> None:
    async with Hub(redis_url + "&queue_max_len=3") as hub:
        q = hub.queue("small")
        for i in range(3):
            await q.push(i)
        with pytest.raises(QueueFull):
            await q.push(3)
        c, got = collector(1)
        q.add_consumer(c)
        await wait_until(lambda: len(got) == 1)
        assert await got[0].ack()
        await q.push(3)  # room again


async def test_nack_with_delay(nodes: Any) -> None:
    hub = await nodes()
    q = hub.queue("later")
    c, got = collector(5)
    q.add_consumer(c)
    await q.push("a")
    await wait_until(lambda: len(got) == 1)
    assert q.nack(got[0].id, delay=0.4)
    await asyncio.sleep(0.1)
    await q.refresh()
    assert q.stats()["delayed"] == 1 and len(got) == 1
    await wait_until(lambda: len(got) == 2, 5)
    assert (got[1].data, got[1].attempts) == ("a", 2)


async def test_python_consumers_and_backpressure_across_nodes(nodes: Any) -> None:
    a, b = await nodes(), await nodes()
    ca, got_a = collector(1)
    cb, got_b = collector(3)
    a.queue("jobs").add_consumer(ca)
    b.queue("jobs").add_consumer(cb)
    for i in range(10):
        await a.queue("jobs").push(i)
    await wait_until(lambda: len(got_a) + len(got_b) == 4)
    await asyncio.sleep(0.2)
    assert (len(got_a), len(got_b)) == (1, 3)  # nobody holds more than it can take
    await b.queue("jobs").refresh()
    assert len(b.queue("jobs")) == 6 and b.queue("jobs").in_flight == 4


async def test_redis_restart_without_persistence() -> None:
    """A restart loses the stream and the group (no persistence): the node
    recreates the group and goes on with new items."""
    server = RedisServer()
    try:
        async with Hub(server.url + "?prefix=rr") as hub:
            q = hub.queue("jobs")
            c, got = collector(10)
            q.add_consumer(c)
            await q.push("before")
            await wait_until(lambda: len(got) == 1)
            assert await got[0].ack()
            server.kill()
            await asyncio.sleep(0.3)
            server.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    await q.push("after")
                    break
                except Exception:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            await wait_until(lambda: len(got) == 2, 15, "an item after the restart")
            assert got[1].data == "after"
    finally:
        server.stop()


async def test_on_redis_cluster(cluster_nodes: list[RedisServer]) -> None:
    """The same scripts on a cluster: every key of a queue shares its hash tag."""
    url = f"redis+cluster://127.0.0.1:{cluster_nodes[0].port}?prefix=cq{uuid.uuid4().hex[:6]}"
    async with Hub(url, queue_visibility_timeout=0.3, queue_max_attempts=2) as a, \
            Hub(url, queue_visibility_timeout=0.3, queue_max_attempts=2) as b:
        for name in ("q1", "q2", "q3"):  # on different shards, most likely
            for i in range(5):
                await a.queue(name).push(i)
            c, got = collector(5)
            b.queue(name).add_consumer(c)
            await wait_until(lambda got=got: len(got) == 5, what=f"items of {name}")
            assert [i.data for i in got] == list(range(5))
            for item in got[:4]:
                assert await item.ack()
            # the last one is never acked: back once, then dead
            await wait_until(lambda got=got: len(got) == 6, 5, "a redelivery")
            dead = a.queue(f"{name}.dead")

            async def buried(dead: StoreQueue = dead) -> int:
                await dead.refresh()
                return len(dead)

            deadline = time.monotonic() + 10
            while await buried() < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            b.queue(name).remove_consumer(c)
