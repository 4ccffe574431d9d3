"""Permission decisions (tidings.core.permissions) without a server."""

from __future__ import annotations

from typing import Any

import pytest

from tidings import Hub
from tidings.core.connection import Connection
from tidings.core.permissions import Rule, covers, decide, is_wide
from tidings.security.auth import Grants, Identity, JWTAuth


@pytest.mark.parametrize(("outer", "inner", "expected"), [
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("a/#", "a/+", True), ("a/#", "a/#", True),
    ("a/+", "a/b", True), ("a/+", "a/+", True), ("a/+", "a/#", False), ("a/+", "a/b/c", False),
    ("a/b", "a/b", True), ("a/b", "a/+", False), ("#", "$sys/x", False), ("+/x", "$s/x", False),
    ("#", "anything/at/all", True), ("a/#", "#", False), ("a/b/#", "a/+/c", False),
])
def test_covers(outer: str, inner: str, expected: bool) -> None:
    assert covers(outer, inner) is expected


def test_is_wide() -> None:
    assert is_wide("#") and is_wide("+/a") and not is_wide("a/#") and not is_wide("a/+")


def conn(hub: Hub, user: str | None, identity: Identity | None = None) -> Connection:
    async def send(message: Any) -> None:
        return None

    c = Connection(hub, "n.c", send, user=user)
    c.identity = identity
    return c


def test_defaults_without_auth_allow_everything_but_rules_still_apply() -> None:
    hub = Hub(rules=[Rule("locked/#", subscribe=[])])
    anon = conn(hub, None)
    assert decide(hub, "subscribe", anon, "#") is None
    assert decide(hub, "publish", anon, "x") is None
    assert decide(hub, "subscribe", anon, "locked/a") is not None


def test_safe_defaults_with_auth() -> None:
    hub = Hub(auth=JWTAuth("k" * 16), admins=["root"])
    alice = conn(hub, "alice", Identity("alice"))
    for name in ("#", "+/a", "$sys/x", "user/bob/x", "user/+/x", "user/#"):
        assert decide(hub, "subscribe", alice, name) is not None, name
    assert decide(hub, "subscribe", alice, "user/alice/#") is None
    assert decide(hub, "history", alice, "chat/a") is None
    assert decide(hub, "publish", alice, "chat/a") is not None
    assert decide(hub, "subscribe", conn(hub, "root"), "#") is None
    assert decide(hub, "subscribe", conn(hub, "x", Identity("x", admin=True)), "#") is None
    limited = conn(hub, "l", Identity("l", Grants(("public/#",), ("public/out",))))
    assert decide(hub, "subscribe", limited, "public/+") is None
    assert decide(hub, "subscribe", limited, "private/x") is not None
    assert decide(hub, "publish", limited, "public/out") is None
    assert decide(hub, "publish", limited, "public/in") is not None


def test_rules() -> None:
    rule = Rule.from_dict({"pattern": "user/{user}/#", "publish": ["authenticated"]})
    assert rule.verdict("publish", "user/alice/x", "alice") is True
    assert rule.verdict("publish", "user/bob/x", "alice") is None  # not this rule's business
    assert rule.verdict("publish", "user/x/y", None) is None
    assert rule.verdict("subscribe", "user/alice/x", "alice") is None
    news = Rule("news/#", subscribe=["*"], publish=["editor"])
    assert news.verdict("subscribe", "news/a", None) is True
    assert news.verdict("publish", "news/a", "alice") is False
    assert news.verdict("publish", "news/a", "editor") is True
    for bad in ({"pattern": "a/#/b"}, {"pattern": "a", "publish": "x"}, {"pattern": "a",
                                                                          "read": []}, {}):
        with pytest.raises(ValueError, match=r"pattern|list|unknown"):
            Rule.from_dict(bad)
