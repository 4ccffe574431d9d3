"""uvicorn's websocket protocol plus a direct write path for the hub.

The ASGI interface costs one ``send`` await per frame, and uvicorn frames
every message again for every client. This subclass of uvicorn's
websockets-sansio protocol advertises itself in the ASGI scope as the
``tidings.direct`` extension; the hub then writes already-built frames (a
publication's bytes are the same for every subscriber) straight to the socket,
all frames queued for a connection in one event-loop turn in one write.
Everything else (handshake, incoming frames, ping/pong, close) stays with
uvicorn and the ``websockets`` state machine. Selected with
``uvicorn.Config(ws="tidings.server.wsproto:DirectWSProtocol")``; the
embedded ASGI path does not need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

__all__ = ["EXTENSION", "DirectWSProtocol"]

EXTENSION = "tidings.direct"


class DirectWSProtocol(WebSocketsSansIOProtocol):
    """A uvicorn websocket protocol the hub can write frames to directly."""

    on_resume: Callable[[], None] | None = None

    async def run_asgi(self) -> None:
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[EXTENSION] = self
        await super().run_asgi()

    # -- what the hub uses -------------------------------------------------------

    @property
    def can_write(self) -> bool:
        """Open, handshake done, close not sent, and below the write high-water mark."""
        return (self.handshake_complete and not self.close_sent and not self.disconnected
                and self.writable.is_set() and not self.transport.is_closing())

    @property
    def gone(self) -> bool:
        return bool(self.close_sent or self.disconnected or self.transport.is_closing())

    def write_frames(self, data: bytes) -> None:
        self.transport.write(data)

    def resume_writing(self) -> None:
        super().resume_writing()
        callback = self.on_resume
        if callback is not None:
            callback()

    def connection_lost(self, exc: Any) -> None:
        super().connection_lost(exc)
        self.on_resume = None
