"""The per-message path over real sockets (tidings.core.flush): a lone frame
reaches the subscribers' sockets from the producer's read callback, bursts
still arrive whole and in order, and the bytes are what ``websockets`` sends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import websockets
from websockets.frames import Frame, Opcode

from tests.e2e.test_lean_server import raw, upgraded
from tests.support import DIRECT_WS, LEAN, TIMEOUT, native, running, ws_url
from tidings import Hub
from tidings.endpoints.native import InlinePublishes
from tidings.server.peer import Peer
from tidings.server.wsproto import DirectWSProtocol
from tidings.types import Publication

SERVERS = pytest.mark.parametrize("ws", [LEAN, DIRECT_WS], ids=["lean", "direct"])
PRODUCERS = pytest.mark.parametrize("producer", ["raw", "native"])


def publish_frame(producer: str, channel: str, value: Any, rid: int) -> bytes:
    """What a producer sends for ``value``: the raw stream's JSON, or a native publish."""
    if producer == "raw":
        return orjson.dumps(value)
    return orjson.dumps({"type": "publish", "id": rid, "channel": channel, "data": value})


def producer_path(producer: str, channel: str) -> str:
    return f"/ws/pub/{channel}" if producer == "raw" else "/ws"


def expected_bytes(pubs: list[Publication]) -> bytes:
    """The publications as the ``websockets`` library would frame the native
    protocol's envelope (encoded here from a dict, not by tidings' template)."""
    out = []
    for p in pubs:
        frame = {"type": "publication", "channel": p.channel, "data": p.data,
                 "offset": p.offset, "epoch": p.epoch, "ts": p.ts}
        if p.sender is not None:
            frame["sender"] = p.sender
        out.append(Frame(Opcode.TEXT, orjson.dumps(frame)).serialize(mask=False))
    return b"".join(out)


@SERVERS
@PRODUCERS
async def test_a_lone_frame_is_written_to_subscribers_from_the_read_callback(
        ws: str, producer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No callback hop and no loop turn between reading a lone publication and
    writing it to every subscriber (and, natively, writing its reply)."""
    cls: Any = Peer if ws == LEAN else DirectWSProtocol
    reading: list[object] = []  # the protocol whose read callback is running
    writes: list[tuple[bool, bytes]] = []  # (inside a read callback, frames)
    read = cls.data_received

    def data_received(self: Any, data: bytes) -> None:
        reading.append(self)
        try:
            read(self, data)
        finally:
            reading.pop()

    class Recording:
        """A transport's stand-in that notes each write (and whether a read
        callback is running); everything else goes to the transport."""

        def __init__(self, transport: Any) -> None:
            self.inner = transport

        def write(self, data: bytes) -> None:
            writes.append((bool(reading), data))
            self.inner.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    monkeypatch.setattr(cls, "data_received", data_received)
    hub = Hub()
    async with running(hub, ws=ws) as base, native(base) as a, native(base) as b:
        for sub in (a, b):
            assert (await sub.request({"type": "subscribe", "channel": "lone"}))["type"] == "reply"
        async with websockets.connect(ws_url(base, producer_path(producer, "lone"))) as pub:
            if producer == "native":
                await pub.recv()  # welcome
                # a connection's publishes are taken from the read callback once it
                # published (most connections only subscribe): publish once first
                await pub.send(publish_frame(producer, "lone", "first", -1).decode())
                await asyncio.wait_for(pub.recv(), TIMEOUT)
                for sub in (a, b):
                    assert (await sub.next("publication"))["data"] == "first"
            for conn in hub.connections.values():  # what the hub writes to each socket
                direct: Any = conn._direct
                direct.transport = Recording(direct.transport)
            writes.clear()
            for i in range(5):  # one at a time: each is alone on an idle loop
                await pub.send(publish_frame(producer, "lone", {"i": i}, i).decode())
                for sub in (a, b):
                    assert (await sub.next("publication"))["data"] == {"i": i}
                if producer == "native":
                    assert orjson.loads(await asyncio.wait_for(pub.recv(), TIMEOUT))["id"] == i
        subscribers = [c for c in hub.connections.values() if c.subs]
        assert [getattr(c._direct, "on_messages", None) for c in subscribers] == [None, None]
    published = [inside for inside, data in writes if b'"type":"publication"' in data]
    assert published == [True] * 10
    if producer == "native":
        replies = [inside for inside, data in writes if b'"type":"reply"' in data]
        assert replies == [True] * 5


class Subscriber:
    """A native subscriber on a bare socket: keeps every byte the server sends."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.data = b""

    async def subscribe(self, channel: str) -> None:
        await upgraded(self.client)
        await self.until(lambda d: b'"type":"welcome"' in d)
        request = orjson.dumps({"type": "subscribe", "id": 1, "channel": channel})
        self.client.writer.write(Frame(Opcode.TEXT, request).serialize(mask=True))
        await self.until(lambda d: b'"type":"reply"' in d)
        self.data = b""

    async def until(self, done: Callable[[bytes], bool]) -> None:
        async def read() -> None:
            while not done(self.data):
                chunk = await self.client.reader.read(1 << 16)
                assert chunk, "the server closed the socket"
                self.data += chunk

        await asyncio.wait_for(read(), TIMEOUT)


