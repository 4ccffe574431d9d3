"""The PostgreSQL QueueStore (one table, ``FOR UPDATE SKIP LOCKED`` leases) and
the hub's StoreQueue on top of it, against a real PostgreSQL: leases, claims
of a dead node's items, atomic requeue, the length bound, delays, dead letters,
blocking fetches woken by NOTIFY, and a server restart (items are durable)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.brokers.conftest import PostgresServer, postgres_drop, postgres_url
from tests.support import wait_until
from tidings import Hub
from tidings.brokers.postgres_queue import PostgresQueueStore
from tidings.testing.queue_store import collector


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await postgres_url("pq")
    yield url
    await postgres_drop(url, url.rsplit("prefix=", 1)[1])


@pytest.fixture
async def nodes(pg_url: str) -> AsyncIterator[Any]:
    hubs: list[Hub] = []

    async def make(**kwargs: Any) -> Hub:
        hub = Hub(pg_url, **kwargs)
        await hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        await hub.stop()


def store_of(hub: Hub) -> PostgresQueueStore:
    store = hub.queues.store
    assert isinstance(store, PostgresQueueStore)
    return store


async def test_concurrent_pushes_keep_their_order_and_binary(nodes: Any) -> None:
    store = store_of(await nodes())
    ids = await asyncio.gather(*(store.push("order", i) for i in range(300)))
    assert ids == sorted(ids, key=int)  # one batch, in push order
    await store.push("order", b"\x00\xffbin")
    items = await store.fetch("order", 400, block=0)
    assert [i.data for i in items] == [*range(300), b"\x00\xffbin"]


async def test_two_nodes_never_lease_the_same_item(nodes: Any) -> None:
    a, b = store_of(await nodes()), store_of(await nodes())
    for i in range(200):
        await a.push("shared", i)
    got: list[Any] = []

    async def drain(store: PostgresQueueStore) -> None:
        while True:
            items = await store.fetch("shared", 7, block=0)
            if not items:
                return
            got.extend(i.data for i in items)
            await store.ack("shared", [i.id for i in items])

    await asyncio.gather(drain(a), drain(b), drain(a), drain(b))
    assert sorted(got) == list(range(200))  # each exactly once


async def test_blocking_fetch_is_woken_by_a_push_on_another_node(nodes: Any) -> None:
    a, b = store_of(await nodes()), store_of(await nodes())
    started = time.monotonic()
    assert await a.fetch("wake", 1, block=0.3) == []
    assert time.monotonic() - started >= 0.25  # it did wait
    waiting = asyncio.ensure_future(a.fetch("wake", 1, block=5))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await b.push("wake", "hi")
    (item,) = await asyncio.wait_for(waiting, 5)
    assert item.data == "hi" and time.monotonic() - started < 2


async def test_dead_letters_are_trimmed_to_the_bound(pg_url: str) -> None:
    async with Hub(pg_url + "&queue_max_len=2") as hub:
        store = store_of(hub)
        for i in range(4):
            await store.push("d", i)
            (item,) = await store.fetch("d", 1, block=0)
            assert await store.requeue("d", item.id, 3, dead=True)
        letters = await store.fetch("d.dead", 10, block=0)
        assert [x.data["data"] for x in letters] == [2, 3]  # the oldest were dropped


@pytest.mark.slow
async def test_items_survive_a_server_restart() -> None:
    """PostgreSQL is durable: items pushed before a crash are there after it."""
    server = PostgresServer()
    try:
        async with Hub(server.url + "?prefix=rq") as hub:
            q = hub.queue("jobs")
            await q.push("before")
            server.kill()
            server.start()
            deadline = time.monotonic() + 20
            while True:
                try:
                    await q.push("after")
                    break
                except Exception:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            c, got = collector(10)
            q.add_consumer(c)
            await wait_until(lambda: len(got) == 2, 15, "both items after the restart")
            assert [i.data for i in got] == ["before", "after"]
    finally:
        server.stop()
