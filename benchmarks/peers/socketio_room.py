"""Peer (e): python-socketio (ASGI app under uvicorn), one room, ``sio.emit`` to it.

Its wire protocol is Engine.IO 4 / Socket.IO 5 over a websocket at
``/socket.io/?EIO=4&transport=websocket``: the server opens with ``0{...}``, the
client connects to the namespace with ``40`` and gets ``40{"sid":...}``. A client
with ``role=sub`` in the query string joins the room in the connect handler
(before the ``40`` reply); a publisher sends ``42["pub",DATA]`` and every room
member gets ``42["msg",DATA]``. Engine.IO pings (``2``) need a pong (``3``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import socketio

from benchmarks.peers._args import parse, run_uvicorn

args = parse(__doc__ or "")
ROOM = args.channel
sio = socketio.AsyncServer(async_mode="asgi")
app = socketio.ASGIApp(sio)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
    if parse_qs(environ.get("QUERY_STRING", "")).get("role") == ["sub"]:
        await sio.enter_room(sid, ROOM)


@sio.on("pub")
async def pub(sid: str, data: Any) -> None:
    await sio.emit("msg", data, room=ROOM)


if __name__ == "__main__":
    run_uvicorn(app, args)
