"""tidings' own server (what `tidings serve` runs), at the wire level."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
from collections.abc import AsyncIterator

import pytest
import websockets
from websockets.frames import Frame, Opcode

from tests.support import (
    ASGI_WS,
    DIRECT_WS,
    LEAN,
    TIMEOUT,
    lean_server,
    native,
    running,
    wait_until,
    ws_url,
)
from tidings import Hub
from tidings.core.config import Limits
from tidings.protocol.frames import parse_close

UPGRADE = ("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}"
           "\r\n\r\n")


class Raw:
    """A websocket client with no manners: it sends whatever bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def frames(self) -> list[tuple[int, bytes]]:
        """Frames the server sent until it closed the socket (unmasked: parse as a
        server would, after masking them with a zero key)."""
        data = await asyncio.wait_for(self.reader.read(), TIMEOUT)
        frames = []
        pos = 0
        while pos < len(data):  # server frames are unmasked: read the header by hand
            length = data[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                start = pos + 4
            frames.append((data[pos] & 0x0F, data[start:start + length]))
            pos = start + length
        return frames

    async def close_code(self) -> int:
        frames = await self.frames()
        closes = [parse_close(p)[0] for op, p in frames if op == 0x8]
        assert closes, frames
        return closes[-1]


@contextlib.asynccontextmanager
async def raw(base: str, path: str = "/ws", version: str = "13") -> AsyncIterator[Raw]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(UPGRADE.format(path=path, version=version).encode())
    try:
        yield Raw(reader, writer)
    finally:
        writer.close()


async def upgraded(client: Raw) -> None:
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()


async def http(base: str, payload: bytes) -> bytes:
    """Send raw HTTP bytes; everything the server answers until it closes."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


async def test_protocol_errors_close_with_their_codes() -> None:
    hub = Hub(limits=Limits(frame_soft=500, frame_hard=1000))
    async with running(hub) as base:
        cases = [
            (Frame(Opcode.TEXT, b"{}").serialize(mask=False), 1002),  # unmasked
            (Frame(Opcode.TEXT, b"\xff\xfe").serialize(mask=True), 1007),  # not UTF-8
            (Frame(Opcode.BINARY, b"x" * 1001).serialize(mask=True), 1009),  # above frame_hard
            (bytes([0x83, 0x80, 1, 2, 3, 4]), 1002),  # reserved opcode
        ]
        for wire, code in cases:
            async with raw(base) as client:
                await upgraded(client)
                client.writer.write(wire)
                assert await client.close_code() == code, wire[:8]
        await wait_until(lambda: not hub.connections, what="connections to go")


async def test_ping_pong_fragments_and_the_close_handshake() -> None:
    hub = Hub()
    async with running(hub) as base, websockets.connect(ws_url(base)) as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        pong = await ws.ping(b"hello")
        await asyncio.wait_for(pong, TIMEOUT)
        # a command split over three fragments arrives whole
        await ws.send(['{"type": "ping", ', '"id": ', '7}'])
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)) == {"type": "pong", "id": 7}
        await ws.close(4000, "done")
        assert ws.close_code == 4000  # the server echoed our close frame


async def test_frames_sent_right_behind_the_handshake_are_read() -> None:
    hub = Hub()
    async with running(hub) as base, raw(base) as client:
        client.writer.write(Frame(Opcode.TEXT, b'{"type":"ping","id":1}').serialize(mask=True))
        await upgraded(client)
        data = await asyncio.wait_for(client.reader.read(4096), TIMEOUT)
        while data.count(b'"pong"') == 0:
            data += await asyncio.wait_for(client.reader.read(4096), TIMEOUT)
        assert b'{"type":"pong","id":1}' in data


async def test_a_burst_of_publishes_arrives_whole_and_in_order() -> None:
    """20,000 frames in one go: reading pauses while the endpoint catches up."""
    hub = Hub(history_size=0, limits=Limits(outbox_size=50_000, outbox_bytes=1 << 24))
    count = 20_000
    async with running(hub) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "burst"}))["type"] == "reply"
        async with websockets.connect(ws_url(base, "/ws/pub/burst")) as pub:
            for i in range(count):
                await pub.send(str(i))
            seen = [(await sub.next("publication"))["data"] for _ in range(count)]
    assert seen == list(range(count))


def _acks(data: bytes) -> list[dict[str, object]]:
    """The JSON text frames in ``data`` (unmasked server frames, all short)."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        op, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        if op == 0x1:
            out.append(json.loads(data[pos + 2:pos + 2 + length]))
        pos += 2 + length
    return out


async def test_frames_read_together_publish_in_order_and_stop_at_a_bad_one() -> None:
    """One read holding JSON, plain text and binary frames, a ping, then a frame
    above the hard limit and more frames: those before it are published (one
    batch, consecutive offsets, acks in order), the big one closes with 1009,
    nothing after it is published."""
    hub = Hub(limits=Limits(frame_soft=500, frame_hard=1000))
    async with running(hub) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "b"}))["type"] == "reply"
        async with raw(base, "/ws/pub/b?ack=1") as client:
            await upgraded(client)
            good = [Frame(Opcode.TEXT, b'{"n":1}'), Frame(Opcode.TEXT, b"plain"),
                    Frame(Opcode.BINARY, b"\x00\x01"), Frame(Opcode.PING, b"p"),
                    Frame(Opcode.TEXT, b"[2,3]")]
            after = [Frame(Opcode.BINARY, b"x" * 1001), Frame(Opcode.TEXT, b'"late"')]
            client.writer.write(b"".join(f.serialize(mask=True) for f in good + after))
            data = await asyncio.wait_for(client.reader.read(), TIMEOUT)
        seen = [await sub.next("publication") for _ in range(4)]
    assert [p["data"] for p in seen] == [{"n": 1}, "plain", {"b64": "AAE="}, [2, 3]]
    offsets = [p["offset"] for p in seen]
    assert offsets == list(range(offsets[0], offsets[0] + 4))
    assert [a["offset"] for a in _acks(data)] == offsets
    assert b"\x8a\x01p" in data  # the pong
    close = data[data.rindex(b"\x88"):]
    assert parse_close(close[2:])[0] == 1009 and close[1] == len(close) - 2
    assert hub.stats.publications_in == 4
    assert not sub.pending


