"""One connection of tidings' own server (:mod:`tidings.server.lean`).

``Peer`` is the ``asyncio.Protocol`` of a client socket: an HTTP/1.1
keep-alive session (requests run as ASGI ``http`` scopes, one at a time,
pipelined ones queued) that may turn into a websocket (an ASGI ``websocket``
scope, plus the ``tidings.direct`` write path and the ``on_messages`` read
path). Parsing is sans-I/O, in :mod:`tidings.protocol.http` and
:mod:`tidings.protocol.frames`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

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
from tidings.protocol.http import (
    ChunkedReader,
    HTTPError,
    Request,
    handshake_response,
    parse_request,
    response_head,
    websocket_key,
)

if TYPE_CHECKING:
    from tidings.server.lean import LeanServer

__all__ = ["ASGI_VERSION", "EXTENSION", "ASGIApp", "ClientDisconnected", "Message", "Peer",
           "hand_over"]

log = logging.getLogger("tidings.server")
access_log = logging.getLogger("tidings.access")

EXTENSION = "tidings.direct"
INBOX_HIGH = 64  # messages waiting for the app before reading pauses
INBOX_LOW = 8
MAX_HEAD = 16 * 1024  # request line plus headers
CLOSE_TIMEOUT = 2.0  # seconds to wait for the peer's close frame after ours

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

# connection states
_HTTP, _BODY, _RUNNING, _WS_HANDSHAKE, _WS_OPEN, _WS_CLOSING, _GONE = range(7)
ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
_CONNECT: Message = {"type": "websocket.connect"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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
    return ran, [{"type": "websocket.receive", "text": message} if isinstance(message, str)
                 else {"type": "websocket.receive", "bytes": message}
                 for message in batch[taken:]]


class ClientDisconnected(OSError):
    """``send`` on a connection the client has closed."""


class Peer(asyncio.Protocol):
    """One client connection: an HTTP/1.1 keep-alive session, or a websocket."""

    __slots__ = (
        "_body",
        "_buf",
        "_chunks",
        "_close",
        "_connected",
        "_drain",
        "_head",
        "_inbox",
        "_paused",
        "_reader",
        "_req",
        "_resp",
        "_state",
        "_waiter",
        "_writable",
        "client",
        "close_sent",
        "on_messages",
        "on_resume",
        "ping_out",
        "seen",
        "server",
        "task",
        "transport",
    )

    def __init__(self, server: LeanServer) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] | None = None
        self.task: asyncio.Task[None] | None = None
        self.on_resume: Callable[[], None] | None = None
        # set by an endpoint that can take frames synchronously: called from the
        # read callback with the data messages of one read (only while the endpoint
        # waits with nothing queued, so order holds); it answers how many it took,
        # and the rest go to ``receive`` after all
        self.on_messages: Callable[[list[str | bytes]], int] | None = None
        self.close_sent = False
        self.ping_out = False
        self.seen = True
        self._state = _HTTP
        self._buf = bytearray()
        self._req: Request | None = None
        self._body: ChunkedReader | None = None
        self._chunks = False  # the HTTP response goes out chunked
        self._resp: int | None = None  # HTTP response status once started
        self._head: list[tuple[bytes, bytes]] = []  # the HTTP response's headers
        self._reader: FrameReader | None = None
        self._inbox: deque[Message] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._close: Message | None = None  # the disconnect message once gone
        self._connected = False  # HTTP: response head written; websocket: connect given
        self._paused = False
        self._writable = True

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
        self._state = _GONE
        self.on_resume = None
        if self._close is None:
            code = 1006 if state in (_WS_OPEN, _WS_HANDSHAKE) else 1005
            self._close = ({"type": "websocket.disconnect", "code": code, "reason": ""}
                           if state >= _WS_HANDSHAKE else {"type": "http.disconnect"})
        for fut in (self._waiter, self._drain):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        callback = self.on_resume
        if callback is not None:
            callback()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state in (_WS_OPEN, _WS_CLOSING):
            self._frames(data)
        elif state == _HTTP:
            self.seen = True
            self._buf += data
            self._next_request()
        elif state == _BODY:
            self.seen = True
            self._feed_body(data)
        elif state != _GONE:  # a request is running or a handshake is pending: hold on
            self._buf += data
            if len(self._buf) > MAX_HEAD and not self._paused:
                self._paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def _access(self, req: Request | None, outcome: object) -> None:
        """One access-log line per request or websocket handshake (INFO)."""
        if req is None or not access_log.isEnabledFor(logging.INFO):
            return
        who = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        what = "WebSocket" if req.upgrade else req.method
        target = req.target.decode("latin-1")
        access_log.info('%s - "%s %s HTTP/%s" %s', who, what, target, req.version, outcome)

    # -- HTTP --------------------------------------------------------------------

    def _next_request(self) -> None:
        if self._state != _HTTP:
            return
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD:
            if len(buf) > MAX_HEAD:
                self._refuse(HTTPError(431, "request head too large"))
            return
        head = bytes(buf[:end])
        del buf[:end + 4]
        try:
            req = parse_request(head, max_body=self.server.max_body)
            if req.upgrade:
                websocket_key(req)  # the rest of the handshake is checked here
        except HTTPError as exc:
            self._refuse(exc)
            return
        self._req = req
        if req.upgrade:
            self._start_websocket(req)
            return
        if req.expect_continue:
            self.transport.write(_CONTINUE)
        self._state = _BODY
        if req.chunked:
            self._body = ChunkedReader(self.server.max_body)
        rest = bytes(buf)
        buf.clear()
        self._feed_body(rest)

    def _feed_body(self, data: bytes) -> None:
        req = self._req
        assert req is not None
        body: bytes
        if self._body is not None:
            try:
                self._body.feed(data)
            except HTTPError as exc:
                self._refuse(exc)
                return
            if not self._body.done:
                return
            body = bytes(self._body.body)
            self._buf += self._body.rest
            self._body = None
        else:
            self._buf += data
            if len(self._buf) < req.content_length:
                return
            body = bytes(self._buf[:req.content_length])
            del self._buf[:req.content_length]
        self._state = _RUNNING
        self._resp = None
        self._chunks = False
        self._connected = False
        self.task = asyncio.get_running_loop().create_task(self._run_http(req, body))

    def _scope(self, req: Request, kind: str) -> dict[str, Any]:
        scope = {
            "type": kind, "asgi": ASGI_VERSION, "http_version": req.version,
            "scheme": "ws" if kind == "websocket" else "http",
            "server": self.server.address, "client": self.client,
            "method": req.method, "root_path": "", "path": req.path,
            "raw_path": req.raw_path, "query_string": req.query, "headers": req.headers,
        }
        if self.server.state:  # what the app's lifespan stored, a copy per request
            scope["state"] = dict(self.server.state)
        return scope

    async def _run_http(self, req: Request, body: bytes) -> None:
        scope = self._scope(req, "http")
        sent_body = False

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            while self._close is None:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
            return {"type": "http.disconnect"}

        me = asyncio.current_task()
        try:
            await self.server.app(scope, receive, self._send_http)
        except ClientDisconnected:
            return  # the client left mid-response: nothing to answer
        except Exception:
            log.exception("error in the HTTP app for %s %s", req.method, req.path)
            if self.task is me and self._resp is None and self._state == _RUNNING:
                self._respond(500, b"Internal Server Error")
                return
        if self.task is not me or self._state != _RUNNING:
            return  # answered (maybe the next request runs already), or gone
        if self._resp is None:  # the app returned without answering
            self._respond(500, b"Internal Server Error")
        else:  # it started but never finished its body: the framing is unknown
            self.transport.close()

    async def _send_http(self, message: Message) -> None:
        if self._state != _RUNNING:
            raise ClientDisconnected("the client is gone")
        kind = message["type"]
        req = self._req
        assert req is not None
        if kind == "http.response.start":
            if self._resp is not None:
                raise RuntimeError("http.response.start sent twice")
            self._resp = int(message["status"])
            self._head = list(message.get("headers") or ())
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if self._resp is None:
            raise RuntimeError("http.response.body before http.response.start")
        data = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        write = self.transport.write
        if not self._connected:  # the head goes out with the first body part
            self._connected = True
            headers = [(bytes(k).lower(), bytes(v)) for k, v in self._head]
            names = {k for k, _ in headers}
            if b"content-length" not in names:
                if more:
                    headers.append((b"transfer-encoding", b"chunked"))
                    self._chunks = True
                else:
                    headers.append((b"content-length", b"%d" % len(data)))
            if not req.keep_alive:
                headers.append((b"connection", b"close"))
            write(response_head(self._resp, headers))
        if req.method != "HEAD" and data:
            write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunks else data)
        if more:
            if not self._writable:
                await self._wait_drain()
            return
        if self._chunks and req.method != "HEAD":
            write(b"0\r\n\r\n")
        self._finish_response()

    def _finish_response(self) -> None:
        req = self._req
        self._access(req, self._resp)
        self._req = None
        self.task = None
        if req is None or not req.keep_alive:
            self._state = _GONE
            self.transport.close()
            return
        self._state = _HTTP
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        if self._buf:  # a pipelined request, once this call stack has unwound
            asyncio.get_running_loop().call_soon(self._next_request)

    def _respond(self, status: int, body: bytes,
                 headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """A complete response of the server's own (errors, refusals)."""
        req = self._req
        keep = req is not None and req.keep_alive and status < 400
        head = [(b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)), *headers]
        if not keep:
            head.append((b"connection", b"close"))
        self.transport.write(response_head(status, head) + body)
        self._resp = status
        if keep:
            self._finish_response()
        else:
            self._access(req, status)
            self._req = None
            self._state = _GONE
            self.transport.close()

    def _refuse(self, exc: HTTPError) -> None:
        self._req = None
        self._respond(exc.status, exc.reason.encode(), exc.headers)

    async def _wait_drain(self) -> None:
        if self._writable or self._state == _GONE:
            return
        self._drain = asyncio.get_running_loop().create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    # -- websocket ---------------------------------------------------------------

    def _start_websocket(self, req: Request) -> None:
        self._state = _WS_HANDSHAKE
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
            if self._state == _WS_HANDSHAKE:
                log.exception("error in the websocket app before accepting")
                self._respond(500, b"Internal Server Error")
            elif self._state == _WS_OPEN:
                log.exception("error in the websocket app")
                self._send_close(1011, "internal error")
            return
        finally:
            self.task = None
        if self._state == _WS_HANDSHAKE:  # returned without accepting
            self._respond(403, b"Forbidden")
        elif self._state == _WS_OPEN:
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
        if self._paused and left <= INBOX_LOW and self._state != _GONE:
            self._paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: Message) -> None:
        """The ASGI ``send`` of a websocket."""
        kind = message["type"]
        state = self._state
        if kind == "websocket.send":
            if state != _WS_OPEN or self.close_sent:
                raise ClientDisconnected("websocket closed")
            text = message.get("text")
            self.transport.write(encode_frame(text.encode()) if text is not None
                                 else encode_frame(bytes(message["bytes"]), OP_BINARY))
            if not self._writable:
                await self._wait_drain()
        elif kind == "websocket.accept":
            if state != _WS_HANDSHAKE:
                raise RuntimeError("websocket.accept twice or after close")
            extra = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers") or ()]
            req = self._req
            assert req is not None
            key = req.header(b"sec-websocket-key")
            assert key is not None  # checked by websocket_key before the app ran
            self.transport.write(handshake_response(key, message.get("subprotocol"), extra))
            self._state = _WS_OPEN
            self._access(self._req, "[accepted]")
            self._req = None
            self._reader = FrameReader(self.server.max_size)
            if self._buf:  # frames sent right behind the handshake
                pending = bytes(self._buf)
                self._buf = bytearray()
                self._frames(pending)
        elif kind == "websocket.close":
            if state == _WS_HANDSHAKE:  # refused before the handshake: HTTP 403
                self._respond(403, b"Forbidden")
            elif state == _WS_OPEN:
                self._send_close(int(message.get("code") or 1000),
                                 str(message.get("reason") or ""))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _frames(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            return
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        self.seen = True
        # how the connection ends, if this read ends it: (method, code, reason)
        end: tuple[Callable[[int, str], None], int, str] | None = None
        try:
            messages = reader.feed(data)
        except FrameError as exc:  # what came before the bad frame still counts
            messages, end = exc.messages, (self._fail, exc.code, exc.reason)
        closing = self._state == _WS_CLOSING
        # data messages for ``on_messages``, taken together at the end
        batch: list[str | bytes] | None = (
            [] if self.on_messages is not None and not inbox and self._waiter is not None
            else None)
        for opcode, payload in messages:
            if opcode in (OP_TEXT, OP_BINARY):
                if closing:
                    continue
                message: str | bytes = payload
                if opcode == OP_TEXT:
                    try:
                        message = payload.decode()
                    except UnicodeDecodeError:
                        end = (self._fail, 1007, "text frame is not UTF-8")
                        break
                if batch is not None:
                    batch.append(message)
                    continue
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
            self._take(batch, inbox)
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
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(inbox) > INBOX_HIGH and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _take(self, batch: list[str | bytes], inbox: deque[Message]) -> None:
        """Hand ``batch`` to ``on_messages``; what it leaves goes to the inbox."""
        assert self.on_messages is not None
        ran, rest = hand_over(self.on_messages, batch)
        if not ran:
            self.on_messages = None
            self._send_close(1011, "internal error")
            return
        inbox.extend(rest)

    def _send_close(self, code: int, reason: str) -> None:
        """Our close frame; the transport closes on the peer's answer or a timeout."""
        if self.close_sent or self._state == _GONE:
            return
        self.close_sent = True
        self._state = _WS_CLOSING
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
        if self._state == _GONE:
            return
        if not self.close_sent:
            self.close_sent = True
            self.transport.write(encode_close(code, ""))
        self._gone(code, reason)

    def _end(self, how: Callable[[int, str], None], code: int, reason: str) -> None:
        if self._state != _GONE:
            how(code, reason)

    def _gone(self, code: int, reason: str) -> None:
        self._close = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self._state = _GONE
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
        if state in (_HTTP, _BODY):
            if not self.seen:
                self._state = _GONE
                self.transport.close()
            self.seen = False
            return
        if state != _WS_OPEN or not ping:
            return
        if self.ping_out:
            self._fail(1011, "keepalive ping timeout")
        elif not self.seen:
            self.ping_out = True
            self.transport.write(encode_frame(b"", OP_PING))
        self.seen = False

    # -- the direct write path (tidings.connection.DirectTransport) -------------

    @property
    def can_write(self) -> bool:
        return (self._state == _WS_OPEN and self._writable
                and not self.transport.is_closing())

    @property
    def gone(self) -> bool:
        return self._state != _WS_OPEN or self.transport.is_closing()

    def write_frames(self, data: bytes) -> None:
        self.transport.write(data)
