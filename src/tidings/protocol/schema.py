"""A machine-readable description of the native protocol (SPEC 4 and 6.1), sans-I/O.

:data:`FRAMES` describes every frame of ``/ws`` once, as JSON Schema. Client
frames are derived from the command dataclasses that ``decode_command``
returns (the members of :data:`tidings.protocol.native.Command`: field names,
annotations and defaults), plus the wire rules the decoder enforces on top of
them; server frames, which the ``encode_*`` functions build as plain objects,
come from a table kept here. :func:`asyncapi` and :func:`typescript` both
render that one description, so the two can never disagree.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

from tidings._version import __version__
from tidings.protocol import native
from tidings.protocol.codes import ErrorCode

__all__ = ["FRAMES", "SHARED", "Field", "Frame", "asyncapi", "schema_of", "ts_declare", "ts_type",
           "typescript"]

Schema = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Field:
    """One member of a frame: its JSON Schema and whether it must be present."""

    name: str
    schema: Schema
    required: bool = True


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame type of the protocol."""

    type: str
    direction: Literal["client", "server"]
    summary: str
    fields: tuple[Field, ...]
    model: builtins.type | None = None  # the dataclass decode_command returns for it

    @property
    def name(self) -> str:
        return _pascal(self.type) + "Frame"

    def schema(self) -> Schema:
        """The frame's JSON Schema: an object whose ``type`` is this frame's type."""
        props: Schema = {"type": {"type": "string", "const": self.type}}
        props.update((f.name, f.schema) for f in self.fields)
        required = ["type", *(f.name for f in self.fields if f.required)]
        return {"type": "object", "description": self.summary, "properties": props,
                "required": required}


def _pascal(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _doc(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description}


STRING: Final[Schema] = {"type": "string"}
INTEGER: Final[Schema] = {"type": "integer"}
BOOLEAN: Final[Schema] = {"type": "boolean"}
NULL: Final[Schema] = {"type": "null"}
ANY: Final[Schema] = {}  # any JSON value


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, NULL]}


def schema_of(annotation: object) -> Schema:
    """The JSON Schema of a Python annotation used by the protocol's dataclasses."""
    if annotation is Any:
        return dict(ANY)
    simple = {str: STRING, int: INTEGER, float: {"type": "number"}, bool: BOOLEAN,
              type(None): NULL}
    if isinstance(annotation, type) and annotation in simple:
        return dict(simple[annotation])
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _ref(annotation.__name__)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        return {"anyOf": [schema_of(arg) for arg in args]}
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return {"type": "array", "items": schema_of(args[0])}
    if origin is dict and args[:1] == (str,):
        return {"type": "object", "additionalProperties": schema_of(args[1])}
    raise TypeError(f"no JSON Schema for annotation {annotation!r}")


# --- client frames: the command dataclasses, plus what the decoder checks ----------------

_CHANNEL: Final[Schema] = {"type": "string", "minLength": 1, "maxLength": 255,
                           "description": "a channel name (1-255 characters by default)"}
_PATTERN: Final[Schema] = {**_CHANNEL, "description": "a channel or an MQTT-style pattern "
                           "(`+` one level, `#` the rest)"}
_NAME: Final[Schema] = {"type": "string", "minLength": 1}

_SUMMARIES: Final[dict[str, str]] = {
    "subscribe": "Follow a channel or a pattern; `recover` replays what was missed.",
    "unsubscribe": "Stop following a channel or pattern.",
    "publish": "Publish `data` to a channel; the reply carries its offset and epoch.",
    "send": "Send `data` directly to one or more connections.",
    "presence": "Ask who is in a channel.",
    "presence_stats": "Ask how many clients and users are in a channel.",
    "history": "Read a channel's kept publications after `since`.",
    "pull": "Become a consumer of a work queue; items then come as `item` frames.",
    "ack": "Acknowledge a work-queue item.",
    "nack": "Give a work-queue item back, to be redelivered (or dropped).",
    "ping": "Ask for a `pong`.",
    "connect": "Authenticate with a token (first frame, when auth is on).",
    "refresh": "Replace the connection's token before it expires (same user).",
}

