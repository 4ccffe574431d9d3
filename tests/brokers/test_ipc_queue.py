"""Work queues shared by the workers of one relay (``ipc://``): the in-memory
store (:mod:`tidings.brokers.memory_queue`) the relay holds, its wire ops, and
the hub's StoreQueue on top of it with two nodes on one relay. The same
guarantees as the Redis queue tests, plus what only the relay can do: give a
gone worker's items back at once instead of waiting for the lease to expire.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import wait_until
from tidings import BrokerUnavailable, Hub
from tidings.brokers.ipc.broker import IpcQueueStore
from tidings.brokers.ipc.relay import Relay
from tidings.brokers.ipc.wire import FrameReader
from tidings.brokers.memory_queue import MemoryQueues
from tidings.core.queue import Consumer, QueueItem
from tidings.core.store_queue import StoreQueue
from tidings.exceptions import QueueFull
from tidings.testing.queue_store import collector


@pytest.fixture
async def relay_path() -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory(prefix="tidings-ipcq-") as tmp:
        yield str(Path(tmp) / "relay.sock")


@pytest.fixture
async def relay(relay_path: str) -> AsyncIterator[Relay]:
    async with Relay(relay_path) as r:
        yield r


@pytest.fixture
async def nodes(relay: Relay) -> AsyncIterator[Any]:
    hubs: list[Hub] = []

    async def make(**kwargs: Any) -> Hub:
        hub = Hub(f"ipc://{relay.path}", **kwargs)
        await hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        await hub.stop()


def store_of(hub: Hub) -> IpcQueueStore:
    store = hub.queues.store
    assert isinstance(store, IpcQueueStore)
    return store


# -- the in-memory store, no I/O ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_store_fifo_leases_and_ack() -> None:
    qs = MemoryQueues()
    a, b = qs.store("a"), qs.store("b")
    ids = [await a.push("jobs", i) for i in range(5)]
    items = await b.fetch("jobs", 3, block=0)
    assert [i.data for i in items] == [0, 1, 2] and [i.id for i in items] == ids[:3]
    assert all(i.attempts == 0 for i in items)
    s = await a.stats("jobs")
    assert (s.length, s.in_flight, s.delayed) == (2, 3, 0)
    assert await a.ack("jobs", [i.id for i in items]) == 3  # any node may ack
    assert await a.ack("jobs", [items[0].id]) == 0
    assert [i.data for i in await a.fetch("jobs", 10, block=0)] == [3, 4]
    assert await a.fetch("nothing", 10, block=0) == []


async def test_memory_store_requeue_only_by_the_holder_and_dead_letters() -> None:
    qs = MemoryQueues()
    a, b = qs.store("a"), qs.store("b")
    await a.push("jobs", "x")
    (item,) = await a.fetch("jobs", 1, block=0)
    assert not await b.requeue("jobs", item.id, 1)
    assert await a.requeue("jobs", item.id, 1)
    assert not await a.requeue("jobs", item.id, 1)  # no duplicate
    (again,) = await b.fetch("jobs", 1, block=0)
    assert (again.data, again.attempts) == ("x", 1) and again.id != item.id
    assert await b.requeue("jobs", again.id, 2, dead=True)
    (letter,) = await b.fetch("jobs.dead", 1, block=0)
    assert letter.data == {"id": again.id, "data": "x", "attempts": 2, "queue": "jobs"}
    assert await b.requeue("jobs.dead", letter.id, 5, dead=True)  # dropped there
    assert (await b.stats("jobs.dead")).length == 0
    assert (await b.stats("jobs")).in_flight == 0


async def test_memory_store_claim_delay_and_drop_node() -> None:
    clock = Clock()
    qs = MemoryQueues(clock=clock)
    dead_node, live = qs.store("dead"), qs.store("live")
    for i in range(3):
        await dead_node.push("jobs", i)
    held = await dead_node.fetch("jobs", 3, block=0)
    assert await live.claim("jobs", min_idle=1, count=10, max_attempts=5) == []
    clock.now += 1
    claimed = await live.claim("jobs", min_idle=1, count=2, max_attempts=5)
    assert [(c.data, c.attempts) for c in claimed] == [(0, 1), (1, 1)]  # oldest first
    assert not await dead_node.requeue("jobs", held[0].id, 1)
    clock.now += 1
    # 0 and 1 delivered twice now, 2 once; max 2: the first two are dead, 2 is claimed
    claimed = await live.claim("jobs", min_idle=1, count=10, max_attempts=2)
    assert [(c.data, c.attempts) for c in claimed] == [(2, 1)]
    assert (await live.stats("jobs.dead")).length == 2
    # delayed
    assert await live.requeue("jobs", claimed[0].id, 2, delay=5)
    assert (await live.stats("jobs")).delayed == 1
    assert await live.release_delayed("jobs") == 5
    clock.now += 5
    assert await live.release_delayed("jobs") is None
    (late,) = await live.fetch("jobs", 1, block=0)
    assert (late.data, late.attempts) == (2, 2)
    # a node that is gone: its leases go back to the front at once, delivery counted
    # (out of attempts by the queue's last claim: dead-lettered instead)
    await live.push("jobs", "next")
    assert await live.claim("jobs", min_idle=100, count=1, max_attempts=5) == []
    assert qs.drop_node("live") == 1
    (first, second) = await dead_node.fetch("jobs", 2, block=0)
    assert (first.id, first.data, first.attempts) == (late.id, 2, 3)
    assert second.data == "next"
    await dead_node.claim("jobs", min_idle=100, count=1, max_attempts=4)
    assert qs.drop_node("dead") == 2
    assert [i.data for i in await live.fetch("jobs", 5, block=0)] == ["next"]
    assert (await live.stats("jobs.dead")).length == 3  # 2 had 4 deliveries: dead


async def test_memory_store_blocking_fetch_is_woken_and_released() -> None:
    qs = MemoryQueues()
    a, b = qs.store("a"), qs.store("b")
    started = time.monotonic()
    assert await a.fetch("jobs", 1, block=0.1) == []  # waits, bounded
    assert 0.08 <= time.monotonic() - started < 1
    waiting = asyncio.create_task(a.fetch("jobs", 5, block=10))
    await asyncio.sleep(0.05)
    await b.push("jobs", "hi")
    items = await asyncio.wait_for(waiting, 1)
    assert [i.data for i in items] == ["hi"]
    waiting = asyncio.create_task(a.fetch("jobs", 5, block=10))
    await asyncio.sleep(0.05)
    await b.release("jobs")  # another node's release: not ours
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await a.release("jobs")
    assert await asyncio.wait_for(waiting, 1) == []
    await b.push("jobs", "kept")  # the released fetch did not lease it
    assert (await a.stats("jobs")).length == 1


async def test_memory_store_length_bound() -> None:
    qs = MemoryQueues(max_len=2)
    s = qs.store("n")
    await s.push("q", 1)
    await s.push("q", 2)
    with pytest.raises(QueueFull):
        await s.push("q", 3)
    (item,) = await s.fetch("q", 1, block=0)
    with pytest.raises(QueueFull):  # in flight counts too
        await s.push("q", 3)
    await s.ack("q", [item.id])
    await s.push("q", 3)
    for i in range(5):  # a dead-letter queue is trimmed instead
        await s.push("q.dead", i)
    assert [i.data for i in await s.fetch("q.dead", 10, block=0)] == [3, 4]


# -- the relay's queue ops ----------------------------------------------------------------


async def test_store_is_used_with_ipc(nodes: Any) -> None:
    hub = await nodes()
    assert isinstance(hub.queue("jobs"), StoreQueue)


async def test_binary_items_and_queue_full_cross_the_relay(relay_path: str) -> None:
    async with Relay(relay_path, queue_max_len=2), Hub(f"ipc://{relay_path}") as hub:
        store = store_of(hub)
        await store.push("bin", b"\x00\xff")
        await store.push("bin", {"k": [1, 2]})
        with pytest.raises(QueueFull):
            await store.push("bin", "three")
        first, second = await store.fetch("bin", 2, block=0)
        assert (first.data, second.data) == (b"\x00\xff", {"k": [1, 2]})
        assert await store.requeue("bin", first.id, 1, dead=True)
        (letter,) = await store.fetch("bin.dead", 1, block=0)
        assert letter.data == {"id": first.id, "data": b"\x00\xff", "attempts": 1,
                               "queue": "bin"}


async def test_a_blocked_fetch_does_not_hold_up_other_requests(nodes: Any) -> None:
    a, b = await nodes(), await nodes()
    store = store_of(a)
    fetch = asyncio.create_task(store.fetch("jobs", 3, block=2.0))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    for i in range(20):  # same worker, same socket: answered while the fetch waits
        await a.publish("news", i)
    await store.stats("jobs")
    assert time.monotonic() - started < 0.5
    assert not fetch.done()
    await store_of(b).push("jobs", "hi")  # wakes it, from the other node
    items = await asyncio.wait_for(fetch, 1)
    assert [i.data for i in items] == ["hi"]
    # release answers a waiting fetch at once, with nothing leased
    fetch = asyncio.create_task(store.fetch("jobs", 3, block=2.0))
    await asyncio.sleep(0.05)
    await store.release("jobs")
    assert await asyncio.wait_for(fetch, 1) == []


async def test_publish_order_holds_with_queue_traffic(nodes: Any) -> None:
    """Queue ops (one of them waiting) interleaved with publishes: offsets in order."""
    a = await nodes()
    store = store_of(a)
    waiting = asyncio.create_task(store.fetch("idle", 1, block=1.0))
    pubs = await asyncio.gather(*(a.publish("ordered", i) for i in range(200)),
                                *(store.push("busy", i) for i in range(200)))
    offsets = [p.offset for p in pubs[:200]]
    assert offsets == list(range(1, 201))
    assert await waiting == []


# -- two nodes, the hub's consumer logic ----------------------------------------------------


async def test_5000_items_2_producers_4_consumers_2_nodes_exactly_once(nodes: Any) -> None:
    n = 5000
    a, b = await nodes(), await nodes()
    seen: list[int] = []
    per_consumer = [0, 0, 0, 0]

    async def consumer(k: int, hub: Hub) -> None:
        async for item in hub.queue("jobs").consume(max_in_flight=20):
            seen.append(item.data)
            per_consumer[k] += 1
            if k % 2:
                await asyncio.sleep(0)  # a bit slower than the other one
            assert await item.ack()

    async def producer(hub: Hub, items: range) -> None:
        for i in items:
            await hub.queue("jobs").push(i)

    consumers = [asyncio.create_task(consumer(k, hub)) for k, hub in enumerate((a, a, b, b))]
    try:
        await wait_until(lambda: a.queue("jobs").consumers == 2
                         and b.queue("jobs").consumers == 2)
        await asyncio.gather(producer(a, range(0, n // 2)), producer(b, range(n // 2, n)))
        await wait_until(lambda: len(seen) >= n, 60, "every item")
        await asyncio.sleep(0.3)  # a duplicate would show up meanwhile
    finally:
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    assert len(seen) == n
    assert sorted(seen) == list(range(n))  # no loss, no duplicate
    assert all(per_consumer), per_consumer  # all four consumers worked
    assert a.queue("jobs").acked + b.queue("jobs").acked == n
    await a.queue("jobs").refresh()
    s = a.queue("jobs").stats()
    assert (s["length"], s["in_flight"], s["delayed"], s["redelivered"]) == (0, 0, 0, 0)


async def test_consumer_leaving_with_items_they_go_to_the_other_node(nodes: Any) -> None:
    a, b = await nodes(), await nodes()
    ca, got_a = collector(10)
    a.queue("work").add_consumer(ca)
    for i in range(10):
        await b.queue("work").push(i)  # pushed on the other node
    await wait_until(lambda: len(got_a) == 10, what="a holds them")
    cb, got_b = collector(10)
    b.queue("work").add_consumer(cb)
    await asyncio.sleep(0.2)
    assert got_b == []  # nothing while a holds them
    await a.queue("work").refresh()
    assert a.queue("work").in_flight == 10
    a.queue("work").remove_consumer(ca)  # a disconnects: nothing acked
    await wait_until(lambda: len(got_b) == 10, what="b gets them")
    assert sorted(i.data for i in got_b) == list(range(10))
    assert all(i.attempts == 2 for i in got_b)
    for item in got_b:
        assert await item.ack()
    await b.queue("work").refresh()
    assert (len(b.queue("work")), b.queue("work").in_flight) == (0, 0)


async def test_visibility_timeout_then_dead_letter(nodes: Any) -> None:
    a = await nodes(queue_visibility_timeout=0.3, queue_max_attempts=3)
    b = await nodes(queue_visibility_timeout=0.3, queue_max_attempts=3)
    deliveries: list[tuple[float, Any, int]] = []

    def record(item: QueueItem) -> None:
        deliveries.append((time.monotonic(), item.data, item.attempts))

    a.queue("jobs").add_consumer(Consumer(record, 5))
    b.queue("jobs").add_consumer(Consumer(record, 5))
    for i in range(3):
        await a.queue("jobs").push(i)
    dead = b.queue("jobs.dead")

    async def buried() -> int:
        await dead.refresh()
        return len(dead)

    deadline = time.monotonic() + 15
    while await buried() < 3:
        assert time.monotonic() < deadline, deliveries
        await asyncio.sleep(0.05)
    for i in range(3):
        times = [t for t, d, _ in deliveries if d == i]
        assert sorted(at for _, d, at in deliveries if d == i) == [1, 2, 3]
        assert all(y - x >= 0.25 for x, y in itertools.pairwise(times)), times
    cd, letters = collector(3)
    a.queue("jobs.dead").add_consumer(cd)
    await wait_until(lambda: len(letters) == 3)
    assert sorted(x.data["data"] for x in letters) == [0, 1, 2]
    assert all(x.data["queue"] == "jobs" and x.data["attempts"] == 3 for x in letters)


async def test_backpressure_max_1_never_holds_2(nodes: Any) -> None:
    a, b = await nodes(), await nodes()
    ca, got_a = collector(1)
    cb, got_b = collector(3)
    a.queue("slow").add_consumer(ca)
    b.queue("slow").add_consumer(cb)
    for i in range(10):
        await a.queue("slow").push(i)
    await wait_until(lambda: len(got_a) + len(got_b) == 4)
    await asyncio.sleep(0.3)
    assert (len(got_a), len(got_b)) == (1, 3)  # nobody holds more than it can take
    await b.queue("slow").refresh()
    assert len(b.queue("slow")) == 6 and b.queue("slow").in_flight == 4
    for _ in range(3):  # a acks one at a time: never two at once
        n = len(got_a)
        assert await got_a[-1].ack()
        await wait_until(lambda n=n: len(got_a) == n + 1)
        await asyncio.sleep(0.1)
        assert len(ca.in_flight) == 1


WORKER = """
import asyncio, sys
from tidings import Hub
from tidings.core.queue import Consumer

