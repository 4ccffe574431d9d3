"""The ``kafka://`` broker beyond the conformance suite, against a private tansu
(a Kafka-protocol server): names that need escaping, a gap whose bus copy
never came (read from the channel topic), history removed on another node,
and the server killed and restarted on the same port."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from tests.brokers.conftest import TansuServer
from tests.support import Sink, apost, free_port, native, running, wait_health, wait_until
from tidings import Hub
from tidings.brokers import create_broker
from tidings.brokers.base import capabilities_of
from tidings.brokers.kafka import KafkaBroker
from tidings.brokers.kafka.wire import MAX_TOPIC, channel_topic
from tidings.brokers.plain_wire import encode_publication
from tidings.exceptions import BrokerUnavailable
from tidings.types import StreamPos

ODD = ["a.b", "a_b", "a_5Fb", "x/%", "ü/日本/語", "sp ace/tab\there", "$sys/x", "a\x1fb",
       "emoji/\U0001f600", "a/b.c/d", "l/" + "é" * 250, "l/" + "e" * 250]


@pytest.fixture
async def nodes(tansu: TansuServer) -> AsyncIterator[Any]:
    url = f"{tansu.url}&prefix=t{uuid.uuid4().hex[:8]}"
    hubs: list[Hub] = []

    async def make(**options: Any) -> Hub:
        hub = Hub(url, **options)
        await hub.start()
        hubs.append(hub)
        return hub

    make.url = url  # type: ignore[attr-defined]
    yield make
    for hub in hubs:
        await hub.stop()


async def subscriber(hub: Hub, *patterns: str) -> Sink:
    sink = Sink()
    conn = hub.register(sink)
    for pattern in patterns:
        await hub.subscribe(conn, pattern)
    return sink


def test_url_and_capabilities() -> None:
    broker = create_broker("kafka://k1:9093,k2?prefix=app.1&timeout=2")
    assert isinstance(broker, KafkaBroker)
    assert broker.servers == ["k1:9093", "k2:9092"]
    assert (broker.prefix, broker.bus_topic, broker.timeout) == ("app.1", "app.1.bus", 2.0)
    caps = capabilities_of(broker)
    assert (caps.positions, caps.history, caps.presence, caps.queues, caps.direct) == (
        True, True, False, False, True)
    for bad in ("a/b", "a b", "x" * 101, "é"):
        with pytest.raises(ValueError, match="prefix"):
            KafkaBroker(f"kafka://127.0.0.1:9092?prefix={bad}")


def test_topic_names_are_legal_and_one_to_one() -> None:
    names = [channel_topic("p", c) for c in ODD]
    assert len(set(names)) == len(ODD)
    legal = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert all(len(n) <= MAX_TOPIC and set(n) <= legal for n in names)
    assert channel_topic("p", "chat/room-1") == "p.h.chat.room-1"  # plain names stay readable
    assert channel_topic("p", "a.b") == "p.h.a_2Eb" and channel_topic("p", "a_b") == "p.h.a_5Fb"
    assert channel_topic("p", "l/" + "e" * 250).startswith("p.x.")


async def test_down_at_start_is_unavailable() -> None:
    hub = Hub(f"kafka://127.0.0.1:{free_port()}?timeout=1")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="cannot reach Kafka"):
        await hub.start()
    assert time.monotonic() - started < 5


async def test_queues_stay_in_process(nodes: Any) -> None:
    hub = await nodes()
    assert hub.queues.store is None
    assert type(hub.queue("jobs")).__name__ == "WorkQueue"


async def test_odd_channel_names_round_trip(nodes: Any) -> None:
    h1, h2 = await nodes(), await nodes()
    sink = await subscriber(h1, *ODD)
    for channel in ODD:
        pub = await h2.publish(channel, {"c": channel})
        assert pub.offset == 1
    await sink.wait_for(lambda f: len(f) >= len(ODD))
    assert sorted(f["channel"] for f in sink.of("publication")) == sorted(ODD)
    assert all(f["data"] == {"c": f["channel"]} for f in sink.of("publication"))
    page = await h1.history("l/" + "é" * 250)
    assert page.offset == 1  # the hashed topic name serves history too


async def test_a_gap_without_its_bus_copy_is_read_from_the_channel_topic(
        nodes: Any, tansu: TansuServer) -> None:
    """A publisher that died between its append to the channel topic and its
    bus copy leaves a gap: the subscribers read it from the channel topic."""
    h1, h2 = await nodes(), await nodes()
    sink = await subscriber(h1, "g/+")
    first = await h2.publish("g/1", "one")
    await sink.wait_for(lambda f: len(f) == 1)
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{tansu.port}", acks="all")
    await producer.start()
    try:  # offset 2 reaches the channel topic only, as from a node that died then
        ts = int(time.time() * 1000)
        sent = await producer.send_and_wait(
            channel_topic(h2.broker.prefix, "g/1"),  # type: ignore[attr-defined]
            encode_publication("g/1", "two", None, None, ts), partition=0,
            headers=[("w", b"10,60")])
        assert sent.offset == 1
    finally:
        await producer.stop()
    third = await h2.publish("g/1", "three")
    assert third.offset == 3 and third.epoch == first.epoch
    await sink.wait_for(lambda f: len(f) == 3)
    assert [(f["data"], f["offset"]) for f in sink.of("publication")] == [
        ("one", 1), ("two", 2), ("three", 3)]


async def test_a_failed_bus_copy_is_delivered_once_at_its_offset(
        nodes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The channel topic took a publication but its bus copy failed (the one
    fault injected here: aiokafka's send to the bus topic raises once, the
    server is the real one): the publish returns it at its offset, the
    publishing node's subscribers get it once, at that offset (not also as an
    offset-0 local copy), and the other node reads it from the channel topic
    with the next publication (after the publishing node reconnected, as it
    does after any failed call)."""
    h1, h2 = await nodes(), await nodes()
    local, remote = await subscriber(h1, "f"), await subscriber(h2, "f")
    assert (await h1.publish("f", "one")).offset == 1
    await remote.wait_for(lambda f: len(f) == 1)
    await local.wait_for(lambda f: len(f) == 1)
    broker = h1.broker
    assert isinstance(broker, KafkaBroker)
    link = broker._link
    assert link is not None
    real_send = link.producer.send
    failures: list[str] = []

    async def send(topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == broker.bus_topic and not failures:
            failures.append(topic)
            raise KafkaConnectionError("injected: the bus copy is lost")
        return await real_send(topic, *args, **kwargs)

    monkeypatch.setattr(link.producer, "send", send)
    two = await h1.publish("f", "two")
    assert (two.offset, failures) == (2, [broker.bus_topic])
    await local.wait_for(lambda f: len(f) == 2)
    # a failed call makes the node check its connection: here it reconnects
    await wait_until(lambda: broker._link not in (None, link) and broker.health().up,
                     what="the publishing node to reconnect")
    assert (await h1.publish("f", "three")).offset == 3
    await local.wait_for(lambda f: len(f) == 3)
    await remote.wait_for(lambda f: len(f) == 3)
    for sink in (local, remote):
        assert [(f["data"], f["offset"]) for f in sink.of("publication")] == [
            ("one", 1), ("two", 2), ("three", 3)]


async def test_history_removed_on_another_node(nodes: Any) -> None:
    h1, h2 = await nodes(history_size=10, history_ttl=60), await nodes()
    for i in range(3):
        old = await h1.publish("r", i)
    assert old.offset == 3
    await h2.remove_history("r")
    page = await h1.history("r")
    assert (page.publications, page.offset) == ([], 0)
    assert page.epoch != old.epoch
    new = await h1.publish("r", "again")
    assert (new.offset, new.epoch) == (1, page.epoch)  # a new stream, told apart by its epoch
    pos = await h2.position("r")
    assert (pos.offset, pos.epoch) == (1, new.epoch)
    stale = await h2.history("r", since=old.position)
    assert not stale.recovered


async def test_history_window_and_text(nodes: Any) -> None:
    h1, h2 = await nodes(history_size=3, history_ttl=60), await nodes()
    for i in range(5):
        await h1.publish("w", {"i": i}, text=f'{{"i": {i}}}')
    page = await h2.history("w")
    assert [p.data for p in page.publications] == [{"i": 2}, {"i": 3}, {"i": 4}]
    assert page.publications[0].text == '{"i": 2}'  # the publisher's text, as sent
    rev = await h2.history("w", limit=1, reverse=True)
    assert [p.offset for p in rev.publications] == [5]
    assert (await h2.history("w", since=StreamPos(page.offset, page.epoch))).publications == []






async def test_tansu_killed_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tidings.hub")
    server = TansuServer()
    try:
        url = f"{server.url}&prefix=f&ping=0.3"
        h1, h2 = Hub(url), Hub(url)
        async with running(h1) as base1, running(h2) as base2, native(base1) as client:
            await client.request({"type": "subscribe", "channel": "live/+"})
            status, body = await apost(base2, "publish", {"channel": "live/1", "data": "before"})
            assert status == 200 and body["result"]["offset"] == 1
            before_epoch = body["result"]["epoch"]
            assert (await client.next("publication"))["data"] == "before"

            server.kill()
            await wait_health(base1, 503, within=10)
            await wait_health(base2, 503, within=10)
            for call in (h1.broker.publish("live/1", "x"), h1.broker.history("live/1"),
                         h2.broker.position("live/1"), h2.broker.send_all(b"x")):
                with pytest.raises(BrokerUnavailable):  # every call, and nothing else
                    await call
            status, _ = await apost(base1, "publish", {"channel": "live/1", "data": "local"})
            assert status == 200  # local delivery goes on during the outage
            assert (await client.next("publication"))["data"] == "local"

            server.start()  # same port, no topics (memory storage)
            await wait_health(base1, 200, within=20)
            await wait_health(base2, 200, within=20)
            status, body = await apost(base2, "publish", {"channel": "live/1", "data": "after"})
            assert status == 200
            # the channel's stream began again: offset 1 in another epoch
            assert body["result"]["offset"] == 1 and body["result"]["epoch"] != before_epoch
            got = await client.next("publication")
            assert (got["data"], got["offset"]) == ("after", 1)
        downs = [r for r in caplog.records if "is down" in r.getMessage()]
        ups = [r for r in caplog.records if "is up again" in r.getMessage()]
        assert len(downs) == 2 and len(ups) == 2  # one line per transition per hub
    finally:
        server.stop()