# Where the wire accepts another type than the dataclass holds (replaces the derived schema).
_WIRE_TYPES: Final[dict[tuple[str, str], Schema]] = {
    ("send", "to"): {"anyOf": [_NAME, {"type": "array", "items": _NAME, "minItems": 1}],
                     "description": "a conn_id or a non-empty list of them"},
}
# Constraints the decoder enforces on top of the annotation (merged into the schema).
_CONSTRAINTS: Final[dict[tuple[str, str], Schema]] = {
    ("subscribe", "channel"): _PATTERN,
    ("subscribe", "recover"): {"description": "the last position seen, to recover from"},
    ("subscribe", "join_leave"): {"description": "also receive `join`/`leave` frames"},
    ("unsubscribe", "channel"): _PATTERN,
    ("publish", "channel"): _CHANNEL,
    ("publish", "data"): {"description": "any JSON value"},
    ("send", "data"): {"description": "any JSON value"},
    ("presence", "channel"): _CHANNEL,
    ("presence_stats", "channel"): _CHANNEL,
    ("history", "channel"): _CHANNEL,
    ("history", "since"): {"description": "return publications after this position"},
    ("history", "limit"): {"minimum": 0, "maximum": 1_000_000},
    ("pull", "queue"): _NAME,
    ("pull", "max"): {"minimum": 1, "maximum": 10_000,
                      "description": "items in flight at once for this consumer"},
    ("ack", "queue"): _NAME,
    ("ack", "item"): _NAME,
    ("nack", "queue"): _NAME,
    ("nack", "item"): _NAME,
    ("nack", "delay"): {"minimum": 0, "exclusiveMaximum": 1_000_000,
                        "description": "seconds before it may be redelivered"},
    ("nack", "requeue"): {"description": "false drops the item"},
    ("connect", "token"): _NAME,
    ("refresh", "token"): _NAME,
    ("StreamPos", "offset"): {"minimum": 0},
}
_ID: Final[Schema] = {**schema_of(native.RequestId),
                      "description": "any id; echoed in the answer to this frame"}


def _model_fields(model: type, key: str) -> tuple[Field, ...]:
    hints = typing.get_type_hints(model)
    out: list[Field] = []
    for f in dataclasses.fields(model):
        if f.name == "id":
            out.append(Field("id", dict(_ID), required=False))
            continue
        schema = _WIRE_TYPES.get((key, f.name)) or schema_of(hints[f.name])
        schema = {**schema, **_CONSTRAINTS.get((key, f.name), {})}
        has_default = (f.default is not dataclasses.MISSING
                       or f.default_factory is not dataclasses.MISSING)
        if f.default is not dataclasses.MISSING and f.default is not None:
            schema["default"] = f.default
        out.append(Field(f.name, schema, required=not has_default))
    return tuple(out)


def _client_frames() -> list[Frame]:
    frames = []
    for model in typing.get_args(native.Command):
        kind = _snake(model.__name__)
        frames.append(Frame(kind, "client", _SUMMARIES.get(kind, ""),
                            _model_fields(model, kind), model))
    return frames


# --- server frames: what the encode_* functions of protocol/native.py build ---------------

_PUBLICATION_FIELDS: Final = (
    Field("channel", _doc(STRING, "the channel it was published to")),
    Field("data", _doc(ANY, 'any JSON value; binary data arrives as {"b64": "..."}')),
    Field("offset", _doc(INTEGER, "position in the channel's stream, +1 per publication")),
    Field("epoch", _doc(STRING, "changes when the channel's history is lost or reset")),
    Field("ts", _doc(INTEGER, "publication time, milliseconds since the Unix epoch")),
    Field("sender", _doc(STRING, "conn_id of the publisher (absent for the HTTP API)"),
          required=False),
)
_PUBLICATIONS: Final[Schema] = {"type": "array", "items": _ref("Publication")}


def _server(kind: str, summary: str, *fields: Field) -> Frame:
    return Frame(kind, "server", summary, fields)


def _server_frames() -> list[Frame]:
    echoed = Field("id", _doc(schema_of(native.RequestId),
                              "the id of the frame answered (null if it had none)"))
    member = Field("member", _ref("Member"))
    return [
        _server("welcome", "The first frame of every connection.",
                Field("conn_id", STRING), Field("node", _doc(STRING, "the serving node")),
                Field("version", _doc(STRING, "the server's version")),
                Field("user", _doc(STRING, "the authenticated user"), required=False)),
        _server("reply", "The success answer to a client frame (see ReplyResults).", echoed,
                Field("result", {"type": "object", "description": "by the frame answered"})),
        _server("error", "The failure answer to a frame; the connection stays open.", echoed,
                Field("code", _ref("ErrorCode")), Field("message", STRING)),
        _server("publication", "A publication of a followed channel.", *_PUBLICATION_FIELDS),
        _server("message", "A direct message (`send`).",
                Field("from", _doc(STRING, 'the sender\'s conn_id, or "server"')),
                Field("data", _doc(ANY, "any JSON value"))),
        _server("join", "A member joined a followed channel (`join_leave`).",
                Field("channel", STRING), member),
        _server("leave", "A member left a followed channel (`join_leave`).",
                Field("channel", STRING), member),
        _server("item", "A work-queue item for this consumer; answer with `ack` or `nack`.",
                Field("queue", STRING), Field("item", _doc(STRING, "the item's id")),
                Field("data", ANY),
                Field("attempt", _doc(INTEGER, "1 for the first delivery"))),
        _server("lagged", "This slow client lost publications (overflow policy `drop`).",
                Field("dropped", _doc(INTEGER, "publications dropped since the last `lagged`"))),
        _server("pong", "The answer to `ping`.", echoed),
    ]


