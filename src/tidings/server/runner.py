"""The one seam where ``tidings serve`` picks its server.

The default is tidings' own HTTP/1.1 + websocket server
(:mod:`tidings.server.lean`); ``server="uvicorn"`` runs uvicorn with the
direct write path of :mod:`tidings.server.wsproto` instead. The hub and the
protocol code do not know which one runs them: both speak ASGI and offer the
``tidings.direct`` extension.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any, Literal

from tidings.hub import Hub
from tidings.protocol.codes import CloseCode
from tidings.server.app import create_app

__all__ = ["SERVERS", "run"]

log = logging.getLogger("tidings.server")

SERVERS = ("tidings", "uvicorn")
ServerName = Literal["tidings", "uvicorn"]


def websocket_routes(hub: Hub) -> list[Any]:
    """The hub's websocket routes, which the lean server matches itself."""
    from starlette.routing import WebSocketRoute

    return [route for route in hub.router.routes if isinstance(route, WebSocketRoute)]


async def close_hub_connections(hub: Hub) -> None:
    """Shutdown, once no new connection comes in: websockets get 1001 first."""
    hub.queues.close()
    await hub.close_all(CloseCode.GOING_AWAY, "server shutting down", timeout=1.5)


def run(hub: Hub, *, host: str, port: int, log_level: str = "info",
        sockets: Any = None, server: ServerName = "tidings", loop: str = "auto") -> None:
    """Serve ``hub`` (with the demo page) until SIGINT/SIGTERM; exit status 0.
    ``loop``: auto (uvloop when installed), asyncio or uvloop."""
    if server == "uvicorn":
        _run_uvicorn(hub, host=host, port=port, log_level=log_level, sockets=sockets,
                     loop=loop)
        return
    if server != "tidings":
        raise ValueError(f"unknown server {server!r}: one of {', '.join(SERVERS)}")
    from tidings.server import lean

    lean.run(create_app(hub), host=host, port=port, ws_routes=websocket_routes(hub),
             max_size=hub.limits.frame_hard, sockets=sockets,
             before_close=lambda: close_hub_connections(hub), loop=loop)


def _run_uvicorn(hub: Hub, *, host: str, port: int, log_level: str, sockets: Any,
                 loop: str) -> None:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn, plus: close websockets with 1001 first, exit 0 on SIGTERM/SIGINT."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after shutdown, which would turn a
            # clean stop into "killed by SIGTERM"; the SPEC wants exit status 0.
            self._captured_signals.clear()

        async def shutdown(self, sockets: Any = None) -> None:
            for listener in self.servers:  # stop accepting before closing the others
                listener.close()
            await close_hub_connections(hub)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        create_app(hub),
        host=host,
        port=port,
        log_level=log_level,
        ws="tidings.server.wsproto:DirectWSProtocol",
        ws_max_size=hub.limits.frame_hard,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
        loop=loop,
    )
    asyncio.run(_Server(config).serve(sockets=sockets))
