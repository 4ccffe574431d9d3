"""``?queue_max_len=N`` on the brokers whose stores bound a queue's length: a
full queue refuses pushes with QueueFull, and takes them again once an item
is acked."""

from __future__ import annotations

import pytest

from tidings import Hub
from tidings.exceptions import QueueFull
from tidings.testing.queue_store import collector, fresh, until
from tidings.testing.support import World


@pytest.mark.parametrize("world", ["redis", "postgres", "nats"], indirect=True)
async def test_length_bound_refuses_pushes(world: World) -> None:
    url = world.url  # type: ignore[attr-defined]
    async with Hub(url + ("&" if "?" in url else "?") + "queue_max_len=3") as hub:
        q = hub.queue(fresh("small"))
        assert q.shared
        for i in range(3):
            await q.push(i)
        with pytest.raises(QueueFull):
            await q.push(3)
        c, got = collector(1)
        q.add_consumer(c)
        await until(lambda: len(got) == 1, "the first item")
        assert await got[0].ack()
        await q.push(3)  # room again
