"""Work queues shared by two nodes on one Redis, over real sockets (issue 5).

Two hubs on one Redis URL (a unique ``?prefix=`` per test), each served by
uvicorn; producers on ``/ws/push``, consumers over the native protocol
(``pull`` + manual ``ack``) and over ``/ws/pull?ack=manual``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from tests.brokers.conftest import REDIS_URL, redis_ping, unavailable
from tests.support import apost, native, running, wait_until, ws_url
from tidings import Hub

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_url() -> str:
    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    return f"{REDIS_URL}?prefix=q{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def two_nodes(url: str, **kwargs: Any) -> AsyncIterator[tuple[Hub, str, Hub, str]]:
    h1, h2 = Hub(url, **kwargs), Hub(url, **kwargs)
    async with running(h1) as b1, running(h2) as b2:
        yield h1, b1, h2, b2


async def stats(base: str, queue: str) -> dict[str, Any]:
    status, body = await apost(base, "queue_stats", {"queue": queue})
    assert status == 200, body
    result: dict[str, Any] = body["result"]
    return result


async def test_10000_items_2_producers_4_consumers_2_nodes_exactly_once(redis_url: str) -> None:
    n = 10_000
    seen: list[int] = []
    per_consumer = [0, 0, 0, 0]

    async def native_consumer(k: int, base: str, ready: asyncio.Event) -> None:
        async with native(base) as c:
            await c.request({"type": "pull", "queue": "jobs", "max": 20})
            ready.set()
            while True:
                frame = await c.recv(30)
                if frame["type"] != "item":
                    continue  # ack replies
                seen.append(frame["data"])
                per_consumer[k] += 1
                await c.send({"type": "ack", "queue": "jobs", "item": frame["item"]})

    async def raw_consumer(k: int, base: str, ready: asyncio.Event) -> None:
        async with websockets.connect(ws_url(base, "/ws/pull/jobs?ack=manual&max=20")) as ws:
            ready.set()
            while True:
                seen.append(json.loads(await ws.recv()))
                per_consumer[k] += 1
                await ws.send('{"ack": true}')

    async def producer(base: str, items: range) -> None:
        async with websockets.connect(ws_url(base, "/ws/push/jobs?ack=1")) as ws:
            for i in items:
                await ws.send(json.dumps(i))
            for _ in items:  # every push confirmed: in Redis
                assert "item" in json.loads(await ws.recv())

    async with two_nodes(redis_url) as (h1, b1, h2, b2):
        readies = [asyncio.Event() for _ in range(4)]
        consumers = [
            asyncio.create_task(native_consumer(0, b1, readies[0])),
            asyncio.create_task(raw_consumer(1, b1, readies[1])),
            asyncio.create_task(native_consumer(2, b2, readies[2])),
            asyncio.create_task(raw_consumer(3, b2, readies[3])),
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 10)
            await asyncio.gather(producer(b1, range(0, n // 2)), producer(b2, range(n // 2, n)))
            await wait_until(lambda: len(seen) >= n, 60, "every item")
            await asyncio.sleep(0.5)  # a duplicate would show up meanwhile
            await wait_until(lambda: h1.queue("jobs").local_in_flight == 0
                             and h2.queue("jobs").local_in_flight == 0, 10, "acks")
        finally:
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
        assert len(seen) == n
        assert sorted(seen) == list(range(n))  # no loss, no duplicate
        assert all(per_consumer), per_consumer  # all four consumers worked
        await wait_until(lambda: h1.queue("jobs").acked + h2.queue("jobs").acked == n, 10)
        s = await stats(b2, "jobs")
        assert (s["length"], s["in_flight"], s["delayed"]) == (0, 0, 0)
        assert s["redelivered"] == 0


async def test_killed_consumer_items_go_to_a_consumer_on_the_other_node(redis_url: str) -> None:
    async with two_nodes(redis_url) as (_h1, b1, h2, b2):
        async with native(b1) as quitter:
            await quitter.request({"type": "pull", "queue": "work", "max": 10})
            for i in range(10):
                await h2.queue("work").push(i)  # pushed on the other node
            held = [await quitter.next("item") for _ in range(10)]
            assert sorted(h["data"] for h in held) == list(range(10))
            assert (await stats(b1, "work"))["in_flight"] == 10
            async with native(b2) as heir:
                await heir.request({"type": "pull", "queue": "work", "max": 10})
                with pytest.raises(TimeoutError):
                    await heir.next("item", timeout=0.3)  # nothing while the quitter holds
                await quitter.ws.close()  # killed: socket gone, nothing acked
                again = [await heir.next("item") for _ in range(10)]
                assert sorted(a["data"] for a in again) == list(range(10))
                assert all(a["attempt"] == 2 for a in again)
                for a in again:
                    reply = await heir.request({"type": "ack", "queue": "work",
                                                "item": a["item"]})
                    assert reply["type"] == "reply"
        await wait_until(lambda: h2.queue("work").local_in_flight == 0)
        # acks reach Redis in batches after the reply: wait for the store to agree
        deadline = time.monotonic() + 10
        while (s := await stats(b1, "work"))["in_flight"] and time.monotonic() < deadline:  # noqa: ASYNC110 - polls Redis
            await asyncio.sleep(0.05)
        assert (s["length"], s["in_flight"]) == (0, 0)


async def test_never_acked_items_come_back_then_dead_letter(redis_url: str) -> None:
    async with two_nodes(redis_url, queue_visibility_timeout=0.5,
                         queue_max_attempts=3) as (h1, b1, h2, b2):
        deliveries: list[tuple[float, int, int]] = []  # (time, data, attempt)

        async def sloth(base: str) -> None:
            async with native(base) as c:
                await c.request({"type": "pull", "queue": "jobs", "max": 5})
                while True:
                    frame = await c.next("item", timeout=30)
                    deliveries.append((time.monotonic(), frame["data"], frame["attempt"]))

        sloths = [asyncio.create_task(sloth(b1)), asyncio.create_task(sloth(b2))]
        try:
            await wait_until(lambda: h1.queue("jobs").consumers == 1
                             and h2.queue("jobs").consumers == 1)
            for i in range(3):
                await h1.queue("jobs").push(i)
            dead = h2.queue("jobs.dead")

            async def buried() -> int:
                await dead.refresh()
                return len(dead)

            deadline = time.monotonic() + 20
            while await buried() < 3:
                assert time.monotonic() < deadline, deliveries
                await asyncio.sleep(0.05)
        finally:
            for task in sloths:
                task.cancel()
            await asyncio.gather(*sloths, return_exceptions=True)
        for i in range(3):
            times = [t for t, d, _ in deliveries if d == i]
            attempts = sorted(a for _, d, a in deliveries if d == i)
            assert attempts == [1, 2, 3]  # delivered exactly max_attempts times
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(g >= 0.45 for g in gaps), gaps  # back only after the timeout
        # the dead letters can be read (here from the other node) and replayed
        async with native(b2) as reader:
            await reader.request({"type": "pull", "queue": "jobs.dead", "max": 3})
            letters = [await reader.next("item") for _ in range(3)]
            for letter in letters:
                assert letter["data"]["queue"] == "jobs"
                assert letter["data"]["attempts"] == 3
                await h1.queue("jobs").push(letter["data"]["data"])  # replay
                await reader.request({"type": "ack", "queue": "jobs.dead",
                                      "item": letter["item"]})
            assert sorted(letter["data"]["data"] for letter in letters) == [0, 1, 2]
        s = await stats(b1, "jobs")
        assert s["length"] == 3 and s["in_flight"] == 0  # replayed, waiting
        assert (await stats(b1, "jobs.dead"))["length"] == 0


async def test_backpressure_max_1_never_holds_2(redis_url: str) -> None:
    async with two_nodes(redis_url) as (h1, b1, h2, b2), native(b1) as c:
        await c.request({"type": "pull", "queue": "slow", "max": 1})
        for i in range(20):
            await h2.queue("slow").push(i)
        got = []
        for _ in range(5):
            item = await c.next("item")
            got.append(item["data"])
            with pytest.raises(TimeoutError):  # no second item while one is unacked
                await c.next("item", timeout=0.2)
            assert h1.queue("slow").local_in_flight == 1
            s = await stats(b2, "slow")
            assert s["in_flight"] == 1  # the node leased one, not a batch
            assert s["length"] == 20 - len(got)
            await c.request({"type": "ack", "queue": "slow", "item": item["item"]})
        assert got == [0, 1, 2, 3, 4]  # FIFO


async def test_shutdown_with_idle_consumers_is_quick_and_keeps_in_flight_items(
        redis_url: str) -> None:
    hub = Hub(redis_url)
    py_done = asyncio.Event()

    async def python_consumer() -> None:
        async for _ in hub.queue("idle").consume():
            pass
        py_done.set()

    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(running(hub))
        idle = [await stack.enter_async_context(native(base)) for _ in range(2)]
        for c in idle:
            await c.request({"type": "pull", "queue": "idle", "max": 5})
        raw = await stack.enter_async_context(
            websockets.connect(ws_url(base, "/ws/pull/idle?ack=manual")))
        task = asyncio.create_task(python_consumer())
        holder = await stack.enter_async_context(native(base))
        await holder.request({"type": "pull", "queue": "busy", "max": 5})
        for i in range(5):
            await hub.queue("busy").push(i)
        held = [await holder.next("item") for _ in range(5)]
        assert sorted(h["data"] for h in held) == list(range(5))
        await wait_until(lambda: hub.queue("idle").consumers == 4)
        await asyncio.sleep(1.2)  # the fetch loops are blocked in XREADGROUP
        started = time.monotonic()
        await stack.aclose()  # server stops while everyone waits on an empty queue
        assert time.monotonic() - started < 5
    assert raw is not None
    await asyncio.wait_for(py_done.wait(), 1)
    await task
    # the held items were never acked: a new node gets them
    async with Hub(redis_url) as again:
        got = []
        async for item in again.queue("busy").consume(max_in_flight=5):
            got.append(item.data)
            assert item.attempts >= 2
            await item.ack()
            if len(got) == 5:
                break
        assert sorted(got) == list(range(5))