@pytest.mark.parametrize("ws", [LEAN, DIRECT_WS, ASGI_WS], ids=["lean", "direct", "asgi"])
async def test_frames_then_a_close_in_one_read_are_published_first(ws: str) -> None:
    """Data frames, a ping and a close frame in one read, with acks: every frame
    is published in order (those taken from the read callback too), each ack
    follows in order (with the direct path), then the close is echoed."""
    hub = Hub()
    async with running(hub, ws=ws) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "c"}))["type"] == "reply"
        async with raw(base, "/ws/pub/c?ack=1") as client:
            await upgraded(client)
            frames = [Frame(Opcode.TEXT, str(i).encode()) for i in range(50)]
            frames.insert(10, Frame(Opcode.PING, b"p"))
            frames.append(Frame(Opcode.CLOSE, (1000).to_bytes(2, "big")))
            client.writer.write(b"".join(f.serialize(mask=True) for f in frames))
            data = await asyncio.wait_for(client.reader.read(), TIMEOUT)
        assert [(await sub.next("publication"))["data"] for _ in range(50)] == list(range(50))
        assert b"\x88\x02\x03\xe8" in data  # the close frame echoed (1000)
        acks = [a["offset"] for a in _acks(data)]
        if ws == ASGI_WS:  # uvicorn closes at once: later ASGI sends are dropped
            assert acks == list(range(1, len(acks) + 1))
        else:
            assert acks == list(range(1, 51))
        page = await hub.history("c", limit=100)
        assert [p.data for p in page.publications] == list(range(50))


