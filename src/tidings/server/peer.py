"""One connection of tidings' own server (:mod:`tidings.server.lean`).

``Peer`` is the ``asyncio.Protocol`` of a client socket: an HTTP/1.1
keep-alive session (requests run as ASGI ``http`` scopes, one at a time,
pipelined ones queued) that may turn into a websocket (an ASGI ``websocket``
scope, plus the ``tidings.direct`` write path and the ``on_messages`` read
path). The HTTP side and the connection's state are
:class:`tidings.server.http1.HTTPSession`; this module adds the websocket
side. Parsing is sans-I/O, in :mod:`tidings.protocol.http` and
:mod:`tidings.protocol.frames`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tidings.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    encode_close,
    encode_frame,
    parse_close,
)
from tidings.protocol.http import Request, handshake_response
from tidings.server.http1 import (
    ASGI_VERSION,
    MAX_HEAD,
    STATE_BODY,
    STATE_GONE,
    STATE_HTTP,
    STATE_WS_CLOSING,
    STATE_WS_HANDSHAKE,
    STATE_WS_OPEN,
    ASGIApp,
    ClientDisconnected,
    HTTPSession,
    Message,
)

if TYPE_CHECKING:
    from tidings.server.lean import LeanServer

__all__ = ["ASGI_VERSION", "EXTENSION", "ASGIApp", "ClientDisconnected", "Message", "Peer",
           "as_received", "hand_over"]

log = logging.getLogger("tidings.server")

EXTENSION = "tidings.direct"
INBOX_HIGH = 64  # messages waiting for the app before reading pauses
INBOX_LOW = 8
CLOSE_TIMEOUT = 2.0  # seconds to wait for the peer's close frame after ours

_CONNECT: Message = {"type": "websocket.connect"}


def hand_over(handler: Callable[[list[str | bytes]], int],
              batch: list[str | bytes]) -> tuple[bool, list[Message]]:
    """Give the data messages of one read to an ``on_messages`` handler: whether
    it ran, and what it left as ASGI receive messages, in order (all of them if
    it raised; logged)."""
    try:
        taken, ran = handler(batch), True
    except Exception:
        log.exception("error in a websocket message handler")
        taken, ran = 0, False
    if taken >= len(batch):
        return ran, []
    return ran, as_received(batch[taken:])


def as_received(messages: list[str | bytes]) -> list[Message]:
    """Data messages as the ASGI ``websocket.receive`` messages they arrived as."""
    return [{"type": "websocket.receive", "text": message} if isinstance(message, str)
            else {"type": "websocket.receive", "bytes": message} for message in messages]


class Peer(HTTPSession, asyncio.Protocol):
    """One client connection: an HTTP/1.1 keep-alive session, or a websocket."""

    __slots__ = (
        "_inbox",
        "_reader",
        "can_write",
        "close_sent",
        "on_messages",
        "on_resume",
        "ping_out",
        "seen",
    )

    def __init__(self, server: LeanServer) -> None:
        super().__init__(server)
        self.on_resume: Callable[[], None] | None = None
        # set by an endpoint that can take frames synchronously: called from the
        # read callback with the data messages of one read (only while the endpoint
        # waits with nothing queued, so order holds); it answers how many it took,
        # and the rest go to ``receive`` after all
        self.on_messages: Callable[[list[str | bytes]], int] | None = None
        self.close_sent = False
        # open and below the write high-water mark: the hub's direct writes ask
        # (with the transport's is_closing()) before each one; kept, not computed
        self.can_write = False
        self.ping_out = False
        self.seen = True
        self._reader: FrameReader | None = None
        self._inbox: deque[Message] | None = None

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        self.server.peers.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.peers.discard(self)
        state = self._state
        self._state = STATE_GONE
        self.can_write = False
        self.on_resume = None
        if self._close is None:
            code = 1006 if state in (STATE_WS_OPEN, STATE_WS_HANDSHAKE) else 1005
            self._close = ({"type": "websocket.disconnect", "code": code, "reason": ""}
                           if state >= STATE_WS_HANDSHAKE else {"type": "http.disconnect"})
        for fut in (self._waiter, self._drain):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def pause_writing(self) -> None:
        self._writable = False
        self.can_write = False

    def resume_writing(self) -> None:
        self._writable = True
        self.can_write = self._state == STATE_WS_OPEN
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        callback = self.on_resume
        if callback is not None:
            callback()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state in (STATE_WS_OPEN, STATE_WS_CLOSING):
            self._frames(data)
        elif state == STATE_HTTP:
            self.seen = True
            self._buf += data
            self._next_request()
        elif state == STATE_BODY:
            self.seen = True
            self._feed_body(data)
        elif state != STATE_GONE:  # a request is running or a handshake is pending: hold on
            self._buf += data
            if len(self._buf) > MAX_HEAD and not self._paused:
                self._paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    # -- websocket ---------------------------------------------------------------

    def _start_websocket(self, req: Request) -> None:
        self._state = STATE_WS_HANDSHAKE
        scope = self._scope(req, "websocket")
        del scope["method"]
        protocols = req.header(b"sec-websocket-protocol")
        scope["subprotocols"] = ([p.strip() for p in protocols.decode("latin-1").split(",")
                                  if p.strip()] if protocols else [])
        scope["extensions"] = {EXTENSION: self}
        self._body = None
        app: Callable[..., Awaitable[None]] = self.server.app
        for route in self.server.ws_routes:
            match, child = route.matches(scope)
            if match.name == "FULL":
                scope.update(child)
                app = route.app  # the endpoint itself: no routing frame kept alive
                break
        self.task = asyncio.get_running_loop().create_task(self._run_ws(app, scope))

    async def _run_ws(self, app: Callable[..., Awaitable[None]], scope: Message) -> None:
        try:
            await app(scope, self.receive, self.send)
        except Exception:
            if self._state == STATE_WS_HANDSHAKE:
                log.exception("error in the websocket app before accepting")
                self._respond(500, b"Internal Server Error")
            elif self._state == STATE_WS_OPEN:
                log.exception("error in the websocket app")
                self._send_close(1011, "internal error")
            return
        finally:
            self.task = None
        if self._state == STATE_WS_HANDSHAKE:  # returned without accepting
            self._respond(403, b"Forbidden")
        elif self._state == STATE_WS_OPEN:
            self._send_close(1000, "")

    async def receive(self) -> Message:
        """The ASGI ``receive`` of a websocket."""
        if not self._connected:
            self._connected = True
            return _CONNECT
        inbox = self._inbox
        while not inbox:
            if self._close is not None:
                return self._close
            self._waiter = (self.server.loop or asyncio.get_running_loop()).create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            inbox = self._inbox
        message = inbox.popleft()
        left = len(inbox)
        if not left:  # idle connections hold no deque
            self._inbox = None
        if self._paused and left <= INBOX_LOW and self._state != STATE_GONE:
            self._paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: Message) -> None:
        """The ASGI ``send`` of a websocket."""
        kind = message["type"]
        state = self._state
        if kind == "websocket.send":
            if state != STATE_WS_OPEN or self.close_sent:
                raise ClientDisconnected("websocket closed")
            text = message.get("text")
            self.transport.write(encode_frame(text.encode()) if text is not None
                                 else encode_frame(bytes(message["bytes"]), OP_BINARY))
            if not self._writable:
                await self._wait_drain()
        elif kind == "websocket.accept":
            if state != STATE_WS_HANDSHAKE:
                raise RuntimeError("websocket.accept twice or after close")
            extra = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers") or ()]
            req = self._req
            assert req is not None
            key = req.header(b"sec-websocket-key")
            assert key is not None  # checked by websocket_key before the app ran
            self.transport.write(handshake_response(key, message.get("subprotocol"), extra))
            self._state = STATE_WS_OPEN
            self.can_write = self._writable
            self._access(self._req, "[accepted]")
            self._req = None
            self._reader = FrameReader(self.server.max_size)
            if self._buf:  # frames sent right behind the handshake
                pending = bytes(self._buf)
                self._buf = bytearray()
                self._frames(pending)
        elif kind == "websocket.close":
            if state == STATE_WS_HANDSHAKE:  # refused before the handshake: HTTP 403
                self._respond(403, b"Forbidden")
            elif state == STATE_WS_OPEN:
                self._send_close(int(message.get("code") or 1000),
                                 str(message.get("reason") or ""))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _frames(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            return
        inbox = self._inbox  # None while empty: most reads never need one
        self.seen = True
        one: tuple[int, bytes] | None = None
        tried = False  # lone() was asked already: the general parser alone is left
        if (inbox is None and self.on_messages is not None and self._waiter is not None
                and self._state == STATE_WS_OPEN):
            # a producer's lone frame, taken without the general loop below
            tried = True
            one = reader.lone(data)
            if one is not None:
                opcode, payload = one
                message: str | bytes = payload
                try:
                    if opcode == OP_TEXT:
                        message = payload.decode()
                except UnicodeDecodeError:
                    pass  # the loop below closes with 1007
                else:  # _take, inlined for one message (one call layer fewer a frame)
                    try:
                        taken = self.on_messages([message])
                    except Exception:
                        log.exception("error in a websocket message handler")
                        self._handler_failed()
                        return
                    if not taken:  # not now: it waits for the endpoint's receive
                        self._inbox = inbox = deque(as_received([message]))
                        self._wake_inbox(inbox)
                    return
        # how the connection ends, if this read ends it: (method, code, reason)
        end: tuple[Callable[[int, str], None], int, str] | None = None
        try:
            messages = ([one] if one is not None else reader.parse(data) if tried
                        else reader.feed(data))
        except FrameError as exc:  # what came before the bad frame still counts
            messages, end = exc.messages, (self._fail, exc.code, exc.reason)
        closing = self._state == STATE_WS_CLOSING
        # data messages for ``on_messages``, taken together at the end
        batch: list[str | bytes] | None = (
            [] if self.on_messages is not None and not inbox and self._waiter is not None
            else None)
        for opcode, payload in messages:
            if opcode in (OP_TEXT, OP_BINARY):
                if closing:
                    continue
                message = payload
                if opcode == OP_TEXT:
                    try:
                        message = payload.decode()
                    except UnicodeDecodeError:
                        end = (self._fail, 1007, "text frame is not UTF-8")
                        break
                if batch is not None:
                    batch.append(message)
                    continue
                if inbox is None:
                    inbox = self._inbox = deque()
                inbox.append({"type": "websocket.receive",
                              "text" if opcode == OP_TEXT else "bytes": message})
            elif opcode == OP_PING:
                if not self.close_sent:
                    self.transport.write(encode_frame(payload, OP_PONG))
            elif opcode == OP_PONG:
                self.ping_out = False
            elif opcode == OP_CLOSE:
                try:
                    code, reason = parse_close(payload)
                except FrameError as exc:
                    end = (self._fail, exc.code, exc.reason)
                else:
                    end = (self._closed_by_peer, code, reason)
                break
        if batch:
            self._take(batch)
            inbox = self._inbox
        if end is not None:
            self._reader = None  # nothing more is read
            if batch:  # after this turn's writes: the acks of what was taken go first
                (self.server.loop or asyncio.get_running_loop()).call_soon(self._end, *end)
            else:
                self._end(*end)
            return
        if not inbox:
            self._inbox = None
            return
        self._wake_inbox(inbox)

    def _wake_inbox(self, inbox: deque[Message]) -> None:
        """Messages are in the inbox: wake the endpoint's ``receive``; stop
        reading while it is behind."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(inbox) > INBOX_HIGH and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _take(self, batch: list[str | bytes]) -> None:
        """Hand ``batch`` to ``on_messages``; what it leaves goes to the inbox."""
        assert self.on_messages is not None
        ran, rest = hand_over(self.on_messages, batch)
        if not ran:
            self._handler_failed()
            return
        if rest:
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.extend(rest)

    def _handler_failed(self) -> None:
        """``on_messages`` raised (logged): no more frames to it; close with 1011."""
        self.on_messages = None
        self._send_close(1011, "internal error")

    def _send_close(self, code: int, reason: str) -> None:
        """Our close frame; the transport closes on the peer's answer or a timeout."""
        if self.close_sent or self._state == STATE_GONE:
            return
        self.close_sent = True
        self._state = STATE_WS_CLOSING
        self.can_write = False
        self.on_resume = None
        self.transport.write(encode_close(code, reason))
        if self._paused:  # its close frame must be read
            self._paused = False
            self.transport.resume_reading()
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.transport.close)

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: close frame, then close at once."""
        if not self.close_sent:
            self.close_sent = True
            self.transport.write(encode_close(code, reason))
        self._gone(code, reason)

    def _closed_by_peer(self, code: int, reason: str) -> None:
        """The peer's close frame: echo it, then the connection is gone."""
        if self._state == STATE_GONE:
            return
        if not self.close_sent:
            self.close_sent = True
            self.transport.write(encode_close(code, ""))
        self._gone(code, reason)

    def _end(self, how: Callable[[int, str], None], code: int, reason: str) -> None:
        if self._state != STATE_GONE:
            how(code, reason)

    def _gone(self, code: int, reason: str) -> None:
        self._close = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self._state = STATE_GONE
        self.can_write = False
        self.on_resume = None
        self.transport.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def tick(self, ping: bool) -> None:
        """The server's timer: an HTTP connection silent for a whole tick (an idle
        keep-alive, a stalled request) is closed; on ``ping`` ticks a silent
        websocket is pinged and one that left the last ping unanswered closed."""
        state = self._state
        if state in (STATE_HTTP, STATE_BODY):
            if not self.seen:
                self._state = STATE_GONE
                self.transport.close()
            self.seen = False
            return
        if state != STATE_WS_OPEN or not ping:
            return
        if self.ping_out:
            self._fail(1011, "keepalive ping timeout")
        elif not self.seen:
            self.ping_out = True
            self.transport.write(encode_frame(b"", OP_PING))
        self.seen = False

    # -- the direct write path (tidings.core.connection.DirectTransport) -------------

    @property
    def gone(self) -> bool:
        return self._state != STATE_WS_OPEN or self.transport.is_closing()

    # frames themselves go to ``self.transport.write`` (DirectTransport.transport)
