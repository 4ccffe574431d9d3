"""Two `tidings serve --broker nats://...` processes on one nats-server (JetStream):
what crosses between the nodes over real sockets (issue 14)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import websockets

from tests.brokers.conftest import NATS_URL, drop_nats_streams, nats_ping, unavailable
from tests.support import apost, native, serve_process, wait_health, ws_url


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    if not nats_ping(NATS_URL):
        unavailable(f"no NATS with JetStream at {NATS_URL}")
    url = f"{NATS_URL}?prefix=e2e{uuid.uuid4().hex[:8]}"
    yield url
    await drop_nats_streams(url)


async def test_two_serve_nodes_on_nats(nats_url: str) -> None:
    with serve_process("--broker", nats_url) as n1, serve_process("--broker", nats_url) as n2:
        async with native(n1.base) as a, native(n2.base) as b:
            assert a.welcome["node"] != b.welcome["node"]
            # cross-node publish: the same offset on both nodes
            await a.subscribe("news")
            await b.subscribe("news")
            status, body = await apost(n2.base, "publish", {"channel": "news", "data": 1})
            assert status == 200
            offset = body["result"]["offset"]
            got_a, got_b = await a.next("publication"), await b.next("publication")
            assert (got_a["data"], got_a["offset"], got_a["epoch"]) == (
                1, offset, got_b["epoch"])
            assert got_b["offset"] == offset
            # +1 offsets for publishes from both nodes
            offsets = []
            for i in range(10):
                node = (n1, n2)[i % 2]
                status, body = await apost(node.base, "publish", {"channel": "news", "data": i})
                assert status == 200
                offsets.append(body["result"]["offset"])
            assert offsets == list(range(offset + 1, offset + 11))
            live = [(await a.next("publication"))["offset"] for _ in range(10)]
            assert live == offsets
            # a wildcard subscription on one node, publications from the other
            await a.subscribe("orders/+/paid")
            await a.subscribe("logs/#")
            for channel in ("orders/7/paid", "orders/7/new", "logs", "logs/a/b", "other"):
                await apost(n2.base, "publish", {"channel": channel, "data": channel})
            got = [(await a.next("publication"))["channel"] for _ in range(3)]
            assert got == ["orders/7/paid", "logs", "logs/a/b"]
            # direct send across nodes
            sent = await b.request({"type": "send", "to": a.conn_id, "data": "psst"})
            assert sent["result"] == {"sent": 1}
            assert await a.next("message") == {"type": "message", "from": b.conn_id,
                                                "data": "psst"}
            # presence across nodes
            await a.subscribe("room")
            await b.subscribe("room")
            reply = await a.request({"type": "presence", "channel": "room"})
            assert set(reply["result"]["presence"]) == {a.conn_id, b.conn_id}

        # recovery of 30 missed publications after a reconnect to the other node
        async with native(n1.base) as c:
            await c.subscribe("feed")
            await apost(n1.base, "publish", {"channel": "feed", "data": "seen"})
            last = await c.next("publication")
        for i in range(30):
            status, _ = await apost(n1.base, "publish", {"channel": "feed", "data": i})
            assert status == 200
        async with native(n2.base) as c:
            result = await c.subscribe("feed", {"offset": last["offset"],
                                                 "epoch": last["epoch"]})
            assert result["recovered"] is True and result["epoch"] == last["epoch"]
            assert [p["data"] for p in result["publications"]] == list(range(30))
            assert [p["offset"] for p in result["publications"]] == list(
                range(last["offset"] + 1, last["offset"] + 31))
            await apost(n1.base, "publish", {"channel": "feed", "data": "live"})
            live_frame = await c.next("publication")
            assert (live_frame["data"], live_frame["offset"]) == ("live", last["offset"] + 31)
            assert not [f for f in c.pending if f["type"] == "publication"]  # no duplicate


async def test_one_queue_consumed_from_both_nodes_exactly_once(nats_url: str) -> None:
    n = 400
    with serve_process("--broker", nats_url) as n1, serve_process("--broker", nats_url) as n2:
        seen: list[int] = []
        per_node = [0, 0]

        async def consumer(k: int, base: str, ready: asyncio.Event) -> None:
            async with native(base) as c:
                await c.request({"type": "pull", "queue": "jobs", "max": 10})
                ready.set()
                while True:
                    frame = await c.recv(30)
                    if frame["type"] != "item":
                        continue
                    seen.append(frame["data"])
                    per_node[k] += 1
                    await c.send({"type": "ack", "queue": "jobs", "item": frame["item"]})

        readies = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(consumer(k, base, readies[k]))
                 for k, base in enumerate((n1.base, n2.base))]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 10)

            async def producer(base: str, items: range) -> None:
                async with websockets.connect(ws_url(base, "/ws/push/jobs?ack=1")) as ws:
                    for i in items:
                        await ws.send(json.dumps(i))
                    for _ in items:
                        assert "item" in json.loads(await ws.recv())

            await asyncio.gather(producer(n1.base, range(0, n, 2)),
                                 producer(n2.base, range(1, n, 2)))
            deadline = asyncio.get_running_loop().time() + 30
            while len(seen) < n:
                assert asyncio.get_running_loop().time() < deadline, f"{len(seen)} of {n}"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a duplicate would show up now
            assert sorted(seen) == list(range(n))  # every item exactly once
            assert per_node[0] > 0 and per_node[1] > 0  # both nodes consumed
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)






async def test_nats_server_killed_and_restarted_without_its_storage() -> None:
    """/health 503 while the server is down, 200 when back; the client recovering
    across the loss is told recovered: false (the epoch changed)."""
    from tests.brokers.conftest import NatsServer
    from tests.support import running
    from tidings import Hub

    server = NatsServer()
    try:
        url = server.url + "?prefix=fault"
        async with running(Hub(url)) as b1, running(Hub(url)) as b2:
            async with native(b1) as c:
                await c.subscribe("feed")
                await apost(b2, "publish", {"channel": "feed", "data": 1})
                last = await c.next("publication")
                server.kill()
                await wait_health(b1, 503)
                await wait_health(b2, 503)
                server.wipe()
                server.start()
                await wait_health(b1, 200)
                await wait_health(b2, 200)
                deadline = asyncio.get_running_loop().time() + 15
                while True:  # JetStream may still be starting
                    status, _ = await apost(b2, "publish", {"channel": "feed", "data": 2})
                    if status == 200:
                        break
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.1)
                live = await c.next("publication")  # delivery resumed
                assert live["data"] == 2 and live["epoch"] != last["epoch"]
            async with native(b1) as c:
                result = await c.subscribe("feed", {"offset": last["offset"],
                                                     "epoch": last["epoch"]})
                assert result["recovered"] is False  # never a silent gap
                assert result["epoch"] != last["epoch"]
    finally:
        server.stop()
