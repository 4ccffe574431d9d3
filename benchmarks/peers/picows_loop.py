"""Peer: a picows server (Cython websockets), a loop of ``transport.send`` per frame.

picows is the fastest websocket library for Python the issue names: frames are
parsed and built in C, a listener gets each frame in a callback with no task or
queue, and ``send`` writes at once. Like the other peers it uses the library as
its documentation shows, with default settings (picows picks uvloop's loop only
if asked, so this runs on asyncio's, as the ``websockets`` peer does; with
``--uvloop``, the ``picows-uvloop`` stack, on uvloop's, as ``tidings serve``).
"""

from __future__ import annotations

import asyncio
import signal

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_create_server,
)

from benchmarks.peers import SUBSCRIBED
from benchmarks.peers._args import parse

subscribers: set[WSTransport] = set()


class Subscriber(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        subscribers.add(transport)
        transport.send(WSMsgType.TEXT, SUBSCRIBED.encode())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        subscribers.discard(transport)


class Publisher(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            for subscriber in subscribers:
                subscriber.send(WSMsgType.TEXT, payload)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


def listener(request: WSUpgradeRequest) -> WSListener | None:
    if request.path == b"/sub":
        return Subscriber()
    if request.path == b"/pub":
        return Publisher()
    return None  # 404


async def main() -> None:
    args = parse(__doc__ or "")
    server = await ws_create_server(listener, args.host, args.port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for transport in list(subscribers):
        transport.send_close(WSCloseCode.GOING_AWAY)
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    import sys

    if "--uvloop" in sys.argv:  # the picows-uvloop stack: the loop tidings serve runs on
        sys.argv.remove("--uvloop")
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
