"""The documents of a hub: the wire protocol's AsyncAPI and TypeScript, plus the
app's own types beside them: typed channels (``hub.channel``), typed work
queues (``hub.queue_type``) and the type of direct messages
(``hub.message_type``).

Each channel declaration becomes an AsyncAPI channel whose address is the
pattern and whose publications carry the type's JSON Schema, and a TypeScript
type plus an entry of ``ChannelTypes`` (pattern -> data type), the map the
JavaScript client types its subscriptions by (``new Client<ChannelTypes>(...)``).
A queue declaration becomes an AsyncAPI channel of the ``item`` frames of the
queues it names and an entry of ``QueueTypes`` (pattern -> item data, for
``Item<QueueTypes["jobs/+"]>``); the message type an AsyncAPI channel of the
``message`` frames and ``MessageData`` (for ``Message<MessageData>``; ``unknown``
when undeclared). Served at ``/asyncapi.json`` (and rendered at ``/asyncapi``)
by the hub's router, printed by ``tidings asyncapi|typescript --app module:hub``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, get_origin

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from tidings.core.channels import JsonSchema
from tidings.protocol.schema import asyncapi, ts_declare, typescript

if TYPE_CHECKING:
    from tidings.core.hub import HubCore

__all__ = ["app_asyncapi", "app_types", "app_typescript", "asyncapi_endpoint",
           "docs_endpoint", "type_name"]

Schema = dict[str, Any]


_REFS = "#/components/schemas/{model}"


def type_name(type_: Any, index: int, fallback: str = "Channel{index}Data") -> str:
    """A class's own name; ``Channel<n>Data`` (``fallback``) for ``list[float]``
    and the like."""
    if isinstance(type_, JsonSchema):
        name = type_.title
    else:
        name = getattr(type_, "__name__", "") if get_origin(type_) is None else ""
    return name if re.fullmatch(r"[A-Za-z_]\w*", name) else fallback.format(index=index)


def _named(declared: list[tuple[str, Any, Schema]], fallback: str,
           schemas: dict[str, Schema]) -> list[tuple[str, str]]:
    """``[(pattern, type name)]`` of declarations; their schemas (nested models
    too) added to ``schemas`` by name."""
    named = []
    for index, (pattern, type_, schema) in enumerate(declared, 1):
        name = type_name(type_, index, fallback)
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas[def_name] = definition
        schemas[name] = schema
        named.append((pattern, name))
    return named


def app_types(hub: HubCore) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str | None,
                                     dict[str, Schema]]:
    """The hub's typed channels and typed queues (``[(pattern, type name)]``
    each), the type name of its direct messages (None: undeclared) and every
    JSON Schema they use, by name."""
    schemas: dict[str, Schema] = {}
    channels = _named(hub.channel_types.json_schemas(_REFS), "Channel{index}Data", schemas)
    queues = _named(hub.queues.types.json_schemas(_REFS), "Queue{index}Item", schemas)
    message: str | None = None
    checker, declared = hub.messenger.message_type, hub.messenger.message_decl
    if checker is not None:
        (_, message), = _named([("", declared, checker.json_schema(_REFS))], "MessageData",
                               schemas)
    return channels, queues, message, schemas


def app_asyncapi(hub: HubCore | None = None) -> dict[str, Any]:
    """The AsyncAPI 3 document of ``/ws``, with ``hub``'s typed channels, typed
    queues and message type."""
    doc = asyncapi()
    if hub is None:
        return doc
    channels, queues, message, schemas = app_types(hub)
    doc["components"]["schemas"].update(schemas)
    for index, (pattern, name) in enumerate(channels, 1):
        _typed_channel(doc, f"app{index}", "publication", pattern, name,
                       f"{pattern} ({name})", f"Publications on {pattern}",
                       "The `data` of publications on channels matching this pattern "
                       "(MQTT wildcards), validated by the server.")
    for index, (pattern, name) in enumerate(queues, 1):
        _typed_channel(doc, f"queue{index}", "item", pattern, name,
                       f"queue {pattern} ({name})", f"Items of the queues {pattern}",
                       "The `data` of `item` frames of the work queues whose names match "
                       "this pattern (MQTT wildcards), validated at every push.")
    if message is not None:
        _typed_channel(doc, "messages", "message", None, message, f"direct messages ({message})",
                       "Direct messages", "The `data` of `message` frames (`send`, "
                       "`send_user`, `broadcast`, a native `send`), validated by the server.")
    return doc


def _typed_channel(doc: dict[str, Any], key: str, frame: str, address: str | None,
                   name: str, title: str, summary: str, description: str) -> None:
    """One AsyncAPI channel (with its message and operation) of an app type."""
    message = {"name": f"{key}_{frame}", "title": f"{frame}: {title}",
               "contentType": "application/json",
               "payload": {"$ref": f"#/components/schemas/{name}"}}
    doc["components"]["messages"][f"{key}_{frame}"] = message
    doc["channels"][key] = {
        "address": address, "title": title, "description": description,
        "messages": {frame: {"$ref": f"#/components/messages/{key}_{frame}"}},
    }
    doc["operations"][f"send_{key}"] = {
        "action": "send", "channel": {"$ref": f"#/channels/{key}"}, "summary": summary,
        "messages": [{"$ref": f"#/channels/{key}/messages/{frame}"}],
    }


def app_typescript(hub: HubCore | None = None) -> str:
    """TypeScript declarations of ``/ws``, with ``hub``'s typed channels, typed
    queues and message type."""
    out = typescript()
    if hub is None:
        return out
    channels, queues, message, schemas = app_types(hub)
    parts = ["// The app's types (hub.channel, hub.queue_type, hub.message_type), from "
             "their JSON Schemas."]
    parts += [ts_declare(name, schema) for name, schema in schemas.items()]
    parts.append(_ts_map("ChannelTypes", "Channel pattern -> the data its publications carry.",
                         channels))
    parts.append(_ts_map("QueueTypes", "Queue name pattern -> the data of its items "
                         "(`Item<QueueTypes[\"jobs/+\"]>`).", queues))
    parts.append("/** What direct messages carry (`Message<MessageData>`). */\n"
                 f"export type MessageData = {message or 'unknown'};")
    return out + "\n" + "\n\n".join(parts) + "\n"


def _ts_map(name: str, doc: str, entries: list[tuple[str, str]]) -> str:
    body = "\n".join(f"  {json.dumps(pattern)}: {type_};" for pattern, type_ in entries)
    return f"/** {doc} */\nexport interface {name} {{\n{body}\n}}"


Endpoint = Callable[[Request], Awaitable[Response]]


def asyncapi_endpoint(hub: HubCore) -> Endpoint:
    """``GET /asyncapi.json``: the document, built at each request (channels may
    be declared after the router was made)."""
    async def document(request: Request) -> Response:
        return JSONResponse(app_asyncapi(hub))

    return document


def docs_endpoint() -> Endpoint:
    """``GET /asyncapi``: a page that renders ``asyncapi.json``, with no CDN."""
    page = resources.files("tidings.endpoints").joinpath("docs_page.html").read_text("utf-8")

    async def docs(request: Request) -> Response:
        return HTMLResponse(page)

    return docs
