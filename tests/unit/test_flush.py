"""The write policy of direct transports (tidings.core.flush): a lone frame is
written at once, the rest of a turn's frames in one write at its end, a busy
hub batches whole turns; order and the slow-consumer policy hold on every path."""

from __future__ import annotations

import orjson
import pytest

from tests.support import Sink
from tests.unit.test_direct import FakeDirect, turn
from tidings import Hub, Limits
from tidings.core import flush
from tidings.core.connection import Connection
from tidings.protocol.codec import NATIVE_FRAMED
from tidings.protocol.frames import encode_frame
from tidings.types import Publication


async def subscribed(hub: Hub, channel: str, direct: FakeDirect | None = None) -> Connection:
    conn = hub.register(Sink(), direct=direct or FakeDirect())
    await hub.subscribe(conn, channel)
    await turn()  # start from an idle loop
    return conn


def frames(pubs: list[Publication]) -> bytes:
    return b"".join(NATIVE_FRAMED.publication(p) for p in pubs)


async def test_a_lone_publication_is_written_before_publish_returns(hub: Hub) -> None:
    directs = [FakeDirect() for _ in range(3)]
    for d in directs:
        await subscribed(hub, "lone", d)
    pub = hub.publish_nowait("lone", {"n": 1})
    assert all(d.writes == [NATIVE_FRAMED.publication(pub)] for d in directs)
    await turn()  # the end of the turn has nothing left to write
    assert all(len(d.writes) == 1 for d in directs)


async def test_lone_burst_lone_arrive_in_order_in_separate_turns(hub: Hub) -> None:
    direct = FakeDirect()
    await subscribed(hub, "o", direct)
    first = hub.publish_nowait("o", 0)
    await turn()
    burst = hub.publish_many_nowait("o", [(i, None) for i in range(1, 6)])
    await turn()
    last = hub.publish_nowait("o", 6)
    await turn()
    assert direct.writes == [frames([first]), frames(burst), frames([last])]


async def test_lone_burst_lone_in_one_turn_keep_their_order(hub: Hub) -> None:
    direct = FakeDirect()
    await subscribed(hub, "o", direct)
    first = hub.publish_nowait("o", 0)
    burst = hub.publish_many_nowait("o", [(i, None) for i in range(1, 6)])
    last = hub.publish_nowait("o", 6)
    assert direct.writes == [frames([first])]  # the rest waits for the end of the turn
    await turn()
    assert direct.writes == [frames([first]), frames([*burst, last])]
    assert [p.offset for p in [first, *burst, last]] == list(range(1, 8))


async def test_a_busy_turn_makes_the_next_one_batch_then_lone_frames_go_through(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flush, "BUSY_SECONDS", 60.0)  # however slow this machine is
    direct = FakeDirect()
    await subscribed(hub, "b", direct)
    a, b = hub.publish_nowait("b", 1), hub.publish_nowait("b", 2)  # two scopes: busy
    await turn()
    assert direct.writes == [frames([a]), frames([b])]
    c = hub.publish_nowait("b", 3)
    assert len(direct.writes) == 2  # the turn after a busy one queues from the start
    await turn()
    assert direct.writes[2] == frames([c])
    d = hub.publish_nowait("b", 4)  # the last turn had one scope: at once again
    assert direct.writes[3] == frames([d])