async def main():
    hub = Hub(sys.argv[1])
    await hub.start()
    got = []
    def deliver(item):
        got.append(item)
        if len(got) == 10:
            print("holding", flush=True)
    hub.queue("jobs").add_consumer(Consumer(deliver, 10))
    print(hub.node, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_worker_process_items_go_to_the_other_node(relay: Relay,
                                                                 nodes: Any) -> None:
    hub = await nodes()  # the default visibility timeout: 30 s, lease 31 s
    worker = subprocess.Popen([sys.executable, "-c", WORKER, f"ipc://{relay.path}"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        node = (await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 20)).strip()
        assert node, "the worker did not start"
        await wait_until(lambda: node in relay.nodes)
        await wait_until(lambda: "jobs" in relay.queues.queues(), what="the worker fetching")
        for i in range(10):
            await hub.queue("jobs").push(i)
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 20)
        assert line.strip() == "holding"
        assert relay.queues.stats("jobs").in_flight == 10
        cb, got = collector(10)
        hub.queue("jobs").add_consumer(cb)
        await asyncio.sleep(0.2)
        assert got == []
        os.kill(worker.pid, signal.SIGKILL)  # no goodbye: the relay notices the socket
        started = time.monotonic()
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
        await asyncio.to_thread(worker.wait, 10)
        if worker.stdout is not None:
            worker.stdout.close()
    await wait_until(lambda: len(got) == 10, 10, "the other node to get the items")
    assert time.monotonic() - started < 5  # not after the 31 s lease
    assert sorted(i.data for i in got) == list(range(10))
    assert all(i.attempts == 2 for i in got)
    for item in got:
        assert await item.ack()
    s = relay.queues.stats("jobs")
    assert (s.length, s.in_flight) == (0, 0)


async def test_disconnect_cleanup_with_a_raw_worker(relay: Relay) -> None:
    """The relay gives a gone node's leases back itself, and a fetch that was
    waiting for that node leases nothing."""
    reader, writer = await asyncio.open_unix_connection(relay.path)
    frames = FrameReader()

    def send(*msg: Any) -> None:
        frame = orjson.dumps(list(msg))
        writer.write(len(frame).to_bytes(4, "big") + frame)

    async def replies(n: int) -> list[Any]:
        got: list[Any] = []
        while len(got) < n:
            got += frames.feed(await asyncio.wait_for(reader.read(65536), 5))
        return got

    send(1, "hello", "raw", "t")
    send(2, "qpush", "jobs", "x", False)
    send(3, "qpush", "jobs", "y", False)
    send(4, "qfetch", "jobs", 1, 0)
    send(5, "qfetch", "other", 1, 5.0)  # waits in a task of its own...
    send(6, "ping")  # ...while this is answered
    got = await replies(5)
    assert [r[0] for r in got] == [1, 2, 3, 4, 6]
    assert got[3][2] == [["1", "x", 0, 0]]
    assert relay.queues.stats("jobs").in_flight == 1
    writer.close()
    await wait_until(lambda: "raw" not in relay.nodes)
    s = relay.queues.stats("jobs")
    assert (s.length, s.in_flight) == (2, 0)
    store = relay.queues.store("next")
    first, second = await store.fetch("jobs", 2, block=0)
    assert (first.data, first.attempts, second.data) == ("x", 1, "y")  # front, counted
    await store.push("other", "z")
    assert relay.queues.stats("other").length == 1  # the dead fetch did not take it


async def test_relay_restart_loses_the_queues_and_calls_fail_fast(relay_path: str) -> None:
    relay = Relay(relay_path)
    await relay.start()
    hub = Hub(f"ipc://{relay_path}")
    relay2: Relay | None = None
    try:
        await hub.start()
        await hub.queue("jobs").push("before")
        await relay.stop()
        await wait_until(lambda: not hub.health().up, 10)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await hub.queue("jobs").push("during")
        assert time.monotonic() - started < 1
        relay2 = Relay(relay_path)
        await relay2.start()
        await wait_until(lambda: hub.health().up, 20)
        await hub.queue("jobs").refresh()
        assert len(hub.queue("jobs")) == 0  # the items lived in the old relay
        c, got = collector(5)
        hub.queue("jobs").add_consumer(c)
        await hub.queue("jobs").push("after")
        await wait_until(lambda: len(got) == 1)
        assert got[0].data == "after"
    finally:
        await hub.stop()
        await relay.stop()
        if relay2 is not None:
            await relay2.stop()