FRAMES: Final[tuple[Frame, ...]] = (*_client_frames(), *_server_frames())


def _object(description: str, *fields: Field) -> Schema:
    return {"type": "object", "description": description,
            "properties": {f.name: f.schema for f in fields},
            "required": [f.name for f in fields if f.required]}


def _shared() -> dict[str, Schema]:
    pos = native.StreamPos
    user = Field("user", _doc(_nullable(STRING), "null for anonymous connections"))
    position = (
        Field("publications", _PUBLICATIONS),
        Field("offset", _doc(INTEGER, "the channel's current offset")),
        Field("epoch", _doc(STRING, "the channel's current epoch")),
    )
    gap = "false: the position asked for is out of the kept window or of another epoch"
    out: dict[str, Schema] = {
        "ErrorCode": {"type": "string", "enum": [code.value for code in ErrorCode],
                      "description": "Codes of `error` frames."},
        pos.__name__: _object("A position in a channel's stream.",
                              *_model_fields(pos, pos.__name__)),
        "Member": _object("A connection present in a channel.", Field("conn_id", STRING),
                          user, Field("info", ANY, required=False)),
        "Publication": _object("A publication as kept in history.", *_PUBLICATION_FIELDS),
        "SubscribeResult": _object(
            "The result of `subscribe`; recovered publications come before any live one.",
            Field("recovered", _doc(BOOLEAN, "true when `recover` was given and every "
                                             "publication since it is in `publications`")),
            *position),
        "HistoryResult": _object("The result of `history`.", *position,
                                 Field("recovered", _doc(BOOLEAN, gap))),
    }
    out.update({
        "PublishResult": _object("The result of `publish`.", Field("offset", INTEGER),
                                 Field("epoch", STRING)),
        "SendResult": _object("The result of `send`.",
                              Field("sent", _doc(INTEGER, "connections reached"))),
        "PresenceResult": _object("The result of `presence`.", Field(
            "presence", {"type": "object", "additionalProperties": _ref("Member"),
                         "description": "members by conn_id"})),
        "PresenceStatsResult": _object("The result of `presence_stats`.",
                                       Field("num_clients", INTEGER),
                                       Field("num_users", INTEGER)),
        "PullResult": _object("The result of `pull`.", Field("queue", STRING),
                              Field("max", INTEGER)),
        "ConnectResult": _object("The result of `connect`.", Field("conn_id", STRING), user),
        "RefreshResult": _object(
            "The result of `refresh`.", Field("user", STRING),
            Field("expires", _doc(_nullable({"type": "number"}),
                                  "Unix time the new token expires (null: never)"))),
        "EmptyResult": _object("The result of `unsubscribe`, `ack` and `nack`."),
    })
    return out


SHARED: Final[dict[str, Schema]] = _shared()
"""Schemas the frames refer to (``#/components/schemas/<name>``)."""

# The result schema of each client frame's ``reply`` (``ping`` is answered by ``pong``).
_RESULT_OF: Final[dict[str, str]] = {
    "subscribe": "SubscribeResult", "unsubscribe": "EmptyResult", "publish": "PublishResult",
    "send": "SendResult", "presence": "PresenceResult",
    "presence_stats": "PresenceStatsResult", "history": "HistoryResult",
    "pull": "PullResult", "ack": "EmptyResult", "nack": "EmptyResult",
    "connect": "ConnectResult", "refresh": "RefreshResult",
}


# --- AsyncAPI -------------------------------------------------------------------------------


