"""Two ``tidings serve --broker postgresql://...`` processes on one PostgreSQL:
what crosses between them over real sockets (issue 14)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import websockets

from tests.brokers.conftest import postgres_drop, postgres_url
from tests.support import ServeProcess, apost, native, serve_process, wait_until, ws_url


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await postgres_url("e2e")
    yield url
    await postgres_drop(url, url.rsplit("prefix=", 1)[1])


@pytest.fixture
def nodes(pg_url: str) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    args = ("--broker", pg_url, "--history-size", "100", "--history-ttl", "300")
    with serve_process(*args) as n1, serve_process(*args) as n2:
        yield n1, n2


async def test_cross_node_publish_offsets_wildcards_direct_presence(
        nodes: tuple[ServeProcess, ServeProcess]) -> None:
    n1, n2 = nodes
    async with native(n1.base) as a, native(n2.base) as b:
        assert a.welcome["node"] != b.welcome["node"]
        for client in (a, b):
            await client.request({"type": "subscribe", "channel": "news"})
        offsets = []
        for i, base in enumerate((n2.base, n1.base, n2.base, n1.base)):
            status, body = await apost(base, "publish", {"channel": "news", "data": i})
            assert status == 200
            offsets.append(body["result"]["offset"])
        assert offsets == [1, 2, 3, 4]  # +1 whichever node publishes
        for client in (a, b):  # the same offsets on both nodes
            got = [await client.next("publication") for _ in range(4)]
            assert [(g["data"], g["offset"]) for g in got] == [(0, 1), (1, 2), (2, 3), (3, 4)]
            assert len({g["epoch"] for g in got}) == 1

        await a.request({"type": "subscribe", "channel": "orders/+"})
        await a.request({"type": "subscribe", "channel": "sys/#"})
        for channel in ("orders/1", "orders/1/x", "sys", "sys/a/b", "other"):
            await apost(n2.base, "publish", {"channel": channel, "data": channel})
        await apost(n2.base, "publish", {"channel": "news", "data": "marker"})
        seen = []
        while True:
            frame = await a.next("publication")
            if frame["channel"] == "news":
                break
            seen.append(frame["channel"])
        assert seen == ["orders/1", "sys", "sys/a/b"]

        sent = await b.request({"type": "send", "to": a.conn_id, "data": "psst"})
        assert sent["result"] == {"sent": 1}
        assert (await a.next("message"))["data"] == "psst"

        status, body = await apost(n1.base, "presence", {"channel": "news"})
        assert status == 200
        assert set(body["result"]["presence"]) == {a.conn_id, b.conn_id}


async def test_recovery_of_30_missed_publications_on_the_other_node(
        nodes: tuple[ServeProcess, ServeProcess]) -> None:
    n1, n2 = nodes
    async with native(n1.base) as c:
        await c.request({"type": "subscribe", "channel": "feed"})
        await apost(n1.base, "publish", {"channel": "feed", "data": "seen"})
        last = await c.next("publication")
    for i in range(30):
        status, _ = await apost(n1.base, "publish", {"channel": "feed", "data": i})
        assert status == 200
    async with native(n2.base) as c:  # back, on the other node
        reply = await c.request({"type": "subscribe", "channel": "feed",
                                 "recover": {"offset": last["offset"], "epoch": last["epoch"]}})
        result = reply["result"]
        assert result["recovered"] is True
        assert [p["data"] for p in result["publications"]] == list(range(30))
        assert [p["offset"] for p in result["publications"]] == list(
            range(last["offset"] + 1, last["offset"] + 31))
        await apost(n1.base, "publish", {"channel": "feed", "data": "live"})
        live = await c.next("publication")
        assert (live["data"], live["offset"]) == ("live", last["offset"] + 31)


async def test_one_queue_consumed_from_both_nodes_exactly_once(
        nodes: tuple[ServeProcess, ServeProcess]) -> None:
    n1, n2 = nodes
    n = 2000
    seen: list[int] = []
    per_node = [0, 0]

    async def consumer(k: int, base: str, ready: asyncio.Event) -> None:
        async with websockets.connect(ws_url(base, "/ws/pull/jobs?ack=manual&max=20")) as ws:
            ready.set()
            while True:
                seen.append(json.loads(await ws.recv()))
                per_node[k] += 1
                await ws.send('{"ack": true}')

    async def producer(base: str, items: range) -> None:
        async with websockets.connect(ws_url(base, "/ws/push/jobs?ack=1")) as ws:
            for i in items:
                await ws.send(json.dumps(i))
            for _ in items:
                assert "item" in json.loads(await ws.recv())

    readies = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(consumer(0, n1.base, readies[0])),
             asyncio.create_task(consumer(1, n2.base, readies[1]))]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 10)
        await asyncio.gather(producer(n1.base, range(0, n // 2)),
                             producer(n2.base, range(n // 2, n)))
        await wait_until(lambda: len(seen) >= n, 60, "every item")
        await asyncio.sleep(0.5)  # a duplicate would show up meanwhile
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(seen) == list(range(n))  # no loss, no duplicate
    assert all(per_node), per_node  # both nodes consumed
    status, body = await apost(n1.base, "queue_stats", {"queue": "jobs"})
    assert status == 200
    stats: dict[str, Any] = body["result"]
    assert stats["delayed"] == 0 and stats["redelivered"] == 0
