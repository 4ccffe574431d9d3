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
