"""uvicorn's websocket protocol plus a direct write path for the hub.

The ASGI interface costs one ``send`` await per frame, and uvicorn frames
every message again for every client. This subclass of uvicorn's
websockets-sansio protocol advertises itself in the ASGI scope as the
``tidings.direct`` extension; the hub then writes already-built frames (a
publication's bytes are the same for every subscriber) straight to the socket,
all frames queued for a connection in one event-loop turn in one write.
A raw producer's frames can also be taken straight from the read callback
(``on_messages``, as on tidings' own server). Everything else (handshake,
frame parsing, ping/pong, close) stays with uvicorn and the ``websockets``
state machine. Selected with
``uvicorn.Config(ws="tidings.server.wsproto:DirectWSProtocol")``; the
embedded ASGI path does not need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from tidings.server.peer import hand_over

__all__ = ["EXTENSION", "DirectWSProtocol"]

EXTENSION = "tidings.direct"


class DirectWSProtocol(WebSocketsSansIOProtocol):
    """A uvicorn websocket protocol the hub can write frames to directly."""

    on_resume: Callable[[], None] | None = None
    # as on tidings' own server (tidings.server.peer.Peer): set by an endpoint that
    # can take frames synchronously; called with the data messages of one read
    # while the endpoint waits in ``receive`` with nothing queued (so order
    # holds); it answers how many it took, the rest are queued as usual
    on_messages: Callable[[list[str | bytes]], int] | None = None
    _batch: list[str | bytes] | None = None
    _receiving = False

    async def run_asgi(self) -> None:
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[EXTENSION] = self
        await super().run_asgi()

    # -- the read path -------------------------------------------------------------

    async def receive(self) -> Any:
        self._receiving = True
        try:
            return await super().receive()
        finally:
            self._receiving = False

    def data_received(self, data: bytes) -> None:
        if self.on_messages is None or not self._receiving or not self.queue.empty():
            super().data_received(data)
            return
        self._batch = []
        try:
            super().data_received(data)
        finally:
            self._take()

    def send_receive_event_to_app(self) -> None:
        batch = self._batch
        if batch is None or self.close_sent:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        if self.curr_msg_data_type == "text":
            try:
                batch.append(data.decode())
            except UnicodeDecodeError:  # uvicorn closes with 1007
                self._take()
                super().send_receive_event_to_app()
                return
        else:
            batch.append(data)
        self.frames = []

    def handle_close(self, event: Any) -> None:
        if self._take():  # after this turn's writes: the acks of what was taken go first
            self.loop.call_soon(super().handle_close, event)
        else:
            super().handle_close(event)

    def _take(self) -> bool:
        """Hand the batch to ``on_messages``; what it leaves is queued for
        ``receive``. True if there was a batch."""
        batch, self._batch = self._batch, None
        if not batch:
            return False
        assert self.on_messages is not None
        ran, rest = hand_over(self.on_messages, batch)
        if not ran:  # the endpoint gets them through ``receive`` (and fails there)
            self.on_messages = None
        for message in rest:
            self.queue.put_nowait(message)  # type: ignore[arg-type]
        if rest and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        return True

    # -- what the hub uses -------------------------------------------------------

    @property
    def can_write(self) -> bool:
        """Open, handshake done, close not sent, and below the write high-water mark."""
        return (self.handshake_complete and not self.close_sent and not self.disconnected
                and self.writable.is_set() and not self.transport.is_closing())

    @property
    def gone(self) -> bool:
        return bool(self.close_sent or self.disconnected or self.transport.is_closing())


    def resume_writing(self) -> None:
        super().resume_writing()
        callback = self.on_resume
        if callback is not None:
            callback()

    def connection_lost(self, exc: Any) -> None:
        super().connection_lost(exc)
        self.on_resume = None
