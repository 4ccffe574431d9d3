"""Several processes sharing one Redis: `tidings serve` nodes and uvicorn workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.brokers.conftest import REDIS_URL, redis_ping, unavailable
from tests.support import apost, free_port, native, serve_process

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_url() -> str:
    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    return f"{REDIS_URL}?prefix=e2e{uuid.uuid4().hex[:8]}"


async def test_two_serve_nodes_share_one_redis(redis_url: str) -> None:
    with serve_process("--broker", redis_url) as n1, serve_process("--broker", redis_url) as n2:
        async with native(n1.base) as a, native(n2.base) as b:
            assert a.welcome["node"] != b.welcome["node"]
            await a.request({"type": "subscribe", "channel": "news"})
            status, body = await apost(n2.base, "publish", {"channel": "news", "data": 1})
            assert status == 200
            pub = await a.next("publication")
            assert (pub["data"], pub["offset"]) == (1, body["result"]["offset"])
            sent = await b.request({"type": "send", "to": a.conn_id, "data": "psst"})
            assert sent["result"] == {"sent": 1}
            msg = await a.next("message")
            assert msg == {"type": "message", "from": b.conn_id, "data": "psst"}


@contextlib.contextmanager
def uvicorn_workers(redis_url: str, workers: int) -> Iterator[str]:
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port),
         "--workers", str(workers), "--log-level", "warning"],
        cwd=root, env={**os.environ, "TIDINGS_BROKER": redis_url},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/rt/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("uvicorn workers did not start") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_uvicorn_workers_with_redis(redis_url: str) -> None:
    with uvicorn_workers(redis_url, 2) as base:
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            nodes: set[str] = set()
            while len(clients) < 12 or (len(nodes) < 2 and len(clients) < 200):
                client = await stack.enter_async_context(native(base, "/rt/ws"))
                clients.append(client)
                nodes.add(client.welcome["node"])
            assert len(nodes) == 2, "the kernel put every connection on one worker"
            for client in clients:
                await client.request({"type": "subscribe", "channel": "orders/+"})
            r = await asyncio.to_thread(
                urllib.request.urlopen,
                urllib.request.Request(base + "/orders/42/pay", method="POST"), None, 10,
            )
            assert r.status == 200
            got = [await c.next("publication") for c in clients]
            assert {(g["channel"], g["offset"]) for g in got} == {("orders/42", 1)}
            assert all(g["data"] == {"status": "paid"} for g in got)


async def test_pipelined_publishes_keep_their_order(redis_url: str) -> None:
    from tests.support import running
    from tidings import Hub

    h1, h2 = Hub(redis_url), Hub(redis_url)
    async with running(h1) as b1, running(h2) as b2, native(b1) as sub, native(b2) as pub:
        await sub.request({"type": "subscribe", "channel": "order"})
        for i in range(500):  # no waiting for replies: the server pipelines them
            await pub.send({"type": "publish", "id": i, "channel": "order", "data": i})
        replies = [await pub.next("reply") for _ in range(500)]
        assert [r["id"] for r in replies] == list(range(500))
        assert [r["result"]["offset"] for r in replies] == list(range(1, 501))
        got = [(await sub.next("publication"))["data"] for _ in range(500)]
        assert got == list(range(500))


async def test_pipelined_publishes_checked_and_answered_in_order(redis_url: str) -> None:
    """Refused publishes among pipelined ones get their error (errors may come
    before earlier replies: clients match by id); the accepted ones keep their
    order, with or without a hook to await."""
    from tests.support import running
    from tidings import Hub

    for hooked in (False, True):
        hub = Hub(redis_url)
        if hooked:
            async def can_publish(conn: object, channel: str) -> bool | None:
                await asyncio.sleep(0)
                return False if channel.endswith("/no") else None

            hub.can_publish = can_publish
        async with running(hub) as base, native(base) as pub:
            for i in range(60):
                channel = "$sys" if i % 10 == 3 else ("chk/no" if hooked and i % 10 == 7
                                                      else "chk/yes")
                await pub.send({"type": "publish", "id": i, "channel": channel, "data": i})
            answers = sorted([await pub.recv() for _ in range(60)], key=lambda a: a["id"])
        assert [a["id"] for a in answers] == list(range(60))
        for a in answers:
            refused = a["id"] % 10 == 3 or (hooked and a["id"] % 10 == 7)
            assert a["type"] == ("error" if refused else "reply"), a
            if refused:
                assert a["code"] == "forbidden"
        offsets = [a["result"]["offset"] for a in answers if a["type"] == "reply"]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


async def test_raw_publisher_is_pipelined_in_order(redis_url: str) -> None:
    import json

    import websockets

    from tests.support import running, ws_url
    from tidings import Hub

    hub = Hub(redis_url)
    async with running(hub) as base, native(base) as sub:
        await sub.request({"type": "subscribe", "channel": "raw"})
        async with websockets.connect(ws_url(base, "/ws/pub/raw?ack=1")) as pub:
            for i in range(300):
                await pub.send(json.dumps(i))
            acks = [json.loads(await asyncio.wait_for(pub.recv(), 10)) for _ in range(300)]
        assert [a["offset"] for a in acks] == list(range(1, 301))
        got = [(await sub.next("publication"))["data"] for _ in range(300)]
        assert got == list(range(300))
