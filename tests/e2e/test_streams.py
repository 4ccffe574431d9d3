"""Raw streams (SPEC 6.2) and work queues over real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
import websockets

from tests.support import ASGI_WS, DIRECT_WS, LEAN, native, running, wait_until, ws_url
from tidings import Hub, Limits


async def test_raw_pub_to_raw_and_native_subscribers(server) -> None:
    hub, base = server
    async with websockets.connect(ws_url(base, "/ws/sub/sensors/+")) as raw_sub, \
            native(base) as nat:
        await nat.request({"type": "subscribe", "channel": "sensors/t1"})
        await wait_until(lambda: hub.index.has("sensors/+"), what="raw subscription")
        async with websockets.connect(ws_url(base, "/ws/pub/sensors/t1?ack=1")) as pub:
            await pub.send('{"celsius": 21}')
            assert json.loads(await asyncio.wait_for(pub.recv(), 5))["offset"] == 1
            await pub.send("plain text")
            assert json.loads(await asyncio.wait_for(pub.recv(), 5))["offset"] == 2
            await pub.send(b"\x00\x01binary")
            assert json.loads(await asyncio.wait_for(pub.recv(), 5))["offset"] == 3
        assert json.loads(await asyncio.wait_for(raw_sub.recv(), 5)) == {"celsius": 21}
        assert json.loads(await asyncio.wait_for(raw_sub.recv(), 5)) == "plain text"
        assert await asyncio.wait_for(raw_sub.recv(), 5) == b"\x00\x01binary"
        frames = [await nat.next("publication") for _ in range(3)]
        assert [f["data"] for f in frames[:2]] == [{"celsius": 21}, "plain text"]
        assert base64.b64decode(frames[2]["data"]["b64"]) == b"\x00\x01binary"


async def test_raw_pub_refuses_bad_channel(server) -> None:
    _, base = server
    async with websockets.connect(ws_url(base, "/ws/pub/a/+")) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1008


async def test_producer_to_two_raw_pull_consumers_exactly_once(server) -> None:
    hub, base = server
    n = 400
    received: list[list[int]] = [[], []]

    async def consume(k: int, ws) -> None:  # type: ignore[no-untyped-def]
        while True:
            item = json.loads(await ws.recv())
            received[k].append(item)
            await ws.send('{"ack": true}')

    async with websockets.connect(ws_url(base, "/ws/pull/jobs?ack=manual")) as c1, \
            websockets.connect(ws_url(base, "/ws/pull/jobs?ack=manual")) as c2:
        await wait_until(lambda: hub.queue("jobs").consumers == 2, what="2 consumers")
        tasks = [asyncio.create_task(consume(0, c1)), asyncio.create_task(consume(1, c2))]
        async with websockets.connect(ws_url(base, "/ws/push/jobs")) as producer:
            for i in range(n):
                await producer.send(json.dumps(i))
        try:
            await wait_until(lambda: len(received[0]) + len(received[1]) >= n)
        finally:
            for t in tasks:
                t.cancel()
        everything = received[0] + received[1]
        assert sorted(everything) == list(range(n))  # each exactly once
        assert received[0] and received[1]  # both consumers worked
        assert received[0] == sorted(received[0])  # FIFO per consumer


async def test_unacked_items_of_a_dropped_consumer_go_to_another(server) -> None:
    hub, base = server
    q = hub.queue("work")
    async with native(base) as quitter:
        await quitter.request({"type": "pull", "queue": "work", "max": 10})
        for i in range(10):
            await q.push(i)
        held = [await quitter.next("item") for _ in range(10)]
        assert [h["data"] for h in held] == list(range(10))
    async with native(base) as heir:
        await heir.request({"type": "pull", "queue": "work", "max": 10})
        again = [await heir.next("item") for _ in range(10)]
        assert [a["data"] for a in again] == list(range(10))
        assert all(a["attempt"] == 2 for a in again)
        for a in again:
            assert (await heir.request({"type": "ack", "queue": "work",
                                        "item": a["item"]}))["type"] == "reply"
    assert len(q) == 0 and q.in_flight == 0


async def test_native_pull_backpressure(server) -> None:
    hub, base = server
    q = hub.queue("slow")
    async with native(base) as c:
        await c.request({"type": "pull", "queue": "slow", "max": 1})
        for i in range(3):
            await q.push(i)
        first = await c.next("item")
        assert q.in_flight == 1 and len(q) == 2  # never 2 in flight
        await c.request({"type": "ack", "queue": "slow", "item": first["item"]})
        second = await c.next("item")
        assert second["data"] == 1
        nack = await c.request({"type": "nack", "queue": "slow", "item": second["item"]})
        assert nack["type"] == "reply"
        third = await c.next("item")
        assert third["data"] == 2  # the nacked item went to the back

async def test_a_fire_and_forget_producer_is_relayed_as_sent(server) -> None:
    """Without ``?ack`` the lean server publishes each frame from its read
    callback; JSON text reaches raw subscribers exactly as the producer wrote
    it and native ones as the parsed value, in order, with history kept."""
    hub, base = server
    sent = ['{"b": [1, 2],   "a": "é"}', "not json", '"a json string"', "[1,2,3]"]
    async with websockets.connect(ws_url(base, "/ws/sub/exact")) as raw_sub, \
            native(base) as nat:
        await nat.request({"type": "subscribe", "channel": "exact"})
        await wait_until(lambda: hub.index.has("exact"), what="raw subscription")
        async with websockets.connect(ws_url(base, "/ws/pub/exact")) as pub:
            for text in sent * 50:
                await pub.send(text)
        raw = [await asyncio.wait_for(raw_sub.recv(), 5) for _ in range(len(sent) * 50)]
        native_data = [(await nat.next("publication"))["data"] for _ in range(len(sent) * 50)]
    assert raw[:4] == ['{"b": [1, 2],   "a": "é"}', '"not json"', '"a json string"', "[1,2,3]"]
    assert raw == raw[:4] * 50
    assert native_data[:4] == [{"b": [1, 2], "a": "é"}, "not json", "a json string", [1, 2, 3]]
    page = await hub.history("exact", limit=-1)
    offsets = [p.offset for p in page.publications]
    assert page.offset == len(sent) * 50 and offsets
    assert offsets == list(range(offsets[0], page.offset + 1))


async def test_a_subscriber_dropping_mid_fanout_costs_the_others_nothing(server) -> None:
    """Real sockets: one subscriber vanishes (RST) while a burst is fanned out;
    every other one still gets every publication, in order."""
    hub, base = server
    count, subscribers = 600, 12
    socks = [await websockets.connect(ws_url(base, "/ws/sub/burst")) for _ in range(subscribers)]
    try:
        await wait_until(lambda: len(hub.index.match("burst")) == subscribers,
                         what="subscriptions")
        async with websockets.connect(ws_url(base, "/ws/pub/burst")) as pub:
            for i in range(count):
                await pub.send(str(i))
                if i == count // 3:  # gone without a close handshake
                    socks[0].transport.abort()
        for ws in socks[1:]:
            got = [int(await asyncio.wait_for(ws.recv(), 5)) for _ in range(count)]
            assert got == list(range(count))
        await wait_until(lambda: len(hub.index.match("burst")) == subscribers - 1,
                         what="the dropped subscriber to be forgotten")
    finally:
        for ws in socks[1:]:
            await ws.close()


@pytest.mark.parametrize("ws", [LEAN, DIRECT_WS, ASGI_WS], ids=["lean", "direct", "asgi"])
async def test_raw_producers_above_the_frame_rate_are_paced_not_dropped(ws: str) -> None:
    """``Limits.rate`` holds for raw producers too: 25 frames sent at once at
    40 frames/s (burst 5) all arrive, in order, over at least (25 - 5) / 40 s;
    the same for a queue producer."""
    hub = Hub(limits=Limits(rate=40, burst=5))
    async with running(hub, ws=ws) as base, native(base) as sub:
        await sub.request({"type": "subscribe", "channel": "paced"})
        async with websockets.connect(ws_url(base, "/ws/pub/paced")) as pub:
            started = time.monotonic()
            for i in range(25):  # queued on the client's side at once
                await pub.send(str(i))
            seen = [(await sub.next("publication"))["data"] for _ in range(25)]
            took = time.monotonic() - started
        assert seen == list(range(25))
        assert took >= 0.45, took
        async with websockets.connect(ws_url(base, "/ws/pull/paced-jobs")) as consumer:
            await wait_until(lambda: hub.queue("paced-jobs").consumers == 1, what="consumer")
            async with websockets.connect(ws_url(base, "/ws/push/paced-jobs")) as producer:
                started = time.monotonic()
                for i in range(25):
                    await producer.send(str(i))
                items = [json.loads(await asyncio.wait_for(consumer.recv(), 5))
                         for _ in range(25)]
                took = time.monotonic() - started
        assert items == list(range(25))
        assert took >= 0.45, took
