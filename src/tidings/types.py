"""Value types shared by the hub, the brokers and the clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidings.protocol.native import StreamPos, b64

__all__ = ["HistoryPage", "Member", "Publication", "StreamPos"]


class Publication:
    """One message of a channel at a position of its stream: plain data.

    ``text`` is ``data`` as the publisher's JSON text when it came as text (a
    raw producer's frame): codecs splice it instead of encoding ``data`` again.
    ``prepared`` holds the encodings the codecs of :mod:`tidings.protocol.codec`
    made of it, one slot each, so every subscriber of a protocol shares one.
    Binary data (from ``/ws/pub`` binary frames) is kept as ``bytes``; JSON
    protocols show it as ``{"b64": "..."}``.
    """

    __slots__ = ("channel", "data", "epoch", "offset", "prepared", "sender", "text", "ts")

    def __init__(
        self,
        channel: str,
        data: Any,
        offset: int,
        epoch: str,
        sender: str | None = None,
        ts: int = 0,
        text: str | None = None,
    ) -> None:
        self.channel = channel
        self.data = data
        self.offset = offset
        self.epoch = epoch
        self.sender = sender
        self.ts = ts
        self.text = text
        self.prepared: list[str | bytes | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = self.data
        if isinstance(data, bytes):
            data = b64(data)
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
