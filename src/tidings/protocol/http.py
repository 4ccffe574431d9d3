"""HTTP/1.1 request heads, bodies and the websocket handshake (RFC 7230, 6455), sans-I/O.

Only what a websocket server with a small HTTP API needs: a request head
parsed in one go once ``\\r\\n\\r\\n`` has arrived, bodies by ``Content-Length``
or ``chunked``, and the opening handshake's answer. Every malformed input
raises :class:`HTTPError` with the status to answer; nothing here touches a
socket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

__all__ = [
    "ChunkedReader",
    "HTTPError",
    "Request",
    "accept_key",
    "handshake_response",
    "parse_request",
    "response_head",
    "websocket_key",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# one shared bytes object per common header name: a held websocket keeps its
# handshake headers (the ASGI scope), and these are most of them
_NAMES = {n: n for n in (
    b"host", b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version",
    b"sec-websocket-protocol", b"sec-websocket-extensions", b"origin", b"user-agent",
    b"accept", b"accept-encoding", b"accept-language", b"cache-control", b"pragma",
    b"cookie", b"authorization", b"content-type", b"content-length", b"x-forwarded-for",
)}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HTTPError(Exception):
    """A request this server answers with ``status`` and closes."""

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None
                 ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or []


@dataclass(slots=True)
class Request:
    """A parsed request head. Header names are lower case, as ASGI wants them."""

    method: str
    target: bytes
    path: str
    raw_path: bytes
    query: bytes
    version: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_length: int = 0
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bool = False  # asks for a websocket
    expect_continue: bool = False

    def header(self, name: bytes) -> bytes | None:
        """The last value of header ``name`` (lower case), or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


def _tokens(value: bytes | None) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")} if value else set()


def parse_request(head: bytes, *, max_body: int) -> Request:
    """Parse a request head (everything before the blank line, which is excluded)."""
    lines = head.split(b"\r\n")
    try:
        method_b, target, version_b = lines[0].split(b" ")
    except ValueError:
        raise HTTPError(400, "malformed request line") from None
    if not method_b or any(c not in _TOKEN for c in method_b):
        raise HTTPError(400, "malformed method")
    if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HTTPError(505, "HTTP version not supported")
    if not target.startswith(b"/"):
        raise HTTPError(400, "only origin-form request targets are served")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or any(c not in _TOKEN for c in name):
            raise HTTPError(400, "malformed header line")
        name = name.lower()
        headers.append((_NAMES.get(name, name), value.strip(b" \t")))
    raw_path, _, query = target.partition(b"?")
    try:
        path = unquote(raw_path.decode("ascii"), errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "malformed path") from None
    version = version_b[5:].decode()
    req = Request(method_b.decode(), target, path, raw_path, query, version, headers)
    connection = _tokens(req.header(b"connection"))
    req.keep_alive = b"close" not in connection if version == "1.1" else b"keep-alive" in connection
    encoding = req.header(b"transfer-encoding")
    length = req.header(b"content-length")
    if encoding is not None:
        if encoding.strip().lower() != b"chunked":
            raise HTTPError(501, "only chunked transfer coding is supported")
        if length is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        req.chunked = True
    elif length is not None:
        if not length.isdigit():
            raise HTTPError(400, "malformed Content-Length")
        req.content_length = int(length)
        if req.content_length > max_body:
            raise HTTPError(413, "request body too large")
    req.expect_continue = (req.header(b"expect") or b"").lower() == b"100-continue"
    req.upgrade = (b"websocket" in _tokens(req.header(b"upgrade"))
                   and b"upgrade" in connection)
    return req


class ChunkedReader:
    """Decodes a ``chunked`` body fed in pieces; ``done`` once the last chunk and
    trailers are in. What follows the body stays in ``rest``."""

    __slots__ = ("_buf", "_left", "body", "done", "max_body", "rest")

    def __init__(self, max_body: int) -> None:
        self._buf = bytearray()
        self._left = -1  # bytes of the current chunk still to read, -1: at a size line
        self.body = bytearray()
        self.done = False
        self.max_body = max_body
        self.rest = b""

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while not self.done:
            if self._left == -2:  # trailers, up to a blank line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 8192:
                        raise HTTPError(431, "trailers too large")
                    return
                del buf[:end + 2]
                if end == 0:
                    self.done = True
                    self.rest = bytes(buf)
                    buf.clear()
            elif self._left < 0:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise HTTPError(400, "malformed chunk size")
                    return
                size_text = bytes(buf[:end]).split(b";")[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HTTPError(400, "malformed chunk size") from None
                del buf[:end + 2]
                if size == 0:
                    self._left = -2  # trailers until a blank line
                else:
                    if len(self.body) + size > self.max_body:
                        raise HTTPError(413, "request body too large")
                    self._left = size
            else:
                if len(buf) < self._left + 2:
                    return
                if buf[self._left:self._left + 2] != b"\r\n":
                    raise HTTPError(400, "malformed chunk")
                self.body += buf[:self._left]
                del buf[:self._left + 2]
                self._left = -1


def websocket_key(req: Request) -> bytes:
    """The client's ``Sec-WebSocket-Key``, after checking the rest of the handshake."""
    if req.method != "GET" or req.version != "1.1":
        raise HTTPError(400, "a websocket handshake is a GET over HTTP/1.1")
    if req.header(b"sec-websocket-version") != b"13":
        raise HTTPError(426, "unsupported websocket version",
                        [(b"sec-websocket-version", b"13")])
    key = req.header(b"sec-websocket-key")
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HTTPError(400, "missing or malformed Sec-WebSocket-Key") from None
    return key


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def response_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A status line and headers, ending with the blank line."""
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise ValueError("header names and values must not hold CR or LF")
        parts.append(b"%s: %s\r\n" % (name, value))
    parts.append(b"\r\n")
    return b"".join(parts)


def handshake_response(key: bytes, subprotocol: str | None = None,
                       headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """The ``101 Switching Protocols`` answer accepting a websocket."""
    head = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept_key(key))]
    if subprotocol is not None:
        head.append((b"sec-websocket-protocol", subprotocol.encode()))
    head.extend(headers or ())
    return response_head(101, head)
