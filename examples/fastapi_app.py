"""A FastAPI app with tidings embedded, ready for ``uvicorn --workers N``.

    TIDINGS_BROKER=redis://127.0.0.1:6379 uvicorn examples.fastapi_app:app --workers 4

Every worker is its own node; the Redis broker carries publications, direct
messages and presence between them, so every client gets every message meant
for it whichever worker holds its socket.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, WebSocket

from tidings import Hub

hub = Hub(broker=os.environ.get("TIDINGS_BROKER", "memory://"))
app = FastAPI(lifespan=hub.lifespan)
app.include_router(hub.router, prefix="/rt")  # /rt/ws, /rt/api/..., /rt/health, streams


@app.post("/orders/{oid}/pay")
async def pay(oid: int) -> dict[str, int | str]:
    pub = await hub.publish(f"orders/{oid}", {"status": "paid"})
    return {"offset": pub.offset, "epoch": pub.epoch}


@app.websocket("/custom")
async def custom(ws: WebSocket) -> None:
    async with hub.accept(ws, user="guest") as conn:
        await conn.subscribe("orders/+")
        async for pub in conn:
            await ws.send_json({"order": pub.channel, "update": pub.data})
