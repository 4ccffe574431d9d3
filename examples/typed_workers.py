"""``uvicorn --workers 4`` in sync, with typed channels and generated TypeScript.

    TIDINGS_BROKER=redis://127.0.0.1:6379/0 uvicorn examples.typed_workers:app --workers 4
    tidings typescript --app examples.typed_workers:hub > web/channels.ts

Every worker declares the same channel types, so a publish is checked on
whichever worker takes it, and reaches the websocket clients of every worker
through the broker. The browser's `Client<ChannelTypes>` (clients/js) types
each subscription from the generated `channels.ts`: the server's Pydantic
models and the browser's types cannot drift apart.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel, Field

from tidings import Hub


class CursorMove(BaseModel):
    user: str
    x: int = Field(ge=0)
    y: int = Field(ge=0)


class DocEdit(BaseModel):
    user: str
    text: str = Field(max_length=10_000)


hub = Hub(broker=os.environ.get("TIDINGS_BROKER", "memory://"))
hub.channel("docs/+/cursors", CursorMove)
hub.channel("docs/+/edits", DocEdit)

app = FastAPI(lifespan=hub.lifespan)
app.include_router(hub.router)  # /ws, /api, /asyncapi.json, ...


@app.post("/docs/{doc}/edits")
async def edit(doc: str, change: DocEdit) -> dict[str, int]:
    pub = await hub.publish(f"docs/{doc}/edits", change)
    return {"offset": pub.offset}
