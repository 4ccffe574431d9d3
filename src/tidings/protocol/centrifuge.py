"""The Centrifuge client protocol, JSON format (SPEC 6.3), sans-I/O.

This is the protocol of Centrifugo and of the Go library centrifuge (protocol
v2, ``definitions/client.proto`` of centrifugal/protocol), spoken by the
official SDKs at ``/connection/websocket``. A client frame holds one or more
commands, one JSON object per line (``{"id": 1, "subscribe": {...}}``); the
server answers each command that has an ``id`` with a reply carrying the same
``id`` and either a result under the method's name or an ``error``. Replies
without an ``id`` are pushes (``{"push": {"channel": ..., "pub": {...}}}``);
an empty object is a ping, and a client answers a ping with an empty object.

:func:`split_frame` parses a frame into command objects; a frame that is not
line-delimited JSON objects raises :class:`CentrifugeError` without a request
id, which the endpoint answers by closing with 3501 (there is nothing to reply
to). :func:`decode_command` turns one object into a typed command or raises
:class:`CentrifugeError` with the command's id when it has one, so the error
can be replied to. Both raise nothing else, whatever the input. The
``encode_*`` functions build server messages as UTF-8 JSON bytes. Nothing here
touches a socket or an event loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import orjson

from tidings.protocol.codes import CloseCode, ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import validate_channel
from tidings.protocol.native import StreamPos

__all__ = [
    "FLAG_REJECT_UNRECOVERED",
    "PING",
    "CentrifugeError",
    "Command",
    "Connect",
    "Disconnect",
    "History",
    "Ping",
    "Pong",
    "Presence",
    "PresenceStats",
    "Publish",
    "Refresh",
    "ReplyCode",
    "Rpc",
    "SendMessage",
    "SubRefresh",
    "Subscribe",
    "Unsubscribe",
    "close_code",
    "decode_command",
    "decode_frame",
    "encode_error",
    "encode_join_leave",
    "encode_message",
    "encode_publication",
    "encode_publication_push",
    "encode_reply",
    "reply_code",
    "split_frame",
]

MAX_DEPTH: Final = 64
MAX_COMMANDS: Final = 100  # commands in one frame; more is abuse, not batching
MAX_ID: Final = 2**32 - 1  # ids are uint32
MAX_OFFSET: Final = 2**64 - 1  # offsets are uint64
FLAG_REJECT_UNRECOVERED: Final = 2  # SubscribeRequest.flag: error 112 instead of recovered=false
PING: Final = b"{}"  # a server ping, and a client's pong


class ReplyCode(IntEnum):
    """Error codes of replies; the connection stays open."""

    INTERNAL = 100
    UNAUTHORIZED = 101
    UNKNOWN_CHANNEL = 102
    PERMISSION_DENIED = 103
    METHOD_NOT_FOUND = 104
    ALREADY_SUBSCRIBED = 105
    LIMIT_EXCEEDED = 106
    BAD_REQUEST = 107
    NOT_AVAILABLE = 108
    TOKEN_EXPIRED = 109
    EXPIRED = 110
    TOO_MANY_REQUESTS = 111
    UNRECOVERABLE_POSITION = 112


TEMPORARY: Final = frozenset({ReplyCode.INTERNAL, ReplyCode.TOO_MANY_REQUESTS})


class Disconnect(IntEnum):
    """Close codes. SDKs reconnect after 3000-3499 and stop after 3500-3999."""

    CONNECTION_CLOSED = 3000
    SHUTDOWN = 3001
    SERVER_ERROR = 3004
    EXPIRED = 3005
    SLOW = 3008
    WRITE_ERROR = 3009
    INSUFFICIENT_STATE = 3010
    FORCE_RECONNECT = 3011
    NO_PONG = 3012
    TOO_MANY_REQUESTS = 3013
    INVALID_TOKEN = 3500
    BAD_REQUEST = 3501
    STALE = 3502
    FORCE_NO_RECONNECT = 3503
    CONNECTION_LIMIT = 3504
    CHANNEL_LIMIT = 3505
    INAPPROPRIATE_PROTOCOL = 3506
    PERMISSION_DENIED = 3507


class CentrifugeError(ProtocolError):
    """A command (or frame, when ``id`` is None) the protocol refuses.

    ``reply`` is the Centrifuge code; ``code`` the closest native one, so code
    that handles :class:`ProtocolError` in general still sees a sensible value.
    """

    def __init__(self, reply: ReplyCode, message: str, id: int | None = None) -> None:
        super().__init__(_NATIVE.get(reply, ErrorCode.BAD_REQUEST), message, id)
        self.reply = reply

    def __repr__(self) -> str:
        return f"CentrifugeError({int(self.reply)}, {self.message!r}, id={self.id!r})"


_NATIVE: Final = {
    ReplyCode.INTERNAL: ErrorCode.INTERNAL,
    ReplyCode.PERMISSION_DENIED: ErrorCode.FORBIDDEN,
    ReplyCode.METHOD_NOT_FOUND: ErrorCode.UNKNOWN_TYPE,
    ReplyCode.LIMIT_EXCEEDED: ErrorCode.TOO_LARGE,
    ReplyCode.TOO_MANY_REQUESTS: ErrorCode.RATE_LIMITED,
}

_FROM_NATIVE: Final = {
    ErrorCode.BAD_REQUEST: ReplyCode.BAD_REQUEST,
    ErrorCode.UNKNOWN_TYPE: ReplyCode.METHOD_NOT_FOUND,
    ErrorCode.BAD_PATTERN: ReplyCode.BAD_REQUEST,
    ErrorCode.BAD_CHANNEL: ReplyCode.BAD_REQUEST,
    ErrorCode.FORBIDDEN: ReplyCode.PERMISSION_DENIED,
    ErrorCode.NOT_FOUND: ReplyCode.BAD_REQUEST,
    ErrorCode.TOO_LARGE: ReplyCode.LIMIT_EXCEEDED,
    ErrorCode.RATE_LIMITED: ReplyCode.TOO_MANY_REQUESTS,
    ErrorCode.INTERNAL: ReplyCode.INTERNAL,
    ErrorCode.NOT_AVAILABLE: ReplyCode.NOT_AVAILABLE,
}


def reply_code(exc: ProtocolError) -> ReplyCode:
    """The Centrifuge code of any protocol error (native ones are mapped)."""
    if isinstance(exc, CentrifugeError):
        return exc.reply
    return _FROM_NATIVE.get(exc.code, ReplyCode.BAD_REQUEST)


def close_code(code: int, reason: str) -> int:
    """A native close code as the Centrifuge code an SDK acts on: shutdown,
    overflow, token expiry and rate limiting make the SDK reconnect (and
    recover); other codes pass unchanged (below 3000 SDKs reconnect too)."""
    if code == CloseCode.GOING_AWAY:
        return Disconnect.SHUTDOWN
    if code == CloseCode.TRY_AGAIN_LATER:
        return Disconnect.SLOW
    if code == CloseCode.INTERNAL_ERROR:
        return Disconnect.SERVER_ERROR
    if code == CloseCode.POLICY_VIOLATION:
        if reason == "token expired":
            return Disconnect.EXPIRED
        if reason.startswith("rate limit"):
            return Disconnect.TOO_MANY_REQUESTS
    return code


# --- commands ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    id: int
    token: str = ""
    name: str = ""
    version: str = ""


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: int
    channel: str
    recover: StreamPos | None = None  # the last position the client saw, to recover from
    positioned: bool = False
    recoverable: bool = False
    join_leave: bool = False
    flag: int = 0


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: int
    channel: str


@dataclass(frozen=True, slots=True)
class Publish:
    id: int
    channel: str
    data: Any


@dataclass(frozen=True, slots=True)
class Presence:
    id: int
    channel: str


@dataclass(frozen=True, slots=True)
class PresenceStats:
    id: int
    channel: str


@dataclass(frozen=True, slots=True)
class History:
    id: int
    channel: str
    limit: int | None = 0  # 0: the position only; None (sent as -1): everything kept
    since: StreamPos | None = None
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class Ping:
    id: int


@dataclass(frozen=True, slots=True)
class Pong:
    """An empty command: the answer to a server ping. Not replied to."""


@dataclass(frozen=True, slots=True)
class SendMessage:
    """An asynchronous message to the server (no id, no reply)."""

    data: Any


@dataclass(frozen=True, slots=True)
class Rpc:
    id: int
    method: str
    data: Any


@dataclass(frozen=True, slots=True)
class Refresh:
    id: int
    token: str


@dataclass(frozen=True, slots=True)
class SubRefresh:
    id: int
    channel: str
    token: str


Command = (
    Connect | Subscribe | Unsubscribe | Publish | Presence | PresenceStats | History | Ping
    | Pong | SendMessage | Rpc | Refresh | SubRefresh
)

_METHODS: Final = ("connect", "subscribe", "unsubscribe", "publish", "presence",
                   "presence_stats", "history", "ping", "send", "rpc", "refresh", "sub_refresh")


# --- decoding ----------------------------------------------------------------------------


def _depth_ok(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in children)
    return True


def _bad(message: str, rid: int | None = None) -> CentrifugeError:
    return CentrifugeError(ReplyCode.BAD_REQUEST, message, rid)


def split_frame(frame: str | bytes, *, max_depth: int = MAX_DEPTH,
                max_commands: int = MAX_COMMANDS) -> list[dict[str, Any]]:
    """The command objects of a frame (JSON objects separated by newlines)."""
    raw = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame
    lines = [line for line in raw.split(b"\n") if line.strip()]
    if not lines:
        raise _bad("empty frame")
    if len(lines) > max_commands:
        raise CentrifugeError(ReplyCode.LIMIT_EXCEEDED,
                              f"more than {max_commands} commands in one frame")
    out: list[dict[str, Any]] = []
    for line in lines:
        try:
            obj = orjson.loads(line)
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            raise _bad(f"frame is not line-delimited JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise _bad("a command must be a JSON object")
        if (line.count(b"{") + line.count(b"[") > max_depth
                and not _depth_ok(obj, max_depth)):
            raise _bad(f"JSON nested deeper than {max_depth}")
        out.append(obj)
    return out


def _params(obj: dict[str, Any], method: str, rid: int | None) -> dict[str, Any]:
    value = obj[method]
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"'{method}' must be an object", rid)
    return value


def _str(params: dict[str, Any], name: str, rid: int | None, *, required: bool = False) -> str:
    value = params.get(name)
    if value is None:
        if required:
            raise _bad(f"missing field '{name}'", rid)
        return ""
    if not isinstance(value, str):
        raise _bad(f"'{name}' must be a string", rid)
    return value


def _bool(params: dict[str, Any], name: str, rid: int | None) -> bool:
    value = params.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be a boolean", rid)
    return value


_INT_RE: Final = re.compile(r"-?[0-9]{1,20}")


def _int(value: Any, name: str, rid: int | None, lo: int, hi: int) -> int:
    """An integer field; protobuf's JSON mapping writes 64-bit ones as strings."""
    if isinstance(value, str) and _INT_RE.fullmatch(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(f"'{name}' must be an integer in [{lo}, {hi}]", rid)
    return value


def _channel(params: dict[str, Any], rid: int | None, max_name: int) -> str:
    try:
        return validate_channel(_str(params, "channel", rid, required=True), max_name)
    except CentrifugeError:
        raise
    except ProtocolError as exc:
        raise _bad(exc.message, rid) from None


def _position(value: Any, name: str, rid: int | None) -> StreamPos:
    if not isinstance(value, dict):
        raise _bad(f"'{name}' must be {{offset, epoch}}", rid)
    offset = _int(value.get("offset", 0), f"{name}.offset", rid, 0, MAX_OFFSET)
    epoch = value.get("epoch", "")
    if not isinstance(epoch, str):
        raise _bad(f"'{name}.epoch' must be a string", rid)
    return StreamPos(offset, epoch)


def decode_command(obj: dict[str, Any], *, max_name: int = 255) -> Command:
    """One command object (from :func:`split_frame`) as a typed command."""
    raw_id = obj.get("id", 0)
    rid = _int(raw_id, "id", None, 0, MAX_ID) if raw_id is not None else 0
    present = [m for m in _METHODS if m in obj]
    if not present:
        if rid == 0:
            return Pong()
        raise CentrifugeError(ReplyCode.METHOD_NOT_FOUND, "unknown or missing method", rid)
    if len(present) > 1:
        raise _bad("one method per command", rid or None)
    method = present[0]
    params = _params(obj, method, rid or None)
    if method == "send":
        return SendMessage(params.get("data"))
    if rid == 0:
        raise _bad(f"'{method}' needs an 'id'")
    if method == "connect":
        return Connect(rid, _str(params, "token", rid), _str(params, "name", rid)[:16],
                       _str(params, "version", rid)[:64])
    if method == "subscribe":
        channel = _channel(params, rid, max_name)
        recover = None
        if _bool(params, "recover", rid):
            recover = _position(params, "subscribe", rid)
        flag = params.get("flag")
        flag = 0 if flag is None else _int(flag, "flag", rid, 0, 2**63 - 1)
        return Subscribe(rid, channel, recover, _bool(params, "positioned", rid),
                         _bool(params, "recoverable", rid), _bool(params, "join_leave", rid),
                         flag)
    if method == "unsubscribe":
        return Unsubscribe(rid, _channel(params, rid, max_name))
    if method == "publish":
        if "data" not in params:
            raise _bad("missing field 'data'", rid)
        return Publish(rid, _channel(params, rid, max_name), params["data"])
    if method == "presence":
        return Presence(rid, _channel(params, rid, max_name))
    if method == "presence_stats":
        return PresenceStats(rid, _channel(params, rid, max_name))
    if method == "history":
        limit = params.get("limit")
        limit = 0 if limit is None else _int(limit, "limit", rid, -1, 2**31 - 1)
        since = params.get("since")
        return History(rid, _channel(params, rid, max_name), None if limit < 0 else limit,
                       None if since is None else _position(since, "since", rid),
                       _bool(params, "reverse", rid))
    if method == "ping":
        return Ping(rid)
    if method == "rpc":
        return Rpc(rid, _str(params, "method", rid), params.get("data"))
    if method == "refresh":
        return Refresh(rid, _str(params, "token", rid, required=True))
    return SubRefresh(rid, _channel(params, rid, max_name), _str(params, "token", rid))


def decode_frame(frame: str | bytes, *, max_depth: int = MAX_DEPTH,
                 max_name: int = 255) -> list[Command]:
    """Every command of a frame; the first bad one raises."""
    return [decode_command(obj, max_name=max_name)
            for obj in split_frame(frame, max_depth=max_depth)]


# --- server messages ---------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def encode_reply(rid: int, method: str, result: dict[str, Any] | None = None) -> bytes:
    """``{"id": N, "<method>": result}``: a successful reply."""
    return dumps({"id": rid, method: result or {}})


def encode_error(rid: int, code: ReplyCode | int, message: str) -> bytes:
    error: dict[str, Any] = {"code": int(code), "message": message}
    if code in TEMPORARY:
        error["temporary"] = True
    return dumps({"id": rid, "error": error})


def encode_publication(data: Any, offset: int, sender: str | None, ts: int) -> dict[str, Any]:
    """A publication as in subscribe and history results (no channel)."""
    pub: dict[str, Any] = {"data": data}
    if offset:
        pub["offset"] = offset
    if sender is not None:
        pub["info"] = {"client": sender, "user": ""}
    if ts:
        pub["time"] = ts
    return pub


def encode_publication_push(channel: str, data: Any, offset: int, sender: str | None,
                            ts: int) -> bytes:
    """The push of a live publication: encoded once, shared by every subscriber."""
    return dumps({"push": {"channel": channel,
                           "pub": encode_publication(data, offset, sender, ts)}})


def encode_join_leave(kind: str, channel: str, client: str, user: str | None) -> bytes:
    """A ``join`` or ``leave`` push."""
    return dumps({"push": {"channel": channel, kind: {"info": {"client": client,
                                                               "user": user or ""}}}})


def encode_message(data: Any) -> bytes:
    """A ``message`` push: a direct message (``hub.send``, ``send_user``, ``broadcast``)."""
    return dumps({"push": {"message": {"data": data}}})
