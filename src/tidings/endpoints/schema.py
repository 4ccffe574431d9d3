"""The documents of a hub: the wire protocol's AsyncAPI and TypeScript, plus the
app's own typed channels (``hub.channel``) beside them.

Each declaration becomes an AsyncAPI channel whose address is the pattern and
whose publications carry the type's JSON Schema, and a TypeScript type plus an
entry of ``ChannelTypes`` (pattern -> data type), the map the JavaScript client
types its subscriptions by (``new Client<ChannelTypes>(...)``). Served at
``/asyncapi.json`` (and rendered at ``/asyncapi``) by the hub's router, printed
by ``tidings asyncapi|typescript --app module:hub``.
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

__all__ = ["app_asyncapi", "app_channels", "app_typescript", "asyncapi_endpoint",
           "docs_endpoint", "type_name"]

Schema = dict[str, Any]


def type_name(type_: Any, index: int) -> str:
    """A class's own name; ``Channel<n>Data`` for ``list[float]`` and the like."""
    if isinstance(type_, JsonSchema):
        name = type_.title
    else:
        name = getattr(type_, "__name__", "") if get_origin(type_) is None else ""
    return name if re.fullmatch(r"[A-Za-z_]\w*", name) else f"Channel{index}Data"


def app_channels(hub: HubCore) -> tuple[list[tuple[str, str]], dict[str, Schema]]:
    """``[(pattern, type name)]`` of the hub's typed channels and the JSON
    Schemas of their types (nested models included), by name."""
    channels: list[tuple[str, str]] = []
    schemas: dict[str, Schema] = {}
    declared = hub.channel_types.json_schemas("#/components/schemas/{model}")
    for index, (pattern, type_, schema) in enumerate(declared, 1):
        name = type_name(type_, index)
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas[def_name] = definition
        schemas[name] = schema
        channels.append((pattern, name))
    return channels, schemas


def app_asyncapi(hub: HubCore | None = None) -> dict[str, Any]:
    """The AsyncAPI 3 document of ``/ws``, with ``hub``'s typed channels."""
    doc = asyncapi()
    if hub is not None:
        channels, schemas = app_channels(hub)
        doc["components"]["schemas"].update(schemas)
        for index, (pattern, name) in enumerate(channels, 1):
            key = f"app{index}"
            message = {"name": f"{key}_publication", "title": f"publication on {pattern}",
                       "contentType": "application/json",
                       "payload": {"$ref": f"#/components/schemas/{name}"}}
            doc["components"]["messages"][f"{key}_publication"] = message
            doc["channels"][key] = {
                "address": pattern,
                "title": f"{pattern} ({name})",
                "description": "The `data` of publications on channels matching this "
                               "pattern (MQTT wildcards), validated by the server.",
                "messages": {"publication": {
                    "$ref": f"#/components/messages/{key}_publication"}},
            }
            doc["operations"][f"send_{key}"] = {
                "action": "send", "channel": {"$ref": f"#/channels/{key}"},
                "summary": f"Publications on {pattern}",
                "messages": [{"$ref": f"#/channels/{key}/messages/publication"}],
            }
    return doc


def app_typescript(hub: HubCore | None = None) -> str:
    """TypeScript declarations of ``/ws``, with ``hub``'s typed channels."""
    out = typescript()
    if hub is not None:
        channels, schemas = app_channels(hub)
        parts = ["// The app's typed channels (hub.channel), from their JSON Schemas."]
        parts += [ts_declare(name, schema) for name, schema in schemas.items()]
        entries = "\n".join(f"  {json.dumps(pattern)}: {name};" for pattern, name in channels)
        parts.append("/** Channel pattern -> the data its publications carry. */\n"
                     f"export interface ChannelTypes {{\n{entries}\n}}")
        out += "\n" + "\n\n".join(parts) + "\n"
    return out


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
