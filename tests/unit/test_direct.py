"""The direct write path: frames built once, one write per connection per turn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from websockets.frames import Frame, Opcode

from tests.support import Sink
from tidings import Hub
from tidings.core.connection import ConnectionKind
from tidings.protocol.codec import NATIVE_FRAMED, RAW_FRAMED
from tidings.protocol.frames import OP_BINARY, TEXT_HEADS, TEXT_HEADS_MAX, encode_frame
from tidings.types import Publication


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
@pytest.mark.parametrize(("opcode", "ws_opcode"), [(1, Opcode.TEXT), (OP_BINARY, Opcode.BINARY)])
def test_frames_are_what_websockets_would_send(size: int, opcode: int, ws_opcode: Opcode) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = Frame(ws_opcode, payload).serialize(mask=False)
    assert encode_frame(payload, opcode) == expected


def test_the_looked_up_text_headers_are_the_frames_headers() -> None:
    """``TEXT_HEADS`` (the native publication frame's header, looked up) is
    what ``websockets`` puts before a text payload of each length."""
    assert len(TEXT_HEADS) == TEXT_HEADS_MAX
    for n in range(TEXT_HEADS_MAX):
        payload = b"x" * n
        expected = Frame(Opcode.TEXT, payload).serialize(mask=False)
        assert TEXT_HEADS[n] + payload == expected == encode_frame(payload)


class FakeDirect:
    """A socket that records writes; ``fail`` makes writes raise (a broken peer)."""

    def __init__(self, fail: bool = False) -> None:
        self.writes: list[bytes] = []
        self.fail = fail
        self.on_resume: Callable[[], None] | None = None
        self.can_write = True
        self.gone = False
        self.transport = self  # its own transport: ``write`` below

    def write(self, data: bytes) -> None:
        if self.fail:
            raise ConnectionResetError("peer gone")
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.gone


async def turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_burst_goes_out_in_two_writes_in_order(hub: Hub) -> None:
    """The first publication of a turn is written at once, the rest of the turn's
    in one write at its end (tidings.core.flush)."""
    direct = FakeDirect()
    conn = hub.register(Sink(), direct=direct)
    await hub.subscribe(conn, "burst")
    await turn()
    pubs = [await hub.publish("burst", i) for i in range(100)]
    assert direct.writes == [NATIVE_FRAMED.publication(pubs[0])]
    await turn()
    assert len(direct.writes) == 2
    assert direct.writes[1] == b"".join(NATIVE_FRAMED.publication(p) for p in pubs[1:])


async def test_the_same_bytes_for_every_subscriber(hub: Hub) -> None:
    directs = [FakeDirect() for _ in range(5)]
    for d in directs:
        await hub.subscribe(hub.register(Sink(), direct=d), "same")
    pub = await hub.publish("same", {"x": 1})
    await turn()
    assert all(d.writes == [NATIVE_FRAMED.publication(pub)] for d in directs)


async def test_a_broken_socket_mid_fanout_costs_the_others_nothing(hub: Hub) -> None:
    directs = [FakeDirect(), FakeDirect(fail=True), FakeDirect()]
    conns = [hub.register(Sink(), direct=d) for d in directs]
    for conn in conns:
        await hub.subscribe(conn, "x")
    pubs: list[Publication] = [await hub.publish("x", i) for i in range(3)]
    await turn()
    expected = b"".join(NATIVE_FRAMED.publication(p) for p in pubs)
    assert b"".join(directs[0].writes) == expected
    assert b"".join(directs[2].writes) == expected
    assert conns[1].closed


async def test_a_lone_publication_reaches_every_connection_as_its_state_says(
        hub: Hub) -> None:
    """The fan-out's inlined write (``deliver_all``) against connections in every
    state, in one fan-out: written at once, paused (written on resume),
    closing (nothing, no error), broken (closed, the rest unharmed),
    recovering (a floor: only what is past it), raw (its own bytes), and one
    already written to in this turn (queued behind its first write)."""
    ok, paused, closing, broken, floored, raw, busy = (FakeDirect() for _ in range(7))
    broken.fail = True
    closing.gone = True
    conns = {}
    for name, direct, kind in [("ok", ok, ConnectionKind.NATIVE),
                               ("paused", paused, ConnectionKind.NATIVE),
                               ("closing", closing, ConnectionKind.NATIVE),
                               ("broken", broken, ConnectionKind.NATIVE),
                               ("floored", floored, ConnectionKind.NATIVE),
                               ("raw", raw, ConnectionKind.RAW),
                               ("busy", busy, ConnectionKind.NATIVE)]:
        conns[name] = conn = hub.register(Sink(), direct=direct, kind=kind)
        await hub.subscribe(conn, "s")
    await turn()
    conns["floored"]._floors["s"] = 1  # as after a recovery up to offset 1
    paused.can_write = False
    hub.flusher.enter()  # one turn: "busy" is written to first, then the fan-out
    try:
        conns["busy"].send_frame('{"type":"pong"}')
        first = hub.publish_nowait("s", {"n": 1})
        second = hub.publish_nowait("s", {"n": 2})
    finally:
        hub.flusher.leave()
    native = [NATIVE_FRAMED.publication(p) for p in (first, second)]
    assert ok.writes == [native[0]]  # at once; the second is the turn's queued write
    assert raw.writes == [RAW_FRAMED.publication(first)]
    assert raw.writes[0] != native[0]
    assert floored.writes == [native[1]]  # the first is below its floor
    assert broken.writes == [] and conns["broken"].closed
    assert busy.writes == [encode_frame(b'{"type":"pong"}')]
    assert closing.writes == [] and paused.writes == []
    await turn()
    assert ok.writes == native
    assert raw.writes == [RAW_FRAMED.publication(p) for p in (first, second)]
    assert floored.writes == [native[1]] and not conns["floored"].closed
    assert busy.writes[1:] == [b"".join(native)]
    assert closing.writes == [] and conns["closing"].closed
    assert paused.writes == []
    paused.can_write = True
    assert paused.on_resume is not None
    paused.on_resume()
    assert paused.writes == [b"".join(native)]
    assert hub.stats.deliveries == 14


async def test_paused_socket_keeps_frames_bounded_until_resume(hub: Hub) -> None:
    direct = FakeDirect()
    direct.can_write = False
    conn = hub.register(Sink(), direct=direct)
    await hub.subscribe(conn, "p")
    for i in range(10):
        await hub.publish("p", i)
    await turn()
    assert direct.writes == []
    direct.can_write = True
    assert direct.on_resume is not None
    direct.on_resume()
    assert len(direct.writes) == 1
    assert direct.writes[0].count(b'"channel":"p"') == 10


async def test_a_batch_of_publications_is_one_write_in_order(hub: Hub) -> None:
    """``publish_many_nowait``: consecutive offsets, one call per subscribing node,
    one write per connection, history in order."""
    directs = [FakeDirect() for _ in range(3)]
    for d in directs:
        await hub.subscribe(hub.register(Sink(), direct=d), "many")
    pubs = hub.publish_many_nowait("many", [({"i": 1}, '{"i":1}'), ("two", None),
                                            (b"\x00", None)], sender="me")
    assert [p.offset for p in pubs] == [1, 2, 3]
    await turn()
    expected = b"".join(NATIVE_FRAMED.publication(p) for p in pubs)
    assert all(d.writes == [expected] for d in directs)
    assert hub.stats.deliveries == 9 and hub.stats.publications_in == 3
    page = await hub.history("many", limit=10)
    assert [p.data for p in page.publications] == [{"i": 1}, "two", b"\x00"]
    assert all(p.sender == "me" for p in page.publications)
    assert hub.publish_many_nowait("many", []) == []  # nothing to publish, nothing changes
    assert (await hub.publish("many", 4)).offset == 4


async def test_a_batch_respects_recovery_floors_and_the_outbox_limit() -> None:
    """A connection that is recovering (a floor on the channel) gets only what
    is past its floor; one whose outbox overflows is closed (disconnect policy)."""
    from tidings.core.config import Limits

    async with Hub(limits=Limits(outbox_size=4)) as hub:
        floored, small = FakeDirect(), FakeDirect()
        conn = hub.register(Sink(), direct=floored)
        await hub.subscribe(conn, "f")
        conn._floors["f"] = 2  # as after a recovery up to offset 2
        slow = hub.register(Sink(), direct=small)
        await hub.subscribe(slow, "f")
        small.can_write = False  # nothing leaves: the outbox fills
        pubs = hub.publish_many_nowait("f", [(i, None) for i in range(6)])
        await turn()
        assert b"".join(floored.writes) == b"".join(NATIVE_FRAMED.publication(p)
                                                    for p in pubs[2:])
        assert slow.closed and not small.writes
