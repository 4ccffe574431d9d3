"""The Redis QueueStore (streams + one consumer group per queue) through a
restart, and on Redis Cluster. What every store does (leases, claims, atomic
requeue, delays, nodes dying) is tidings.testing.queue_store's suite, run on
Redis by test_store_conformance.py; the length bound is test_queue_bounds.py."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.brokers.conftest import RedisServer
from tests.support import wait_until
from tidings import Hub
from tidings.core.store_queue import StoreQueue
from tidings.testing.queue_store import collector

pytestmark = pytest.mark.redis


async def test_redis_restart_without_persistence() -> None:
    """A restart loses the stream and the group (no persistence): the node
    recreates the group and goes on with new items."""
    server = RedisServer()
    try:
        async with Hub(server.url + "?prefix=rr") as hub:
            q = hub.queue("jobs")
            c, got = collector(10)
            q.add_consumer(c)
            await q.push("before")
            await wait_until(lambda: len(got) == 1)
            assert await got[0].ack()
            server.kill()
            await asyncio.sleep(0.3)
            server.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    await q.push("after")
                    break
                except Exception:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            await wait_until(lambda: len(got) == 2, 15, "an item after the restart")
            assert got[1].data == "after"
    finally:
        server.stop()


async def test_on_redis_cluster(cluster_nodes: list[RedisServer]) -> None:
    """The same scripts on a cluster: every key of a queue shares its hash tag."""
    url = f"redis+cluster://127.0.0.1:{cluster_nodes[0].port}?prefix=cq{uuid.uuid4().hex[:6]}"
    async with Hub(url, queue_visibility_timeout=0.3, queue_max_attempts=2) as a, \
            Hub(url, queue_visibility_timeout=0.3, queue_max_attempts=2) as b:
        for name in ("q1", "q2", "q3"):  # on different shards, most likely
            for i in range(5):
                await a.queue(name).push(i)
            c, got = collector(5)
            b.queue(name).add_consumer(c)
            await wait_until(lambda got=got: len(got) == 5, what=f"items of {name}")
            assert [i.data for i in got] == list(range(5))
            for item in got[:4]:
                assert await item.ack()
            # the last one is never acked: back once, then dead
            await wait_until(lambda got=got: len(got) == 6, 5, "a redelivery")
            dead = a.queue(f"{name}.dead")

            async def buried(dead: StoreQueue = dead) -> int:
                await dead.refresh()
                return len(dead)

            deadline = time.monotonic() + 10
            while await buried() < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            b.queue(name).remove_consumer(c)
