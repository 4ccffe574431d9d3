"""A stalled subscriber never slows the others, and its memory stays bounded."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
import websockets

from tests.support import native, running, ws_url
from tidings import Hub, Limits

TOTAL = 20_000
PAD = "x" * 1000  # ~20 MB in all: more than any socket buffer can hide


async def stalled_client(base: str) -> Any:
    """A websocket client whose socket stops reading: TCP backpressure reaches the server."""
    port = int(base.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    ws = await websockets.connect(ws_url(base), sock=sock, max_queue=1)
    await ws.recv()  # welcome
    return ws


@pytest.mark.parametrize("policy", ["disconnect", "drop"])
async def test_stalled_subscriber_does_not_hold_back_the_reader(policy: str) -> None:
    limits = Limits(overflow=policy)  # type: ignore[arg-type]
    hub = Hub(limits=limits, history_size=0)
    async with running(hub) as base:
        stalled = await stalled_client(base)
        try:
            await stalled.send('{"type":"subscribe","id":1,"channel":"feed"}')
            async with native(base) as reader:
                await reader.request({"type": "subscribe", "channel": "feed"})
                stalled_conn = next(c for c in hub.connections.values()
                                    if c.conn_id != reader.conn_id)
                assert "feed" in stalled_conn.subs
                received: list[int] = []
                worst_outbox = 0
                for start in range(0, TOTAL, 500):
                    for i in range(start, start + 500):
                        await hub.publish("feed", {"i": i, "pad": PAD})
                    worst_outbox = max(worst_outbox, stalled_conn.queued)
                    while len(received) < start + 500:
                        frame = await reader.next("publication")
                        received.append(frame["data"]["i"])
                assert received == list(range(TOTAL))  # all, in order
                assert worst_outbox <= limits.outbox_size
                assert stalled_conn._out_bytes <= limits.outbox_bytes
                if policy == "disconnect":
                    assert stalled_conn.closed
                    assert hub.stats.overflows >= 1
                else:
                    assert stalled_conn.dropped > 0
                    assert hub.stats.dropped == stalled_conn.dropped
        finally:
            stalled.transport.abort()


async def test_lagged_frame_reaches_a_reader_that_resumes() -> None:
    hub = Hub(limits=Limits(overflow="drop", outbox_size=50), history_size=0)
    async with running(hub) as base:
        ws = await stalled_client(base)
        try:
            await ws.send('{"type":"subscribe","id":1,"channel":"feed"}')
            await asyncio.wait_for(ws.recv(), 5)
            conn = next(iter(hub.connections.values()))
            for i in range(5000):
                await hub.publish("feed", {"i": i, "pad": PAD})
            assert conn.dropped > 0
            lagged = 0
            last = -1
            async with asyncio.timeout(10):
                while last != 4999:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "lagged":
                        lagged += frame["dropped"]
                    else:
                        assert frame["data"]["i"] > last
                        last = frame["data"]["i"]
            assert lagged == conn.dropped
        finally:
            await ws.close()
