"""The single-host relay (``ipc://``): faults, cleanup and the wire format.

The conformance suite (test_conformance.py, world ``ipc``) covers what
crosses between nodes; this file covers what only the relay does: a relay
restart, a worker dying, a worker that stops reading, binary data.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import Sink, wait_until
from tidings import BrokerUnavailable, Hub, StreamPos
from tidings.brokers.ipc.broker import IpcBroker
from tidings.brokers.ipc.relay import Relay
from tidings.brokers.ipc.wire import FrameReader


@pytest.fixture
async def relay_path() -> AsyncIterator[str]:
    """A socket path in a private temp dir (short: AF_UNIX paths are ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tidings-ipc-") as tmp:
        yield str(Path(tmp) / "relay.sock")


async def test_relay_restart_hubs_stay_up_and_recover(
        relay_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tidings.hub")
    relay = Relay(relay_path)
    await relay.start()
    url = f"ipc://{relay_path}"
    h1, h2 = Hub(url), Hub(url)
    relay2: Relay | None = None
    try:
        await h1.start()
        await h2.start()
        sink = Sink()
        conn = h1.register(sink, user="ann")
        await h1.subscribe(conn, "live")
        await h2.publish("live", "before")
        await sink.wait_for(lambda f: len(f) == 1)

        await relay.stop()
        await wait_until(lambda: not h1.health().up and not h2.health().up, 10,
                         "both hubs to report the broker down")
        assert h1.running and h2.running  # the hubs stay up
        assert "relay" in h1.health().reason or "connection" in h1.health().reason
        started = time.monotonic()
        during = await h2.publish("live", "during")  # no hang; position unknown
        assert (during.offset, during.epoch) == (0, "")
        assert time.monotonic() - started < 1.0
        await h1.publish("live", "local")  # SPEC 7: local subscribers still get it
        await sink.wait_for(lambda f: len(f) == 2)
        assert (sink.frames[-1]["data"], sink.frames[-1]["offset"]) == ("local", 0)

        relay2 = Relay(relay_path)  # same path, empty state
        await relay2.start()
        await wait_until(lambda: h1.health().up and h2.health().up, 20,
                         "both hubs to reconnect")
        assert sorted(relay2.nodes) == sorted([h1.node, h2.node])
        pub = await h2.publish("live", "after")  # h1's subscription was restored
        assert pub.offset == 1  # the new relay started over: a new stream
        await sink.wait_for(lambda f: len(f) == 3)
        after = sink.frames[2]
        assert (after["data"], after["offset"]) == ("after", 1)
        assert after["epoch"] != sink.frames[0]["epoch"]  # clients can tell there was a gap
        members = await h2.presence("live")  # presence was restored too
        assert [(m.conn_id, m.user) for m in members] == [(conn.conn_id, "ann")]
    finally:
        await h1.stop()
        await h2.stop()
        if relay2 is not None:
            await relay2.stop()
    downs = [r for r in caplog.records if "is down" in r.getMessage()]
    ups = [r for r in caplog.records if "is up again" in r.getMessage()]
    assert len(downs) == 2 and len(ups) == 2  # once per transition per hub, no storm


WORKER = """
import asyncio, sys
from tidings import Hub

class Sink:
    async def __call__(self, message):
        pass

async def main():
    hub = Hub(sys.argv[1])
    await hub.start()
    conn = hub.register(Sink(), user="bob")
    await hub.subscribe(conn, "room")
    print(conn.conn_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_dead_worker_loses_its_presence_members(relay_path: str) -> None:
    async with Relay(relay_path) as relay, Hub(f"ipc://{relay_path}") as hub:
        watcher_sink = Sink()
        watcher = hub.register(watcher_sink, user="w")
        await hub.subscribe(watcher, "room", join_leave=True)
        worker = subprocess.Popen([sys.executable, "-c", WORKER, f"ipc://{relay_path}"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert worker.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 20)
            bob = line.strip()
            assert bob, "the worker did not start"
            members = await hub.presence("room")
            assert {m.conn_id for m in members} == {watcher.conn_id, bob}
            assert len(relay.nodes) == 2
        finally:
            os.kill(worker.pid, signal.SIGKILL)  # no goodbye: the relay must notice alone
            await asyncio.to_thread(worker.wait, 10)
            if worker.stdout is not None:
                worker.stdout.close()
        await wait_until(lambda: relay.nodes == [hub.node], 10, "the relay to drop the node")
        assert [m.conn_id for m in await hub.presence("room")] == [watcher.conn_id]
        await watcher_sink.wait_for(lambda f: any(
            x["type"] == "leave" and x["member"] == {"conn_id": bob, "user": "bob"} for x in f))


async def test_worker_that_stops_reading_is_dropped(relay_path: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async with Relay(relay_path, max_buffer=256 * 1024) as relay, \
            Hub(f"ipc://{relay_path}") as hub:
        # a raw worker: says hello, subscribes to everything, then never reads
        reader, writer = await asyncio.open_unix_connection(relay_path)
        for msg in ([1, "hello", "stuck", "t"], [2, "sub", "#"]):
            frame = orjson.dumps(msg)
            writer.write(len(frame).to_bytes(4, "big") + frame)
        frames = FrameReader()
        replies: list[object] = []
        while len(replies) < 2:
            replies += frames.feed(await asyncio.wait_for(reader.read(65536), 5))
        assert replies == [[1, True, None], [2, True, None]]
        writer.transport.pause_reading()
        sink = Sink()
        conn = hub.register(sink)
        await hub.subscribe(conn, "bulk")
        blob = "x" * 16384
        sent = 0
        while "stuck" in relay.nodes:  # the relay must drop it, not buffer forever
            await hub.publish("bulk", blob)
            sent += 1
            assert sent < 2000, "the relay kept buffering for a worker that does not read"
        assert any("disconnecting worker node stuck" in r.getMessage() for r in caplog.records)
        await sink.wait_for(lambda f: len(f) == sent, timeout=10)  # the healthy hub is fine
        assert relay.nodes == [hub.node]
        writer.close()


async def test_binary_data_crosses_and_is_kept(relay_path: str) -> None:
    async with Relay(relay_path), Hub(f"ipc://{relay_path}") as h1, \
            Hub(f"ipc://{relay_path}") as h2:
        sink = Sink()
        conn = h1.register(sink)
        await h1.subscribe(conn, "bin")
        pub = await h2.publish("bin", b"\x00\xffraw")
        await sink.wait_for(lambda f: len(f) == 1)
        assert sink.frames[0]["data"] == {"b64": "AP9yYXc="}
        page = await h1.history("bin", since=StreamPos(0, pub.epoch))
        assert [p.data for p in page.publications] == [b"\x00\xffraw"]


async def test_publishes_started_together_cross_in_order(relay_path: str) -> None:
    """The relay link is pipelined (``publish_then``): a burst started without
    waiting gets consecutive offsets, its outcomes in the order it started,
    and reaches the other worker's subscribers whole and in order (there in
    batches: one fan-out per run of publications a read brings)."""
    from tests.unit.test_direct import FakeDirect

    async with Relay(relay_path), Hub(f"ipc://{relay_path}") as h1, \
            Hub(f"ipc://{relay_path}") as h2:
        assert h2.pipelined and not h2.can_publish_nowait
        direct = FakeDirect()
        conn = h1.register(Sink(), direct=direct)
        await h1.subscribe(conn, "burst")
        outcomes: list[object] = []
        count = 300
        for i in range(count):
            h2.publish_then("burst", {"i": i}, done=outcomes.append)
        await wait_until(lambda: len(outcomes) == count, 10, "every publish answered")
        offsets = [o.offset for o in outcomes]  # type: ignore[attr-defined]
        assert offsets == list(range(offsets[0], offsets[0] + count))
        assert [o.data for o in outcomes] == [{"i": i} for i in range(count)]  # type: ignore[attr-defined]
        await wait_until(lambda: len(_frames(b"".join(direct.writes))) >= count, 10,
                         "every frame written to the subscriber on the other worker")
        frames = _frames(b"".join(direct.writes))
        assert [orjson.loads(f)["data"] for f in frames] == [{"i": i} for i in range(count)]
        assert [orjson.loads(f)["offset"] for f in frames] == offsets


async def test_runs_of_publishes_keep_every_order_and_field(relay_path: str) -> None:
    """Publishes started in one turn cross as runs (one request per run of one
    channel, sender and history setting); a publish to another channel, by
    another sender, or any other request between them ends a run: every
    outcome still comes in the order started, each channel's offsets are
    consecutive, the other worker gets every publication with its sender and
    data (binary too) in offset order, and data that cannot be encoded is
    refused to its caller alone."""
    async with Relay(relay_path), Hub(f"ipc://{relay_path}") as h1, \
            Hub(f"ipc://{relay_path}") as h2:
        sink = Sink()
        conn = h1.register(sink)
        await h1.subscribe(conn, "r/+")
        outcomes: list[Any] = []
        plan: list[tuple[str, object, str | None]] = []
        for i in range(40):
            channel = "r/b" if i % 10 == 5 else "r/a"  # the last run is of r/a
            sender = "s2" if 12 <= i < 17 or i == 30 else None
            data: object = bytes([i, 0]) if i % 5 == 4 else {"i": i}
            plan.append((channel, data, sender))
        # another request of this turn: its task's first step runs before the
        # turn's end sends the last run, so the request must send that run first
        position = asyncio.ensure_future(h2.broker.position("r/a"))
        for channel, data, sender in plan[:20]:
            h2.publish_then(channel, data, sender=sender, done=outcomes.append)
        with pytest.raises(TypeError):
            h2.publish_then("r/a", object(), done=outcomes.append)
        for channel, data, sender in plan[20:]:
            h2.publish_then(channel, data, sender=sender, done=outcomes.append)
        await wait_until(lambda: len(outcomes) == len(plan), 10, "every publish answered")
        assert (await position).offset == sum(c == "r/a" for c, _, _ in plan)
        pubs = outcomes
        assert [(p.channel, p.data, p.sender) for p in pubs] == plan
        for channel in ("r/a", "r/b"):
            offsets = [p.offset for p in pubs if p.channel == channel]
            assert offsets == list(range(1, len(offsets) + 1))
        await sink.wait_for(lambda f: len(f) == len(plan))
        got = [(f["channel"], f["offset"], f["data"], f.get("sender")) for f in sink.frames]
        expected = [(p.channel, p.offset,
                     {"b64": base64.b64encode(p.data).decode()}
                     if isinstance(p.data, bytes) else p.data, p.sender)
                    for p in pubs]
        for channel in ("r/a", "r/b"):
            assert [g for g in got if g[0] == channel] == [e for e in expected if e[0] == channel]


def _frames(data: bytes) -> list[bytes]:
    """The payloads of unmasked server frames written back to back."""
    out, pos = [], 0
    while pos < len(data):
        length, start = data[pos + 1] & 0x7F, pos + 2
        if length == 126:
            length, start = int.from_bytes(data[pos + 2:pos + 4], "big"), pos + 4
        out.append(data[start:start + length])
        pos = start + length
    return out


async def test_a_pipelined_publish_with_the_relay_gone_is_delivered_locally(
        relay_path: str) -> None:
    relay = Relay(relay_path)
    await relay.start()
    async with Hub(f"ipc://{relay_path}") as hub:
        sink = Sink()
        conn = hub.register(sink)
        await hub.subscribe(conn, "alone")
        await relay.stop()
        await wait_until(lambda: not hub.health().up, 10, "the hub to see the relay gone")
        outcomes: list[object] = []
        hub.publish_then("alone", "still here", done=outcomes.append)
        await wait_until(lambda: bool(outcomes), 5, "the publish to be answered")
        assert isinstance(outcomes[0], BrokerUnavailable)
        await sink.wait_for(lambda f: len(f) == 1)  # SPEC 7: local subscribers still get it
        assert sink.frames[0]["data"] == "still here" and sink.frames[0]["offset"] == 0


async def test_unreachable_relay_fails_fast(relay_path: str) -> None:
    broker = IpcBroker(f"ipc://{relay_path}")
    hub = Hub(broker)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="cannot reach the relay"):
        await hub.start()
    assert time.monotonic() - started < 2
    assert not broker.health().up


async def test_relay_refuses_a_live_path_and_replaces_a_stale_one(relay_path: str) -> None:
    async with Relay(relay_path):
        with pytest.raises(RuntimeError, match="already listens"):
            await Relay(relay_path).start()
    # a socket file left by a relay that died without cleaning up
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(relay_path)
    stale.close()
    async with Relay(relay_path), Hub(f"ipc://{relay_path}") as hub:
        assert hub.health().up
    assert not os.path.exists(relay_path)  # stop() removes its socket


async def test_a_relay_that_stops_answering_is_declared_dead(relay_path: str) -> None:
    """A hung relay (say SIGSTOPped) keeps its socket open: only silence tells."""
    answering = True
    writers: list[asyncio.StreamWriter] = []

    async def fake_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        frames = FrameReader()
        while data := await reader.read(65536):
            for msg in frames.feed(data):
                if answering:
                    reply = orjson.dumps([msg[0], True, None])
                    writer.write(len(reply).to_bytes(4, "big") + reply)

    server = await asyncio.start_unix_server(fake_relay, relay_path)
    hub = Hub(f"ipc://{relay_path}?timeout=0.5")
    try:
        await hub.start()
        assert hub.health().up
        answering = False
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="did not answer"):
            await hub.broker.publish_event("x", "{}")
        assert time.monotonic() - started < 3
        assert not hub.health().up
        answering = True  # it wakes up: the reconnect loop gets through again
        await wait_until(lambda: hub.health().up, 10, "the hub to reconnect")
    finally:
        await hub.stop()
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def test_frame_reader_handles_split_and_merged_frames() -> None:
    msgs = [[1, "a"], {"k": "v" * 300}, [], "x"]
    stream = b"".join(len(b).to_bytes(4, "big") + b for b in map(orjson.dumps, msgs))
    for step in (1, 3, 7, len(stream)):
        reader = FrameReader()
        got: list[object] = []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i:i + step])
        assert got == msgs
    with pytest.raises(ValueError, match="limit"):
        FrameReader(max_frame=10).feed((11).to_bytes(4, "big"))


def test_ipc_url_validation() -> None:
    with pytest.raises(ValueError, match="absolute"):
        IpcBroker("ipc://relative.sock")
    assert IpcBroker("ipc:///tmp/r.sock?timeout=2").timeout == 2
