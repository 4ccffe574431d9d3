"""The ``mqtt://`` broker against the real Mosquitto on loopback (names that
need escaping, native wildcards with overlapping subscriptions) and a private
``mosquitto`` killed and restarted mid-stream; direct messages and join/leave
events are in the conformance suite."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.brokers.conftest import MQTT_URL, MosquittoServer, port_open, unavailable, with_prefix
from tests.support import Sink, apost, native, running, wait_health
from tidings import Hub
from tidings.brokers.base import capabilities_of
from tidings.brokers.mqtt import MqttBroker, escape_level, escape_topic

# control characters, a non-character and '%' are refused by Mosquitto or need escaping
ODD = ["a.b", "a*b", "x/%", "x/%25", "ü/日本/語", "sp ace/tab\there", "$sys/x", "a\x1fb",
       "ctl\x01\x7f\x85/q", "\ufffe/x", "\U0001fffe", "emoji/\U0001f600", "a/b.c/d",
       "l/" + "é" * 250]


@pytest.fixture
async def nodes() -> AsyncIterator[Any]:
    if not port_open(MQTT_URL, 1883):
        unavailable(f"no MQTT server at {MQTT_URL}")
    url = with_prefix(MQTT_URL, f"t{uuid.uuid4().hex[:8]}")
    hubs: list[Hub] = []

    async def make() -> Hub:
        hub = Hub(url)
        await hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        await hub.stop()


async def subscriber(hub: Hub, *patterns: str) -> Sink:
    sink = Sink()
    conn = hub.register(sink)
    for pattern in patterns:
        await hub.subscribe(conn, pattern)
    return sink


def channels(sink: Sink) -> list[str]:
    return [f["channel"] for f in sink.of("publication")]


def test_escaping_is_one_to_one() -> None:
    assert escape_topic("a/b c/ü") == "a/b c/ü"  # plain names are the topic as is
    assert escape_topic("x/%") == "x/%25" and escape_topic("x/%25") == "x/%2525"
    assert escape_topic("c\x01\x7f") == "c%01%7F"
    assert escape_topic("\ufffe") == "%u00FFFE"
    assert escape_level("n/+#") == "n%2F%2B%23"
    assert len({escape_topic(c) for c in ODD}) == len(ODD)


def test_capabilities_are_stated() -> None:
    caps = capabilities_of(MqttBroker("mqtt://127.0.0.1:1883"))
    assert (caps.positions, caps.history, caps.presence, caps.queues, caps.direct) == (
        False, False, False, False, True)
    with pytest.raises(ValueError, match="prefix"):
        MqttBroker("mqtt://127.0.0.1:1883?prefix=a/b")


async def test_queues_stay_in_process(nodes: Any) -> None:
    hub = await nodes()
    assert hub.queues.store is None
    assert type(hub.queue("jobs")).__name__ == "WorkQueue"


async def test_odd_channel_names_round_trip(nodes: Any) -> None:
    h1, h2 = await nodes(), await nodes()
    sink = await subscriber(h1, *ODD)
    for channel in ODD:
        await h2.publish(channel, {"c": channel})
    await sink.wait_for(lambda f: len(f) >= len(ODD))
    await asyncio.sleep(0.2)  # nothing arrives twice
    assert sorted(channels(sink)) == sorted(ODD)
    assert all(f["data"] == {"c": f["channel"]} for f in sink.of("publication"))
    assert h1.health().up and h2.health().up  # no name made the server drop us


async def test_overlapping_wildcards_deliver_once(nodes: Any) -> None:
    h1, h2 = await nodes(), await nodes()
    sink = await subscriber(h1, "x/+", "x/#", "#", "x/1", "+/日本/#")
    sent = ["x/1", "x/1/2", "x", "ü/日本/語", "$sys/x", "other"]
    for channel in sent:
        await h2.publish(channel, channel)
    await sink.wait_for(lambda f: len(f) >= len(sent) - 1)
    await asyncio.sleep(0.3)
    # each once, however many subscriptions match; '#' skips "$sys/x" as tidings does
    assert sorted(channels(sink)) == sorted(c for c in sent if c != "$sys/x")


async def test_unsubscribe_stops_delivery(nodes: Any) -> None:
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
    await h2.publish("probe", "sync")
    await probe.wait_for(lambda f: len(f) == 1)
    assert h1.stats.publications_out - before == 1






async def test_mosquitto_killed_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tidings.hub")
    server = MosquittoServer()
    try:
        h1, h2 = Hub(server.url), Hub(server.url)
        async with running(h1) as base1, running(h2) as base2, native(base1) as client:
            await client.request({"type": "subscribe", "channel": "live/+"})
            await apost(base2, "publish", {"channel": "live/1", "data": "before"})
            assert (await client.next("publication"))["data"] == "before"

            server.kill()
            await wait_health(base1, 503, within=10)
            await wait_health(base2, 503, within=10)
            status, _ = await apost(base1, "publish", {"channel": "live/1", "data": "local"})
            assert status == 200  # local delivery goes on during the outage
            assert (await client.next("publication"))["data"] == "local"

            server.start()  # same port
            await wait_health(base1, 200, within=20)
            await wait_health(base2, 200, within=20)
            status, _ = await apost(base2, "publish", {"channel": "live/2", "data": "after"})
            assert status == 200
            assert (await client.next("publication"))["data"] == "after"  # resubscribed
        downs = [r for r in caplog.records if "is down" in r.getMessage()]
        ups = [r for r in caplog.records if "is up again" in r.getMessage()]
        assert len(downs) == 2 and len(ups) == 2  # one line per transition per hub
    finally:
        server.stop()
