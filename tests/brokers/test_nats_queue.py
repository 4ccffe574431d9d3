"""The NATS QueueStore (a JetStream work-queue stream, one durable pull consumer
per queue) through a server restart. What every store does (leases, claims,
atomic requeue, delays, nodes dying) is tidings.testing.queue_store's suite,
run on NATS by test_store_conformance.py; the length bound is test_queue_bounds.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.brokers.conftest import (
    NatsServer,
)
from tests.support import wait_until
from tidings import Hub
from tidings.testing.queue_store import collector


async def test_server_restart_keeps_items(tmp_path: Any) -> None:
    """A private server killed -9 and restarted on its storage: the items pushed
    before are still there, and pushing works again."""
    server = NatsServer(store=str(tmp_path / "js"))
    try:
        async with Hub(server.url + "?prefix=nr") as hub:
            q = hub.queue("jobs")
            await q.push("before")
            server.kill()
            server.start()
            deadline = time.monotonic() + 15
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
