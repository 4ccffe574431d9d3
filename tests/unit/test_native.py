from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from tidings.protocol import ErrorCode, ProtocolError
from tidings.protocol import native as n
from tidings.protocol.codec import NATIVE_FRAMED
from tidings.types import Publication


def decode(frame: Any) -> n.Command:
    return n.decode_command(json.dumps(frame))


def test_decodes_every_command() -> None:
    assert decode({"type": "subscribe", "id": 1, "channel": "chat/+",
                   "recover": {"offset": 41, "epoch": "e1"}, "join_leave": True}) == n.Subscribe(
        1, "chat/+", n.StreamPos(41, "e1"), True)
    assert decode({"type": "unsubscribe", "id": 2, "channel": "chat/+"}) == n.Unsubscribe(
        2, "chat/+")
    assert decode({"type": "publish", "id": 3, "channel": "c", "data": {"t": 1}}) == n.Publish(
        3, "c", {"t": 1})
    assert decode({"type": "send", "id": 4, "to": "x.1", "data": 1}) == n.Send(4, ("x.1",), 1)
    assert decode({"type": "send", "id": 4, "to": ["a", "b"], "data": None}) == n.Send(
        4, ("a", "b"), None)
    assert decode({"type": "presence", "id": 5, "channel": "c"}) == n.Presence(5, "c")
    assert decode({"type": "presence_stats", "id": 5, "channel": "c"}) == n.PresenceStats(5, "c")
    assert decode({"type": "history", "id": 6, "channel": "c", "since": {"offset": 3,
                   "epoch": "e"}, "limit": 100}) == n.History(6, "c", n.StreamPos(3, "e"), 100)
    assert decode({"type": "pull", "id": 7, "queue": "jobs", "max": 2}) == n.Pull(7, "jobs", 2)
    assert decode({"type": "ack", "id": 8, "queue": "jobs", "item": "i"}) == n.Ack(8, "jobs", "i")
    assert decode({"type": "nack", "queue": "q", "item": "i", "delay": 1.5}) == n.Nack(
        None, "q", "i", 1.5, True)
    assert decode({"type": "ping", "id": 9}) == n.Ping(9)
    assert decode({"type": "ping", "id": "abc"}) == n.Ping("abc")
    assert decode({"type": "connect", "token": "t"}) == n.Connect(None, "t")
    assert n.decode_command(b'{"type":"ping"}') == n.Ping(None)


@pytest.mark.parametrize(
    ("frame", "code", "rid"),
    [
        ("not json", ErrorCode.BAD_REQUEST, None),
        ("[1,2]", ErrorCode.BAD_REQUEST, None),
        ('{"id": 1}', ErrorCode.BAD_REQUEST, 1),
        ('{"type": "nope", "id": 2}', ErrorCode.UNKNOWN_TYPE, 2),
        ('{"type": "publish", "id": 3, "channel": "a"}', ErrorCode.BAD_REQUEST, 3),
        ('{"type": "publish", "id": 3, "channel": "a/+", "data": 1}', ErrorCode.BAD_CHANNEL, 3),
        ('{"type": "subscribe", "id": 4, "channel": "a/#/b"}', ErrorCode.BAD_PATTERN, 4),
        ('{"type": "subscribe", "id": 4, "channel": "a", "recover": 5}', ErrorCode.BAD_REQUEST, 4),
        ('{"type": "ping", "id": [1]}', ErrorCode.BAD_REQUEST, None),
        ('{"type": "ping", "id": true}', ErrorCode.BAD_REQUEST, None),
        ('{"type": "send", "id": 5, "to": [], "data": 1}', ErrorCode.BAD_REQUEST, 5),
        ('{"type": "pull", "id": 6, "queue": "q", "max": 0}', ErrorCode.BAD_REQUEST, 6),
        ('{"type": "history", "id": 7, "channel": "c", "limit": -1}', ErrorCode.BAD_REQUEST, 7),
    ],
)
def test_bad_frames(frame: str, code: ErrorCode, rid: object) -> None:
    with pytest.raises(ProtocolError) as info:
        n.decode_command(frame)
    assert info.value.code is code
    assert info.value.id == rid


def test_depth_limit() -> None:
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ProtocolError) as info:
        n.decode_command(json.dumps({"type": "publish", "channel": "c", "data": deep}),
                         max_depth=64)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "deeper" in info.value.message


def test_server_frames_round_trip() -> None:
    assert orjson.loads(n.encode_publication("c", {"x": 1}, 4, "e", "s", 7)) == {
        "type": "publication", "channel": "c", "data": {"x": 1}, "offset": 4, "epoch": "e",
        "ts": 7, "sender": "s"}
    assert orjson.loads(n.encode_error(3, ErrorCode.FORBIDDEN, "no")) == {
        "type": "error", "id": 3, "code": "forbidden", "message": "no"}
    assert orjson.loads(n.encode_lagged(5)) == {"type": "lagged", "dropped": 5}
    assert orjson.loads(n.encode_pong(9)) == {"type": "pong", "id": 9}
    assert orjson.loads(n.encode_welcome("c1", "n1", "v", None))["conn_id"] == "c1"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "publish", "send", "presence",
                              "presence_stats", "history", "pull", "ack", "nack", "ping",
                              "connect", "x"])},
    optional={k: json_values for k in ("id", "channel", "data", "to", "recover", "since",
                                       "limit", "queue", "item", "max", "delay", "token",
                                       "join_leave", "reverse", "requeue")},
)


def _only_protocol_errors(frame: str | bytes) -> None:
    try:
        n.decode_command(frame)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@settings(max_examples=300)
@given(st.text())
def test_arbitrary_text(frame: str) -> None:
    _only_protocol_errors(frame)