def asyncapi() -> dict[str, Any]:
    """An AsyncAPI 3.0.0 document of ``/ws``, from the server's point of view."""
    chan = "#/channels/native"
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    schemas: dict[str, Schema] = dict(SHARED)
    for frame in FRAMES:
        schemas[frame.name] = frame.schema()
        messages[frame.type] = {
            "name": frame.type, "title": frame.name, "summary": frame.summary,
            "contentType": "application/json", "payload": _ref(frame.name),
        }
        msg_ref = {"$ref": f"{chan}/messages/{frame.type}"}
        if frame.direction == "client":
            answers = ["pong" if frame.type == "ping" else "reply", "error"]
            operations[f"receive_{frame.type}"] = {
                "action": "receive", "channel": {"$ref": chan},
                "summary": frame.summary, "messages": [msg_ref],
                "reply": {"channel": {"$ref": chan},
                          "messages": [{"$ref": f"{chan}/messages/{a}"} for a in answers]},
            }
        else:
            operations[f"send_{frame.type}"] = {
                "action": "send", "channel": {"$ref": chan},
                "summary": frame.summary, "messages": [msg_ref],
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "tidings native protocol",
            "version": __version__,
            "description": (
                "JSON text frames, one object each, on the `/ws` websocket of a tidings "
                "server (SPEC 6.1). Operations are the server's: it receives client "
                "frames and sends server frames. Every client frame may carry an `id`, "
                "echoed in its `reply`, `error` or `pong`."
            ),
        },
        "servers": {"local": {"host": "127.0.0.1:8000", "protocol": "ws",
                              "description": "`tidings serve` with its defaults"}},
        "defaultContentType": "application/json",
        "channels": {"native": {"address": "/ws", "title": "native protocol",
                                "messages": {k: {"$ref": f"#/components/messages/{k}"}
                                             for k in messages}}},
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


# --- TypeScript -----------------------------------------------------------------------------


def ts_type(schema: Schema, indent: str = "") -> str:
    """A TypeScript type for a JSON Schema of the subset this module produces."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(ts_type(s, indent) for s in schema["anyOf"])
    kind = schema.get("type")
    if kind == "array":
        item = ts_type(schema["items"], indent)
        return f"({item})[]" if " " in item else f"{item}[]"
    if kind == "object":
        if "properties" in schema:
            return _ts_body(schema, indent)
        extra = schema.get("additionalProperties")
        return f"Record<string, {ts_type(extra, indent) if extra else 'unknown'}>"
    names = {"string": "string", "integer": "number", "number": "number",
             "boolean": "boolean", "null": "null"}
    return names.get(str(kind), "unknown")


def _ts_comment(schema: Schema, indent: str) -> list[str]:
    text = schema.get("description", "")
    if "default" in schema:
        text = f"{text} (default: {json.dumps(schema['default'])})".strip()
    return [f"{indent}/** {text} */"] if text else []


def _ts_body(schema: Schema, indent: str) -> str:
    inner = indent + "  "
    required = set(schema.get("required", ()))
    lines = ["{"]
    for name, prop in schema["properties"].items():
        key = name if re.fullmatch(r"[A-Za-z_$][\w$]*", name) else json.dumps(name)
        optional = "" if name in required else "?"
        lines += _ts_comment(prop, inner)
        lines.append(f"{inner}{key}{optional}: {ts_type(prop, inner)};")
    lines.append(indent + "}")
    return "\n".join(lines) if len(lines) > 2 else "{}"


def ts_declare(name: str, schema: Schema) -> str:
    lines = _ts_comment(schema, "")
    if schema.get("type") == "object" and "properties" in schema:
        lines.append(f"export interface {name} {_ts_body(schema, '')}")
    else:
        lines.append(f"export type {name} = {ts_type(schema)};")
    return "\n".join(lines)


def _union(name: str, members: Iterable[str]) -> str:
    return f"export type {name} =\n" + "\n".join(f"  | {m}" for m in members) + ";"


def typescript() -> str:
    """TypeScript declarations (``.d.ts``) of every frame of ``/ws``."""
    parts = [
        f"// TypeScript types of the tidings native protocol (/ws), tidings {__version__}.\n"
        "// Generated by `tidings typescript`; do not edit.",
    ]
    parts += [ts_declare(name, schema) for name, schema in SHARED.items()]
    parts += [ts_declare(frame.name, frame.schema()) for frame in FRAMES]
    client = [f.name for f in FRAMES if f.direction == "client"]
    server = [f.name for f in FRAMES if f.direction == "server"]
    parts.append(_union("ClientFrame", client))
    parts.append(_union("ServerFrame", server))
    results = "\n".join(f"  {kind}: {name};" for kind, name in _RESULT_OF.items())
    parts.append("/** The `result` of a `reply`, by the type of the frame answered. */\n"
                 f"export interface ReplyResults {{\n{results}\n}}")
    return "\n\n".join(parts) + "\n"
