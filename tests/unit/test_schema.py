"""The generated AsyncAPI document and TypeScript types agree with the codec."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tidings.protocol import native
from tidings.protocol.codes import ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.schema import FRAMES, asyncapi, typescript
from tidings.server.cli_schema import print_asyncapi, print_typescript

CLIENT_TYPES = {"subscribe", "unsubscribe", "publish", "send", "presence", "presence_stats",
                "history", "pull", "ack", "nack", "ping", "connect", "refresh"}
SERVER_TYPES = {"welcome", "reply", "error", "publication", "message", "join", "leave", "item",
                "lagged", "pong"}
DOC = asyncapi()
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def sample(schema: dict[str, Any], *, everything: bool = False) -> Any:
    """A value of the schema's type, within its bounds (required fields only, by default)."""
    schema = resolve(schema)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return sample(schema["anyOf"][0], everything=everything)
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        names = props if everything else schema.get("required", [])
        return {name: sample(props[name], everything=everything) for name in names}
    if kind == "array":
        return [sample(schema["items"])] * max(1, schema.get("minItems", 0))
    if kind == "string":
        return "a" * max(1, schema.get("minLength", 1))
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return {"any": ["json", 1]}  # {}: any JSON value


def payload(kind: str) -> dict[str, Any]:
    message = DOC["components"]["messages"][kind]
    return resolve(message["payload"])


def decode(frame: dict[str, Any]) -> native.Command:
    return native.decode_command(json.dumps(frame))


def test_document_basics() -> None:
    assert DOC["asyncapi"] == "3.0.0"
    assert DOC["info"]["title"]
    assert DOC["info"]["version"]
    (channel,) = DOC["channels"].values()
    assert channel["address"] == "/ws"
    json.dumps(DOC)  # plain JSON all the way down


def test_every_frame_type_has_a_message() -> None:
    messages = DOC["components"]["messages"]
    assert set(messages) == CLIENT_TYPES | SERVER_TYPES
    assert {f.type for f in FRAMES if f.direction == "client"} == CLIENT_TYPES
    assert {f.type for f in FRAMES if f.direction == "server"} == SERVER_TYPES
    for kind in messages:
        assert payload(kind)["properties"]["type"]["const"] == kind
        assert "type" in payload(kind)["required"]


def refusal(frame: dict[str, Any]) -> ErrorCode | None:
    try:
        decode(frame)
    except ProtocolError as exc:
        return exc.code
    return None


def test_the_decoder_knows_exactly_the_client_types() -> None:
    for kind in CLIENT_TYPES:  # accepted, or refused for a missing field, not for its type
        assert refusal({"type": kind}) in (None, ErrorCode.BAD_REQUEST), kind
    for kind in SERVER_TYPES:
        assert refusal({"type": kind}) is ErrorCode.UNKNOWN_TYPE, kind


def test_operations_reference_channel_messages() -> None:
    channel_id, channel = next(iter(DOC["channels"].items()))
    actions: dict[str, str] = {}
    for op in DOC["operations"].values():
        assert op["channel"] == {"$ref": f"#/channels/{channel_id}"}
        for ref in op["messages"] + op.get("reply", {}).get("messages", []):
            prefix = f"#/channels/{channel_id}/messages/"
            assert ref["$ref"].startswith(prefix)
            assert ref["$ref"].removeprefix(prefix) in channel["messages"]
        (msg,) = op["messages"]
        actions[msg["$ref"].rsplit("/", 1)[-1]] = op["action"]
    # the document describes the server: it receives client frames and sends the others
    assert actions == {**dict.fromkeys(CLIENT_TYPES, "receive"),
                       **dict.fromkeys(SERVER_TYPES, "send")}


def test_refs_resolve() -> None:
    text = json.dumps(DOC)
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', text)):
        node: Any = DOC
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


