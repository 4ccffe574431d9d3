"""Two `tidings serve` processes on one RabbitMQ (``amqp://``) or one Mosquitto
(``mqtt://``): cross-node publish to wildcard subscribers, direct messages,
and on RabbitMQ one work queue consumed from both nodes, every item exactly
once, and a node killed (SIGKILL) holding unacked items without loss."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import websockets

from tests.brokers.conftest import (
    AMQP_URL,
    MQTT_URL,
    delete_rabbitmq_queues,
    port_open,
    unavailable,
    with_prefix,
)
from tests.support import apost, native, serve_process, wait_until, ws_url


def broker_url(kind: str, prefix: str) -> str:
    url, port = (AMQP_URL, 5672) if kind == "amqp" else (MQTT_URL, 1883)
    if not port_open(url, port):
        unavailable(f"no {kind} server at {url}")
    return with_prefix(url, prefix)


@pytest.mark.parametrize("kind", ["amqp", "mqtt"])
async def test_two_serve_nodes_publish_and_direct(kind: str) -> None:
    url = broker_url(kind, f"e{uuid.uuid4().hex[:8]}")
    with serve_process("--broker", url) as n1, serve_process("--broker", url) as n2:
        async with native(n1.base) as a, native(n2.base) as b:
            assert a.welcome["node"] != b.welcome["node"]
            await a.request({"type": "subscribe", "channel": "news/+"})
            await a.request({"type": "subscribe", "channel": "site/#"})
            for channel in ("news/sport", "site", "site/a.b/c", "other/x", "news/x/y"):
                status, body = await apost(n2.base, "publish", {"channel": channel,
                                                                "data": channel})
                assert status == 200, body
            got = [(await a.next("publication"))["channel"] for _ in range(3)]
            assert sorted(got) == ["news/sport", "site", "site/a.b/c"]
            sent = await b.request({"type": "send", "to": a.conn_id, "data": "psst"})
            assert sent["result"] == {"sent": 1}
            msg = await a.next("message")
            assert msg == {"type": "message", "from": b.conn_id, "data": "psst"}
            assert not [f for f in a.pending if f.get("type") == "publication"]


async def consume(base: str, queue: str, seen: list[Any], ready: asyncio.Event, *,
                  ack: bool = True, max_in_flight: int = 20) -> None:
    async with native(base) as c:
        await c.request({"type": "pull", "queue": queue, "max": max_in_flight})
        ready.set()
        while True:
            frame = await c.recv(60)
            if frame["type"] != "item":
                continue
            seen.append(frame)
            if ack:
                await c.send({"type": "ack", "queue": queue, "item": frame["item"]})


async def push(base: str, queue: str, items: range) -> None:
    async with websockets.connect(ws_url(base, f"/ws/push/{queue}?ack=1")) as ws:
        for i in items:
            await ws.send(json.dumps(i))
        for _ in items:  # every push confirmed by RabbitMQ
            assert "item" in json.loads(await ws.recv())


async def test_rabbitmq_one_queue_two_nodes_exactly_once() -> None:
    prefix = f"e{uuid.uuid4().hex[:8]}"
    url = broker_url("amqp", prefix)
    n = 1000
    try:
        with serve_process("--broker", url) as n1, serve_process("--broker", url) as n2:
            seen1: list[Any] = []
            seen2: list[Any] = []
            readies = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.create_task(consume(n1.base, "jobs", seen1, readies[0])),
                     asyncio.create_task(consume(n2.base, "jobs", seen2, readies[1]))]
            try:
                await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 10)
                await asyncio.gather(push(n1.base, "jobs", range(0, n // 2)),
                                     push(n2.base, "jobs", range(n // 2, n)))
                await wait_until(lambda: len(seen1) + len(seen2) >= n, 60, "every item")
                await asyncio.sleep(0.5)  # a duplicate would show up meanwhile
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            data = sorted(f["data"] for f in seen1 + seen2)
            assert data == list(range(n))  # no loss, no duplicate
            assert seen1 and seen2  # both nodes consumed
    finally:
        await delete_rabbitmq_queues(prefix, ["jobs"])


async def test_rabbitmq_node_killed_with_unacked_items_loses_nothing() -> None:
    prefix = f"e{uuid.uuid4().hex[:8]}"
    url = broker_url("amqp", prefix)
    try:
        with serve_process("--broker", url) as n1, serve_process("--broker", url) as n2:
            held: list[Any] = []
            ready = asyncio.Event()
            quitter = asyncio.create_task(consume(n1.base, "work", held, ready, ack=False,
                                                  max_in_flight=10))
            try:
                await asyncio.wait_for(ready.wait(), 10)
                await push(n2.base, "work", range(10))
                await wait_until(lambda: len(held) == 10, 20, "node 1 holds 10 items")
                n1.kill()  # SIGKILL: nothing graceful reaches RabbitMQ
            finally:
                quitter.cancel()
                await asyncio.gather(quitter, return_exceptions=True)
            again: list[Any] = []
            heir_ready = asyncio.Event()
            heir = asyncio.create_task(consume(n2.base, "work", again, heir_ready))
            try:
                await wait_until(lambda: len(again) >= 10, 30, "node 2 gets them all")
                await asyncio.sleep(0.3)
            finally:
                heir.cancel()
                await asyncio.gather(heir, return_exceptions=True)
            assert sorted(f["data"] for f in again) == list(range(10))
            assert all(f["attempt"] >= 2 for f in again)  # redelivered, counted
    finally:
        await delete_rabbitmq_queues(prefix, ["work"])
