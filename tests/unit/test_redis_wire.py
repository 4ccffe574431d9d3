"""The Redis broker's message format, sans I/O (tidings.brokers.redis.wire)."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from tidings.brokers.redis.wire import SEP, decode_data, encode_data, publication_from, unbatch

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
entries = st.lists(st.tuples(
    st.integers(0, 2**45),
    st.text(string.ascii_letters + string.digits + ".", max_size=20),
    json_values | st.binary(max_size=40).map(lambda b: SEP + b + SEP),  # separators inside
), min_size=1, max_size=20)


def b_message(first: int, epoch: str, items: list[tuple[int, str, object]]) -> bytes:
    """A 'B' message as the publish script builds it (redis_wire's docstring)."""
    parts = [b"B%d" % first, epoch.encode(), b"%d" % len(items)]
    for ts, sender, data in items:
        encoded = encode_data(data)
        parts += [b"%d" % ts, sender.encode(), b"%d" % len(encoded), encoded]
    return SEP.join(parts)


@given(st.integers(1, 2**40), entries)
def test_a_grouped_message_gives_back_every_publication_in_order(
        first: int, items: list[tuple[int, str, object]]) -> None:
    pubs = unbatch("room/1", b_message(first, "e0f1", items))
    assert [(p.channel, p.offset, p.epoch) for p in pubs] == [
        ("room/1", first + k, "e0f1") for k in range(len(items))]
    assert [(p.ts, p.sender, p.data) for p in pubs] == [
        (ts, sender or None, data) for ts, sender, data in items]


def test_json_text_is_kept_as_sent_and_bytes_stay_bytes() -> None:
    pub = publication_from("c", 7, "ep", b"123", b"", b'j{"a": 1}')
    assert (pub.data, pub.text, pub.sender, pub.ts) == ({"a": 1}, '{"a": 1}', None, 123)
    binary = publication_from("c", 8, "ep", b"1", b"s.1", b"b\x1f\x00")
    assert binary.data == b"\x1f\x00" and binary.sender == "s.1"
    assert decode_data(encode_data(b"\x1f")) == b"\x1f"