@SERVERS
@PRODUCERS
async def test_lone_burst_lone_arrive_in_order_as_websockets_would_frame_them(
        ws: str, producer: str) -> None:
    """A lone frame (written at once), a burst in one write (queued behind the
    first of its turn), another lone frame, and one above 64 KiB (raw) or 125
    bytes: every subscriber gets them in order, byte for byte the frames the
    ``websockets`` library builds of the same envelopes."""
    hub = Hub()
    big = "x" * (70_000 if producer == "raw" else 2_000)
    async with running(hub, ws=ws) as base, raw(base) as c1, raw(base) as c2:
        subs = [Subscriber(c1), Subscriber(c2)]
        for sub in subs:
            await sub.subscribe("o")
        async with raw(base, producer_path(producer, "o")) as pub:
            await upgraded(pub)

            def send(values: list[Any], first: int) -> None:
                pub.writer.write(b"".join(
                    Frame(Opcode.TEXT, publish_frame(producer, "o", v, first + k)).serialize(
                        mask=True) for k, v in enumerate(values)))

            async def arrived(count: int) -> None:
                for sub in subs:
                    await sub.until(lambda d: d.count(b'"type":"publication"') >= count)

            send([{"lone": 1}], 0)
            await arrived(1)
            send([{"burst": i} for i in range(20)], 1)
            await arrived(21)
            send([{"lone": 2}, {"big": big}], 21)
            await arrived(23)
        page = await hub.history("o", limit=100)
        assert [p.offset for p in page.publications] == list(range(1, 24))
        expected = expected_bytes(page.publications)
        for sub in subs:  # the big frame may still be on its way
            await sub.until(lambda d: len(d) >= len(expected))
            assert sub.data == expected


@SERVERS
async def test_native_publishes_then_a_close_in_one_read_lose_nothing(ws: str) -> None:
    """A publisher's 100 publishes and a close frame in one read: all are
    published in order, every reply is written before the close is echoed."""
    hub = Hub()
    async with running(hub, ws=ws) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "c"}))["type"] == "reply"
        async with raw(base, "/ws") as client:
            await upgraded(client)
            first = Frame(Opcode.TEXT, publish_frame("native", "c", -1, -1))
            client.writer.write(first.serialize(mask=True))  # now a publisher
            data = b""
            while len(_texts(data)) < 2:  # the welcome and the first reply
                data += await asyncio.wait_for(client.reader.read(1 << 16), TIMEOUT)
            frames = [Frame(Opcode.TEXT, publish_frame("native", "c", i, i)) for i in range(100)]
            frames.append(Frame(Opcode.CLOSE, (1000).to_bytes(2, "big")))
            client.writer.write(b"".join(f.serialize(mask=True) for f in frames))
            data += await asyncio.wait_for(client.reader.read(), TIMEOUT)
        seen = [(await sub.next("publication"))["data"] for _ in range(101)]
    assert seen == list(range(-1, 100))
    replies = [orjson.loads(line) for line in _texts(data)]
    assert [r["id"] for r in replies if r["type"] == "reply"] == list(range(-1, 100))
    assert data.endswith(b"\x88\x02\x03\xe8")  # the close echoed, after every reply