async def test_http_keep_alive_pipelining_chunked_and_continue() -> None:
    hub = Hub()
    async with running(hub) as base:
        two = await http(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert two.startswith(b"HTTP/1.1 200 OK\r\n")
        assert two.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 404 Not Found\r\n" in two
        body = b'{"channel": "c", "data": 1}'
        chunked = await http(base, b"POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close"
                                   b"\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n"
                                   b"\r\n5\r\n" + body[:5] + b"\r\n" + b"%x\r\n" % (len(body) - 5)
                                   + body[5:] + b"\r\n0\r\n\r\n")
        assert chunked.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), chunked
        assert b'"offset":1' in chunked
        head = await http(base, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")


async def test_bad_requests_get_clear_statuses() -> None:
    hub = Hub()
    async with running(hub) as base:
        assert (await http(base, b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
                ).startswith(b"HTTP/1.1 431 ")
        assert (await http(base, b"BROKEN\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        async with raw(base, version="8") as client:
            answer = await client.reader.read()
            assert answer.startswith(b"HTTP/1.1 426 ") and b"sec-websocket-version: 13" in answer
        async with raw(base, path="/no/such/socket") as client:
            assert (await client.reader.read()).startswith(b"HTTP/1.1 403 ")


async def test_silent_peers_are_pinged_and_dead_ones_closed() -> None:
    hub = Hub()
    async with lean_server(hub, ping_interval=0.1) as server:
        base = f"http://127.0.0.1:{server.address[1]}"
        async with websockets.connect(ws_url(base)) as alive, raw(base) as dead:
            await upgraded(dead)  # never answers a ping
            frames = await dead.frames()
            assert (0x9, b"") in frames  # it was pinged ...
            assert parse_close(frames[-1][1])[0] == 1011  # ... then given up on
            assert alive.state is websockets.State.OPEN  # websockets answers pings
            assert json.loads(await alive.recv())["type"] == "welcome"


async def test_a_close_frame_from_the_app_ends_the_session() -> None:
    hub = Hub()
    async with running(hub) as base, native(base) as client:
        hub.connections[client.conn_id].close(4001, "kicked")
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(client.ws.recv(), TIMEOUT)
        assert (client.ws.close_code, client.ws.close_reason) == (4001, "kicked")


async def test_silent_http_connections_are_closed() -> None:
    """Idle keep-alive and stalled requests do not hold a socket forever."""
    async with lean_server(Hub(), http_idle=0.2) as server:
        host, port = server.address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # then closed
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.count(b"HTTP/1.1") == 1
        writer.close()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\n")  # a head that never ends
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        await wait_until(lambda: not server.peers, what="peers to go")


@pytest.mark.parametrize("ws", [LEAN, DIRECT_WS], ids=["lean", "direct"])
async def test_a_bad_utf8_frame_after_good_ones_in_one_read(ws: str) -> None:
    """The frames before it are published; the bad one closes with 1007."""
    hub = Hub()
    async with running(hub, ws=ws) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "u"}))["type"] == "reply"
        async with raw(base, "/ws/pub/u") as client:
            await upgraded(client)
            frames = [Frame(Opcode.TEXT, b"1"), Frame(Opcode.TEXT, b"2"),
                      Frame(Opcode.TEXT, b"\xff\xfe"), Frame(Opcode.TEXT, b"3")]
            client.writer.write(b"".join(f.serialize(mask=True) for f in frames))
            assert await client.close_code() == 1007
        assert [(await sub.next("publication"))["data"] for _ in range(2)] == [1, 2]
        assert hub.stats.publications_in == 2


async def test_an_idle_subscriber_holds_nothing_of_its_last_command() -> None:
    """Idle connections are many: once a subscribe is answered, neither the
    command, nor its frame, nor the admission that let the socket in stays
    referenced while the connection waits for its next frame."""
    import gc

    from tidings.endpoints.gate import Admission
    from tidings.protocol.native import Subscribe

    hub = Hub()
    async with running(hub) as base, native(base) as sub:
        reply = await sub.request({"type": "subscribe", "channel": "idle/held-nothing"})
        assert reply["type"] == "reply"
        gc.collect()
        held = [o for o in gc.get_objects() if isinstance(o, Subscribe | Admission)]
        frames = [o for o in gc.get_objects()
                  if isinstance(o, dict) and "idle/held-nothing" in str(o.get("text", ""))]
        assert held == [] and frames == []
        assert hub.channels() == {"idle/held-nothing": 1}  # and it is subscribed


@contextlib.asynccontextmanager
async def producer(hub: Hub, base: str, path: str) -> AsyncIterator[Raw]:
    """A raw producer on ``path``, upgraded, once its endpoint takes its frames."""
    async with raw(base, path) as client:
        await upgraded(client)
        await wait_until(lambda: any(c.kind.value == "raw" for c in hub.connections.values()),
                         what="the producer to be taken")
        yield client


async def _write_in_pieces(writer: asyncio.StreamWriter, wire: bytes, cuts: list[int]) -> None:
    """``wire`` in one write per piece, the server (in this loop) let in between
    so that it mostly reads them apart: cut headers, cut payloads, many frames
    a read, whichever way the pieces fall."""
    start = 0
    for cut in [*sorted(cuts), len(wire)]:
        if cut > start:
            writer.write(wire[start:cut])
            await writer.drain()
            for _ in range(3):
                await asyncio.sleep(0)
            start = cut


@pytest.mark.parametrize("ws", [LEAN, DIRECT_WS], ids=["lean", "direct"])
async def test_a_producer_stream_cut_anywhere_publishes_every_message_in_order(ws: str) -> None:
    """The read path that takes a producer's frames straight from the read
    callback (and, under uvicorn, unmasks them itself at frame boundaries):
    short, 16-bit and 64-bit lengths, text and binary, pings, a fragmented
    message with a ping inside, a frame longer than what a read keeps for the
    next, cut byte by byte and at random: every message is published once, in
    order, and every ping answered."""
    hub = Hub(history_size=0, limits=Limits(frame_soft=200_000, frame_hard=1 << 20))
    big = "y" * 70_000
    frames: list[Frame] = []
    expected: list[object] = []
    for i in range(120):
        if i % 17 == 5:
            frames.append(Frame(Opcode.PING, b"p%d" % i))
        if i % 29 == 7:  # a message in three fragments, a ping between them
            text = json.dumps({"frag": i, "pad": "z" * 300})
            frames += [Frame(Opcode.TEXT, text[:100].encode(), fin=False),
                       Frame(Opcode.PING, b"f"),
                       Frame(Opcode.CONT, text[100:200].encode(), fin=False),
                       Frame(Opcode.CONT, text[200:].encode())]
            expected.append(json.loads(text))
        elif i % 23 == 11:
            frames.append(Frame(Opcode.TEXT, json.dumps(big).encode()))
            expected.append(big)
        elif i % 13 == 3:
            frames.append(Frame(Opcode.BINARY, bytes([i, 0, 1])))
            expected.append({"b64": base64.b64encode(bytes([i, 0, 1])).decode()})
        else:
            frames.append(Frame(Opcode.TEXT, json.dumps({"n": i, "pad": "x" * (i * 7)}).encode()))
            expected.append({"n": i, "pad": "x" * (i * 7)})
    wire = b"".join(f.serialize(mask=True) for f in frames)
    pings = sum(f.opcode == Opcode.PING for f in frames)
    rng = random.Random(17)
    cuts = list(range(1, 40)) + rng.sample(range(40, len(wire)), 150)
    async with running(hub, ws=ws) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "s"}))["type"] == "reply"
        async with producer(hub, base, "/ws/pub/s") as client:
            await _write_in_pieces(client.writer, wire, cuts)
            seen = [(await sub.next("publication"))["data"] for _ in range(len(expected))]
            assert seen == expected
            pongs = b""
            while pongs.count(b"\x8a") < pings:  # server frames are unmasked: \x8a starts a pong
                pongs += await asyncio.wait_for(client.reader.read(4096), TIMEOUT)
        assert hub.stats.publications_in == len(expected)
        assert not sub.pending


