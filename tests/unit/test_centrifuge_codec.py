"""The Centrifuge client protocol codec (tidings.protocol.centrifuge)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.protocol import centrifuge as cf
from tidings.protocol.codes import CloseCode, ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.native import StreamPos


def one(frame: str | bytes) -> cf.Command:
    commands = cf.decode_frame(frame)
    assert len(commands) == 1
    return commands[0]


def test_commands_the_sdks_send() -> None:
    assert one('{"id":1,"connect":{"token":"t","name":"python","version":"1"}}') == \
        cf.Connect(1, "t", "python", "1")
    assert one('{"id":1,"connect":{}}') == cf.Connect(1)
    assert one('{"id":2,"subscribe":{"channel":"chat:index","recoverable":true,'
               '"positioned":true,"join_leave":true,"flag":1}}') == \
        cf.Subscribe(2, "chat:index", None, True, True, True, 1)
    assert one('{"id":3,"subscribe":{"channel":"news","recover":true,"offset":"41",'
               '"epoch":"e1"}}') == cf.Subscribe(3, "news", StreamPos(41, "e1"))
    assert one('{"id":4,"unsubscribe":{"channel":"news"}}') == cf.Unsubscribe(4, "news")
    assert one('{"id":5,"publish":{"channel":"news","data":{"x":[1]}}}') == \
        cf.Publish(5, "news", {"x": [1]})
    assert one('{"id":6,"presence":{"channel":"news"}}') == cf.Presence(6, "news")
    assert one('{"id":7,"presence_stats":{"channel":"news"}}') == cf.PresenceStats(7, "news")
    assert one('{"id":8,"history":{"channel":"news","limit":10,"reverse":true,'
               '"since":{"offset":3,"epoch":"e"}}}') == \
        cf.History(8, "news", 10, StreamPos(3, "e"), True)
    assert one('{"id":8,"history":{"channel":"news","limit":-1}}') == cf.History(8, "news", None)
    assert one('{"id":8,"history":{"channel":"news"}}') == cf.History(8, "news", 0)
    assert one('{"id":9,"ping":{}}') == cf.Ping(9)
    assert one("{}") == cf.Pong()
    assert one('{"send":{"data":1}}') == cf.SendMessage(1)
    assert one('{"id":10,"rpc":{"method":"m","data":null}}') == cf.Rpc(10, "m", None)
    assert one('{"id":11,"refresh":{"token":"t"}}') == cf.Refresh(11, "t")
    assert one('{"id":12,"sub_refresh":{"channel":"c","token":"t"}}') == \
        cf.SubRefresh(12, "c", "t")


def test_json_streaming() -> None:
    frame = ('{"id":1,"subscribe":{"channel":"a"}}\n'
             '{"id":2,"subscribe":{"channel":"b"}}\n\n')
    assert cf.decode_frame(frame) == [cf.Subscribe(1, "a"), cf.Subscribe(2, "b")]
    assert cf.decode_frame(frame.encode()) == cf.decode_frame(frame)


@pytest.mark.parametrize(
    ("frame", "code", "rid"),
    [
        ("", cf.ReplyCode.BAD_REQUEST, None),
        ("not json", cf.ReplyCode.BAD_REQUEST, None),
        ("[1]", cf.ReplyCode.BAD_REQUEST, None),
        ('{"id":1,"subscribe":{"channel":"a"}}\nnope', cf.ReplyCode.BAD_REQUEST, None),
        ('{"id":-1,"ping":{}}', cf.ReplyCode.BAD_REQUEST, None),
        ('{"id":true,"ping":{}}', cf.ReplyCode.BAD_REQUEST, None),
        ('{"subscribe":{"channel":"a"}}', cf.ReplyCode.BAD_REQUEST, None),
        ('{"id":3,"frobnicate":{}}', cf.ReplyCode.METHOD_NOT_FOUND, 3),
        ('{"id":3,"ping":{},"publish":{}}', cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"subscribe":[]}', cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"subscribe":{}}', cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"subscribe":{"channel":"a/+"}}', cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"subscribe":{"channel":"a","recover":"yes"}}', cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"subscribe":{"channel":"a","recover":true,"offset":-2}}',
         cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"publish":{"channel":"a"}}', cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"history":{"channel":"a","limit":"x"}}', cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"history":{"channel":"a","since":{"epoch":1}}}', cf.ReplyCode.BAD_REQUEST, 3),
        ('{"id":3,"refresh":{}}', cf.ReplyCode.BAD_REQUEST, 3),
    ],
)
def test_bad_commands(frame: str, code: cf.ReplyCode, rid: int | None) -> None:
    with pytest.raises(cf.CentrifugeError) as info:
        cf.decode_frame(frame)
    assert info.value.reply is code
    assert info.value.id == rid
    assert isinstance(info.value, ProtocolError)  # one root for every codec error


def test_limits() -> None:
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(cf.CentrifugeError, match="deeper"):
        cf.decode_frame(json.dumps({"id": 1, "publish": {"channel": "c", "data": deep}}))
    with pytest.raises(cf.CentrifugeError) as info:
        cf.split_frame("\n".join(["{}"] * 101))
    assert info.value.reply is cf.ReplyCode.LIMIT_EXCEEDED


def test_replies_and_pushes() -> None:
    assert orjson.loads(cf.encode_reply(1, "publish")) == {"id": 1, "publish": {}}
    assert orjson.loads(cf.encode_reply(2, "connect", {"client": "c"})) == \
        {"id": 2, "connect": {"client": "c"}}
    assert orjson.loads(cf.encode_error(3, cf.ReplyCode.PERMISSION_DENIED, "no")) == \
        {"id": 3, "error": {"code": 103, "message": "no"}}
    assert orjson.loads(cf.encode_error(3, cf.ReplyCode.INTERNAL, "x"))["error"]["temporary"]
    assert orjson.loads(cf.encode_publication_push("c", {"a": 1}, 4, "s", 7)) == {
        "push": {"channel": "c", "pub": {"data": {"a": 1}, "offset": 4,
                                         "info": {"client": "s", "user": ""}, "time": 7}}}
    assert orjson.loads(cf.encode_join_leave("join", "c", "id1", "u")) == \
        {"push": {"channel": "c", "join": {"info": {"client": "id1", "user": "u"}}}}
    assert orjson.loads(cf.encode_message([1])) == {"push": {"message": {"data": [1]}}}
    assert b"\n" not in cf.encode_publication_push("c", "line\nbreak", 1, None, 0)


def test_close_codes() -> None:
    assert cf.close_code(CloseCode.GOING_AWAY, "") == cf.Disconnect.SHUTDOWN
    assert cf.close_code(CloseCode.TRY_AGAIN_LATER, "outbox overflow") == cf.Disconnect.SLOW
    assert cf.close_code(CloseCode.POLICY_VIOLATION, "token expired") == cf.Disconnect.EXPIRED
    assert cf.close_code(CloseCode.POLICY_VIOLATION, "origin") == CloseCode.POLICY_VIOLATION
    assert cf.close_code(3501, "bad request") == 3501


def test_native_errors_map_to_codes() -> None:
    assert cf.reply_code(ProtocolError(ErrorCode.FORBIDDEN, "x")) is \
        cf.ReplyCode.PERMISSION_DENIED
    assert cf.reply_code(ProtocolError(ErrorCode.BAD_CHANNEL, "x")) is cf.ReplyCode.BAD_REQUEST
    assert cf.reply_code(cf.CentrifugeError(cf.ReplyCode.EXPIRED, "x")) is cf.ReplyCode.EXPIRED


# --- fuzzing: any input raises CentrifugeError or decodes ---------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
params = st.dictionaries(
    st.sampled_from(["channel", "token", "data", "recover", "offset", "epoch", "limit",
                     "since", "reverse", "positioned", "recoverable", "join_leave", "flag",
                     "method", "name", "version"]),
    json_values, max_size=6)
methods = st.sampled_from(["connect", "subscribe", "unsubscribe", "publish", "presence",
                           "presence_stats", "history", "ping", "send", "rpc", "refresh",
                           "sub_refresh", "x"])
command_like = st.builds(
    lambda rid, method, body: {**({} if rid is None else {"id": rid}), method: body},
    st.none() | st.integers(-2, 2**33) | st.text(max_size=4), methods, params | json_values,
)


def _only_codec_errors(frame: str | bytes) -> None:
    try:
        cf.decode_frame(frame)
    except cf.CentrifugeError as exc:
        assert isinstance(exc.reply, cf.ReplyCode)
        assert exc.id is None or isinstance(exc.id, int)


@settings(max_examples=300)
@given(st.text())
def test_arbitrary_text(frame: str) -> None:
    _only_codec_errors(frame)


@settings(max_examples=300)
@given(st.binary())
def test_arbitrary_bytes(frame: bytes) -> None:
    _only_codec_errors(frame)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    _only_codec_errors(json.dumps(value))


@settings(max_examples=500)
@given(st.lists(command_like, min_size=1, max_size=3))
def test_command_like_frames(commands: list[dict[str, Any]]) -> None:
    _only_codec_errors("\n".join(json.dumps(c) for c in commands))
