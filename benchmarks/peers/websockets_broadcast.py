"""Peer (a): a bare ``websockets`` server and ``websockets.broadcast``, the Python ceiling."""

from __future__ import annotations

import asyncio
import signal

from websockets.asyncio.server import ServerConnection, broadcast, serve

from benchmarks.peers import SUBSCRIBED
from benchmarks.peers._args import parse

subscribers: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request else ""
    if path == "/sub":
        subscribers.add(ws)
        try:
            await ws.send(SUBSCRIBED)
            await ws.wait_closed()
        finally:
            subscribers.discard(ws)
    elif path == "/pub":
        async for message in ws:
            broadcast(subscribers, message)
    else:
        await ws.close(1008, "unknown path")


async def main() -> None:
    args = parse(__doc__ or "")
    async with serve(handler, args.host, args.port) as server:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, server.close)
        loop.add_signal_handler(signal.SIGINT, server.close)
        await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