async def test_a_busy_mark_lapses_when_the_loop_was_idle(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mark is for the turn right after a busy one: a scope that comes once
    the loop was idle for ``BUSY_SECONDS`` writes through."""
    monkeypatch.setattr(flush, "BUSY_SECONDS", 0.0)  # any pause is long enough
    direct = FakeDirect()
    await subscribed(hub, "b", direct)
    hub.publish_nowait("b", 1)
    hub.publish_nowait("b", 2)  # two scopes in one turn: busy
    await turn()
    assert len(direct.writes) == 2
    c = hub.publish_nowait("b", 3)
    assert direct.writes[2] == frames([c])  # at once: the mark lapsed


async def test_a_frame_queued_earlier_in_the_turn_goes_first(hub: Hub) -> None:
    direct = FakeDirect()
    conn = await subscribed(hub, "q", direct)
    conn.send_json({"type": "reply", "id": 1})  # a task's reply: queued for the turn's end
    pub = hub.publish_nowait("q", "after")
    assert direct.writes == []  # not written ahead of the reply
    await turn()
    assert direct.writes == [encode_frame(b'{"type":"reply","id":1}') + frames([pub])]


async def test_a_broken_socket_on_the_direct_path_costs_the_others_nothing(hub: Hub) -> None:
    good, bad, other = FakeDirect(), FakeDirect(fail=True), FakeDirect()
    conns = [await subscribed(hub, "x", d) for d in (good, bad, other)]
    pub = hub.publish_nowait("x", 1)
    assert good.writes == other.writes == [frames([pub])]
    assert conns[1].closed and not conns[0].closed


async def test_a_paused_socket_is_never_written_through_and_gets_lagged() -> None:
    """SPEC 7 on a paused (slow) socket: frames wait in the bounded outbox, the
    oldest are dropped past it, and the client hears ``lagged`` first."""
    async with Hub(limits=Limits(outbox_size=4, overflow="drop")) as hub:
        direct = FakeDirect()
        direct.can_write = False
        conn = await subscribed(hub, "slow", direct)
        pubs = []
        for i in range(10):  # each one alone in its turn: all would go through
            pubs.append(hub.publish_nowait("slow", i))
            await turn()
        assert direct.writes == [] and conn.dropped == 6
        direct.can_write = True
        assert direct.on_resume is not None
        direct.on_resume()
        expected = encode_frame(orjson.dumps({"type": "lagged", "dropped": 6})) + frames(pubs[6:])
        assert direct.writes == [expected]
        more = hub.publish_nowait("slow", 10)  # caught up: at once again
        assert direct.writes[1] == frames([more])


async def test_a_paused_socket_is_disconnected_past_its_outbox() -> None:
    async with Hub(limits=Limits(outbox_size=4)) as hub:
        direct = FakeDirect()
        direct.can_write = False
        sink = Sink()
        conn = hub.register(sink, direct=direct)
        await hub.subscribe(conn, "slow")
        await turn()
        for i in range(5):
            hub.publish_nowait("slow", i)
            await turn()
        assert conn.closed and direct.writes == []
        await sink.wait_for(lambda f: any(m.get("type") == "websocket.close" for m in f))
        assert sink.frames[-1] == {"type": "websocket.close", "code": 1013,
                                   "reason": "outbox overflow"}


async def test_closing_mid_burst_writes_what_was_queued_before_the_close(hub: Hub) -> None:
    direct = FakeDirect()
    sink = Sink()
    conn = hub.register(sink, direct=direct)
    await hub.subscribe(conn, "c")
    await turn()
    pubs = [hub.publish_nowait("c", i) for i in range(5)]  # 1 at once, 4 queued
    conn.close(4000, "bye")
    assert b"".join(direct.writes) == frames(pubs)
    await sink.wait_for(lambda f: bool(f))
    assert sink.frames == [{"type": "websocket.close", "code": 4000, "reason": "bye"}]
    hub.publish_nowait("c", 5)  # after the close: not written
    await turn()
    assert b"".join(direct.writes) == frames(pubs)


async def test_one_scope_for_many_publications_writes_each_connection_once_then_once(
        hub: Hub) -> None:
    """Nested scopes (a producer's read around its publications' fan-outs) are
    one: each connection is written through once, the rest at the end."""
    direct = FakeDirect()
    await subscribed(hub, "n", direct)
    hub.flusher.enter()
    try:
        pubs = [hub.publish_nowait("n", i) for i in range(4)]
    finally:
        hub.flusher.leave()
    await turn()
    assert direct.writes == [frames(pubs[:1]), frames(pubs[1:])]
    lone = hub.publish_nowait("n", 4)  # one scope last turn: not busy
    assert direct.writes[2] == frames([lone])


async def test_a_burst_is_framed_once_for_every_subscriber_whatever_path_it_takes(
        hub: Hub) -> None:
    """One burst fanned out in a scope: the connection that can write through
    gets it in one write, the one already written to in this scope gets it
    queued for the end of the turn; both get the same bytes as framing each
    publication on its own, and the outbox holds one entry per publication
    (a drop policy drops whole publications, never part of a batch)."""
    fresh, behind = FakeDirect(), FakeDirect()
    await subscribed(hub, "many", fresh)
    late = await subscribed(hub, "many", behind)
    await hub.subscribe(late, "solo")
    hub.flusher.enter()  # one read's scope, as a producer's read callback opens
    solo = hub.publish_nowait("solo", 0)
    burst = hub.publish_many_nowait("many", [({"i": i}, None) for i in range(4)])
    hub.flusher.leave()
    assert fresh.writes == [frames(burst)]  # at once, in one write
    assert behind.writes == [frames([solo])]  # its one write-through of this turn
    assert late.queued == 4
    await turn()
    assert behind.writes == [frames([solo]), frames(burst)]
    assert fresh.writes == [frames(burst)]
