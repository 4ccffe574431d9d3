"""The sans-I/O pieces of tidings' own server: client frames in, HTTP heads, the handshake."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from tidings.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameError,
    FrameReader,
    FrameTracker,
    _unmask_int,
    encode_close,
    frame_bounds,
    parse_close,
    unmask,
)
from tidings.protocol.http import (
    ChunkedReader,
    HTTPError,
    accept_key,
    handshake_response,
    parse_request,
    websocket_key,
)


def client_frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    """What a real client library puts on the wire (masked)."""
    return Frame(opcode, payload, fin=fin).serialize(mask=True)


def feed_in_pieces(reader: FrameReader, data: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        out += reader.feed(data[start:cut])
        start = max(start, cut)
    out += reader.feed(data[start:])
    return out


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(st.tuples(st.sampled_from([Opcode.TEXT, Opcode.BINARY]),
                                   st.binary(max_size=70_000), st.integers(1, 3)),
                         max_size=6),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=8))
def test_messages_survive_any_split_and_fragmentation(
        messages: list[tuple[Opcode, bytes, int]], cuts: list[int]) -> None:
    wire = b""
    for opcode, payload, parts in messages:
        size = -(-len(payload) // parts) or 1
        pieces = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
        for i, piece in enumerate(pieces):
            op = opcode if i == 0 else Opcode.CONT
            wire += client_frame(op, piece, fin=i == len(pieces) - 1)
            if i == 0 and len(pieces) > 1:  # a ping between fragments is allowed
                wire += client_frame(Opcode.PING, b"p")
    got = feed_in_pieces(FrameReader(1 << 20), wire, cuts)
    data = [(op, payload) for op, payload in got if op != OP_PING]
    assert data == [(int(op), payload) for op, payload, _ in messages]
    assert sum(op == OP_PING for op, _ in got) == sum(
        1 for _, p, parts in messages if len(p) > (-(-len(p) // parts) or 1))


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.tuples(st.sampled_from([Opcode.TEXT, Opcode.BINARY, Opcode.CONT,
                                                  Opcode.PING, Opcode.CLOSE]),
                                 st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70_000]),
                                 st.booleans(), st.booleans()),
                       min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=8))
def test_the_tracker_knows_every_frame_boundary(
        frames: list[tuple[Opcode, int, bool, bool]], cuts: list[int]) -> None:
    """Fed a stream in any pieces, the tracker is at a boundary exactly after a
    piece that ends where a frame ends, and knows whether a data message is
    still open (a data frame without FIN opens one, a final continuation ends
    it); masked or not, every length encoding."""
    wire, ends, open_after = b"", [0], [False]
    in_message = False
    for opcode, size, fin, mask in frames:
        if opcode in (Opcode.PING, Opcode.CLOSE):  # short and whole, as the RFC wants
            size, fin = min(size, 125), True
        wire += Frame(opcode, b"x" * size, fin=fin).serialize(mask=mask)
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            in_message = not fin
        elif opcode == Opcode.CONT and fin:
            in_message = False
        ends.append(len(wire))
        open_after.append(in_message)
    tracker = FrameTracker()
    start = 0
    for cut in sorted({c % (len(wire) + 1) for c in cuts} | {len(wire)}):
        if cut <= start:
            continue
        tracker.feed(wire[start:cut])
        start = cut
        assert tracker.at_boundary == (cut in ends), cut
        if cut in ends:
            assert tracker.in_message == open_after[ends.index(cut)]
    assert tracker.at_boundary and tracker.in_message == in_message


def test_frame_bounds() -> None:
    """First bytes, payload start and end of a frame; None while its header is cut."""
    masked = Frame(Opcode.TEXT, b"x" * 300).serialize(mask=True)
    assert frame_bounds(masked, 0) == (0x81, 0xFE, 8, 308)
    plain = b"zz" + Frame(Opcode.BINARY, b"abc").serialize(mask=False)
    assert frame_bounds(plain, 2) == (0x82, 3, 4, 7)
    for cut in range(8):  # 2 + 2 length bytes + 4 mask bytes
        assert frame_bounds(masked[:cut], 0) is None
    assert frame_bounds(masked[:8], 0) == (0x81, 0xFE, 8, 308)  # the payload may be missing


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 1000, 65535, 65536, 70_000])
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_a_read_of_one_whole_frame(size: int, opcode: Opcode) -> None:
    """The one-frame read (taken in one step) gives what the general parser gives,
    the size limit included; a fragment pending sends it the general way."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = client_frame(opcode, payload)
    assert FrameReader(1 << 20).feed(wire) == [(int(opcode), payload)]
    assert feed_in_pieces(FrameReader(1 << 20), wire + wire, [len(wire)]) == [
        (int(opcode), payload)] * 2
    # two in one read: the general parser, whose first case is a whole text frame
    assert FrameReader(1 << 20).feed(wire + wire) == [(int(opcode), payload)] * 2
    assert feed_in_pieces(FrameReader(1 << 20), wire + wire, [len(wire) + 3]) == [
        (int(opcode), payload)] * 2
    if size:
        with pytest.raises(FrameError) as caught:
            FrameReader(size - 1).feed(wire)
        assert caught.value.code == 1009
        with pytest.raises(FrameError) as caught:
            FrameReader(size - 1).feed(client_frame(opcode, b"") + wire)
        assert caught.value.code == 1009
        assert caught.value.messages == [(int(opcode), b"")]
    reader = FrameReader(1 << 20)
    assert reader.feed(client_frame(Opcode.TEXT, b"a", fin=False)) == []
    with pytest.raises(FrameError):  # a new message inside a fragmented one
        reader.feed(wire)


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask_matches_the_pure_python_fallback(data: bytes, mask: bytes) -> None:
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert unmask(data, mask) == expected
    assert _unmask_int(data, mask) == expected


