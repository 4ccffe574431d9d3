"""The native JSON protocol of ``/ws`` (SPEC 6.1), sans-I/O.

``decode_command`` turns one received frame (text or bytes) into a typed
command or raises :class:`ProtocolError`, and nothing else, whatever the input.
The ``encode_*`` functions build server frames as UTF-8 JSON bytes. Nothing in
here touches a socket or an event loop, so it can be fuzzed and benchmarked
alone.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from tidings.protocol.codes import ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import validate_channel, validate_pattern

__all__ = [
    "Ack",
    "Command",
    "Connect",
    "History",
    "Nack",
    "Ping",
    "Presence",
    "PresenceStats",
    "Publish",
    "Pull",
    "Refresh",
    "RequestId",
    "Send",
    "StreamPos",
    "Subscribe",
    "Unsubscribe",
    "decode_command",
    "decode_publish",
    "dumps",
    "encode_error",
    "encode_item",
    "encode_join_leave",
    "encode_lagged",
    "encode_message",
    "encode_pong",
    "encode_position_reply",
    "encode_publication",
    "encode_publication_json",
    "encode_reply",
    "encode_welcome",
    "loads",
    "peek_id",
]

RequestId = int | str | None

MAX_DEPTH: Final = 64  # JSON nesting accepted in client frames


@dataclass(frozen=True, slots=True)
class StreamPos:
    """A position in a channel's stream: the last offset seen and its epoch."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: RequestId
    channel: str  # a channel or a pattern
    recover: StreamPos | None = None
    join_leave: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: RequestId
    channel: str


@dataclass(frozen=True, slots=True)
class Publish:
    id: RequestId
    channel: str
    data: Any


@dataclass(frozen=True, slots=True)
class Send:
    id: RequestId
    to: tuple[str, ...]
    data: Any


@dataclass(frozen=True, slots=True)
class Presence:
    id: RequestId
    channel: str


@dataclass(frozen=True, slots=True)
class PresenceStats:
    id: RequestId
    channel: str


@dataclass(frozen=True, slots=True)
class History:
    id: RequestId
    channel: str
    since: StreamPos | None = None
    limit: int | None = None
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class Pull:
    id: RequestId
    queue: str
    max: int = 1


@dataclass(frozen=True, slots=True)
class Ack:
    id: RequestId
    queue: str
    item: str


@dataclass(frozen=True, slots=True)
class Nack:
    id: RequestId
    queue: str
    item: str
    delay: float = 0.0
    requeue: bool = True


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId


@dataclass(frozen=True, slots=True)
class Connect:
    id: RequestId
    token: str


@dataclass(frozen=True, slots=True)
class Refresh:
    id: RequestId
    token: str


Command = (
    Subscribe
    | Unsubscribe
    | Publish
    | Send
    | Presence
    | PresenceStats
    | History
    | Pull
    | Ack
    | Nack
    | Ping
    | Connect
    | Refresh
)


def loads(frame: str | bytes) -> Any:
    """Parse JSON, mapping every failure onto ``bad_request``."""
    try:
        return orjson.loads(frame)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame is not valid JSON: {exc}") from None


def b64(data: bytes) -> dict[str, str]:
    """Binary data where JSON needs a value: ``{"b64": "..."}`` (SPEC 6.1)."""
    return {"b64": base64.b64encode(data).decode()}


