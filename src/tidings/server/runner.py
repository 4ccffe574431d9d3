"""The one seam where ``tidings serve`` picks its ASGI server (uvicorn today).

The hub and the protocol code do not know which server runs them; a faster
transport can replace this module without touching them.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any

import uvicorn

from tidings.hub import Hub
from tidings.protocol.codes import CloseCode
from tidings.server.app import create_app

__all__ = ["run"]

log = logging.getLogger("tidings.server")


class _Server(uvicorn.Server):
    """uvicorn, plus: close websockets with 1001 first, exit 0 on SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, which would turn a
        # clean stop into "killed by SIGTERM"; the SPEC wants exit status 0.
        self._captured_signals.clear()

    async def shutdown(self, sockets: Any = None) -> None:
        for server in self.servers:  # stop accepting before closing the others
            server.close()
        self.hub.queues.close()
        await self.hub.close_all(CloseCode.GOING_AWAY, "server shutting down", timeout=1.5)
        await super().shutdown(sockets)


def run(hub: Hub, *, host: str, port: int, log_level: str = "info",
        sockets: Any = None) -> None:
    """Serve ``hub`` (with the demo page) until SIGINT/SIGTERM."""
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
    )
    server = _Server(config, hub)
    asyncio.run(server.serve(sockets=sockets))