@pytest.mark.parametrize(("wire", "code"), [
    (Frame(Opcode.TEXT, b"x").serialize(mask=False), 1002),  # unmasked
    (client_frame(Opcode.CONT, b"x"), 1002),  # continuation of nothing
    (client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.TEXT, b"b"), 1002),
    (bytes([0x09, 0x80, 0, 0, 0, 0]), 1002),  # fragmented control frame (a ping)
    (bytes([0x83, 0x80, 0, 0, 0, 0]), 1002),  # opcode 3 is reserved
    (bytes([0xC1, 0x80, 0, 0, 0, 0]), 1002),  # RSV1 without an extension
    (bytes([0x81, 0xFF]) + (2000).to_bytes(8, "big"), 1009),  # refused before buffering
])
def test_protocol_errors_carry_their_close_code(wire: bytes, code: int) -> None:
    with pytest.raises(FrameError) as caught:
        FrameReader(1000).feed(wire)
    assert caught.value.code == code


def test_a_protocol_error_keeps_the_messages_read_before_it() -> None:
    wire = (client_frame(Opcode.TEXT, b"one") + client_frame(Opcode.PING, b"p")
            + client_frame(Opcode.BINARY, b"two") + bytes([0x83, 0x80, 0, 0, 0, 0])
            + client_frame(Opcode.TEXT, b"after"))
    with pytest.raises(FrameError) as caught:
        FrameReader(1000).feed(wire)
    assert caught.value.code == 1002
    assert caught.value.messages == [(1, b"one"), (9, b"p"), (2, b"two")]


def test_fragments_count_against_the_size_limit() -> None:
    reader = FrameReader(10)
    assert reader.feed(client_frame(Opcode.TEXT, b"123456", fin=False)) == []
    with pytest.raises(FrameError) as caught:
        reader.feed(client_frame(Opcode.CONT, b"123456"))
    assert caught.value.code == 1009


def test_byte_by_byte() -> None:
    reader = FrameReader(1 << 20)
    wire = client_frame(Opcode.TEXT, b"x" * 300) + client_frame(Opcode.BINARY, b"\x00\x01")
    got = [m for i in range(len(wire)) for m in reader.feed(wire[i:i + 1])]
    assert got == [(OP_TEXT, b"x" * 300), (OP_BINARY, b"\x00\x01")]
    assert reader.buffered == 0


def test_close_frames_both_ways() -> None:
    assert encode_close(1001, "bye") == Frame(Opcode.CLOSE, Close(1001, "bye").serialize()
                                              ).serialize(mask=False)
    long = encode_close(1000, "é" * 100)  # cut to 123 bytes, not inside a character
    assert len(long) == 2 + 2 + 122
    assert parse_close(Close(4000, "why").serialize()) == (4000, "why")
    assert parse_close(b"") == (1005, "")
    for bad, code in ((b"\x03", 1002), ((999).to_bytes(2, "big"), 1002),
                      (b"\x03\xe8\xff", 1007)):
        with pytest.raises(FrameError) as caught:
            parse_close(bad)
        assert caught.value.code == code
    reader = FrameReader(100)
    assert reader.feed(client_frame(Opcode.CLOSE, Close(1000, "").serialize())) == [
        (OP_CLOSE, b"\x03\xe8")]


