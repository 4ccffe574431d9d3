"""Local subscription index: which subscribers want a channel.

Exact channels live in a dict; patterns live in a topic trie keyed by level,
so matching a publication costs O(levels + matches) whatever the number of
subscriptions. MQTT semantics: ``+`` matches one level (an empty one too),
``#`` matches the rest including nothing (``a/#`` matches ``a``), and a
wildcard in the first level never matches a channel starting with ``$``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from tidings.protocol.names import is_pattern

__all__ = ["SubscriptionIndex"]

S = TypeVar("S", bound=Hashable)
_EMPTY: frozenset[object] = frozenset()


class _Node(Generic[S]):
    __slots__ = ("children", "hash_subs", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.subs: set[S] = set()  # patterns ending exactly here
        self.hash_subs: set[S] = set()  # patterns ending with '#' below here

    def empty(self) -> bool:
        return not (self.children or self.subs or self.hash_subs)


class SubscriptionIndex(Generic[S]):
    """Map channels and patterns to subscribers; match a channel to subscribers.

    ``add``/``remove`` report whether the pattern gained its first or lost its
    last subscriber, which is what the hub needs to refcount broker interest.
    """

    __slots__ = ("_exact", "_patterns", "_root")

    def __init__(self) -> None:
        self._exact: dict[str, set[S]] = {}
        self._root: _Node[S] = _Node()
        self._patterns: dict[str, int] = {}  # pattern -> number of subscribers

    def add(self, pattern: str, sub: S) -> bool:
        """Add ``sub`` under ``pattern``; True if the pattern had no subscriber before."""
        if not is_pattern(pattern):
            subs = self._exact.get(pattern)
            if subs is None:
                self._exact[pattern] = {sub}
                return True
            subs.add(sub)
            return False
        node = self._root
        levels = pattern.split("/")
        if levels[-1] == "#":
            for level in levels[:-1]:
                node = node.children.setdefault(level, _Node())
            target = node.hash_subs
        else:
            for level in levels:
                node = node.children.setdefault(level, _Node())
            target = node.subs
        if sub in target:
            return False
        target.add(sub)
        count = self._patterns.get(pattern, 0)
        self._patterns[pattern] = count + 1
        return count == 0

    def remove(self, pattern: str, sub: S) -> bool:
        """Remove ``sub`` from ``pattern``; True if the pattern has no subscriber left."""
        if not is_pattern(pattern):
            subs = self._exact.get(pattern)
            if subs is None or sub not in subs:
                return False
            subs.discard(sub)
            if not subs:
                del self._exact[pattern]
                return True
            return False
        levels = pattern.split("/")
        hashed = levels[-1] == "#"
        path = levels[:-1] if hashed else levels
        trail: list[tuple[_Node[S], str]] = []
        node = self._root
        for level in path:
            child = node.children.get(level)
            if child is None:
                return False
            trail.append((node, level))
            node = child
        target = node.hash_subs if hashed else node.subs
        if sub not in target:
            return False
        target.discard(sub)
        for parent, level in reversed(trail):  # prune empty branches
            if not parent.children[level].empty():
                break
            del parent.children[level]
        count = self._patterns[pattern] - 1
        if count:
            self._patterns[pattern] = count
            return False
        del self._patterns[pattern]
        return True

    def match(self, channel: str) -> set[S]:
        """Every subscriber whose channel or pattern matches ``channel``, once each.

        The result may be the index's own set: iterate it, do not keep or change it.
        """
        exact = self._exact.get(channel)
        if not self._patterns:
            return exact if exact is not None else _EMPTY  # type: ignore[return-value]
        result: set[S] = set(exact) if exact else set()
        levels = channel.split("/")
        dollar = channel.startswith("$")
        nodes: list[_Node[S]] = [self._root]
        for depth, level in enumerate(levels):
            nxt: list[_Node[S]] = []
            for node in nodes:
                if node.hash_subs and not (dollar and depth == 0):
                    result |= node.hash_subs
                child = node.children.get(level)
                if child is not None:
                    nxt.append(child)
                if not (dollar and depth == 0):
                    plus = node.children.get("+")
                    if plus is not None:
                        nxt.append(plus)
            if not nxt:
                return result
            nodes = nxt
        for node in nodes:
            result |= node.subs
            result |= node.hash_subs  # 'a/#' matches 'a'
        return result

    def has(self, channel_or_pattern: str) -> bool:
        return channel_or_pattern in self._exact or channel_or_pattern in self._patterns

    def subscribers(self, channel_or_pattern: str) -> int:
        """How many subscribers name exactly this channel or pattern."""
        exact = self._exact.get(channel_or_pattern)
        if exact is not None:
            return len(exact)
        return self._patterns.get(channel_or_pattern, 0)

    def names(self) -> Iterator[str]:
        """Every channel and pattern with at least one subscriber."""
        yield from self._exact
        yield from self._patterns

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)
