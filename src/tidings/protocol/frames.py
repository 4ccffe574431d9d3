"""Server-to-client websocket frames (RFC 6455 section 5.2), sans-I/O.

A frame the server sends is never masked, so the bytes of one message are the
same for every client: a publication's frame is built once and written to
every subscriber's socket as is.
"""

from __future__ import annotations

import struct

__all__ = ["OP_BINARY", "OP_TEXT", "encode_frame"]

OP_TEXT = 0x1
OP_BINARY = 0x2


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One unfragmented, unmasked frame carrying ``payload``."""
    length = len(payload)
    head = 0x80 | opcode  # FIN + opcode
    if length < 126:
        return struct.pack("!BB", head, length) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", head, 126, length) + payload
    return struct.pack("!BBQ", head, 127, length) + payload
