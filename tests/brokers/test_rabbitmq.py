"""The ``amqp://`` broker against the real RabbitMQ on loopback: channel names
that need escaping, wildcards, the quorum-queue QueueStore
(two hubs, a node dying with unacked items, the delivery limit, the length
bound, delays) and a connection cut by the server mid-stream.

The shared RabbitMQ is never restarted: the fault test closes only its own
node's connection (``rabbitmqctl close_connection``, found by the
``connection_name`` the broker sets).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.brokers.conftest import (
    AMQP_URL,
    close_rabbitmq_connections,
    delete_rabbitmq_queues,
    port_open,
    unavailable,
    with_prefix,
)
from tests.support import Sink, wait_until
from tidings import Hub
from tidings.brokers.base import BrokerHealth, capabilities_of
from tidings.brokers.rabbitmq import MAX_KEY, RabbitMQBroker, binding_key, routing_key
from tidings.brokers.rabbitmq_queue import RabbitMQQueueStore
from tidings.core.queue import Consumer, QueueItem
from tidings.core.store_queue import StoreQueue
from tidings.exceptions import QueueFull

ODD = ["a.b", "a*b", "*", "x/*/y", "%2E", "x/%", "ü/日本/語", "sp ace/tab\there", "$sys/x",
       "a\x1fb", ".", "..", "a/b.c/d", "#x".replace("#", "hash"), "l/" + "é" * 200,
       "deep/" + "/".join("w" for _ in range(60))]


QUEUES = ["jobs", "work"]  # the tidings queues these tests use (deleted afterwards)


@pytest.fixture
async def nodes() -> AsyncIterator[Any]:
    if not port_open(AMQP_URL, 5672):
        unavailable(f"no RabbitMQ at {AMQP_URL}")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    hubs: list[Hub] = []
    shared: dict[str, str] = {}

    async def make(**params: Any) -> Hub:
        if "url" not in shared:
            shared["url"] = with_prefix(AMQP_URL, prefix) + "".join(
                f"&{key}={value}" for key, value in params.items())
        hub = Hub(shared["url"])
        await hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        await hub.stop()
    await delete_rabbitmq_queues(prefix, QUEUES)


def store_of(hub: Hub) -> RabbitMQQueueStore:
    store = hub.queues.store
    assert isinstance(store, RabbitMQQueueStore)
    return store


async def subscriber(hub: Hub, *patterns: str) -> Sink:
    sink = Sink()
    conn = hub.register(sink)
    for pattern in patterns:
        await hub.subscribe(conn, pattern)
    return sink


def channels(sink: Sink) -> list[str]:
    return [f["channel"] for f in sink.of("publication")]


# -- names (no server) --------------------------------------------------------------


def test_keys_escape_levels_and_fit_amqp() -> None:
    assert routing_key("a.b/c*d") == "c.a%2Eb.c%2Ad"
    assert routing_key("x/%2E") == "c.x.%252E"  # the escape itself is escaped: one to one
    assert binding_key("a/+/#") == "c.a.*.#"
    assert binding_key("*/+") == "c.%2A.*"  # a literal '*' level is no wildcard
    keys = {routing_key(c) for c in ODD}
    assert len(keys) == len(ODD)  # no two channels share a key
    long = "l/" + "é" * 200
    assert routing_key(long).startswith("l.") and len(routing_key(long)) == 42
    deep = binding_key("a/" + "/".join("w" * 9 for _ in range(40)) + "/#")
    assert len(deep.encode()) <= MAX_KEY and deep.endswith(".#") and deep.startswith("c.a.")


# -- live pub/sub ---------------------------------------------------------------------


async def test_capabilities_are_stated() -> None:
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:5672/")
    caps = capabilities_of(broker)
    assert (caps.positions, caps.history, caps.presence, caps.queues, caps.direct) == (
        False, False, False, True, True)
    assert caps.offered() == ["pubsub", "queues", "direct"]


async def test_odd_channel_names_round_trip(nodes: Any) -> None:
    h1, h2 = await nodes(), await nodes()
    sink = await subscriber(h1, *ODD)
    for channel in ODD:
        await h2.publish(channel, {"c": channel})
    await sink.wait_for(lambda f: len(f) >= len(ODD))
    await asyncio.sleep(0.2)  # nothing arrives twice
    assert sorted(channels(sink)) == sorted(ODD)
    assert all(f["data"] == {"c": f["channel"]} for f in sink.of("publication"))
    assert all((f["offset"], f["epoch"]) == (0, "") for f in sink.of("publication"))


async def test_wildcards_with_escaped_levels(nodes: Any) -> None:
    h1, h2 = await nodes(), await nodes()
    sink = await subscriber(h1, "a.b/+", "x/#", "l/#", "+/日本/#", "#")
    other = await subscriber(h1, "only/*")  # '*' here is a literal level
    sent = ["a.b/1", "a.b/1/2", "x", "x/y/z", "ü/日本/語", "l/" + "é" * 200, "$sys/x", "only/z",
            "only/*"]
    for channel in sent:
        await h2.publish(channel, channel)
    await other.wait_for(lambda f: len(f) >= 1)
    await sink.wait_for(lambda f: len(f) >= len(sent) - 1)
    await asyncio.sleep(0.2)
    # '#' takes every channel but "$sys/x" (a first-level wildcard skips '$'), once each
    assert sorted(channels(sink)) == sorted(c for c in sent if c != "$sys/x")
    assert channels(other) == ["only/*"]


async def test_unsubscribe_unbinds(nodes: Any) -> None:
    h1, h2 = await nodes(), await nodes()
    sink = Sink()
    conn = h1.register(sink)
    await h1.subscribe(conn, "u/+")
    probe = await subscriber(h1, "probe")
    await h2.publish("u/1", 1)
    await sink.wait_for(lambda f: len(f) == 1)
    await h1.unsubscribe(conn, "u/+")
    before = h1.stats.publications_out
    await h2.publish("u/2", 2)
    await h2.publish("probe", "sync")  # after u/2 on the same publisher channel
    await probe.wait_for(lambda f: len(f) == 1)
    assert h1.stats.publications_out - before == 1  # only the probe reached h1


async def test_connection_cut_by_the_server(nodes: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """``rabbitmqctl close_connection`` on h1's connection only (never the shared
    server): h1 reports down once and up once, rebinds, and delivery resumes."""
    caplog.set_level(logging.WARNING, logger="tidings.hub")
    h1, h2 = await nodes(), await nodes()
    states: list[BrokerHealth] = []
    seen = h1.on_broker_state

    def spy(health: BrokerHealth) -> None:
        states.append(health)
        seen(health)

    h1.on_broker_state = spy  # type: ignore[method-assign]
    broker = h1.broker
    assert isinstance(broker, RabbitMQBroker)
    sink = await subscriber(h1, "live/+")
    await h2.publish("live/1", "before")
    await sink.wait_for(lambda f: len(f) == 1)
    generation = broker.generation
    assert await asyncio.to_thread(close_rabbitmq_connections, broker.connection_name) == 1
    await wait_until(lambda: broker.generation > generation and broker.health().up,
                     timeout=20, what="h1 reconnected")
    assert [s.up for s in states] == [False, True]  # one report per transition
    await h2.publish("live/2", "after")  # the binding was restored
    await sink.wait_for(lambda f: len(f) == 2)
    assert [f["data"] for f in sink.frames] == ["before", "after"]
    downs = [r for r in caplog.records if "is down" in r.getMessage()]
    ups = [r for r in caplog.records if "is up again" in r.getMessage()]
    assert (len(downs), len(ups)) == (1, 1)


# -- work queues ----------------------------------------------------------------------


def collector(max_in_flight: int) -> tuple[Consumer, list[QueueItem]]:
    got: list[QueueItem] = []
    return Consumer(got.append, max_in_flight), got


async def test_store_is_used_with_rabbitmq(nodes: Any) -> None:
    hub = await nodes()
    assert isinstance(hub.queue("jobs"), StoreQueue)


async def test_push_fetch_ack_fifo(nodes: Any) -> None:
    store = store_of(await nodes())
    ids = [await store.push("jobs", i) for i in range(5)]
    items = await store.fetch("jobs", 3, block=0)
    assert [i.data for i in items] == [0, 1, 2] and [i.id for i in items] == ids[:3]
    assert all(i.attempts == 0 for i in items)
    s = await store.stats("jobs")
    assert (s.length, s.in_flight) == (2, 3)
    assert await store.ack("jobs", [i.id for i in items]) == 3
    assert await store.ack("jobs", [items[0].id]) == 0  # twice: nothing
    s = await store.stats("jobs")
    assert (s.length, s.in_flight) == (2, 0)
    assert [i.data for i in await store.fetch("jobs", 10, block=0)] == [3, 4]
    assert await store.fetch("jobs", 1, block=0.1) == []  # empty: waits, then nothing


async def test_window_fetch_is_bounded_and_waits_for_a_push(nodes: Any) -> None:
    """A fetch of more than a few items is a consumer window whose prefetch is
    the count: never more than asked for, FIFO, and an empty queue is waited on."""
    a, b = store_of(await nodes()), store_of(await nodes())
    for i in range(20):
        await a.push("jobs", i)
    items = await a.fetch("jobs", 10, block=1)
    assert [i.data for i in items] == list(range(10))
    s = await a.stats("jobs")
    assert (s.length, s.in_flight) == (10, 10)
    rest = await b.fetch("jobs", 64, block=1)
    assert [i.data for i in rest] == list(range(10, 20))
    assert await a.ack("jobs", [i.id for i in items]) == 10
    assert await b.ack("jobs", [i.id for i in rest]) == 10
    waiting = asyncio.ensure_future(a.fetch("jobs", 10, block=5))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # blocked on the empty queue
    await b.push("jobs", "late")
    got = await asyncio.wait_for(waiting, 5)
    assert [i.data for i in got] == ["late"]
    assert (await a.stats("jobs")).length == 0


async def test_requeue_only_by_the_holder_and_dead_letters(nodes: Any) -> None:
    a, b = store_of(await nodes()), store_of(await nodes())
    await a.push("jobs", "x")
    (item,) = await a.fetch("jobs", 1, block=0)
    assert not await b.requeue("jobs", item.id, 1)  # b does not hold it
    assert await a.requeue("jobs", item.id, 1)
    assert not await a.requeue("jobs", item.id, 1)  # no longer held: no duplicate
    s = await a.stats("jobs")
    assert (s.length, s.in_flight) == (1, 0)
    (again,) = await b.fetch("jobs", 1, block=0)
    assert (again.id, again.data, again.attempts) == (item.id, "x", 1)  # attempts travel
    assert await b.requeue("jobs", again.id, 2, dead=True)
    (letter,) = await b.fetch("jobs.dead", 1, block=0)
    assert letter.data == {"id": item.id, "data": "x", "attempts": 2, "queue": "jobs"}
    assert await b.requeue("jobs.dead", letter.id, 5, dead=True)  # dropped, not looped
    assert (await b.stats("jobs.dead")).length == 0


async def test_delay_goes_through_the_delay_queue(nodes: Any) -> None:
    store = store_of(await nodes())
    await store.push("jobs", "later")
    (item,) = await store.fetch("jobs", 1, block=0)
    assert await store.requeue("jobs", item.id, 1, delay=0.3)
    s = await store.stats("jobs")
    assert (s.length, s.delayed) == (0, 1)
    (back,) = await store.fetch("jobs", 1, block=5)  # RabbitMQ expires it back
    assert (back.data, back.attempts) == ("later", 1)


async def test_length_bound_refuses(nodes: Any) -> None:
    """RabbitMQ nacks a push once the quorum queue is over its bound; the
    bound is RabbitMQ's, which admits one item past it before refusing."""
    store = store_of(await nodes(queue_max_len=2))
    accepted = 0
    with pytest.raises(QueueFull):
        for i in range(10):
            await store.push("jobs", i)
            accepted += 1
    assert accepted in (2, 3)
    assert (await store.stats("jobs")).length == accepted


