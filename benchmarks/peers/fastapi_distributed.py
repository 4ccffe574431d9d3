"""Peer (d): fastapi-distributed-websocket (``WebSocketManager``, memory broker), as in
its README. A publisher frame is a client message ``{"type":"send","topic":T,...}``;
subscribers of topic T get the message without those tags, re-encoded by ``send_json``."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from distributed_websocket import WebSocketManager
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from benchmarks.peers import SUBSCRIBED
from benchmarks.peers._args import parse, run_uvicorn

args = parse(__doc__ or "", url="memory://")
manager = WebSocketManager("bench-broker", broker_url=args.url)
ids = itertools.count()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await manager.startup()
    try:
        yield
    finally:
        await manager.shutdown()


app = FastAPI(lifespan=lifespan)


async def _serve(ws: WebSocket, topic: str | None) -> None:
    connection = await manager.new_connection(ws, f"c{next(ids)}", topic)
    try:
        if topic is not None:
            await ws.send_text(SUBSCRIBED)
        async for message in connection.iter_json():
            await manager.receive(connection, message)
    except WebSocketDisconnect:
        pass
    finally:
        manager.remove_connection(connection)


@app.websocket("/sub")
async def sub(ws: WebSocket) -> None:
    await _serve(ws, args.channel)


@app.websocket("/pub")
async def pub(ws: WebSocket) -> None:
    await _serve(ws, None)


if __name__ == "__main__":
    run_uvicorn(app, args)