@pytest.mark.parametrize("ws", [LEAN, DIRECT_WS], ids=["lean", "direct"])
@pytest.mark.parametrize(("bad", "code"), [
    (Frame(Opcode.TEXT, b"{}").serialize(mask=False), 1002),  # unmasked
    (Frame(Opcode.TEXT, b"\xff\xfe").serialize(mask=True), 1007),  # not UTF-8
    (Frame(Opcode.BINARY, b"x" * 1001).serialize(mask=True), 1009),  # above frame_hard
    (bytes([0x83, 0x80, 1, 2, 3, 4]), 1002),  # reserved opcode
    (Frame(Opcode.CONT, b"1").serialize(mask=True), 1002),  # continuation of nothing
], ids=["unmasked", "utf8", "size", "opcode", "continuation"])
async def test_a_producers_bad_frame_after_good_ones(ws: str, bad: bytes, code: int) -> None:
    """On the producer's read path: the good frames before a bad one in the same
    read are published, the bad one closes with its code, nothing after it is
    published."""
    hub = Hub(limits=Limits(frame_soft=500, frame_hard=1000))
    async with running(hub, ws=ws) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "e"}))["type"] == "reply"
        async with producer(hub, base, "/ws/pub/e") as client:
            good = b"".join(Frame(Opcode.TEXT, str(i).encode()).serialize(mask=True)
                            for i in range(3))
            client.writer.write(good + bad + Frame(Opcode.TEXT, b"9").serialize(mask=True))
            assert await client.close_code() == code
        assert [(await sub.next("publication"))["data"] for _ in range(3)] == [0, 1, 2]
        assert hub.stats.publications_in == 3


