"""One codec object per protocol: what a connection is sent, in its protocol's frames.

A :class:`~tidings.types.Publication` is plain data. The first connection that
needs it in some encoding asks its codec, which encodes it once and keeps the
result in the publication's ``prepared`` slots (one slot per codec, as
centrifuge keys its prepared data per protocol); every other subscriber of that
protocol takes the same bytes. Each protocol has two codecs: one giving the
payload (a websocket message handed to an ASGI ``send``), one giving the whole
websocket frame (written straight to the socket by tidings' own server).

Sans-I/O like the rest of :mod:`tidings.protocol`: publications are read
through the :class:`Prepared` protocol, so this module knows no hub or broker.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from tidings.protocol import centrifuge
from tidings.protocol.frames import OP_BINARY, TEXT_HEADS, TEXT_HEADS_MAX, encode_frame
from tidings.protocol.native import (
    b64,
    dumps,
    encode_join_leave,
    encode_lagged,
    encode_message,
    encode_publication_json,
)

__all__ = [
    "CENTRIFUGE",
    "CENTRIFUGE_FRAMED",
    "NATIVE",
    "NATIVE_FRAMED",
    "RAW",
    "RAW_FRAMED",
    "SLOTS",
    "CentrifugeCodec",
    "Codec",
    "NativeCodec",
    "Prepared",
    "RawCodec",
]

SLOTS: Final = 6  # prepared encodings a publication can hold: two per protocol


class Prepared(Protocol):
    """What a codec reads of a publication (:class:`tidings.types.Publication`)."""

    channel: str
    data: Any
    offset: int
    epoch: str
    sender: str | None
    ts: int
    text: str | None  # ``data`` as the publisher's JSON text, when it came as text
    prepared: list[str | bytes | None] | None


class Codec:
    """Encodes for one protocol; ``framed`` codecs give whole websocket frames."""

    __slots__ = ("framed", "slot")

    name = ""

    def __init__(self, slot: int, framed: bool) -> None:
        self.slot = slot
        self.framed = framed

    def publication(self, pub: Prepared) -> str | bytes:
        """``pub`` as this protocol sends it, encoded at most once per codec (a
        framed codec frames what its unframed sibling, one slot down, made)."""
        prepared = pub.prepared
        if prepared is None:
            prepared = pub.prepared = [None] * SLOTS
        else:
            done = prepared[self.slot]
            if done is not None:
                return done
        out: str | bytes
        if self.framed:
            sibling = prepared[self.slot - 1]
            out = self._frame(sibling) if sibling is not None else self._framed(pub)
        else:
            out = self._message(self._payload(pub))
        prepared[self.slot] = out
        return out

    def _payload(self, pub: Prepared) -> str | bytes:
        """The encoded publication, framing aside."""
        raise NotImplementedError

    def _framed(self, pub: Prepared) -> bytes:
        """The publication as a whole websocket frame, when no payload is made yet."""
        return self._frame(self._payload(pub))

    def _message(self, payload: str | bytes) -> str | bytes:
        """The payload as an ASGI message: text."""
        return payload.decode() if isinstance(payload, bytes) else payload

    def _frame(self, payload: str | bytes) -> bytes:
        """The payload as a whole websocket text frame."""
        return encode_frame(payload.encode() if isinstance(payload, str) else payload)

    def message(self, sender: str, data: Any) -> str | None:
        """A direct message; None when the protocol has none (raw streams)."""
        return None

    def join_leave(self, kind: str, channel: str, conn_id: str, user: str | None) -> str | None:
        """A join/leave event; None when the protocol has none."""
        return None

    def lagged(self, dropped: int) -> str | None:
        """The notice that ``dropped`` publications were lost (slow consumer)."""
        return None

    def close_code(self, code: int, reason: str) -> int:
        """The close code this protocol's clients act on."""
        return code


class NativeCodec(Codec):
    """The native protocol (SPEC 6.1): publication, message, join/leave, lagged."""

    __slots__ = ()

    name = "native"

    @staticmethod
    def _body(pub: Prepared) -> bytes:
        """The JSON of ``pub``'s data."""
        data = pub.data
        if isinstance(data, bytes):
            return dumps(b64(data))
        text = pub.text
        if text is not None:  # the publisher's JSON text: spliced, not re-encoded
            return text.encode()
        return dumps(data)

    def _payload(self, pub: Prepared) -> str | bytes:
        return encode_publication_json(pub.channel, self._body(pub), pub.offset, pub.epoch,
                                       pub.sender, pub.ts)

    def _framed(self, pub: Prepared) -> bytes:
        # the envelope and its frame header in one step (no str, a publisher's JSON
        # text spliced without a call, the header looked up): the first
        # subscriber of every publication pays for it
        text = pub.text
        body = (text.encode() if text is not None and not isinstance(pub.data, bytes)
                else self._body(pub))
        out = encode_publication_json(pub.channel, body, pub.offset, pub.epoch, pub.sender,
                                      pub.ts)
        n = len(out)
        return TEXT_HEADS[n] + out if n < TEXT_HEADS_MAX else encode_frame(out)

    def message(self, sender: str, data: Any) -> str | None:
        return encode_message(sender, data).decode()

    def join_leave(self, kind: str, channel: str, conn_id: str, user: str | None) -> str | None:
        return encode_join_leave(kind, channel, conn_id, user).decode()

    def lagged(self, dropped: int) -> str | None:
        return encode_lagged(dropped).decode()


class RawCodec(Codec):
    """The raw streams (SPEC 6.2): the data alone; binary data stays binary."""

    __slots__ = ()

    name = "raw"

    def _payload(self, pub: Prepared) -> str | bytes:
        data = pub.data
        if isinstance(data, bytes):
            return data
        return pub.text if pub.text is not None else dumps(data).decode()

    def _message(self, payload: str | bytes) -> str | bytes:
        return payload  # binary data is a binary message

    def _frame(self, payload: str | bytes) -> bytes:
        if isinstance(payload, bytes):
            return encode_frame(payload, OP_BINARY)
        return encode_frame(payload.encode())


class CentrifugeCodec(Codec):
    """The Centrifuge client protocol, JSON format (SPEC 6.3)."""

    __slots__ = ()

    name = "centrifuge"

    def _payload(self, pub: Prepared) -> str | bytes:
        data = pub.data
        if isinstance(data, bytes):  # JSON clients cannot take binary
            data = b64(data)
        return centrifuge.encode_publication_push(pub.channel, data, pub.offset, pub.sender,
                                                  pub.ts)

    def message(self, sender: str, data: Any) -> str | None:
        return centrifuge.encode_message(data).decode()

    def join_leave(self, kind: str, channel: str, conn_id: str, user: str | None) -> str | None:
        return centrifuge.encode_join_leave(kind, channel, conn_id, user).decode()

    def close_code(self, code: int, reason: str) -> int:
        return centrifuge.close_code(code, reason)


NATIVE: Final = NativeCodec(0, framed=False)
NATIVE_FRAMED: Final = NativeCodec(1, framed=True)
RAW: Final = RawCodec(2, framed=False)
RAW_FRAMED: Final = RawCodec(3, framed=True)
CENTRIFUGE: Final = CentrifugeCodec(4, framed=False)
CENTRIFUGE_FRAMED: Final = CentrifugeCodec(5, framed=True)
