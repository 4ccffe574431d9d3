"""The wire format of the brokers without stream positions (``amqp://``,
``mqtt://``), sans I/O so it can be tested alone.

Data is ``j`` + JSON text or ``b`` + raw bytes (as on Redis). A message is one of:

- ``P<ts>\\x1f<sender length>\\x1f<channel length>\\x1f<sender><channel><data>``:
  a publication (no offset, no epoch: these brokers do not assign positions);
- ``E<channel length>\\x1f<channel><frame>``: a join/leave event;
- ``N<payload>``: a node message (direct send, user-wide orders).

Lengths are of the UTF-8 bytes, so a channel or sender may hold any character
(a channel may hold 0x1f; only NUL is refused by the name rules).
"""

from __future__ import annotations

from typing import Any

import orjson

from tidings.types import Publication

__all__ = ["SEP", "decode_data", "encode_data", "encode_event", "encode_publication",
           "parse_event", "parse_publication"]

SEP = b"\x1f"


def encode_data(data: Any) -> bytes:
    if isinstance(data, bytes):
        return b"b" + data
    return b"j" + orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)


def decode_data(raw: bytes) -> Any:
    if raw[:1] == b"b":
        return raw[1:]
    return orjson.loads(raw[1:])


def encode_publication(channel: str, data: Any, text: str | None, sender: str | None,
                       ts: int) -> bytes:
    sender_b = (sender or "").encode()
    channel_b = channel.encode()
    payload = encode_data(data) if text is None else b"j" + text.encode()
    return b"P%d\x1f%d\x1f%d\x1f%b%b%b" % (ts, len(sender_b), len(channel_b), sender_b,
                                           channel_b, payload)


def parse_publication(body: bytes) -> Publication:
    """A ``P`` message as a publication at offset 0, epoch "" (position unknown)."""
    ts_end = body.index(SEP)
    sender_end = body.index(SEP, ts_end + 1)
    channel_end = body.index(SEP, sender_end + 1)
    start = channel_end + 1
    sender_len = int(body[ts_end + 1:sender_end])
    channel_len = int(body[sender_end + 1:channel_end])
    sender = body[start:start + sender_len].decode()
    channel = body[start + sender_len:start + sender_len + channel_len].decode()
    payload = body[start + sender_len + channel_len:]
    text = payload[1:].decode() if payload[:1] == b"j" else None
    return Publication(channel, decode_data(payload), 0, "", sender or None,
                       int(body[1:ts_end]), text=text)


def encode_event(channel: str, frame: str) -> bytes:
    channel_b = channel.encode()
    return b"E%d\x1f%b%b" % (len(channel_b), channel_b, frame.encode())


def parse_event(body: bytes) -> tuple[str, str]:
    """(channel, frame) of an ``E`` message."""
    end = body.index(SEP)
    start = end + 1
    n = int(body[1:end])
    return body[start:start + n].decode(), body[start + n:].decode()
