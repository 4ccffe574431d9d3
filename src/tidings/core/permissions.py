"""Who may subscribe, publish, and read presence and history, where.

One decision per request, in this order (the first that answers wins):

1. Publishing to a ``$`` channel: refused, always (the server's namespace).
2. The Python hook (``can_subscribe(conn, pattern)``, ``can_publish(conn,
   channel)``, ``can_presence``, ``can_history``; sync or async): ``True`` or
   ``False`` is final; ``None`` means "no opinion".
3. Admins (``admin: true`` in the token, or a user in ``HubCore(admins=...)``):
   allowed.
4. The first configured :class:`Rule` whose pattern covers the name and that
   lists this action: allowed if the connection is one of its principals.
5. No authenticator configured (local development): allowed.
6. The safe defaults once auth is on: refused are wide wildcards (a pattern
   whose first level is ``+`` or ``#``), ``$`` channels, and another user's
   private channels (``user/<name>/...``, including ``user/+/...``).
7. The token's ``channels`` claim, when present: allowed within it only.
8. Otherwise reading (subscribe, presence, history) is allowed to
   authenticated connections and publishing is refused.

Rules name principals: ``"*"`` (anyone, even anonymous), ``"authenticated"``
(any user), or user names; a rule's pattern may hold ``{user}``, replaced by
the connection's user (``user/{user}/#``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tidings.core.hooks import ErrorContext
from tidings.protocol.codes import ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import validate_pattern

if TYPE_CHECKING:
    from tidings.core.connection import Connection
    from tidings.core.hub import HubCore

__all__ = ["ACTIONS", "Action", "Rule", "check", "check_now", "covers", "decide", "is_wide"]

Action = Literal["subscribe", "publish", "presence", "history"]
ACTIONS: tuple[Action, ...] = ("subscribe", "publish", "presence", "history")
ANYONE, AUTHENTICATED = "*", "authenticated"


def covers(outer: str, inner: str) -> bool:
    """True when every channel ``inner`` matches is matched by ``outer`` (both
    valid patterns or channels, MQTT semantics)."""
    if inner.startswith("$") and outer[:1] in ("+", "#"):
        return False
    o_levels, i_levels = outer.split("/"), inner.split("/")
    for i, o in enumerate(o_levels):
        if o == "#":
            return True
        if i >= len(i_levels):
            return False
        level = i_levels[i]
        if level == "#":
            return False
        if o != "+" and o != level:
            return False
    return len(o_levels) == len(i_levels)


def is_wide(pattern: str) -> bool:
    """A pattern whose first level is a wildcard: it reads across every namespace."""
    return pattern.split("/", 1)[0] in ("+", "#")


def _private_of_other(name: str, user: str | None) -> bool:
    levels = name.split("/", 2)
    return levels[0] == "user" and len(levels) > 1 and levels[1] != user  # also "+", "#"


@dataclass(frozen=True, slots=True)
class Rule:
    """Per-channel permissions: who may do each action under ``pattern``.

    An action left out (None) leaves the decision to the next rule or the
    defaults; an empty list refuses it to everyone but admins.
    """

    pattern: str
    subscribe: tuple[str, ...] | None = None
    publish: tuple[str, ...] | None = None
    presence: tuple[str, ...] | None = None
    history: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        validate_pattern(self.pattern.replace("{user}", "u"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """From a config table: ``{pattern, subscribe: [...], publish: [...], ...}``."""
        unknown = set(data) - {"pattern", *ACTIONS}
        if unknown:
            raise ValueError(f"unknown permission keys: {', '.join(sorted(unknown))}")
        pattern = data.get("pattern")
        if not isinstance(pattern, str):
            raise ValueError("a permission rule needs a 'pattern'")
        lists: dict[str, tuple[str, ...] | None] = {}
        for action in ACTIONS:
            value = data.get(action)
            if value is not None and (not isinstance(value, list)
                                      or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"'{action}' must be a list of users, '*' or 'authenticated'")
            lists[action] = None if value is None else tuple(value)
        try:
            return cls(pattern, **lists)
        except ProtocolError as exc:
            raise ValueError(f"bad permission pattern {pattern!r}: {exc.message}") from None

    def verdict(self, action: Action, name: str, user: str | None) -> bool | None:
        """True/False if this rule decides ``action`` on ``name``; None if it does not."""
        principals: Sequence[str] | None = getattr(self, action)
        if principals is None:
            return None
        pattern = self.pattern
        if "{user}" in pattern:
            if user is None or any(c in user for c in "/+#") or not user:
                return None
            pattern = pattern.replace("{user}", user)
        if not covers(pattern, name):
            return None
        return ANYONE in principals or (user is not None and (
            AUTHENTICATED in principals or user in principals))


def decide(hub: HubCore, action: Action, conn: Connection, name: str) -> str | None:
    """Steps 3-8 of the module docstring: None if allowed, else the reason."""
    identity = conn.identity
    user = conn.user
    if (identity is not None and identity.admin) or (user is not None and user in hub.admins):
        return None
    for rule in hub.rules:
        verdict = rule.verdict(action, name, user)
        if verdict is not None:
            return None if verdict else f"not allowed to {action} {name!r}"
    if hub.auth is None:
        return None
    if is_wide(name):
        return "wildcards in the first level are for admins"
    if name.startswith("$"):
        return "'$' channels are reserved to the server"
    if _private_of_other(name, user):
        return f"{name!r} is another user's private channel"
    grants = identity.channels if identity is not None else None
    if grants is not None:
        allowed = grants.publish if action == "publish" else grants.subscribe
        if any(covers(p, name) for p in allowed):
            return None
        return f"the token does not allow {action} on {name!r}"
    if action == "publish":
        return f"not allowed to publish to {name!r}"
    return None if user is not None else "not authenticated"


def check_now(hub: HubCore, action: Action, conn: Connection, name: str) -> None:
    """:func:`check` for when no hook is set for ``action`` (nothing to await)."""
    if action == "publish" and name.startswith("$"):
        raise ProtocolError(ErrorCode.FORBIDDEN, "'$' channels are reserved to the server")
    reason = decide(hub, action, conn, name)
    if reason is not None:
        raise ProtocolError(ErrorCode.FORBIDDEN, reason)


async def check(hub: HubCore, action: Action, conn: Connection, name: str) -> None:
    """Raise ``forbidden`` unless ``conn`` may do ``action`` on ``name``."""
    if action == "publish" and name.startswith("$"):
        raise ProtocolError(ErrorCode.FORBIDDEN, "'$' channels are reserved to the server")
    hook = hub.hooks.get(action)
    if hook is not None:
        context = ErrorContext(f"can_{action}", conn.conn_id, conn.user, name)
        verdict = await hub.error_handlers.call(hook, conn, name, context=context)
        if verdict is not None:
            if verdict:
                return
            raise ProtocolError(ErrorCode.FORBIDDEN, f"not allowed to {action} {name!r}")
    reason = decide(hub, action, conn, name)
    if reason is not None:
        raise ProtocolError(ErrorCode.FORBIDDEN, reason)


def parse_rules(tables: Iterable[Mapping[str, Any]]) -> list[Rule]:
    return [Rule.from_dict(t) for t in tables]
