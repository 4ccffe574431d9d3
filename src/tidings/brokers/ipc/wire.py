"""The wire format of the ``ipc://`` relay (:mod:`tidings.brokers.ipc.relay`): frames of a
4-byte big-endian length and an orjson array, with bytes carried as base64
and a flag. Shared by the relay and its workers (:mod:`tidings.brokers.ipc.broker`);
the protocol itself is described in :mod:`tidings.brokers.ipc.relay`.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any

import orjson

from tidings.brokers.base import StoredItem
from tidings.types import Publication

__all__ = [
    "MAX_FRAME",
    "READ_CHUNK",
    "FrameReader",
    "FrameWriter",
    "dumps",
    "pack_data",
    "pack_item",
    "pack_publication",
    "pack_publications",
    "payload_bytes",
    "unpack_data",
    "unpack_item",
    "unpack_publication",
    "unpack_publications",
]

MAX_FRAME = 64 << 20  # a frame above this is a protocol error, not a big message
READ_CHUNK = 1 << 18

_OPTS = orjson.OPT_NON_STR_KEYS  # the hub's own encoding accepts int keys too


def dumps(value: Any) -> bytes:
    """Encode one wire message (same orjson options as the native protocol)."""
    return orjson.dumps(value, option=_OPTS)


# -- data and publication encoding ------------------------------------------------------


def pack_data(data: Any) -> tuple[Any, bool]:
    """JSON cannot hold bytes (binary ``/ws/pub`` frames): send them as base64."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return base64.b64encode(data).decode("ascii"), True
    return data, False


def unpack_data(value: Any, b64: bool) -> Any:
    return base64.b64decode(value) if b64 else value


def pack_publication(pub: Publication) -> list[Any]:
    data, b64 = pack_data(pub.data)
    return [pub.channel, data, b64, pub.offset, pub.epoch, pub.sender, pub.ts]


def unpack_publication(row: list[Any], start: int = 0) -> Publication:
    channel, data, b64, offset, epoch, sender, ts = row[start:start + 7]
    return Publication(channel, base64.b64decode(data) if b64 else data, offset, epoch,
                       sender, ts)


def pack_publications(pubs: Sequence[Publication]) -> list[Any]:
    """Consecutive publications of one channel as one ``"P"`` frame:
    ``["P", channel, [[data, b64, offset, epoch, sender, ts], ...]]``."""
    rows = []
    for pub in pubs:
        data, b64 = pack_data(pub.data)
        rows.append([data, b64, pub.offset, pub.epoch, pub.sender, pub.ts])
    return ["P", pubs[0].channel, rows]


def unpack_publications(msg: list[Any]) -> list[Publication]:
    """The publications of a ``"P"`` frame, in order."""
    channel = msg[1]
    return [Publication(channel, base64.b64decode(data) if b64 else data, offset, epoch,
                        sender, ts)
            for data, b64, offset, epoch, sender, ts in msg[2]]


# -- framing ------------------------------------------------------------------------------


class FrameReader:
    """Cut a byte stream into decoded messages (4-byte big-endian length + orjson)."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Any]:
        """Append ``data``; return every complete message. Raises ValueError on garbage."""
        buf = self._buf
        buf += data
        out: list[Any] = []
        pos = 0
        end = len(buf)
        with memoryview(buf) as view:
            while end - pos >= 4:
                size = int.from_bytes(view[pos:pos + 4], "big")
                if size > self.max_frame:
                    raise ValueError(f"frame of {size} bytes is above the {self.max_frame} limit")
                if end - pos - 4 < size:
                    break
                out.append(orjson.loads(view[pos + 4:pos + 4 + size]))
                pos += 4 + size
        if pos:
            del buf[:pos]
        return out


class FrameWriter:
    """Queue frames for one socket and write each loop turn's frames in one call.

    Coalescing matters under load: a burst of publications fanned out to a
    worker costs one syscall instead of one per frame, at the price of one
    loop iteration of latency. ``send`` never blocks; it reports whether the
    peer is within ``limit`` bytes so the owner can decide what to do.
    """

    __slots__ = ("_chunks", "_loop", "_scheduled", "_size", "limit", "transport")

    def __init__(self, transport: asyncio.WriteTransport, limit: int) -> None:
        self.transport = transport
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def send(self, payload: bytes) -> bool:
        """Queue one message; False once more than ``limit`` bytes wait for the peer."""
        self._chunks.append(len(payload).to_bytes(4, "big"))
        self._chunks.append(payload)
        self._size += len(payload) + 4
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        return self.backlog() <= self.limit

    def backlog(self) -> int:
        """Bytes queued here plus bytes the transport has not handed to the kernel."""
        return self._size + self.transport.get_write_buffer_size()

    def flush(self) -> None:
        self._scheduled = False
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if not self.transport.is_closing():
            self.transport.write(data)


def payload_bytes(value: str, b64: bool) -> bytes:
    """A node message's payload from its wire form (base64 when it was bytes)."""
    return base64.b64decode(value) if b64 else value.encode()


def pack_item(item: StoredItem) -> list[Any]:
    """``[id, data, enc, attempts]``: bytes (a raw binary push) travel as base64,
    at the top (enc 1) or as the ``data`` of a dead letter (enc 2)."""
    data, enc = item.data, 0
    if isinstance(data, (bytes, bytearray, memoryview)):
        data, enc = base64.b64encode(data).decode("ascii"), 1
    elif (isinstance(data, dict) and "queue" in data
          and isinstance(data.get("data"), (bytes, bytearray, memoryview))):
        data, enc = {**data, "data": base64.b64encode(data["data"]).decode("ascii")}, 2
    return [item.id, data, enc, item.attempts]


def unpack_item(row: list[Any]) -> StoredItem:
    """The worker side of :func:`pack_item`."""
    item_id, data, enc, attempts = row
    if enc == 1:
        data = base64.b64decode(data)
    elif enc == 2:
        data = {**data, "data": base64.b64decode(data["data"])}
    return StoredItem(item_id, data, attempts)
