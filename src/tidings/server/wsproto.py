"""uvicorn's websocket protocol plus a direct write path for the hub.

The ASGI interface costs one ``send`` await per frame, and uvicorn frames
every message again for every client. This subclass of uvicorn's
websockets-sansio protocol advertises itself in the ASGI scope as the
``tidings.direct`` extension; the hub then writes already-built frames (a
publication's bytes are the same for every subscriber) straight to the socket,
all frames queued for a connection in one event-loop turn in one write.
A raw producer's frames can also be taken straight from the read callback
(``on_messages``, as on tidings' own server): while an endpoint takes them
that way, the whole, unfragmented text and binary frames of a read are
unmasked and decoded here (:meth:`DirectWSProtocol._scan`), at a frame
boundary of the stream the ``websockets`` state machine is given, which
:class:`~tidings.protocol.frames.FrameTracker` follows. Everything else
(handshake, control frames, fragments, compression, protocol errors, close)
goes whole to uvicorn and ``websockets``, in order. Selected with
``uvicorn.Config(ws="tidings.server.wsproto:DirectWSProtocol")``; the
embedded ASGI path does not need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from tidings.protocol.frames import FrameTracker, frame_bounds, unmask
from tidings.server.peer import hand_over

__all__ = ["EXTENSION", "DirectWSProtocol"]

EXTENSION = "tidings.direct"
TAIL_MAX = 64 * 1024  # an incomplete frame the fast read path keeps for the next read


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
    # the fast read path (see _scan): where websockets' frames end, None when it
    # cannot be followed (frames before the handshake's answer, a refused frame)
    _tracker: FrameTracker | None = None
    _tail = b""  # the incomplete last frame of a read the fast path took

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
        if self._tail:  # a frame the fast path began: it comes first
            data, self._tail = self._tail + data, b""
        if not self.handshake_complete:
            self._early(data)
            return
        if self.on_messages is None or not self._receiving or not self.queue.empty():
            self._to_websockets(data)
            return
        self._batch = []
        try:
            tracker = self._tracker
            if (tracker is None or not tracker.at_boundary or tracker.in_message
                    or self.close_sent or self.conn.state is not State.OPEN):
                self._to_websockets(data)
            else:
                self._scan(data)
        finally:
            self._take()

    def _early(self, data: bytes) -> None:
        """Before the handshake's answer: the request. Frames are only followed
        (and then taken by :meth:`_scan`) if nothing came after the request in
        its read; a client that sends frames before the answer gets uvicorn's
        path for good."""
        initiated = self.handshake_initiated
        super().data_received(data)
        if initiated or not data.endswith(b"\r\n\r\n"):
            self._tracker = None
        elif self.handshake_initiated:
            self._tracker = FrameTracker()

    def _to_websockets(self, data: bytes) -> None:
        """``data`` to the ``websockets`` state machine (whole frames, or the
        rest of the stream), its frames followed."""
        if self._tracker is not None:
            self._tracker.feed(data)
        super().data_received(data)

    def _scan(self, data: bytes) -> None:
        """The fast read path, at a frame boundary: whole, unfragmented, masked
        text and binary frames are unmasked and decoded here and go to the
        batch; any other frame (control frames, fragments, compressed or
        invalid ones) goes whole to ``websockets``, in order, and the rest of
        the read too once it holds a message open or the connection is
        closing. A short incomplete last frame waits in ``_tail`` for the next
        read; a long one goes to ``websockets``, which buffers it better."""
        batch = self._batch
        assert batch is not None
        size, pos = len(data), 0
        max_size = self.config.ws_max_size  # what uvicorn gave websockets (any version)
        while pos < size:
            bounds = frame_bounds(data, pos)
            if bounds is None:
                self._tail = data[pos:]
                return
            b0, b1, start, end = bounds
            if not b1 & 0x80 or end - start > max_size:
                self._tracker = None  # websockets refuses it and closes: its path from here
                super().data_received(data[pos:])
                return
            if end > size:
                if end - pos > TAIL_MAX:
                    self._to_websockets(data[pos:])
                else:
                    self._tail = data[pos:]
                return
            if b0 == 0x82:
                batch.append(unmask(data[start:end], data[start - 4:start]))
                pos = end
                continue
            if b0 == 0x81:
                try:
                    batch.append(unmask(data[start:end], data[start - 4:start]).decode())
                    pos = end
                    continue
                except UnicodeDecodeError:  # websockets' path closes with 1007
                    pass
            self._to_websockets(data[pos:end])
            pos = end
            tracker = self._tracker
            if (tracker is None or tracker.in_message or self.close_sent
                    or self.conn.state is not State.OPEN):
                if pos < size:
                    self._to_websockets(data[pos:])
                return

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
