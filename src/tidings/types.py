"""Value types shared by the hub, the brokers and the clients."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

from tidings.protocol.centrifuge import encode_publication_push
from tidings.protocol.frames import OP_BINARY, encode_frame
from tidings.protocol.native import StreamPos, dumps, encode_publication

__all__ = ["HistoryPage", "Member", "Publication", "StreamPos"]


class Publication:
    """One message of a channel at a position of its stream.

    Frames are encoded lazily and at most once per process, then shared by every
    subscriber: ``frame`` for native subscribers, ``raw`` for raw-stream ones,
    ``cf_frame`` for Centrifuge-protocol ones.
    Binary data (from ``/ws/pub`` binary frames) is kept as ``bytes``; native
    subscribers see it as ``{"b64": "..."}``.
    """

    __slots__ = ("_cf_frame", "_frame", "_raw", "_ws_cf_frame", "_ws_frame", "_ws_raw",
                 "channel", "data", "epoch", "offset", "sender", "ts")

    def __init__(
        self,
        channel: str,
        data: Any,
        offset: int,
        epoch: str,
        sender: str | None = None,
        ts: int = 0,
        frame: str | None = None,
        raw: str | None = None,
    ) -> None:
        self.channel = channel
        self.data = data
        self.offset = offset
        self.epoch = epoch
        self.sender = sender
        self.ts = ts
        self._frame = frame
        self._raw: str | bytes | None = raw  # given: data's JSON text as published
        self._ws_frame: bytes | None = None
        self._ws_raw: bytes | None = None
        self._cf_frame: str | None = None
        self._ws_cf_frame: bytes | None = None

    def _native(self) -> bytes:
        data = self.data
        if isinstance(data, bytes):
            data = {"b64": base64.b64encode(data).decode()}
        elif isinstance(self._raw, str):  # the publisher's JSON text: spliced, not re-encoded
            data = orjson.Fragment(self._raw)
        return encode_publication(self.channel, data, self.offset, self.epoch, self.sender,
                                  self.ts)

    @property
    def frame(self) -> str:
        """The native ``publication`` frame, encoded once."""
        if self._frame is None:
            self._frame = self._native().decode()
        return self._frame

    @property
    def cf_frame(self) -> str:
        """The Centrifuge protocol's publication push, encoded once."""
        if self._cf_frame is None:
            data = self.data
            if isinstance(data, bytes):  # JSON clients cannot take binary
                data = {"b64": base64.b64encode(data).decode()}
            self._cf_frame = encode_publication_push(
                self.channel, data, self.offset, self.sender, self.ts
            ).decode()
        return self._cf_frame

    @property
    def ws_cf_frame(self) -> bytes:
        """``cf_frame`` as a complete websocket text frame, built once."""
        if self._ws_cf_frame is None:
            self._ws_cf_frame = encode_frame(self.cf_frame.encode())
        return self._ws_cf_frame

    @property
    def raw(self) -> str | bytes:
        """What a raw-stream subscriber gets: the data alone (bytes stay binary)."""
        if self._raw is None:
            self._raw = self.data if isinstance(self.data, bytes) else dumps(self.data).decode()
        return self._raw

    @property
    def ws_frame(self) -> bytes:
        """``frame`` as a complete websocket text frame, built once."""
        if self._ws_frame is None:
            self._ws_frame = encode_frame(self._native() if self._frame is None
                                          else self._frame.encode())
        return self._ws_frame

    @property
    def ws_raw(self) -> bytes:
        """``raw`` as a complete websocket frame (binary data stays binary)."""
        if self._ws_raw is None:
            raw = self.raw
            self._ws_raw = (encode_frame(raw, OP_BINARY) if isinstance(raw, bytes)
                            else encode_frame(raw.encode()))
        return self._ws_raw

    def to_dict(self) -> dict[str, Any]:
        data = self.data
        if isinstance(data, bytes):
            data = {"b64": base64.b64encode(data).decode()}
        out: dict[str, Any] = {"channel": self.channel, "data": data, "offset": self.offset,
                               "epoch": self.epoch, "ts": self.ts}
        if self.sender is not None:
            out["sender"] = self.sender
        return out

    @property
    def position(self) -> StreamPos:
        return StreamPos(self.offset, self.epoch)

    def __repr__(self) -> str:
        return (f"Publication({self.channel!r}, {self.data!r}, offset={self.offset}, "
                f"epoch={self.epoch!r}, sender={self.sender!r})")


@dataclass(frozen=True, slots=True)
class Member:
    """One connection present in a channel."""

    conn_id: str
    user: str | None = None
    info: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"conn_id": self.conn_id, "user": self.user, "info": self.info}


@dataclass(slots=True)
class HistoryPage:
    """Publications from history plus the channel's current position."""

    publications: list[Publication] = field(default_factory=list)
    offset: int = 0
    epoch: str = ""
    recovered: bool = True  # False when ``since`` fell out of the window or the epoch changed
