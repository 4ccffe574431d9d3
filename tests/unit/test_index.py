from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.protocol import pattern_matches
from tidings.protocol.index import SubscriptionIndex


def test_exact_and_patterns() -> None:
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    assert idx.add("a/b", "s1") is True
    assert idx.add("a/b", "s2") is False
    assert idx.add("a/+", "s3") is True
    assert idx.add("a/#", "s4") is True
    assert idx.add("#", "s5") is True
    assert idx.match("a/b") == {"s1", "s2", "s3", "s4", "s5"}
    assert idx.match("a") == {"s4", "s5"}  # 'a/#' matches 'a'
    assert idx.match("b") == {"s5"}
    assert idx.match("$sys/x") == set()  # '#' does not see '$' channels


def test_subscriber_matching_twice_is_returned_once() -> None:
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    idx.add("a/b", "s")
    idx.add("a/+", "s")
    idx.add("#", "s")
    assert idx.match("a/b") == {"s"}


def test_refcount_and_pruning() -> None:
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    idx.add("a/+/c", "s1")
    idx.add("a/+/c", "s2")
    assert idx.remove("a/+/c", "s1") is False
    assert idx.remove("a/+/c", "s1") is False  # not there any more
    assert idx.remove("a/+/c", "s2") is True
    assert len(idx) == 0
    assert idx._root.children == {}  # the trie was pruned
    assert idx.remove("x/y", "s") is False


def test_match_cost_does_not_scan_unrelated_subscriptions() -> None:
    idx: SubscriptionIndex[int] = SubscriptionIndex()
    for i in range(5000):
        idx.add(f"room{i}/+", i)
    visited = 0
    real = idx._root.children.get

    class Counting(dict):  # type: ignore[type-arg]
        def get(self, key, default=None):  # type: ignore[no-untyped-def]
            nonlocal visited
            visited += 1
            return real(key, default)

    idx._root.children = Counting(idx._root.children)
    assert idx.match("room42/x") == {42}
    assert visited <= 2  # one lookup for the level, one for '+'


levels = st.sampled_from(["a", "b", "c", "$s"])
channels = st.lists(levels, min_size=1, max_size=4).map("/".join)
patterns = st.lists(st.sampled_from(["a", "b", "c", "$s", "+"]), min_size=1, max_size=4).flatmap(
    lambda ls: st.sampled_from([ls, [*ls[:-1], "#"]])
).map("/".join)


@settings(max_examples=300)
@given(st.lists(st.tuples(patterns, st.integers(0, 5)), max_size=20), channels)
def test_trie_agrees_with_reference_matcher(subs: list[tuple[str, int]], channel: str) -> None:
    idx: SubscriptionIndex[int] = SubscriptionIndex()
    for pattern, sub in subs:
        idx.add(pattern, sub)
    expected = {sub for pattern, sub in subs if pattern_matches(pattern, channel)}
    assert idx.match(channel) == expected
    for pattern, sub in subs:
        idx.remove(pattern, sub)
    assert idx.match(channel) == set()
    assert len(idx) == 0
