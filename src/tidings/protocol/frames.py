"""Websocket frames (RFC 6455 section 5), sans-I/O.

A frame the server sends is never masked, so the bytes of one message are the
same for every client: a publication's frame is built once and written to
every subscriber's socket as is. :class:`FrameReader` turns the bytes a client
sends (masked, possibly fragmented, with control frames interleaved) into
whole messages; every protocol error raises :class:`FrameError` with the close
code to answer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "TEXT_HEADS",
    "TEXT_HEADS_MAX",
    "FrameError",
    "FrameReader",
    "FrameTracker",
    "encode_close",
    "encode_frame",
    "frame_bounds",
    "parse_close",
    "unmask",
]

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_DATA = (OP_TEXT, OP_BINARY)
_CONTROL = (OP_CLOSE, OP_PING, OP_PONG)


# the 2-byte headers of short text and binary frames, ready-made
_SHORT = ((), tuple(bytes((0x81, n)) for n in range(126)),
          tuple(bytes((0x82, n)) for n in range(126)))


# the headers of unmasked text frames of up to TEXT_HEADS_MAX - 1 bytes, by
# length (2 bytes below 126, 4 from there): what a publication's frame starts
# with, looked up instead of built (about 45 KiB)
TEXT_HEADS_MAX: Final = 1024
TEXT_HEADS: Final = (_SHORT[OP_TEXT]
                     + tuple(struct.pack("!BBH", 0x81, 126, n) for n in range(126, TEXT_HEADS_MAX)))


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One unfragmented, unmasked frame carrying ``payload``."""
    length = len(payload)
    if length < 126 and opcode in (OP_TEXT, OP_BINARY):
        return _SHORT[opcode][length] + payload
    head = 0x80 | opcode  # FIN + opcode
    if length < 126:
        return struct.pack("!BB", head, length) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", head, 126, length) + payload
    return struct.pack("!BBQ", head, 127, length) + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame (123 bytes)."""
    if code in (1005, 1006):  # "no status" codes are never sent
        return encode_frame(b"", OP_CLOSE)
    data = reason.encode()[:123]
    while True:
        try:
            data.decode()
            break
        except UnicodeDecodeError:  # a cut in the middle of a character
            data = data[:-1]
    return encode_frame(struct.pack("!H", code) + data, OP_CLOSE)


def _unmask_int(data: bytes | bytearray, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


# ``unmask(data, mask)``: ``data`` XOR the repeated 4-byte ``mask``. The C
# helper that ships with the websockets wheels is used as it is (no Python
# wrapper: a call layer per frame on the hot path).
unmask: Callable[[bytes | bytearray, bytes], bytes]
try:
    from websockets.speedups import apply_mask as unmask
except ImportError:  # pragma: no cover - websockets without its C extension
    unmask = _unmask_int


class FrameError(Exception):
    """The client broke the protocol: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        # raised by FrameReader.feed: the messages of that input before the bad
        # frame, which are still valid and should be handled before closing
        self.messages: list[tuple[int, bytes]] = []


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                    1014) or 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int, str]:
    """A close frame's code and reason (1005 when it carries none)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(1002, "malformed close frame")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise FrameError(1002, f"invalid close code {code}")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(1007, "close reason is not UTF-8") from None


class FrameReader:
    """Client-to-server frames in, ``(opcode, payload)`` messages out.

    Data messages come out whole (fragments joined; text still as bytes, the
    caller decodes it); control frames come out as they arrive. ``max_size``
    bounds one message; above it :class:`FrameError` 1009 is raised before the
    payload is buffered.
    """

    __slots__ = ("_buf", "_frag_op", "_frag_size", "_fragments", "_need", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = b""
        self._need = 2  # bytes buffered before parsing is worth trying
        self._fragments: list[bytes] = []
        self._frag_op = 0
        self._frag_size = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def lone(self, data: bytes) -> tuple[int, bytes] | None:
        """``(opcode, unmasked payload)`` when ``data`` is exactly one whole,
        masked text or binary frame below 64 KiB and nothing is pending (the
        read of a producer that writes one message at a time), else None: give
        ``data`` to :meth:`feed`, which takes anything. Nothing is consumed."""
        n = len(data)
        b0 = data[0] if n >= 6 else 0
        if (b0 != 0x81 and b0 != 0x82) or self._buf or self._frag_op:
            return None
        b1 = data[1]
        length = b1 & 0x7F
        if not b1 & 0x80 or length == 127:
            return None
        start = 6
        if length == 126:
            length, start = (data[2] << 8) | data[3], 8
        if n != start + length or length > self.max_size:
            return None
        return b0 & 0x0F, unmask(data[start:], data[start - 4:start]) if length else b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The messages completed by ``data``. A protocol violation raises
        :class:`FrameError` carrying the messages completed before it."""
        one = self.lone(data)
        if one is not None:
            return [one]
        return self.parse(data)

    def parse(self, data: bytes) -> list[tuple[int, bytes]]:
        """:meth:`feed` without trying :meth:`lone` first (the caller did)."""
        out: list[tuple[int, bytes]] = []
        try:
            self._parse(data, out)
        except FrameError as exc:
            exc.messages = out
            raise
        return out

    def _parse(self, data: bytes, out: list[tuple[int, bytes]]) -> None:
        buf = self._buf + data if self._buf else data
        size = len(buf)
        if size < self._need:
            self._buf = buf
            return
        pos = 0
        max_size = self.max_size
        self._need = 2
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            if b0 == 0x81 and b1 & 0x80 and length != 127 and not self._frag_op:
                # the usual frame first: a whole, masked text frame below 64 KiB,
                # taken when all of it is here and within the limit (every check
                # below passes for it); anything else: the general path
                start = pos + 6
                if length == 126 and size - pos >= 4:
                    length, start = (buf[pos + 2] << 8) | buf[pos + 3], pos + 8
                end = start + length
                if length != 126 and length <= max_size and end <= size:
                    out.append((OP_TEXT, unmask(buf[start:end], buf[start - 4:start])
                                if length else b""))
                    pos = end
                    continue
                length = b1 & 0x7F
            start = pos + 6
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 8
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 14
            if not b1 & 0x80:
                raise FrameError(1002, "client frames must be masked")
            if b0 & 0x70:
                raise FrameError(1002, "reserved bits set (no extension was negotiated)")
            opcode = b0 & 0x0F
            if opcode in _CONTROL:
                if length > 125 or not b0 & 0x80:
                    raise FrameError(1002, "control frames are short and not fragmented")
            elif length + self._frag_size > max_size:
                raise FrameError(1009, "message above the size limit")
            end = start + length
            if end > size:
                self._need = end - pos
                break
            payload = unmask(buf[start:end], buf[start - 4:start]) if length else b""
            pos = end
            if opcode in _DATA:
                if self._frag_op:
                    raise FrameError(1002, "a new message inside a fragmented one")
                if b0 & 0x80:
                    out.append((opcode, payload))
                else:
                    self._frag_op = opcode
                    self._fragments.append(payload)
                    self._frag_size = length
            elif opcode == OP_CONT:
                if not self._frag_op:
                    raise FrameError(1002, "continuation without a message")
                self._fragments.append(payload)
                self._frag_size += length
                if b0 & 0x80:
                    out.append((self._frag_op, b"".join(self._fragments)))
                    self._fragments = []
                    self._frag_op = 0
                    self._frag_size = 0
            elif opcode in _CONTROL:
                out.append((opcode, payload))
            else:
                raise FrameError(1002, f"unknown opcode {opcode}")
        self._buf = buf[pos:] if pos < size else b""


