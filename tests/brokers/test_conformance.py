"""One conformance suite, run against every broker (see conftest.world).

Every test builds two or three hubs (nodes) on one broker and checks what
crosses between them: pub/sub, patterns, ordering, global offsets, direct
messages, interest routing, history, presence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.support import Sink
from tidings import Hub, StreamPos
from tidings.brokers.base import capabilities_of
from tidings.connection import Connection


def broker_name(hub: Hub) -> str:
    return str(getattr(hub.broker, "name", type(hub.broker).__name__))


def need(hub: Hub, feature: str) -> None:
    """Skip, with the reason, a test of a feature the broker says it lacks."""
    if not getattr(capabilities_of(hub.broker), feature):
        pytest.skip(f"{feature} not available on the {broker_name(hub)} broker")


def positions(hub: Hub) -> bool:
    return capabilities_of(hub.broker).positions


async def started(make: Callable[..., Hub], n: int = 2, **kwargs: object) -> list[Hub]:
    hubs = [make(**kwargs) for _ in range(n)]
    for hub in hubs:
        await hub.start()
    return hubs


async def subscriber(hub: Hub, *patterns: str, user: str | None = None
                     ) -> tuple[Connection, Sink]:
    sink = Sink()
    conn = hub.register(sink, user=user)
    for pattern in patterns:
        await hub.subscribe(conn, pattern)
    return conn, sink


def pubs(sink: Sink) -> list[tuple[str, object, int]]:
    return [(f["channel"], f["data"], f["offset"]) for f in sink.of("publication")]


pubs_of = pubs


async def test_publish_reaches_other_node(world) -> None:
    h1, h2 = await started(world)
    _, sink = await subscriber(h1, "chat/room1")
    pub = await h2.publish("chat/room1", {"text": "hi"})
    # without positions a publication carries offset 0, epoch "" (position unknown)
    assert (pub.offset, pub.epoch == "") == ((1, False) if positions(h2) else (0, True))
    await sink.wait_for(lambda f: len(f) == 1)
    frame = sink.frames[0]
    assert (frame["channel"], frame["data"], frame["offset"], frame["epoch"]) == (
        "chat/room1", {"text": "hi"}, pub.offset, pub.epoch)


async def test_patterns(world) -> None:
    h1, h2 = await started(world)
    _, sink = await subscriber(h1, "a/+", "x/#")
    for channel in ("a/b", "a/b/c", "a", "x", "x/y/z", "b/a", "$sys/x"):
        await h2.publish(channel, channel)
    await h2.publish("done/marker", 0)
    _, marker = await subscriber(h1, "done/+")
    await h2.publish("done/marker", 1)
    # on a Redis cluster a classic PUBLISH reaches the other shards over the cluster
    # bus, so marker 0 may still arrive after the subscription: wait for marker 1
    await marker.wait_for(lambda f: any(x.get("data") == 1 for x in f))
    await sink.wait_for(lambda f: len(f) >= 3)
    assert sorted(c for c, _, _ in pubs(sink)) == ["a/b", "x", "x/y/z"]


async def test_order_and_global_offsets(world) -> None:
    h1, h2, h3 = await started(world, 3)
    need(h1, "positions")
    _, sink = await subscriber(h1, "seq")
    n = 300
    results = await asyncio.gather(
        *(h.publish("seq", i) for i in range(n) for h in (h2, h3))
    )
    offsets = sorted(p.offset for p in results)
    assert offsets == list(range(1, 2 * n + 1))  # unique and gap-free across nodes
    assert len({p.epoch for p in results}) == 1
    await sink.wait_for(lambda f: len(f) == 2 * n, timeout=15)
    got = [o for _, _, o in pubs(sink)]
    assert got == list(range(1, 2 * n + 1))  # in offset order at the subscriber


async def test_direct_messages_across_nodes(world) -> None:
    h1, h2 = await started(world)
    a, sink_a = await subscriber(h1, user="alice")
    b, sink_b = await subscriber(h2, user="alice")
    c, sink_c = await subscriber(h2, user="carol")
    assert await h2.send(a.conn_id, "to a") == 1
    await sink_a.wait_for(lambda f: len(f) == 1)
    assert sink_a.frames[0] == {"type": "message", "from": "server", "data": "to a"}
    await h1.send([b.conn_id, c.conn_id], "to b and c")
    await sink_b.wait_for(lambda f: len(f) == 1)
    await sink_c.wait_for(lambda f: len(f) == 1)
    await h1.send_user("alice", "to alice")
    await sink_a.wait_for(lambda f: len(f) == 2)
    await sink_b.wait_for(lambda f: len(f) == 2)
    await h2.broadcast("to all")
    for sink, n in ((sink_a, 3), (sink_b, 3), (sink_c, 2)):
        await sink.wait_for(lambda f, n=n: len(f) == n)
        assert sink.frames[-1]["data"] == "to all"
    assert [f["data"] for f in sink_c.frames] == ["to b and c", "to all"]


async def test_interest_routing(world) -> None:
    h1, h2 = await started(world)
    conn, sink = await subscriber(h1, "only/here")
    _, probe = await subscriber(h2, "probe")
    before = h2.stats.publications_out
    for i in range(20):
        await h1.publish("only/here", i)
        await h2.publish("only/here", i)
    await h1.publish("probe", "sync")  # h2 gets this one: everything before has passed
    await probe.wait_for(lambda f: len(f) == 1)
    await sink.wait_for(lambda f: len(f) == 40)
    assert h2.stats.publications_out - before == 1  # only the probe, none of "only/here"
    await h1.unsubscribe(conn, "only/here")
    out = h1.stats.publications_out
    await h2.publish("only/here", "after")
    await h2.publish("probe", "sync2")
    await probe.wait_for(lambda f: len(f) == 2)
    assert h1.stats.publications_out == out  # h1 unsubscribed at the broker


async def test_history_and_positions(world) -> None:
    h1, h2 = await started(world, history_size=5, history_ttl=60)
    need(h1, "history")
    for i in range(8):
        await h1.publish("hist", i)
    page = await h2.history("hist")
    assert [p.data for p in page.publications] == [3, 4, 5, 6, 7]
    assert page.offset == 8
    since = await h2.history("hist", since=StreamPos(5, page.epoch))
    assert since.recovered
    assert [p.offset for p in since.publications] == [6, 7, 8]
    gone = await h2.history("hist", since=StreamPos(1, page.epoch))
    assert not gone.recovered  # offset 2 left the window
    other = await h2.history("hist", since=StreamPos(5, "another-epoch"))
    assert not other.recovered
    rev = await h1.history("hist", limit=2, reverse=True)
    assert [p.offset for p in rev.publications] == [8, 7]
    pos = await h2.position("hist")
    assert (pos.offset, pos.epoch) == (8, page.epoch)
    await h2.remove_history("hist")
    after = await h1.history("hist")
    assert after.publications == [] and after.epoch != page.epoch


async def test_presence_and_join_leave_across_nodes(world) -> None:
    h1, h2 = await started(world)
    need(h1, "presence")
    watcher_sink = Sink()
    watcher = h1.register(watcher_sink, user="w")
    await h1.subscribe(watcher, "room", join_leave=True)
    other, _ = await subscriber(h2, "room", user="bob")
    members = await h1.presence("room")
    assert {(m.conn_id, m.user) for m in members} == {(watcher.conn_id, "w"),
                                                     (other.conn_id, "bob")}
    assert await h2.presence_stats("room") == {"num_clients": 2, "num_users": 2}
    await watcher_sink.wait_for(lambda f: any(x["type"] == "join"
                                              and x["member"]["conn_id"] == other.conn_id
                                              for x in f))
    await h2.unregister(other)
    await watcher_sink.wait_for(lambda f: any(x["type"] == "leave" for x in f))
    leave = watcher_sink.of("leave")[0]
    assert leave["member"] == {"conn_id": other.conn_id, "user": "bob"}
    assert [m.conn_id for m in await h2.presence("room")] == [watcher.conn_id]


async def test_publishes_of_one_sender_keep_their_order(world) -> None:
    (hub,) = await started(world, 1)
    _, sink = await subscriber(hub, "mine")  # served through the broker
    # started together without waiting for each other, as a pipelining sender does
    pubs = await asyncio.gather(*(hub.publish("mine", i) for i in range(200)))
    if positions(hub):
        assert [p.offset for p in pubs] == list(range(1, 201))
    assert [p.data for p in pubs] == list(range(200))
    await sink.wait_for(lambda f: len(f) == 200, timeout=15)
    assert [d for _, d, _ in pubs_of(sink)] == list(range(200))