async def test_delivery_limit_dead_letters_a_poison_item(nodes: Any) -> None:
    """An item whose holder dies each time (its channel closes unacked) is
    dead-lettered by RabbitMQ after ``delivery_limit`` redeliveries."""
    store = store_of(await nodes(delivery_limit=1))
    item_id = await store.push("jobs", "poison")
    for expected in (0, 1):
        (item,) = await store.fetch("jobs", 1, block=5)
        assert (item.id, item.attempts) == (item_id, expected)
        channel = store._channel
        assert channel is not None
        await channel.close()  # the holder "dies": RabbitMQ returns the item
    (letter,) = await store.fetch("jobs.dead", 1, block=5)
    assert letter.data["id"] == item_id and letter.data["data"] == "poison"
    assert letter.data["queue"] == "jobs"
    assert (await store.stats("jobs")).length == 0


async def test_out_of_attempts_after_a_node_death_goes_dead(nodes: Any) -> None:
    """As Redis's claim does: an item RabbitMQ gave back after its holder died,
    that has had ``max_attempts`` deliveries, is dead-lettered, not fetched."""
    store = store_of(await nodes())
    await store.claim("jobs", min_idle=1, count=1, max_attempts=1)  # the hub's limit
    await store.push("jobs", "once")
    (item,) = await store.fetch("jobs", 1, block=5)
    assert item.attempts == 0
    assert store._channel is not None
    await store._channel.close()
    assert await store.fetch("jobs", 1, block=0.3) == []
    (letter,) = await store.fetch("jobs.dead", 1, block=5)
    assert letter.data == {"id": item.id, "data": "once", "attempts": 1, "queue": "jobs"}


