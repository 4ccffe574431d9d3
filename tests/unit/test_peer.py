"""The lean server's connection (tidings.server.peer) on a fake socket (the
hot-path benchmark's, which keeps what it is written): what an
``on_messages`` handler is given from the read callback, and what it leaves."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from benchmarks.hotpath import CountingTransport
from benchmarks.loadgen import client_frame, upgrade_request
from websockets.frames import Frame, Opcode

from tests.support import wait_until
from tidings.server.lean import LeanServer
from tidings.server.peer import EXTENSION, Peer


def masked(text: str) -> bytes:
    return client_frame(text.encode())


async def test_lone_frames_a_handler_leaves_or_breaks_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """Each frame in a read of its own goes to ``on_messages`` from the read
    callback; one it does not take (0) reaches ``receive``, in order with what
    follows; one it raises on is logged and closes the connection with 1011."""
    seen: list[tuple[str, str]] = []
    ended = asyncio.Event()

    def handler(batch: list[str | bytes]) -> int:
        message = str(batch[0])
        if message == "boom":
            raise RuntimeError("boom")
        if message.startswith("later"):
            return 0
        seen.append(("direct", message))
        return len(batch)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        scope["extensions"][EXTENSION].on_messages = handler
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                seen.append(("closed", str(message["code"])))
                ended.set()
                return
            seen.append(("receive", message["text"]))

    server = LeanServer(app, ping_interval=None)
    server.loop = asyncio.get_running_loop()
    peer, sock = Peer(server), CountingTransport()  # keeps what it is written
    peer.connection_made(sock)  # type: ignore[arg-type]
    peer.data_received(upgrade_request("t", 80, "/x"))
    await wait_until(lambda: peer.on_messages is not None, what="the handler")
    assert sock.received.startswith(b"HTTP/1.1 101")
    peer.data_received(masked("a"))
    assert seen == [("direct", "a")]  # in the read callback itself
    peer.data_received(masked("later-1"))
    peer.data_received(masked("b"))  # behind one left for receive: it waits too
    await wait_until(lambda: len(seen) == 3, what="receive")
    assert seen == [("direct", "a"), ("receive", "later-1"), ("receive", "b")]
    peer.data_received(masked("c"))  # the inbox is empty again: direct
    assert seen[-1] == ("direct", "c")
    with caplog.at_level(logging.ERROR, logger="tidings.server"):
        peer.data_received(masked("boom"))
    assert "error in a websocket message handler" in caplog.text
    assert peer.on_messages is None
    assert sock.received.endswith(Frame(Opcode.CLOSE, (1011).to_bytes(2, "big")
                                       + b"internal error").serialize(mask=False))
    peer.connection_lost(None)
    await asyncio.wait_for(ended.wait(), 5)
    assert seen[-1][0] == "closed"
    assert ("direct", "boom") not in seen and ("receive", "boom") not in seen