@pytest.mark.parametrize("kind", sorted(CLIENT_TYPES))
def test_required_fields_are_enough_for_the_decoder(kind: str) -> None:
    schema = payload(kind)
    frame = sample(schema)
    cmd = decode(frame)
    model = next(f.model for f in FRAMES if f.type == kind)
    assert model is not None
    assert type(cmd) is model
    # the defaults the schema announces are the ones the decoder applies
    for name, prop in schema["properties"].items():
        if "default" in prop:
            assert getattr(cmd, name) == prop["default"], name


@pytest.mark.parametrize("kind", sorted(CLIENT_TYPES))
def test_every_field_is_accepted_and_required_ones_are_required(kind: str) -> None:
    schema = payload(kind)
    full = sample(schema, everything=True)
    assert set(full) == set(schema["properties"])
    assert type(decode(full)).__name__.lower() == kind.replace("_", "")
    for name in schema["required"]:
        if name == "type":
            continue
        with pytest.raises(ProtocolError) as info:
            decode({k: v for k, v in full.items() if k != name})
        assert info.value.code is ErrorCode.BAD_REQUEST, name


def test_send_accepts_one_target_or_a_list() -> None:
    to = payload("send")["properties"]["to"]
    assert len(to["anyOf"]) == 2
    for alternative in to["anyOf"]:
        cmd = decode({"type": "send", "to": sample(alternative), "data": 1})
        assert isinstance(cmd, native.Send)


ENCODED = {
    "welcome": native.encode_welcome("c1", "n1", "1.0", "alice"),
    "reply": native.encode_reply(1, {"offset": 1, "epoch": "e"}),
    "error": native.encode_error("x", ErrorCode.BAD_PATTERN, "bad"),
    "publication": native.encode_publication("a/b", {"k": 1}, 3, "e", "c1", 1700000000000),
    "message": native.encode_message("server", [1, 2]),
    "join": native.encode_join_leave("join", "a", "c1", None),
    "leave": native.encode_join_leave("leave", "a", "c1", "bob"),
    "item": native.encode_item("jobs", "i1", "work", 1),
    "lagged": native.encode_lagged(5),
    "pong": native.encode_pong(None),
}


@pytest.mark.parametrize("kind", sorted(SERVER_TYPES))
def test_server_frames_match_the_encoders(kind: str) -> None:
    frame = json.loads(ENCODED[kind])
    schema = payload(kind)
    assert frame["type"] == kind
    assert set(frame) <= set(schema["properties"])
    assert set(schema["required"]) <= set(frame)


def test_publication_optional_sender() -> None:
    frame = json.loads(native.encode_publication("a", 1, 1, "e", None, 0))
    assert "sender" not in payload("publication")["required"]
    assert set(payload("publication")["required"]) <= set(frame)


def test_error_codes() -> None:
    assert SCHEMAS["ErrorCode"]["enum"] == [code.value for code in ErrorCode]
    assert payload("error")["properties"]["code"] == {"$ref": "#/components/schemas/ErrorCode"}


def test_typescript() -> None:
    ts = typescript()
    for frame in FRAMES:
        match = re.search(rf"export interface {frame.name} \{{\n(.*?)\n\}}", ts, re.S)
        assert match, frame.name
        assert f'  type: "{frame.type}";' in match.group(1)
    union = re.search(r"export type ErrorCode = ([^;]+);", ts)
    assert union
    assert set(re.findall(r'"(\w+)"', union.group(1))) == {code.value for code in ErrorCode}
    for name, direction in (("ClientFrame", "client"), ("ServerFrame", "server")):
        block = re.search(rf"export type {name} =\n(.*?);", ts, re.S)
        assert block, name
        members = re.findall(r"\| (\w+)", block.group(1))
        assert members == [f.name for f in FRAMES if f.direction == direction]
    assert "recover?: StreamPos | null;" in ts
    assert "to: string | string[];" in ts
    assert ts.count("{") == ts.count("}")


def test_cli_printers(capsys: pytest.CaptureFixture[str]) -> None:
    assert print_asyncapi() == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(DOC))
    assert print_typescript() == 0
    assert capsys.readouterr().out == typescript()