async def test_one_queue_two_hubs_every_item_exactly_once(nodes: Any) -> None:
    h1, h2 = await nodes(), await nodes()
    q1, q2 = h1.queue("work"), h2.queue("work")
    c1, got1 = collector(10)
    c2, got2 = collector(10)
    q1.add_consumer(c1)
    q2.add_consumer(c2)
    n = 200
    for i in range(n):
        await (q1 if i % 2 else q2).push(i)

    def settle() -> None:
        for q, got in ((q1, got1), (q2, got2)):
            while got:
                assert q.ack(got.pop().id)

    done: list[Any] = []

    async def drain() -> None:
        while len(done) < n:
            for got in (got1, got2):
                done.extend(item.data for item in got)
            settle()
            await asyncio.sleep(0.01)

    await asyncio.wait_for(drain(), 30)
    assert sorted(done) == list(range(n))  # every item, none twice
    assert q1.acked > 0 and q2.acked > 0  # both hubs consumed
    await q1.refresh()
    assert len(q1) == 0


async def test_consumer_killed_with_unacked_items_nothing_lost(nodes: Any) -> None:
    """h1's consumer takes items and never acks; h1's connection dies (cut by
    the server). RabbitMQ gives every item to h2's consumer, attempts counted."""
    h1, h2 = await nodes(), await nodes()
    q1, q2 = h1.queue("work"), h2.queue("work")
    c1, got1 = collector(5)
    q1.add_consumer(c1)
    for i in range(8):
        await q1.push(i)
    await wait_until(lambda: len(got1) == 5, timeout=10, what="h1 holds 5 items")
    held = sorted(item.data for item in got1)
    broker = h1.broker
    assert isinstance(broker, RabbitMQBroker)
    # h1's consumer dies holding them: nothing graceful reaches RabbitMQ
    assert await asyncio.to_thread(close_rabbitmq_connections, broker.connection_name) == 1
    c2, got2 = collector(20)
    q2.add_consumer(c2)
    await wait_until(lambda: {i.data for i in got2} == set(range(8)), timeout=20,
                     what="h2 has every item")
    by_data = {item.data: item for item in got2}
    assert sorted(by_data) == list(range(8))
    assert all(by_data[d].attempts >= 1 for d in held)  # redelivered, and counted
    for item in got2:
        q2.ack(item.id)
    # h1's late acks of its dead leases do nothing (the store says: not held)
    for item in got1:
        q1.ack(item.id)
    await q2.refresh()
    assert len(q2) == 0
