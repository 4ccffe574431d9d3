"""Peer (b): FastAPI under uvicorn, a loop of ``await ws.send_text`` over the subscribers."""

from __future__ import annotations

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from benchmarks.peers import SUBSCRIBED
from benchmarks.peers._args import parse, run_uvicorn

app = FastAPI()
subscribers: set[WebSocket] = set()


@app.websocket("/sub")
async def sub(ws: WebSocket) -> None:
    await ws.accept()
    subscribers.add(ws)
    try:
        await ws.send_text(SUBSCRIBED)
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
    finally:
        subscribers.discard(ws)


@app.websocket("/pub")
async def pub(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            text = await ws.receive_text()
            for subscriber in list(subscribers):
                try:
                    await subscriber.send_text(text)
                except Exception:  # gone meanwhile
                    subscribers.discard(subscriber)
    except WebSocketDisconnect:
        pass


if __name__ == "__main__":
    run_uvicorn(app, parse(__doc__ or ""))