@settings(max_examples=300)
@given(st.binary())
def test_arbitrary_bytes(frame: bytes) -> None:
    _only_protocol_errors(frame)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    _only_protocol_errors(json.dumps(value))


@settings(max_examples=1000)
@given(frame_like)
def test_frame_like_objects(frame: dict[str, Any]) -> None:
    _only_protocol_errors(json.dumps(frame))


@pytest.mark.parametrize(
    ("frame", "rid"),
    [
        ('{"type":"publish","id":7,"data":"xxx"}', 7),
        ('{"id": "abc", "type": "ping"}', "abc"),
        ('{"type":"ping"}', None),
        (b'{"id": 12, "data": "' + b"x" * 1000 + b'"}', 12),
        ('{"data": "' + "x" * 1000 + '", "id": 5}', None),  # beyond the window: unknown
        ('{"id": "unterminated', None),
    ],
)
def test_peek_id(frame: str | bytes, rid: object) -> None:
    assert n.peek_id(frame) == rid


@given(st.text(max_size=300))
def test_peek_id_never_raises(frame: str) -> None:
    assert n.peek_id(frame) is None or isinstance(n.peek_id(frame), (int, str))


ints64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _reference(value: Any) -> bytes | None:
    """orjson's encoding of ``value`` (as tidings encoded frames before the
    templates), None when orjson refuses it (surrogates, integers past 64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return None


@settings(max_examples=500)
@given(channel=st.text(min_size=1), data=json_values, offset=ints64, epoch=st.text(),
       sender=st.none() | st.text(), ts=ints64)
def test_the_publication_template_is_the_dict_encoding(
        channel: str, data: Any, offset: int, epoch: str, sender: str | None, ts: int) -> None:
    frame: dict[str, Any] = {"type": "publication", "channel": channel, "data": data,
                             "offset": offset, "epoch": epoch, "ts": ts}
    if sender is not None:
        frame["sender"] = sender
    expected = _reference(frame)
    if expected is None:
        with pytest.raises((orjson.JSONEncodeError, TypeError)):
            n.encode_publication(channel, data, offset, epoch, sender, ts)
        return
    assert n.encode_publication(channel, data, offset, epoch, sender, ts) == expected
    body = _reference(data)
    assert body is not None
    assert n.encode_publication_json(channel, body, offset, epoch, sender, ts) == expected
    # the frame a direct subscriber is written: that object in one unmasked text
    # frame, byte for byte what the websockets library sends for it
    pub = Publication(channel, data, offset, epoch, sender, ts)
    assert NATIVE_FRAMED.publication(pub) == Frame(Opcode.TEXT, expected).serialize(mask=False)


@settings(max_examples=300)
@given(rid=st.none() | ints64 | st.text(max_size=64), offset=ints64, epoch=st.text())
def test_the_publish_reply_template_is_the_dict_encoding(
        rid: n.RequestId, offset: int, epoch: str) -> None:
    expected = _reference({"type": "reply", "id": rid,
                           "result": {"offset": offset, "epoch": epoch}})
    if expected is None:
        with pytest.raises((orjson.JSONEncodeError, TypeError)):
            n.encode_position_reply(rid, offset, epoch)
        return
    assert n.encode_position_reply(rid, offset, epoch) == expected


def _agree(frame: str | bytes) -> None:
    fast = n.decode_publish(frame)
    try:
        cmd: n.Command | None = n.decode_command(frame)
    except ProtocolError:
        cmd = None
    if isinstance(cmd, n.Publish):
        assert fast == (cmd.id, cmd.channel, cmd.data)
    else:
        assert fast is None


@settings(max_examples=1000)
@given(frame_like)
def test_decode_publish_takes_exactly_the_publishes_decode_command_takes(
        frame: dict[str, Any]) -> None:
    _agree(json.dumps(frame))
    _agree(json.dumps({**frame, "type": "publish"}))
    _agree(json.dumps({**frame, "type": "publish", "channel": "a/b", "data": 1}).encode())


@settings(max_examples=300)
@given(st.text())
def test_decode_publish_never_raises(frame: str) -> None:
    _agree(frame)


def test_decode_publish_limits() -> None:
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    assert n.decode_publish(json.dumps({"type": "publish", "channel": "c", "data": deep})) is None
    assert n.decode_publish('{"type":"publish","channel":"' + "c" * 300 + '","data":1}') is None
    assert n.decode_publish('{"type":"publish","id":true,"channel":"c","data":1}') is None
    assert n.decode_publish('{"type":"publish","id":"x","channel":"c","data":null}') == (
        "x", "c", None)


@pytest.mark.parametrize("size", [0, 50, 900, 1100, 70_000])
def test_the_publication_frame_of_a_publishers_text_and_of_bytes(size: int) -> None:
    """A raw producer's JSON text is spliced as it came, bytes go as ``b64``,
    at every frame length class (the looked-up headers end at 1 KiB)."""
    text = '{"pad": "%s"}' % ("x" * size)  # spaces kept: the publisher's own bytes
    pub = Publication("c", orjson.loads(text), 7, "e", "s", 1, text=text)
    body = text.encode()
    expected = n.encode_publication_json("c", body, 7, "e", "s", 1)
    assert NATIVE_FRAMED.publication(pub) == Frame(Opcode.TEXT, expected).serialize(mask=False)
    raw = bytes(range(256)) * (size // 256 + 1)
    binary = Publication("c", raw, 8, "e", None, 1, text="ignored for bytes")
    wire = NATIVE_FRAMED.publication(binary)
    assert wire == Frame(Opcode.TEXT, n.encode_publication(
        "c", n.b64(raw), 8, "e", None, 1)).serialize(mask=False)
