"""The asyncio.Queue websocket relay, done right: producers -> a work queue -> workers.

    uvicorn examples.queue_relay:app        # or TIDINGS_BROKER=redis://... for many hosts

Producers push jobs over a websocket (``/rt/ws/push/jobs``, one frame per job)
or over HTTP (``POST /jobs``); every job goes to exactly one worker, is acked
when done and comes back if its worker dies first (an ``asyncio.Queue`` loses
it). Progress goes out on ``jobs/done`` to anyone listening on
``/rt/ws/sub/jobs/done``. On shutdown the workers' loops end by themselves
(no sentinel, no hang) and unacked jobs go back to the queue.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from tidings import Hub

hub = Hub(broker=os.environ.get("TIDINGS_BROKER", "memory://"))


async def worker(name: str) -> None:
    async for job in hub.queue("jobs").consume(max_in_flight=1):
        await hub.publish("jobs/done", {"job": job.data, "by": name})
        await job.ack()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with hub:
        workers = [asyncio.create_task(worker(f"w{i}")) for i in range(2)]
        yield
        await hub.stop()  # ends every consume() loop: the workers return
        await asyncio.gather(*workers)


app = FastAPI(lifespan=lifespan)
app.include_router(hub.router, prefix="/rt")


@app.post("/jobs")
async def push(job: dict[str, Any]) -> dict[str, str]:
    return {"id": await hub.queue("jobs").push(job)}
