"""Work queues in one process: exactly-once hand-out, redelivery, dead letters."""

from __future__ import annotations

import asyncio

from tests.support import wait_until
from tidings import Hub
from tidings.core.queue import Consumer, QueueItem


def collector(max_in_flight: int) -> tuple[Consumer, list[QueueItem]]:
    got: list[QueueItem] = []
    return Consumer(got.append, max_in_flight), got


async def test_each_item_to_one_consumer_round_robin(hub: Hub) -> None:
    q = hub.queue("jobs")
    (c1, got1), (c2, got2) = collector(100), collector(100)
    q.add_consumer(c1)
    q.add_consumer(c2)
    for i in range(10):
        await q.push(i)
    assert sorted(i.data for i in got1 + got2) == list(range(10))
    assert len(got1) == len(got2) == 5


async def test_backpressure_max_in_flight(hub: Hub) -> None:
    q = hub.queue("jobs")
    c, got = collector(1)
    q.add_consumer(c)
    for i in range(3):
        await q.push(i)
    assert [i.data for i in got] == [0]
    assert len(c.in_flight) == 1
    assert q.ack(got[0].id)
    assert [i.data for i in got] == [0, 1]
    assert not q.ack(got[0].id)  # double ack is refused


async def test_consumer_leaving_gives_items_back(hub: Hub) -> None:
    q = hub.queue("jobs")
    c1, got1 = collector(10)
    q.add_consumer(c1)
    for i in range(10):
        await q.push(i)
    assert len(got1) == 10
    c2, got2 = collector(10)
    q.add_consumer(c2)
    assert got2 == []
    q.remove_consumer(c1)
    assert [i.data for i in got2] == list(range(10))  # same order, to the other consumer
    assert all(i.attempts == 2 for i in got2)


async def test_visibility_timeout_then_dead_letter() -> None:
    async with Hub(queue_visibility_timeout=0.05, queue_max_attempts=3) as hub:
        q = hub.queue("jobs")
        c, got = collector(1)
        q.add_consumer(c)
        await q.push("never acked")
        dead = hub.queue("jobs.dead")

        await wait_until(lambda: len(dead) == 1, 5)
        assert len(got) == 3  # delivered three times (the same item)
        assert got[-1].attempts == 3
        d = []
        async for item in dead.consume():
            d.append(item.data)
            await item.ack()
            break
        assert d[0]["data"] == "never acked"
        assert d[0]["attempts"] == 3


async def test_nack_with_delay_and_without_requeue(hub: Hub) -> None:
    q = hub.queue("jobs")
    c, got = collector(5)
    q.add_consumer(c)
    await q.push("a")
    await q.push("b")
    assert q.nack(got[0].id, requeue=False)
    assert len(hub.queue("jobs.dead")) == 1
    assert q.nack(got[1].id, delay=0.05)
    await wait_until(lambda: len(got) == 3, 5)
    assert got[2].data == "b"


async def test_python_consumer_ends_when_hub_stops() -> None:
    hub = Hub()
    await hub.start()
    q = hub.queue("idle")
    started = asyncio.Event()

    async def consume() -> int:
        n = 0
        started.set()
        async for _ in q.consume():
            n += 1
        return n

    task = asyncio.create_task(consume())
    await started.wait()
    await asyncio.sleep(0)
    await hub.stop()
    assert await asyncio.wait_for(task, 5) == 0
