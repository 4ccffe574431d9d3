"""FastAPI + ``POST /push`` + websocket events, scaled out on PostgreSQL alone.

    TIDINGS_BROKER=postgresql://app@db/app uvicorn examples.postgres_push:app --workers 4

The setup the FastAPI + broadcaster + Postgres recipe aims at, without its
caveats: every worker is a node; a push on any of them gets a per-channel
offset and reaches the websocket clients of all of them, in order, with history
for clients that reconnect (``{"type": "subscribe", "channel": ..., "recover":
{"offset": N, "epoch": "..."}}`` on ``/ws``), payloads of any size, and
reconnects after the database restarts. No Redis needed.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from tidings import Hub

hub = Hub(broker=os.environ.get("TIDINGS_BROKER", "postgresql://postgres@127.0.0.1/test"))
app = FastAPI(lifespan=hub.lifespan)
app.include_router(hub.router)  # /ws for the events, plus /api, /health, ...


@app.post("/push/{channel:path}")
async def push(channel: str, event: dict[str, Any]) -> dict[str, Any]:
    pub = await hub.publish(channel, event)
    return {"offset": pub.offset, "epoch": pub.epoch}