def _texts(data: bytes) -> list[bytes]:
    """The whole text frames of an unmasked server stream (below 64 KiB)."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        op, length, head = data[pos] & 0x0F, data[pos + 1] & 0x7F, 2
        if length == 126:
            length, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        if pos + head + length > len(data):
            break
        if op == 0x1:
            out.append(data[pos + head:pos + head + length])
        pos += head + length
    return out


@SERVERS
async def test_native_frames_read_together_are_answered_in_order(ws: str) -> None:
    """Publishes read together (batched per channel), a refused one, a bad frame
    and a ping between them: every answer in the order of the frames, each
    channel's publications in order at consecutive offsets."""
    hub = Hub()
    async with running(hub, ws=ws) as base, native(base) as sub:
        for channel in ("a", "b"):
            assert (await sub.request({"type": "subscribe", "channel": channel}))["type"] == "reply"
        async with raw(base, "/ws") as client:
            await upgraded(client)
            client.writer.write(Frame(Opcode.TEXT, publish_frame("native", "c", 0, -1)).serialize(
                mask=True))  # a publisher from now on: its reads are taken inline
            data = b""
            while len(_texts(data)) < 2:  # the welcome and that reply
                data += await asyncio.wait_for(client.reader.read(1 << 16), TIMEOUT)
            frames = [publish_frame("native", "a", 0, 0), publish_frame("native", "a", 1, 1),
                      publish_frame("native", "b", 2, 2), publish_frame("native", "$x", 3, 3),
                      publish_frame("native", "a", 4, 4), b"not json",
                      b'{"type":"ping","id":6}', publish_frame("native", "a", 7, 7),
                      publish_frame("native", "a", 8, 8)]
            client.writer.write(b"".join(Frame(Opcode.TEXT, f).serialize(mask=True)
                                         for f in frames))
            answers: list[dict[str, Any]] = []
            while len(answers) < 11:  # the welcome, the first reply and nine answers
                data += await asyncio.wait_for(client.reader.read(1 << 16), TIMEOUT)
                answers = [orjson.loads(t) for t in _texts(data)]
        seen = [await sub.next("publication") for _ in range(6)]
    kinds = [(a["type"], a.get("id"), a.get("code")) for a in answers[2:]]
    assert kinds == [("reply", 0, None), ("reply", 1, None), ("reply", 2, None),
                     ("error", 3, "forbidden"), ("reply", 4, None),
                     ("error", None, "bad_request"), ("pong", 6, None), ("reply", 7, None),
                     ("reply", 8, None)]
    on_a = [(p["data"], p["offset"]) for p in seen if p["channel"] == "a"]
    assert on_a == [(0, 1), (1, 2), (4, 3), (7, 4), (8, 5)]
    assert [p["data"] for p in seen if p["channel"] == "b"] == [2]
    assert [a["result"]["offset"] for a in answers[2:] if a["type"] == "reply"] == [
        1, 2, 1, 3, 4, 5]


@pytest.mark.redis
@SERVERS
async def test_native_publishes_on_redis_are_started_from_the_read_callback(ws: str) -> None:
    """On a pipelined broker the reader starts each publish itself (no task step),
    and answers still come in the order of the frames; a ping waits for the
    publishes before it."""
    from tests.brokers.conftest import REDIS_URL, redis_ping, unavailable

    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    prefix = f"wt{uuid.uuid4().hex[:8]}"
    hub = Hub(broker=f"{REDIS_URL}?prefix={prefix}")
    async with running(hub, ws=ws) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "r"}))["type"] == "reply"
        async with raw(base, "/ws") as client:
            await upgraded(client)
            frames = [publish_frame("native", "r", i, i) for i in range(30)]
            frames.insert(20, b'{"type":"ping","id":"p"}')
            client.writer.write(Frame(Opcode.TEXT, frames[0]).serialize(mask=True))
            data = b""
            while len(_texts(data)) < 2:  # the welcome, then the lone publish's reply
                data += await asyncio.wait_for(client.reader.read(1 << 16), TIMEOUT)
            handlers = [getattr(c._direct, "on_messages", None) for c in hub.connections.values()
                        if not c.subs]
            assert [type(h) for h in handlers] == [InlinePublishes]  # the reader publishes
            client.writer.write(b"".join(Frame(Opcode.TEXT, f).serialize(mask=True)
                                         for f in frames[1:]))
            while len(_texts(data)) < 32:
                data += await asyncio.wait_for(client.reader.read(1 << 16), TIMEOUT)
        seen = [(await sub.next("publication"))["data"] for _ in range(30)]
    answers = [orjson.loads(t) for t in _texts(data)][1:]
    assert [a.get("id") for a in answers] == [*range(20), "p", *range(20, 30)]
    assert [a["type"] for a in answers].count("pong") == 1
    assert [a["result"]["offset"] for a in answers if a["type"] == "reply"] == list(range(1, 31))
    assert seen == list(range(30))
