"""Peers (c) and (f): FastAPI under uvicorn with encode/broadcaster (``--url memory://``
or ``--url redis://...``), as in broadcaster's README: one sender task per subscriber
iterating ``broadcast.subscribe(channel)``, publishers call ``broadcast.publish``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broadcaster import Broadcast
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from benchmarks.peers import SUBSCRIBED
from benchmarks.peers._args import parse, run_uvicorn

args = parse(__doc__ or "", url="memory://")
broadcast = Broadcast(args.url)
CHANNEL = args.channel


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await broadcast.connect()
    backend = broadcast._backend
    if hasattr(backend, "_ready") and hasattr(backend, "_pubsub"):
        # broadcaster 0.3.1 + redis-py >= 5: RedisBackend.subscribe sets ``_ready``
        # before SUBSCRIBE completes, so its listener task finds no subscription,
        # leaves ``listen()`` at once, clears ``_ready`` and never delivers anything.
        # Workaround: one subscription held for the server's lifetime, then wake the
        # listener once ``listen()`` has a channel to read.
        await backend.subscribe(f"{CHANNEL}-keepalive")
        for _ in range(100):
            if backend._pubsub.subscribed:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        backend._ready.set()
    try:
        yield
    finally:
        await broadcast.disconnect()


app = FastAPI(lifespan=lifespan)


async def _sender(ws: WebSocket, subscribed: asyncio.Event) -> None:
    async with broadcast.subscribe(channel=CHANNEL) as subscriber:
        subscribed.set()
        async for event in subscriber:  # type: ignore[union-attr]
            await ws.send_text(event.message)


@app.websocket("/sub")
async def sub(ws: WebSocket) -> None:
    await ws.accept()
    subscribed = asyncio.Event()
    sender = asyncio.create_task(_sender(ws, subscribed))
    try:
        await subscribed.wait()
        await ws.send_text(SUBSCRIBED)
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
    finally:
        sender.cancel()


@app.websocket("/pub")
async def pub(ws: WebSocket) -> None:
    await ws.accept()
    try:
        async for text in ws.iter_text():
            await broadcast.publish(channel=CHANNEL, message=text)
    except WebSocketDisconnect:
        pass


if __name__ == "__main__":
    run_uvicorn(app, args)
