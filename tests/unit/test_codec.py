"""The codec objects: each protocol's frames of a publication, encoded once per codec."""

from __future__ import annotations

import orjson

from tidings.brokers.base import MemberEvent
from tidings.protocol import codec
from tidings.protocol.frames import OP_BINARY, encode_frame
from tidings.types import Publication


def test_each_codec_encodes_once_and_frames_its_siblings_payload() -> None:
    pub = Publication("chat:index", {"t": "hi"}, 3, "e", "n.c", 5)
    text = codec.NATIVE.publication(pub)
    assert isinstance(text, str)
    assert codec.NATIVE.publication(pub) is text  # cached in the publication
    assert orjson.loads(text) == {"type": "publication", "channel": "chat:index",
                                  "data": {"t": "hi"}, "offset": 3, "epoch": "e",
                                  "sender": "n.c", "ts": 5}
    framed = codec.NATIVE_FRAMED.publication(pub)
    assert framed == encode_frame(text.encode())
    assert codec.NATIVE_FRAMED.publication(pub) is framed
    push = codec.CENTRIFUGE.publication(pub)
    assert orjson.loads(push)["push"]["pub"]["offset"] == 3
    assert codec.CENTRIFUGE_FRAMED.publication(pub) == encode_frame(str(push).encode())
    assert pub.prepared is not None and len(pub.prepared) == codec.SLOTS
    assert len({c.slot for c in (codec.NATIVE, codec.NATIVE_FRAMED, codec.RAW,
                                 codec.RAW_FRAMED, codec.CENTRIFUGE,
                                 codec.CENTRIFUGE_FRAMED)}) == codec.SLOTS


def test_binary_and_publisher_text() -> None:
    binary = Publication("c", b"\x00\x01", 1, "e")
    assert codec.RAW.publication(binary) == b"\x00\x01"  # a binary message
    assert codec.RAW_FRAMED.publication(binary) == encode_frame(b"\x00\x01", OP_BINARY)
    assert orjson.loads(codec.NATIVE.publication(binary))["data"] == {"b64": "AAE="}
    assert orjson.loads(codec.CENTRIFUGE.publication(binary))["push"]["pub"]["data"] == {
        "b64": "AAE="}
    spliced = Publication("c", {"a": 1}, 1, "e", text='{"a":  1}')
    assert codec.RAW.publication(spliced) == '{"a":  1}'  # as the producer wrote it
    assert '"data":{"a":  1}' in str(codec.NATIVE.publication(spliced))


def test_messages_events_lagged_and_close_codes_per_protocol() -> None:
    assert orjson.loads(codec.NATIVE.message("server", 1) or "") == {
        "type": "message", "from": "server", "data": 1}
    assert orjson.loads(codec.CENTRIFUGE.message("server", 1) or "") == {
        "push": {"message": {"data": 1}}}
    assert codec.RAW.message("server", 1) is None
    event = MemberEvent.decode(MemberEvent("join", "room", "n.c", "bob").encode())
    assert event == MemberEvent("join", "room", "n.c", "bob")
    assert MemberEvent.decode("{}") is None
    assert MemberEvent.decode("nope") is None
    assert orjson.loads(codec.CENTRIFUGE.join_leave("join", "room", "n.c", None) or "") == {
        "push": {"channel": "room", "join": {"info": {"client": "n.c", "user": ""}}}}
    assert codec.RAW.join_leave("join", "room", "n.c", None) is None
    assert orjson.loads(codec.NATIVE.lagged(4) or "") == {"type": "lagged", "dropped": 4}
    assert codec.CENTRIFUGE.lagged(4) is None
    assert codec.CENTRIFUGE.close_code(1001, "") == 3001  # shutdown: the SDK reconnects
    assert codec.NATIVE.close_code(1001, "") == 1001