HEAD = (b"GET /ws/sub/a%2Fb?token=x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: a, b")


def test_a_websocket_handshake() -> None:
    req = parse_request(HEAD, max_body=10)
    assert req.upgrade and req.keep_alive
    assert (req.path, req.raw_path, req.query) == ("/ws/sub/a/b", b"/ws/sub/a%2Fb", b"token=x")
    assert req.header(b"sec-websocket-protocol") == b"a, b"
    key = websocket_key(req)
    assert accept_key(key) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 section 1.3
    answer = handshake_response(key, "b")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-protocol: b\r\n" in answer and answer.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /\r\nHost: x", 400),
    (b"GET / HTTP/2.0", 505),
    (b"GET http://x/ HTTP/1.1", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x", 400),
    (b"GET / HTTP/1.1\r\nno-colon", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 11", 413),
    (b"POST / HTTP/1.1\r\nContent-Length: -1", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", 400),
])
def test_bad_heads(head: bytes, status: int) -> None:
    with pytest.raises(HTTPError) as caught:
        parse_request(head, max_body=10)
    assert caught.value.status == status


@pytest.mark.parametrize(("replace", "status"), [
    ((b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), 426),
    ((b"dGhlIHNhbXBsZSBub25jZQ==", b"short"), 400),
    ((b"GET", b"POST"), 400),
])
def test_bad_handshakes(replace: tuple[bytes, bytes], status: int) -> None:
    req = parse_request(HEAD.replace(*replace), max_body=10)
    with pytest.raises(HTTPError) as caught:
        websocket_key(req)
    assert caught.value.status == status


def test_keep_alive_rules() -> None:
    assert not parse_request(b"GET / HTTP/1.0", max_body=0).keep_alive
    assert parse_request(b"GET / HTTP/1.0\r\nConnection: keep-alive", max_body=0).keep_alive
    assert not parse_request(b"GET / HTTP/1.1\r\nConnection: close", max_body=0).keep_alive
    assert parse_request(b"POST / HTTP/1.1\r\nExpect: 100-continue", max_body=0).expect_continue


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=5), st.integers(1, 7))
def test_chunked_bodies(chunks: list[bytes], step: int) -> None:
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks)
    wire += b"0\r\nTrailer: x\r\n\r\nNEXT"
    reader = ChunkedReader(max_body=1000)
    for i in range(0, len(wire), step):
        reader.feed(wire[i:i + step])
    assert reader.done and bytes(reader.body) == b"".join(chunks)
    assert reader.rest.startswith(b"NEXT"[:len(reader.rest)])


def test_chunked_limits() -> None:
    with pytest.raises(HTTPError) as caught:
        ChunkedReader(max_body=4).feed(b"5\r\nhello\r\n")
    assert caught.value.status == 413
    with pytest.raises(HTTPError) as caught:
        ChunkedReader(max_body=4).feed(b"zz\r\n")
    assert caught.value.status == 400


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_any_bytes_give_messages_or_a_frame_error(chunks: list[bytes]) -> None:
    reader = FrameReader(200)
    try:
        for chunk in chunks:
            for opcode, payload in reader.feed(chunk):
                assert opcode in (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, 0xA)
                assert len(payload) <= 200
    except FrameError as exc:
        assert exc.code in (1002, 1007, 1009)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode()))
def test_any_head_parses_or_gives_an_http_error(head: bytes) -> None:
    for data in (head, b"GET / HTTP/1.1\r\n" + head):
        try:
            req = parse_request(data, max_body=100)
        except HTTPError as exc:
            assert 400 <= exc.status < 600
            continue
        assert req.path.startswith("/") and req.content_length <= 100
        try:
            websocket_key(req)
        except HTTPError as exc:
            assert exc.status in (400, 426)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_any_chunked_body_decodes_or_gives_an_http_error(data: bytes) -> None:
    reader = ChunkedReader(max_body=50)
    try:
        reader.feed(data)
    except HTTPError as exc:
        assert exc.status in (400, 413, 431)
        return
    assert len(reader.body) <= 50
