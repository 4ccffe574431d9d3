"""Recovery after reconnect and presence across nodes, on memory and on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.brokers.conftest import REDIS_URL, RedisServer, redis_ping, unavailable
from tests.support import NativeClient, apost, native, running, serve_process
from tidings import Hub


@contextlib.asynccontextmanager
async def two_nodes(url: str) -> AsyncIterator[tuple[str, str]]:
    """Two hubs (nodes) on one broker, each served on its own port."""
    h1, h2 = Hub(url), Hub(url)
    async with running(h1) as b1, running(h2) as b2:
        yield b1, b2


def broker_urls() -> list[Any]:
    return [
        pytest.param("memory", id="memory"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
    ]


def url_for(kind: str) -> str:
    if kind == "memory":
        return f"memory://recovery-{uuid.uuid4().hex}"
    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    return f"{REDIS_URL}?prefix=rec{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("kind", broker_urls())
async def test_recover_exactly_the_missed_publications(kind: str) -> None:
    async with two_nodes(url_for(kind)) as (b1, b2):
        async with native(b1) as c:
            await c.subscribe("feed")
            await apost(b2, "publish", {"channel": "feed", "data": "seen"})
            last = await c.next("publication")
        for i in range(100):  # while the client is away, published on the other node
            status, _ = await apost(b2, "publish", {"channel": "feed", "data": i})
            assert status == 200
        async with native(b1) as c:
            result = await c.subscribe("feed", {"offset": last["offset"],
                                                 "epoch": last["epoch"]})
            assert result["recovered"] is True
            assert result["epoch"] == last["epoch"]
            replayed = result["publications"]
            assert [p["data"] for p in replayed] == list(range(100))
            assert [p["offset"] for p in replayed] == list(
                range(last["offset"] + 1, last["offset"] + 101))
            await apost(b2, "publish", {"channel": "feed", "data": "live"})
            live = await c.next("publication")
            assert (live["data"], live["offset"]) == ("live", last["offset"] + 101)
            assert not [f for f in c.pending if f["type"] == "publication"]  # no duplicate


async def test_epoch_mismatch_and_window_loss_are_reported() -> None:
    hub = Hub(history_size=10)
    async with running(hub) as base, native(base) as c:
        first = await hub.publish("w", 0)
        for i in range(20):
            await hub.publish("w", i)
        gone = await c.subscribe("w", {"offset": first.offset, "epoch": first.epoch})
        assert gone["recovered"] is False  # older than the window
        assert gone["publications"] == []
        assert gone["offset"] == 21
        await c.subscribe("x")
        other = await c.subscribe("w2", {"offset": 3, "epoch": "not-the-epoch"})
        assert other["recovered"] is False


async def test_a_replay_too_big_for_one_reply_is_not_recovered() -> None:
    """A replay that could never be sent in one frame (the outbox would close the
    connection with 1013, again on every retry) is answered recovered: false."""
    from tidings import Limits

    hub = Hub(history_size=100, limits=Limits(outbox_bytes=64 * 1024))
    async with running(hub) as base, native(base) as c:
        first = await hub.publish("big", "x")
        for _ in range(20):
            await hub.publish("big", "y" * 8000)  # 160 KB to replay: more than a reply may hold
        reply = await c.subscribe("big", {"offset": first.offset, "epoch": first.epoch})
        assert reply["recovered"] is False
        assert (reply["publications"], reply["offset"]) == ([], 21)
        await hub.publish("big", "live")
        assert (await c.next("publication"))["data"] == "live"  # still connected
        small = await c.subscribe("big", {"offset": 20, "epoch": first.epoch})
        assert small["recovered"] is True
        assert [p["offset"] for p in small["publications"]] == [21, 22]


@pytest.mark.redis
@pytest.mark.parametrize("how", ["flushall", "restart"])
async def test_redis_losing_state_gives_a_new_epoch(how: str) -> None:
    server = RedisServer()
    try:
        async with two_nodes(server.url) as (b1, b2):
            async with native(b1) as c:
                await c.subscribe("feed")
                await apost(b2, "publish", {"channel": "feed", "data": 1})
                last = await c.next("publication")
            if how == "flushall":
                subprocess.run(["redis-cli", "-p", str(server.port), "flushall"], check=True,
                               capture_output=True, timeout=10)
            else:
                server.kill()
                server.start()
                await wait_for_health(b1)
                await wait_for_health(b2)
            await apost(b2, "publish", {"channel": "feed", "data": 2})
            async with native(b1) as c:
                result = await c.subscribe("feed", {"offset": last["offset"],
                                                     "epoch": last["epoch"]})
                assert result["recovered"] is False  # never a silent gap
                assert result["epoch"] != last["epoch"]
    finally:
        server.stop()


async def wait_for_health(base: str, timeout: float = 20) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with await asyncio.to_thread(urllib.request.urlopen, base + "/health", None, 2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", broker_urls())
async def test_resubscribe_race_is_gap_free_and_duplicate_free(kind: str) -> None:
    hub1, hub2 = Hub(url_for(kind)), None
    hub2 = Hub(hub1.broker.url)
    async with running(hub1) as b1, running(hub2):
        stop = asyncio.Event()

        async def publisher() -> int:
            n = 0
            while not stop.is_set():
                await hub2.publish("race", n)
                n += 1
                if n % 5 == 0:
                    await asyncio.sleep(0.002)  # ~2,500/s: fast, but inside the history window
            return n

        task = asyncio.create_task(publisher())
        seen: list[int] = []
        position: dict[str, Any] | None = None
        try:
            for _round in range(5):
                async with native(b1) as c:
                    result = await c.subscribe("race", position)
                    if position is not None:
                        assert result["recovered"] is True
                    seen.extend(p["offset"] for p in result["publications"])
                    if position is None:
                        seen.append(result["offset"])  # the position we start from
                    for _ in range(200):
                        frame = await c.next("publication")
                        seen.append(frame["offset"])
                    position = {"offset": seen[-1], "epoch": frame["epoch"]}
        finally:
            stop.set()
            await task
        breaks = [(a, b) for a, b in itertools.pairwise(seen) if b != a + 1]
        assert not breaks, f"gaps or duplicates at {breaks[:5]}"  # no gap, no duplicate


@pytest.mark.redis
async def test_presence_of_a_killed_node_expires() -> None:
    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    url = f"{REDIS_URL}?prefix=pk{uuid.uuid4().hex[:8]}&presence_ttl=2"
    with serve_process("--broker", url) as doomed, serve_process("--broker", url) as survivor:
        async with native(survivor.base) as watcher:
            await watcher.request({"type": "subscribe", "channel": "room", "join_leave": True})
            doomed_client = await _connect(doomed.base)
            await doomed_client.request({"type": "subscribe", "channel": "room"})
            members = await presence(watcher)
            assert doomed_client.conn_id in members and watcher.conn_id in members
            doomed.kill()  # SIGKILL: no cleanup at all
            await until(lambda m: doomed_client.conn_id not in m, watcher, within=10)
            assert watcher.conn_id in await presence(watcher)


async def _connect(base: str) -> NativeClient:
    import websockets

    from tests.support import ws_url

    ws = await websockets.connect(ws_url(base))
    client = NativeClient(ws)
    client.welcome = await client.recv()
    return client


async def presence(client: NativeClient) -> dict[str, Any]:
    reply = await client.request({"type": "presence", "channel": "room"})
    members: dict[str, Any] = reply["result"]["presence"]
    return members


async def until(pred: Callable[[dict[str, Any]], bool], client: NativeClient,
                within: float) -> None:
    deadline = time.monotonic() + within
    while not pred(await presence(client)):
        if time.monotonic() > deadline:
            raise TimeoutError("presence did not change in time")
        await asyncio.sleep(0.2)
