"""``tidings asyncapi`` and ``tidings typescript`` (SPEC 4): print the protocol's
schemas and, with ``--app module:hub``, the app's own typed channels beside them.

An app's channels are those it declared with ``hub.channel(pattern, type)``:
each becomes an AsyncAPI channel whose address is the pattern and whose
publications carry the type's JSON Schema, and a TypeScript type plus an entry
of ``ChannelTypes`` (pattern -> data type), the map the JavaScript client types
its subscriptions by (``new Client<ChannelTypes>(...)``).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any, get_origin

from tidings.hub import Hub
from tidings.protocol.schema import asyncapi, ts_declare, typescript

__all__ = ["app_channels", "load_hub", "print_asyncapi", "print_typescript"]

Schema = dict[str, Any]


def load_hub(spec: str) -> Hub:
    """The hub named by ``module:attribute`` (as uvicorn names an app)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--app wants module:attribute (e.g. myapp.main:hub), not {spec!r}")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"cannot load {spec!r}: {exc}") from None
    if not isinstance(value, Hub):
        raise SystemExit(f"{spec!r} is a {type(value).__name__}, not a tidings Hub")
    return value


def _type_name(type_: Any, index: int) -> str:
    """A class's own name; ``Channel<n>Data`` for ``list[float]`` and the like."""
    name = getattr(type_, "__name__", "") if get_origin(type_) is None else ""
    return name if re.fullmatch(r"[A-Za-z_]\w*", name) else f"Channel{index}Data"


def app_channels(hub: Hub) -> tuple[list[tuple[str, str]], dict[str, Schema]]:
    """``[(pattern, type name)]`` of the hub's typed channels and the JSON
    Schemas of their types (nested models included), by name."""
    channels: list[tuple[str, str]] = []
    schemas: dict[str, Schema] = {}
    declared = hub.channel_types.json_schemas("#/components/schemas/{model}")
    for index, (pattern, type_, schema) in enumerate(declared, 1):
        name = _type_name(type_, index)
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas[def_name] = definition
        schemas[name] = schema
        channels.append((pattern, name))
    return channels, schemas


def print_asyncapi(app: str | None = None) -> int:
    """Print the AsyncAPI 3 document of ``/ws`` (and the app's channels) as JSON."""
    doc = asyncapi()
    if app is not None:
        channels, schemas = app_channels(load_hub(app))
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
    print(json.dumps(doc, indent=2, ensure_ascii=False))
    return 0


def print_typescript(app: str | None = None) -> int:
    """Print the TypeScript declarations of ``/ws`` (and of the app's channels)."""
    out = typescript()
    if app is not None:
        channels, schemas = app_channels(load_hub(app))
        parts = ["// The app's typed channels (hub.channel), from their JSON Schemas."]
        parts += [ts_declare(name, schema) for name, schema in schemas.items()]
        entries = "\n".join(f"  {json.dumps(pattern)}: {name};" for pattern, name in channels)
        parts.append("/** Channel pattern -> the data its publications carry. */\n"
                     f"export interface ChannelTypes {{\n{entries}\n}}")
        out += "\n" + "\n\n".join(parts) + "\n"
    print(out, end="")
    return 0
