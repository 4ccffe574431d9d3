"""The HTTP/1.1 side of a lean-server connection (:class:`tidings.server.peer.Peer`).

Requests are parsed sans-I/O (:mod:`tidings.protocol.http`), run one at a
time as ASGI ``http`` scopes, pipelined ones queued; a response is written as
the app sends it (a content length or chunks), and keep-alive decides whether
the next request may follow. An upgrade request hands over to the websocket
side (``_start_websocket``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from tidings.protocol.http import (
    ChunkedReader,
    HTTPError,
    Request,
    parse_request,
    response_head,
    websocket_key,
)

if TYPE_CHECKING:
    from tidings.server.lean import LeanServer

__all__ = ["ASGI_VERSION", "ASGIApp", "ClientDisconnected", "HTTPSession", "Message"]

log = logging.getLogger("tidings.server")
access_log = logging.getLogger("tidings.access")

MAX_HEAD = 16 * 1024  # request line plus headers

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

# connection states
# the session's states, shared with tidings.server.peer
(STATE_HTTP, STATE_BODY, STATE_RUNNING, STATE_WS_HANDSHAKE, STATE_WS_OPEN, STATE_WS_CLOSING,
 STATE_GONE) = range(7)
ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientDisconnected(OSError):
    """``send`` on a connection the client has closed."""


class HTTPSession:
    """The connection's state and its HTTP/1.1 side; :class:`tidings.server.peer.Peer`
    adds the websocket side."""

    __slots__ = (
        "_body",
        "_buf",
        "_chunks",
        "_close",
        "_connected",
        "_drain",
        "_head",
        "_paused",
        "_req",
        "_resp",
        "_state",
        "_waiter",
        "_writable",
        "client",
        "server",
        "task",
        "transport",
    )

    def __init__(self, server: LeanServer) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] | None = None
        self.task: asyncio.Task[None] | None = None
        self._state = STATE_HTTP
        self._buf = bytearray()
        self._req: Request | None = None
        self._body: ChunkedReader | None = None
        self._chunks = False  # the HTTP response goes out chunked
        self._resp: int | None = None  # HTTP response status once started
        self._head: list[tuple[bytes, bytes]] = []  # the HTTP response's headers
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._close: Message | None = None  # the disconnect message once gone
        self._connected = False  # HTTP: response head written; websocket: connect given
        self._paused = False
        self._writable = True

    def _start_websocket(self, req: Request) -> None:
        raise NotImplementedError

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
        if self._state != STATE_HTTP:
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
        self._state = STATE_BODY
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
        self._state = STATE_RUNNING
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
            if self.task is me and self._resp is None and self._state == STATE_RUNNING:
                self._respond(500, b"Internal Server Error")
                return
        if self.task is not me or self._state != STATE_RUNNING:
            return  # answered (maybe the next request runs already), or gone
        if self._resp is None:  # the app returned without answering
            self._respond(500, b"Internal Server Error")
        else:  # it started but never finished its body: the framing is unknown
            self.transport.close()

    async def _send_http(self, message: Message) -> None:
        if self._state != STATE_RUNNING:
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
            self._state = STATE_GONE
            self.transport.close()
            return
        self._state = STATE_HTTP
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
            self._state = STATE_GONE
            self.transport.close()

    def _refuse(self, exc: HTTPError) -> None:
        self._req = None
        self._respond(exc.status, exc.reason.encode(), exc.headers)

    async def _wait_drain(self) -> None:
        if self._writable or self._state == STATE_GONE:
            return
        self._drain = asyncio.get_running_loop().create_future()
        try:
            await self._drain
        finally:
            self._drain = None
