"""What the NATS broker puts in JetStream messages (see :mod:`tidings.brokers.nats`).

A stream message carries one or more publications of one channel at
consecutive offsets: headers ``T-O`` (first offset), ``T-E`` (epoch), ``T-N``
(count, 1 when absent, 0 for an epoch marker), ``T-H`` (``size,ttl_ms``), and
a body of records (sender length, ts ms, data length, sender, data). Data is
``j`` + JSON text or ``b`` + bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson

from tidings.types import Publication

__all__ = [
    "REQUEST_TIMEOUT",
    "SCAN_TIMEOUT",
    "STREAM_NAME_IN_USE",
    "STREAM_NOT_FOUND",
    "WRONG_LAST_SEQUENCE",
    "JetStreamError",
    "Tail",
    "decode_data",
    "encode_data",
    "pack_record",
    "parse_headers",
    "unpack_records",
]

WRONG_LAST_SEQUENCE = 10071
STREAM_NAME_IN_USE = 10058
STREAM_NOT_FOUND = 10059
REQUEST_TIMEOUT = 5.0
SCAN_TIMEOUT = 2.0
_REC = struct.Struct(">HQI")  # sender length, ts ms, data length


class JetStreamError(Exception):
    """An error answer of the JetStream API."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"JetStream: {description} ({code}/{err_code})")
        self.code = code
        self.err_code = err_code


def encode_data(data: Any, text: str | None) -> bytes:
    if text is not None:
        return b"j" + text.encode()
    if isinstance(data, bytes):
        return b"b" + data
    return b"j" + orjson.dumps(data)


def decode_data(raw: bytes) -> tuple[Any, str | None]:
    if raw[:1] == b"b":
        return raw[1:], None
    text = raw[1:].decode()
    return orjson.loads(text), text


def pack_record(sender: str | None, ts: int, payload: bytes) -> bytes:
    s = (sender or "").encode()
    return _REC.pack(len(s), ts, len(payload)) + s + payload


def unpack_records(channel: str, first: int, epoch: str, body: bytes
                   ) -> list[Publication]:
    out: list[Publication] = []
    pos, offset, end = 0, first, len(body)
    size = _REC.size
    while pos < end:
        slen, ts, dlen = _REC.unpack_from(body, pos)
        pos += size
        sender = body[pos:pos + slen].decode() or None
        pos += slen
        data, text = decode_data(body[pos:pos + dlen])
        pos += dlen
        out.append(Publication(channel, data, offset, epoch, sender, ts, text=text))
        offset += 1
    return out


@dataclass(frozen=True, slots=True)
class Tail:
    seq: int
    first: int  # offset of the message's first publication
    count: int  # publications in it (0: an epoch marker)
    epoch: str
    size: int
    ttl_ms: int

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def parse_headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode().split("\r\n")[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            out[key.strip()] = value.strip()
    return out