@pytest.mark.parametrize("ws", [LEAN, DIRECT_WS], ids=["lean", "direct"])
async def test_lone_frames_each_in_a_read_of_its_own(ws: str) -> None:
    """A producer writing one message at a time: each read holds one whole frame
    (the lone-frame path), each is published once, in order; a lone frame that
    is not UTF-8 closes with 1007 and publishes nothing."""
    hub = Hub()
    async with running(hub, ws=ws) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "l"}))["type"] == "reply"
        async with producer(hub, base, "/ws/pub/l") as client:
            for i in range(5):  # short and 16-bit lengths, text and binary
                payload = json.dumps({"i": i, "pad": "x" * (i * 60)}).encode()
                frame = Frame(Opcode.BINARY if i == 2 else Opcode.TEXT, payload)
                client.writer.write(frame.serialize(mask=True))
                await client.writer.drain()
                got = (await sub.next("publication"))["data"]
                assert got == ({"b64": base64.b64encode(payload).decode()} if i == 2
                               else json.loads(payload))
            client.writer.write(Frame(Opcode.TEXT, b"\xff\xfe").serialize(mask=True))
            assert await client.close_code() == 1007
        assert hub.stats.publications_in == 5
        assert not sub.pending


async def test_a_compressing_producer_under_uvicorn_is_read_whole_and_in_order() -> None:
    """permessage-deflate negotiated (uvicorn offers it by default, the
    ``websockets`` client asks for it): compressed frames go to ``websockets``
    (its inflate context stays whole), uncompressed ones may be taken by the
    fast path; all are published once, in order."""
    hub = Hub(history_size=0)
    messages = [{"n": i, "pad": "abc" * (i % 50)} for i in range(300)]
    async with running(hub, ws=DIRECT_WS, deflate=True) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "z"}))["type"] == "reply"
        async with websockets.connect(ws_url(base, "/ws/pub/z"), compression="deflate") as pub:
            assert pub.protocol.extensions, "deflate was not negotiated"
            for message in messages:
                await pub.send(json.dumps(message))
            seen = [(await sub.next("publication"))["data"] for _ in messages]
    assert seen == messages