def dumps(value: Any) -> bytes:
    """Serialize to compact JSON bytes (non-str dict keys are stringified)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _depth_ok(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item)
    return True


def _brackets(frame: str | bytes) -> int:
    if isinstance(frame, str):
        return frame.count("{") + frame.count("[")
    return frame.count(b"{") + frame.count(b"[")


def _req_id(obj: dict[str, Any]) -> RequestId:
    rid = obj.get("id")
    if rid is None or (isinstance(rid, (int, str)) and not isinstance(rid, bool)):
        return rid
    raise ProtocolError(ErrorCode.BAD_REQUEST, "'id' must be an integer or a string")


def _field(obj: dict[str, Any], name: str, rid: RequestId) -> Any:
    if name not in obj:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"missing field '{name}'", rid)
    return obj[name]


def _str_field(obj: dict[str, Any], name: str, rid: RequestId) -> str:
    value = _field(obj, name, rid)
    if not isinstance(value, str) or not value:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' must be a non-empty string", rid)
    return value


def _int_field(
    obj: dict[str, Any], name: str, rid: RequestId, default: int | None, lo: int, hi: int
) -> int | None:
    value = obj.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"'{name}' must be an integer in [{lo}, {hi}]", rid
        )
    return value


def _bool_field(obj: dict[str, Any], name: str, rid: RequestId) -> bool:
    value = obj.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' must be a boolean", rid)
    return value


def _pos_field(obj: dict[str, Any], name: str, rid: RequestId) -> StreamPos | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' must be {{offset, epoch}}", rid)
    offset = value.get("offset")
    epoch = value.get("epoch", "")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}.offset' must be an integer >= 0", rid)
    if not isinstance(epoch, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}.epoch' must be a string", rid)
    return StreamPos(offset, epoch)


def _channel(obj: dict[str, Any], rid: RequestId, max_length: int) -> str:
    try:
        return validate_channel(_field(obj, "channel", rid), max_length)
    except ProtocolError as exc:
        exc.id = rid
        raise


def _pattern(obj: dict[str, Any], rid: RequestId, max_length: int) -> str:
    try:
        return validate_pattern(_field(obj, "channel", rid), max_length)
    except ProtocolError as exc:
        exc.id = rid
        raise


_ID_RE = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,64}")')


def peek_id(frame: str | bytes, window: int = 256) -> RequestId:
    """The request id of a frame we will not parse (too large, rate limited),
    read from its first bytes so the error can still name the request."""
    head = frame[:window]
    raw = head.encode("utf-8", "replace") if isinstance(head, str) else head
    match = _ID_RE.search(raw)
    if match is None:
        return None
    try:
        value = orjson.loads(match.group(1))
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, (int, str)) else None


def decode_publish(
    frame: str | bytes, *, max_depth: int = MAX_DEPTH, max_name: int = 255
) -> tuple[RequestId, str, Any] | None:
    """A well-formed ``publish`` command as ``(id, channel, data)``, without
    building a :class:`Publish` (a producer's hot path); None for any other frame,
    valid or not: :func:`decode_command` says what it is. Never raises."""
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or obj.get("type") != "publish" or "data" not in obj:
        return None
    rid = obj.get("id")
    if rid is not None and type(rid) is not int and type(rid) is not str:
        return None
    channel = obj.get("channel")
    if type(channel) is not str:
        return None
    if _brackets(frame) > max_depth and not _depth_ok(obj, max_depth):
        return None
    try:
        validate_channel(channel, max_name)
    except ProtocolError:
        return None
    return rid, channel, obj["data"]


def decode_command(
    frame: str | bytes, *, max_depth: int = MAX_DEPTH, max_name: int = 255
) -> Command:
    """Decode one client frame. Raises only :class:`ProtocolError`."""
    obj = loads(frame)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    rid = _req_id(obj)
    # nesting needs an opening bracket per level: count them (C speed) before walking
    if _brackets(frame) > max_depth and not _depth_ok(obj, max_depth):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"JSON nested deeper than {max_depth}", rid)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing field 'type'", rid)
    if kind == "publish":
        return Publish(rid, _channel(obj, rid, max_name), _field(obj, "data", rid))
    if kind == "subscribe":
        return Subscribe(
            rid,
            _pattern(obj, rid, max_name),
            _pos_field(obj, "recover", rid),
            _bool_field(obj, "join_leave", rid),
        )
    if kind == "unsubscribe":
        return Unsubscribe(rid, _pattern(obj, rid, max_name))
    if kind == "ping":
        return Ping(rid)
    if kind == "send":
        to = _field(obj, "to", rid)
        targets = (to,) if isinstance(to, str) else to
        if (
            not isinstance(targets, (list, tuple))
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "'to' must be a conn_id or a non-empty list of them", rid
            )
        return Send(rid, tuple(targets), _field(obj, "data", rid))
    if kind == "presence":
        return Presence(rid, _channel(obj, rid, max_name))
    if kind == "presence_stats":
        return PresenceStats(rid, _channel(obj, rid, max_name))
    if kind == "history":
        return History(
            rid,
            _channel(obj, rid, max_name),
            _pos_field(obj, "since", rid),
            _int_field(obj, "limit", rid, None, 0, 1_000_000),
            _bool_field(obj, "reverse", rid),
        )
    if kind == "pull":
        max_ = _int_field(obj, "max", rid, 1, 1, 10_000)
        return Pull(rid, _str_field(obj, "queue", rid), max_ if max_ is not None else 1)
    if kind == "ack":
        return Ack(rid, _str_field(obj, "queue", rid), _str_field(obj, "item", rid))
    if kind == "nack":
        delay = obj.get("delay", 0)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay < 1e6:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'delay' must be seconds >= 0", rid)
        requeue = obj.get("requeue", True)
        if not isinstance(requeue, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'requeue' must be a boolean", rid)
        return Nack(
            rid,
            _str_field(obj, "queue", rid),
            _str_field(obj, "item", rid),
            float(delay),
            requeue,
        )
    if kind == "connect":
        return Connect(rid, _str_field(obj, "token", rid))
    if kind == "refresh":
        return Refresh(rid, _str_field(obj, "token", rid))
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:64]!r}", rid)


# --- server frames -----------------------------------------------------------


def encode_welcome(conn_id: str, node: str, version: str, user: str | None) -> bytes:
    frame: dict[str, Any] = {"type": "welcome", "conn_id": conn_id, "node": node,
                             "version": version}
    if user is not None:
        frame["user"] = user
    return dumps(frame)


def encode_reply(rid: RequestId, result: Any) -> bytes:
    return dumps({"type": "reply", "id": rid, "result": result})


def encode_position_reply(rid: RequestId, offset: int, epoch: str) -> bytes:
    """``encode_reply(rid, {"offset": offset, "epoch": epoch})``, the answer to a
    publish, from a template (the same bytes)."""
    return b'{"type":"reply","id":%s,"result":{"offset":%d,"epoch":%s}}' % (
        b"%d" % rid if type(rid) is int else dumps(rid), offset, _string(epoch))


def encode_error(rid: RequestId, code: ErrorCode | str, message: str) -> bytes:
    return dumps({"type": "error", "id": rid, "code": str(code), "message": message})


# Publication frames are built from a template, not from a dict: the channel's
# head (``{"type":"publication","channel":...,"data":``) and the JSON of an epoch
# or a sender are made once and kept (they repeat: one channel, one epoch, one
# producer), and the data and the numbers are spliced in. The bytes are the
# ones orjson makes of the dict (a unit test compares them).
_CACHE_MAX: Final = 4096
_heads: dict[str, bytes] = {}
_strings: dict[str, bytes] = {}


def _head(channel: str) -> bytes:
    head = _heads.get(channel)
    if head is None:
        if len(_heads) >= _CACHE_MAX:
            _heads.clear()
        head = _heads[channel] = b'{"type":"publication","channel":' + dumps(channel) + b',"data":'
    return head


def _string(value: str) -> bytes:
    """``value`` as a JSON string, kept for the values that repeat (epochs, senders)."""
    out = _strings.get(value)
    if out is None:
        if len(_strings) >= _CACHE_MAX:
            _strings.clear()
        out = _strings[value] = dumps(value)
    return out


def encode_publication(
    channel: str, data: Any, offset: int, epoch: str, sender: str | None, ts: int
) -> bytes:
    return encode_publication_json(channel, dumps(data), offset, epoch, sender, ts)


def encode_publication_json(
    channel: str, data: bytes, offset: int, epoch: str, sender: str | None, ts: int
) -> bytes:
    """:func:`encode_publication` of data that is JSON already (``data``: its
    UTF-8 bytes, spliced in as they are)."""
    head = _heads.get(channel) or _head(channel)  # the caches read inline: a hot path
    epoch_json = _strings.get(epoch) or _string(epoch)
    if sender is None:
        return b'%s%s,"offset":%d,"epoch":%s,"ts":%d}' % (head, data, offset, epoch_json, ts)
    return b'%s%s,"offset":%d,"epoch":%s,"ts":%d,"sender":%s}' % (
        head, data, offset, epoch_json, ts, _strings.get(sender) or _string(sender))


def encode_message(sender: str, data: Any) -> bytes:
    return dumps({"type": "message", "from": sender, "data": data})


def encode_join_leave(kind: str, channel: str, conn_id: str, user: str | None) -> bytes:
    return dumps({"type": kind, "channel": channel, "member": {"conn_id": conn_id, "user": user}})


def encode_item(queue: str, item: str, data: Any, attempt: int) -> bytes:
    return dumps({"type": "item", "queue": queue, "item": item, "data": data,
                  "attempt": attempt})


def encode_lagged(dropped: int) -> bytes:
    return dumps({"type": "lagged", "dropped": dropped})


def encode_pong(rid: RequestId) -> bytes:
    return dumps({"type": "pong", "id": rid})