def frame_bounds(data: bytes, pos: int) -> tuple[int, int, int, int] | None:
    """The frame that starts at ``pos`` of ``data``: its first byte, its second
    byte, where its payload starts (after the mask key, if it has one) and
    where it ends (maybe beyond ``data``); None while its header is incomplete."""
    left = len(data) - pos
    if left < 2:
        return None
    b1 = data[pos + 1]
    length = b1 & 0x7F
    start = pos + 2
    if length == 126:
        if left < 4:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        start = pos + 4
    elif length == 127:
        if left < 10:
            return None
        length = int.from_bytes(data[pos + 2:pos + 10], "big")
        start = pos + 10
    if b1 & 0x80:
        start += 4
    if start > len(data):
        return None
    return data[pos], b1, start, start + length


class FrameTracker:
    """Where the frames of a byte stream begin and end, without keeping them.

    For a parser that is given the stream (here: the ``websockets`` state
    machine under uvicorn) while another one may take over at a frame
    boundary: :meth:`feed` every byte handed to it, in order. ``at_boundary``
    says whether they ended exactly where a frame ends; ``in_message`` whether
    a fragmented message is still open (its next data frames belong to it).
    """

    __slots__ = ("_head", "_skip", "in_message")

    def __init__(self) -> None:
        self._head = b""  # an incomplete header, kept to finish it
        self._skip = 0  # bytes left of the frame in progress
        self.in_message = False

    @property
    def at_boundary(self) -> bool:
        return not self._skip and not self._head

    def feed(self, data: bytes) -> None:
        """``data`` was handed on: follow its frames."""
        if self._head:
            data, self._head = self._head + data, b""
        pos, size = 0, len(data)
        if self._skip:
            if self._skip >= size:
                self._skip -= size
                return
            pos, self._skip = self._skip, 0
        while pos < size:
            bounds = frame_bounds(data, pos)
            if bounds is None:
                self._head = data[pos:]
                return
            b0, _, _, end = bounds
            opcode = b0 & 0x0F
            if opcode in _DATA:
                self.in_message = not b0 & 0x80
            elif opcode == OP_CONT and b0 & 0x80:
                self.in_message = False
            if end > size:
                self._skip = end - size
                return
            pos = end
