"""The pub/sub conformance suite: what crosses between two or three nodes.

Import its tests into a module that defines the ``world`` fixture (see
:mod:`tidings.testing`). Tests of a feature the broker does not offer skip
with the reason; a broker without positions must publish at offset 0.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from tidings.testing.support import Sink, World, requires, started, subscriber
from tidings.types import StreamPos

__all__ = [
    "test_direct_messages_across_nodes",
    "test_global_offsets",
    "test_history_and_positions",
    "test_interest_routing",
    "test_join_leave_events_reach_the_nodes_that_asked",
    "test_order_across_nodes",
    "test_patterns",
    "test_presence_and_join_leave_across_nodes",
    "test_publish_reaches_other_node",
    "test_publishes_of_one_sender_keep_their_order",
]


def has_count(n: int, frames: list[dict[str, Any]]) -> bool:
    return len(frames) == n


async def test_publish_reaches_other_node(world: World) -> None:
    h1, h2 = await started(world)
    _, sink = await subscriber(h1, "chat/room1")
    pub = await h2.publish("chat/room1", {"text": "hi"})
    await sink.wait_for(lambda f: len(f) == 1)
    frame = sink.frames[0]
    assert (frame["channel"], frame["data"]) == ("chat/room1", {"text": "hi"})
    if h1.capabilities.positions:
        assert pub.offset == 1
        assert (frame["offset"], frame["epoch"]) == (1, pub.epoch)
    else:  # no made-up positions
        assert (pub.offset, frame["offset"]) == (0, 0)


async def test_patterns(world: World) -> None:
    h1, h2 = await started(world)
    _, sink = await subscriber(h1, "a/+", "x/#")
    for channel in ("a/b", "a/b/c", "a", "x", "x/y/z", "b/a", "$sys/x"):
        await h2.publish(channel, channel)
    _, marker = await subscriber(h1, "done/+")
    await h2.publish("done/marker", 1)
    # the marker was published after the others, but a broker may route each
    # channel its own way (a Redis cluster's shards): wait for both sides
    await marker.wait_for(lambda f: any(x.get("data") == 1 for x in f))
    await sink.wait_for(lambda f: len(f) >= 3)
    assert sorted(c for c, _, _ in sink.publications()) == ["a/b", "x", "x/y/z"]


async def test_order_across_nodes(world: World) -> None:
    h1, h2 = await started(world)
    _, sink = await subscriber(h1, "seq")
    n = 300
    await asyncio.gather(*(h2.publish("seq", i) for i in range(n)))
    await sink.wait_for(lambda f: len(f) == n, timeout=20)
    assert [d for _, d, _ in sink.publications()] == list(range(n))


async def test_global_offsets(world: World) -> None:
    h1, h2, h3 = await started(world, 3)
    requires(h1, "positions")
    _, sink = await subscriber(h1, "seq")
    n = 300
    results = await asyncio.gather(
        *(h.publish("seq", i) for i in range(n) for h in (h2, h3))
    )
    offsets = sorted(p.offset for p in results)
    assert offsets == list(range(1, 2 * n + 1))  # unique and gap-free across nodes
    assert len({p.epoch for p in results}) == 1
    await sink.wait_for(lambda f: len(f) == 2 * n, timeout=20)
    got = [o for _, _, o in sink.publications()]
    assert got == list(range(1, 2 * n + 1))  # in offset order at the subscriber


async def test_direct_messages_across_nodes(world: World) -> None:
    h1, h2 = await started(world)
    requires(h1, "direct")
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
        await sink.wait_for(partial(has_count, n))
        assert sink.frames[-1]["data"] == "to all"
    assert [f["data"] for f in sink_c.frames] == ["to b and c", "to all"]


async def test_interest_routing(world: World) -> None:
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


async def test_history_and_positions(world: World) -> None:
    h1, h2 = await started(world, history_size=5, history_ttl=60)
    requires(h1, "history")
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
    assert after.publications == []
    assert after.epoch != page.epoch


async def test_join_leave_events_reach_the_nodes_that_asked(world: World) -> None:
    """Every broker carries join/leave frames (``publish_event``, presence or
    not) to the nodes whose clients asked for them on a matching channel, and
    to no one else."""
    h1, h2 = await started(world)
    sink, other_sink = Sink(), Sink()
    watcher, other = h1.register(sink), h1.register(other_sink)
    await h1.subscribe(watcher, "room/+", join_leave=True)
    await h1.subscribe(other, "elsewhere", join_leave=True)
    frame = '{"type":"join","channel":"%s","member":{"conn_id":"x","user":"bob"}}'
    for channel in ("elsewhere", "room/1", "room/2"):
        await h2.broker.publish_event(channel, frame % channel)
    # (channels are not ordered with each other on every broker: Redis Cluster
    # shards them) once "elsewhere" reached its watcher, the room watcher's
    # share of it, none, is settled too: nothing is left queued for it
    def bobs(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # (a watcher of a channel may also see its own join, where presence is on)
        return [f for f in frames if f.get("member", {}).get("conn_id") == "x"]

    await other_sink.wait_for(lambda f: len(bobs(f)) >= 1)
    await sink.wait_for(lambda f: len(bobs(f)) >= 2)
    assert watcher.queued == 0
    assert sorted(bobs(sink.frames), key=lambda f: str(f["channel"])) == [
        {"type": "join", "channel": room, "member": {"conn_id": "x", "user": "bob"}}
        for room in ("room/1", "room/2")]
    assert not [f for f in sink.frames if f.get("channel") == "elsewhere"]
    assert [f["channel"] for f in bobs(other_sink.frames)] == ["elsewhere"]


async def test_presence_and_join_leave_across_nodes(world: World) -> None:
    h1, h2 = await started(world)
    requires(h1, "presence")
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


async def test_publishes_of_one_sender_keep_their_order(world: World) -> None:
    (hub,) = await started(world, 1)
    _, sink = await subscriber(hub, "mine")
    # started together without waiting for each other, as a pipelining sender does
    pubs = await asyncio.gather(*(hub.publish("mine", i) for i in range(200)))
    assert [p.data for p in pubs] == list(range(200))
    if hub.capabilities.positions:
        assert [p.offset for p in pubs] == list(range(1, 201))
    await sink.wait_for(lambda f: len(f) == 200)
    assert [d for _, d, _ in sink.publications()] == list(range(200))
