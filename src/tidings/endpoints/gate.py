"""The door of every websocket endpoint: origin, authentication, connection limits.

Order of the checks, and how each refusal looks to the client:

1. ``Origin`` not in the allow-list (when one is set): the handshake is
   refused before it is accepted, so the client sees HTTP 403.
2. A token in the handshake (``?token=``, ``Authorization: Bearer``, a
   ``token.<jwt>`` subprotocol) that does not verify: HTTP 403 as well.
3. The handshake is accepted (echoing the ``tidings`` or ``token.*``
   subprotocol offered). A hub that is not running closes with 1013.
4. Auth on and no token in the handshake: the first frame must be
   ``{"type": "connect", "token": ...}`` within ``Limits.auth_timeout``
   seconds; otherwise close 1008 with the reason.
5. Too many connections for this user or this IP: close 1008
   ``too many connections``.

Every refusal is counted in ``hub.stats.refusals`` by reason (``/metrics``).
Reasons sent to clients never contain the token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tidings.core.hooks import ErrorContext
from tidings.exceptions import HookError
from tidings.protocol.codes import CloseCode, ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.native import Connect, RequestId, decode_command
from tidings.security.auth import AuthError, Identity, select_subprotocol, token_from_scope

if TYPE_CHECKING:
    from tidings.core.connection import Connection
    from tidings.core.hub import HubCore

__all__ = [
    "Admission",
    "admit",
    "authenticate",
    "client_ip",
    "connection_limit",
    "origin_allowed",
    "refresh",
]

log = logging.getLogger("tidings.endpoints.gate")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Admission:
    """What the gate learnt about an accepted connection."""

    identity: Identity | None
    ip: str | None
    connect_id: RequestId = None  # id of a first-frame ``connect``, to answer it
    connected_by_frame: bool = False


def _header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def origin_allowed(hub: HubCore, scope: MutableMapping[str, Any]) -> bool:
    """True without an allow-list, for clients that send no ``Origin`` (not a
    browser, so not a cross-site hijack), and for a listed origin."""
    allowed = hub.allowed_origins
    if not allowed or "*" in allowed:
        return True
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    return origin.strip().rstrip("/").lower() in allowed


def client_ip(scope: MutableMapping[str, Any]) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


async def authenticate(hub: HubCore, token: str) -> Identity:
    """Ask the hub's authenticator; a crash in it is logged and refuses the token."""
    auth = hub.auth
    if auth is None:
        raise AuthError("authentication is not configured")
    try:
        identity = await hub.error_handlers.call(
            auth.authenticate, token, context=ErrorContext("authenticate"))
    except HookError:
        raise AuthError("authentication failed") from None
    if not isinstance(identity, Identity):
        raise AuthError("authentication failed")
    return identity


def connection_limit(hub: HubCore, user: str | None, ip: str | None) -> str | None:
    """The refusal reason if one more connection of ``user``/``ip`` is too many."""
    limits = hub.limits
    if (limits.max_connections_per_user and user is not None
            and len(hub.users.get(user, ())) >= limits.max_connections_per_user):
        return "connections_per_user"
    if (limits.max_connections_per_ip and ip is not None
            and hub.ips[ip] >= limits.max_connections_per_ip):
        return "connections_per_ip"
    return None


async def _close(hub: HubCore, send: Send, code: int, reason: str, metric: str) -> None:
    hub.stats.refusals[metric] += 1
    await send({"type": "websocket.close", "code": code, "reason": reason[:120]})


async def _first_frame(hub: HubCore, receive: Receive, send: Send
                       ) -> tuple[Identity, RequestId] | None:
    try:
        message = await asyncio.wait_for(receive(), hub.limits.auth_timeout)
    except TimeoutError:
        await _close(hub, send, CloseCode.POLICY_VIOLATION, "authentication timeout",
                     "auth_timeout")
        return None
    if message["type"] == "websocket.disconnect":
        return None
    data = message.get("text")
    if data is None:
        data = message.get("bytes")
    if data is None or len(data) > hub.limits.frame_soft:
        await _close(hub, send, CloseCode.POLICY_VIOLATION, "expected a connect frame",
                     "auth_missing")
        return None
    try:
        cmd = decode_command(data, max_depth=8, max_name=hub.limits.max_name)
    except ProtocolError:
        cmd = None
    if not isinstance(cmd, Connect):
        await _close(hub, send, CloseCode.POLICY_VIOLATION, "expected a connect frame",
                     "auth_missing")
        return None
    try:
        identity = await authenticate(hub, cmd.token)
    except AuthError as exc:
        await _close(hub, send, CloseCode.POLICY_VIOLATION,
                     f"authentication failed: {exc.reason}", "auth_invalid")
        return None
    return identity, cmd.id


async def admit(hub: HubCore, scope: MutableMapping[str, Any], receive: Receive,
                send: Send, *, connect_frame: bool = True) -> Admission | None:
    """Run the checks of the module docstring; None when the connection was refused.

    On success the caller must register the connection without awaiting in
    between, so the connection limits cannot be overrun by a race.
    ``connect_frame=False`` skips step 4 for protocols with their own first
    frame (Centrifuge's ``connect``): the caller then authenticates and checks
    :func:`connection_limit` for the user itself.
    """
    message = await receive()
    if message["type"] != "websocket.connect":
        return None
    if not origin_allowed(hub, scope):
        await _close(hub, send, CloseCode.POLICY_VIOLATION, "origin not allowed", "origin")
        return None
    identity: Identity | None = None
    token = token_from_scope(scope) if hub.auth is not None else None
    if token is not None and hub.running:
        try:
            identity = await authenticate(hub, token)
        except AuthError as exc:
            log.info("handshake refused: %s", exc.reason)
            await _close(hub, send, CloseCode.POLICY_VIOLATION, exc.reason, "auth_invalid")
            return None
    accept: Message = {"type": "websocket.accept"}
    subprotocol = select_subprotocol(scope)
    if subprotocol is not None:
        accept["subprotocol"] = subprotocol
    await send(accept)
    if not hub.running:  # accepted first, so the client sees 1013 and not a 403
        await send({"type": "websocket.close", "code": CloseCode.TRY_AGAIN_LATER,
                    "reason": "server not running"})
        return None
    connect_id: RequestId = None
    by_frame = False
    if hub.auth is not None and identity is None and connect_frame:
        got = await _first_frame(hub, receive, send)
        if got is None:
            return None
        identity, connect_id = got
        by_frame = True
    ip = client_ip(scope)
    reason = connection_limit(hub, identity.user if identity else None, ip)
    if reason is not None:
        await _close(hub, send, CloseCode.POLICY_VIOLATION, "too many connections", reason)
        return None
    return Admission(identity, ip, connect_id, by_frame)


async def refresh(hub: HubCore, conn: Connection, token: str) -> dict[str, Any]:
    """Swap the connection's token for a fresh one (same user); the reply's result."""
    if hub.auth is None:
        raise _forbidden("authentication is not enabled on this server")
    try:
        identity = await authenticate(hub, token)
    except AuthError as exc:
        hub.stats.refusals["refresh_invalid"] += 1
        raise _forbidden(f"refresh refused: {exc.reason}") from None
    if identity.user != conn.user:
        hub.stats.refusals["refresh_invalid"] += 1
        raise _forbidden("refresh refused: the token is for another user")
    conn.identity = identity
    hub.arm_expiry(conn)
    return {"user": identity.user, "expires": identity.expires}


def _forbidden(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, message)
