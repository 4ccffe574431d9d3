"""The Centrifuge client protocol at ``/connection/websocket`` (SPEC 6.3).

The official Centrifugo SDKs (centrifuge-js, centrifuge-python, -go, -swift,
-dart, -java) connect here unchanged, JSON format. A session runs like this:

1. The gate (:mod:`tidings.endpoints.gate`) checks origin, a handshake token and the
   per-IP limit, as for every endpoint.
2. The first frame must hold a ``connect`` command within
   ``Limits.auth_timeout`` (else close 3502 stale; anything else: 3501). With
   auth on and no token in the handshake, its ``token`` is the JWT: missing,
   reply 101; expired, reply 109 (SDKs fetch a new one); invalid, close 3500.
   Over the per-user limit: close 3504. The reply carries ``client`` (the
   conn_id), ``version``, ``ping``/``pong`` (the server pings with ``{}``
   every ``ping_interval`` seconds and the SDK answers ``{}``) and, for an
   expiring token, ``expires``/``ttl`` so the SDK sends ``refresh`` in time.
3. Then every command maps onto the same hub operation and permission check
   as the native protocol; see docs/centrifuge.md for the table.

Subscribing runs the same :func:`tidings.core.operations.subscribe` as the
native protocol: live publications are held until the reply (with any
recovered publications) is queued, and an outage subscribes at an unknown
position instead of failing, so a recovering client sees each offset once and
in order. Join/leave pushes go to
subscriptions that asked for them with ``join_leave: true`` (the SDKs'
``join_leave`` subscription option), as in Centrifugo.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from tidings._version import __version__
from tidings.core import operations
from tidings.core.connection import Connection, ConnectionKind
from tidings.core.permissions import check
from tidings.endpoints.gate import admit, authenticate, connection_limit, refresh
from tidings.endpoints.session import DIRECT, frame_guard, payload_of, receive_message
from tidings.exceptions import AuthError, HubError
from tidings.protocol.centrifuge import (
    FLAG_REJECT_UNRECOVERED,
    PING,
    CentrifugeError,
    Command,
    Connect,
    Disconnect,
    History,
    Ping,
    Pong,
    Presence,
    PresenceStats,
    Publish,
    Refresh,
    ReplyCode,
    Rpc,
    SendMessage,
    SubRefresh,
    Subscribe,
    Unsubscribe,
    decode_command,
    encode_error,
    encode_publication,
    encode_reply,
    reply_code,
    split_frame,
)
from tidings.protocol.errors import ProtocolError

if TYPE_CHECKING:
    from tidings.core.hub import HubCore
    from tidings.security.auth import Identity
    from tidings.types import Publication

__all__ = ["CentrifugeEndpoint"]

log = logging.getLogger("tidings.centrifuge")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

def _pub(p: Publication) -> dict[str, Any]:
    data = p.data
    if isinstance(data, bytes):
        data = p.to_dict()["data"]  # {"b64": ...}, as in live pushes
    return encode_publication(data, p.offset, p.sender, p.ts)


def _ttl(expires: float | None) -> dict[str, Any]:
    """``expires``/``ttl`` of connect and refresh results: the SDK refreshes after
    ``ttl`` seconds, so leave it a margin before the server closes the connection."""
    if expires is None:
        return {}
    left = expires - time.time()
    return {"expires": True, "ttl": max(1, int(left - min(10.0, left / 4)))}


class _Pinger:
    """Sends ``{}`` every ``interval`` seconds (one timer, re-armed)."""

    def __init__(self, conn: Connection, interval: float) -> None:
        self.conn = conn
        self.interval = interval
        self.handle: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self.handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        if self.conn.closed:
            return
        self.conn.send_frame(PING.decode())
        self._arm()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class CentrifugeEndpoint:
    """ASGI websocket app speaking the Centrifuge client protocol for ``hub``."""

    def __init__(self, hub: HubCore, *, ping_interval: float = 25.0) -> None:
        self.hub = hub
        self.ping_interval = ping_interval

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub
        admission = await admit(hub, scope, receive, send, connect_frame=False)
        if admission is None:
            return
        if "centrifuge-protobuf" in (scope.get("subprotocols") or ()):
            await self._refuse(send, Disconnect.BAD_REQUEST,
                               "protobuf format is not supported yet", "protobuf")
            return
        first = await self._first_frame(receive, send)
        if first is None:
            return
        connect, rest = first
        identity = admission.identity
        if hub.auth is not None and identity is None:
            identity = await self._authenticate(connect, receive, send)
            if identity is None:
                return
        reason = connection_limit(hub, identity.user if identity else None, admission.ip)
        if reason is not None:
            await self._refuse(send, Disconnect.CONNECTION_LIMIT, "connection limit", reason)
            return
        try:  # no await since connection_limit(): the limits hold
            conn = hub.register(send, kind=ConnectionKind.CENTRIFUGE, identity=identity,
                                ip=admission.ip,
                                direct=scope.get("extensions", {}).get(DIRECT))
        except HubError:
            await self._refuse(send, Disconnect.SHUTDOWN, "server not running", "not_running")
            return
        pinger = _Pinger(conn, self.ping_interval) if self.ping_interval > 0 else None
        try:
            result: dict[str, Any] = {"client": conn.conn_id, "version": __version__,
                                      "node": hub.node}
            if pinger is not None:
                result.update(ping=max(1, int(self.ping_interval)), pong=True)
            result.update(_ttl(identity.expires if identity else None))
            conn.send_frame(encode_reply(connect.id, "connect", result).decode())
            session = _Session(hub, conn)
            for obj in rest:
                await session.handle(obj, None)
            await session.serve(receive)
        finally:
            if pinger is not None:
                pinger.cancel()
            await conn.wait_closed(0.5)
            await hub.unregister(conn)

    async def _refuse(self, send: Send, code: int, reason: str, metric: str) -> None:
        self.hub.stats.refusals[metric] += 1
        await send({"type": "websocket.close", "code": code, "reason": reason[:120]})

    async def _first_frame(self, receive: Receive, send: Send
                           ) -> tuple[Connect, list[dict[str, Any]]] | None:
        """The ``connect`` command and the commands that came after it in its frame."""
        limits = self.hub.limits
        try:
            message = await asyncio.wait_for(receive(), limits.auth_timeout)
        except TimeoutError:
            await self._refuse(send, Disconnect.STALE, "stale", "auth_timeout")
            return None
        if message["type"] == "websocket.disconnect":
            return None
        data = payload_of(message)
        try:
            if data is None or len(data) > limits.frame_soft:
                raise CentrifugeError(ReplyCode.BAD_REQUEST, "expected a connect command")
            objs = split_frame(data, max_depth=limits.max_depth)
            cmd = decode_command(objs[0], max_name=limits.max_name)
        except CentrifugeError:
            cmd = None
        if not isinstance(cmd, Connect):
            await self._refuse(send, Disconnect.BAD_REQUEST, "bad request", "auth_missing")
            return None
        return cmd, objs[1:]

    async def _authenticate(self, connect: Connect, receive: Receive,
                            send: Send) -> Identity | None:
        hub = self.hub
        if not connect.token:
            hub.stats.refusals["auth_missing"] += 1
            await self._reply_and_linger(connect.id, ReplyCode.UNAUTHORIZED, "unauthorized",
                                         receive, send)
            return None
        try:
            return await authenticate(hub, connect.token)
        except AuthError as exc:
            if exc.reason == "token expired":
                hub.stats.refusals["auth_expired"] += 1
                await self._reply_and_linger(connect.id, ReplyCode.TOKEN_EXPIRED,
                                             "token expired", receive, send)
                return None
            log.info("centrifuge connect refused: %s", exc.reason)
            await self._refuse(send, Disconnect.INVALID_TOKEN, "invalid token", "auth_invalid")
            return None

    async def _reply_and_linger(self, rid: int, code: ReplyCode, message: str,
                                receive: Receive, send: Send) -> None:
        """Answer ``connect`` with an error and let the client close: a close
        frame right behind the reply could overtake it in the SDK, which acts
        on the reply (refresh the token, or stop)."""
        await send({"type": "websocket.send", "text": encode_error(rid, code, message).decode()})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hub.limits.auth_timeout
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                break
            if msg["type"] == "websocket.disconnect":
                return
        await send({"type": "websocket.close", "code": Disconnect.STALE, "reason": "stale"})


class _Session:
    """The commands of one connected client."""

    def __init__(self, hub: HubCore, conn: Connection) -> None:
        self.hub = hub
        self.conn = conn

    async def serve(self, receive: Receive) -> None:
        hub, conn, limits = self.hub, self.conn, self.hub.limits
        loop = asyncio.get_running_loop()
        while not conn.closed:
            message = await receive_message(receive, conn, limits.idle_timeout)
            if message is None:
                return
            data = payload_of(message)
            if data is None:
                continue
            if not frame_guard(hub, conn, data):
                return
            try:
                objs = split_frame(data, max_depth=limits.max_depth)
            except CentrifugeError as exc:
                hub.stats.errors["bad_request"] += 1
                conn.close(Disconnect.BAD_REQUEST, exc.message)
                return
            refusal: tuple[ReplyCode, str] | None = None
            if not conn.allow_frame(loop.time()):
                if conn.violations >= limits.max_violations:
                    conn.close(Disconnect.TOO_MANY_REQUESTS, "too many requests")
                    return
                refusal = (ReplyCode.TOO_MANY_REQUESTS, "too many requests")
            elif len(data) > limits.frame_soft:
                refusal = (ReplyCode.LIMIT_EXCEEDED,
                           f"frame larger than {limits.frame_soft} bytes")
            for obj in objs:
                await self.handle(obj, refusal)

    def _error(self, rid: int, code: ReplyCode, message: str) -> None:
        self.hub.stats.errors[f"centrifuge_{int(code)}"] += 1
        self.conn.send_frame(encode_error(rid, code, message).decode())

    async def handle(self, obj: dict[str, Any], refusal: tuple[ReplyCode, str] | None) -> None:
        """Decode and apply one command object; reply (or error) on the connection."""
        conn = self.conn
        if conn.closed:  # an earlier command of the frame ended it
            return
        try:
            cmd = decode_command(obj, max_name=self.hub.limits.max_name)
        except CentrifugeError as exc:
            if not isinstance(exc.id, int) or exc.id == 0:  # nothing to reply to
                self.hub.stats.errors["bad_request"] += 1
                conn.close(Disconnect.BAD_REQUEST, exc.message)
                return
            self._error(exc.id, exc.reply, exc.message)
            return
        if isinstance(cmd, (Pong, SendMessage)):  # no reply; no message handler here
            return
        if refusal is not None:
            self._error(cmd.id, *refusal)
            return
        try:
            reply = await self._apply(cmd)
        except CentrifugeError as exc:
            self._error(cmd.id, exc.reply, exc.message)
            return
        except operations.Unrecoverable:
            self._error(cmd.id, ReplyCode.UNRECOVERABLE_POSITION, "unrecoverable position")
            return
        except Exception as exc:
            code, message = operations.classify(self.hub, conn, type(cmd).__name__, exc)
            reply_to = ProtocolError(code, message)
            self._error(cmd.id, reply_code(reply_to),
                        "internal server error" if code == "internal" else message)
            return
        if reply is not None:
            conn.send_frame(reply)

    async def _apply(self, cmd: Command) -> str | None:
        hub, conn = self.hub, self.conn
        if isinstance(cmd, Publish):
            await check(hub, "publish", conn, cmd.channel)
            await hub.publisher.publish(cmd.channel, cmd.data, sender=conn.conn_id)
            return encode_reply(cmd.id, "publish").decode()
        if isinstance(cmd, Subscribe):
            await self._subscribe(cmd)
            return None
        if isinstance(cmd, Unsubscribe):
            await hub.unsubscribe(conn, cmd.channel)  # not subscribed: nothing to do
            return encode_reply(cmd.id, "unsubscribe").decode()
        if isinstance(cmd, Presence):
            await check(hub, "presence", conn, cmd.channel)
            members = await hub.presence(cmd.channel)
            clients: dict[str, Any] = {}
            for m in members:
                info: dict[str, Any] = {"client": m.conn_id, "user": m.user or ""}
                if m.info is not None:
                    info["conn_info"] = m.info
                clients[m.conn_id] = info
            return encode_reply(cmd.id, "presence", {"presence": clients}).decode()
        if isinstance(cmd, PresenceStats):
            await check(hub, "presence", conn, cmd.channel)
            return encode_reply(cmd.id, "presence_stats",
                                await hub.presence_stats(cmd.channel)).decode()
        if isinstance(cmd, History):
            return await self._history(cmd)
        if isinstance(cmd, Ping):
            return encode_reply(cmd.id, "ping").decode()
        if isinstance(cmd, Connect):
            raise CentrifugeError(ReplyCode.BAD_REQUEST, "already connected", cmd.id)
        if isinstance(cmd, Refresh):
            return await self._refresh(cmd)
        if isinstance(cmd, SubRefresh):  # no subscription tokens: nothing expires
            return encode_reply(cmd.id, "sub_refresh").decode()
        if isinstance(cmd, Rpc):
            raise CentrifugeError(ReplyCode.METHOD_NOT_FOUND, "method not found", cmd.id)
        raise CentrifugeError(ReplyCode.METHOD_NOT_FOUND, "method not found")  # pragma: no cover

    async def _subscribe(self, cmd: Subscribe) -> None:
        hub, conn, channel = self.hub, self.conn, cmd.channel
        if channel in conn.subs:
            raise CentrifugeError(ReplyCode.ALREADY_SUBSCRIBED, "already subscribed", cmd.id)
        if len(conn.subs) >= hub.limits.max_subscriptions:
            raise CentrifugeError(ReplyCode.LIMIT_EXCEEDED, "limit exceeded", cmd.id)
        opts = hub.history_config.options(channel)
        recoverable = cmd.recoverable and opts.size > 0 and opts.ttl > 0

        def reply(sub: operations.Subscribed) -> str:
            result: dict[str, Any] = {}
            if sub.recovering:
                result.update(was_recovering=True, recovered=sub.recovered)
                if sub.publications:
                    result["publications"] = [_pub(p) for p in sub.publications]
            if recoverable:
                result["recoverable"] = True
            if recoverable or cmd.positioned:
                result["positioned"] = True
            result.update(offset=sub.offset, epoch=sub.epoch)
            return encode_reply(cmd.id, "subscribe", result).decode()

        await operations.subscribe(
            hub, conn, channel, join_leave=cmd.join_leave, recover=cmd.recover,
            reject_unrecovered=bool(cmd.flag & FLAG_REJECT_UNRECOVERED), reply=reply)

    async def _history(self, cmd: History) -> str:
        hub = self.hub
        page = await operations.history(hub, self.conn, cmd.channel, since=cmd.since,
                                        limit=cmd.limit or None, reverse=cmd.reverse)
        if cmd.since is not None and not page.recovered:
            raise CentrifugeError(ReplyCode.UNRECOVERABLE_POSITION, "unrecoverable position",
                                  cmd.id)
        pubs = [] if cmd.limit == 0 else page.publications
        result: dict[str, Any] = {"offset": page.offset, "epoch": page.epoch}
        if pubs:
            result["publications"] = [_pub(p) for p in pubs]
        return encode_reply(cmd.id, "history", result).decode()

    async def _refresh(self, cmd: Refresh) -> str | None:
        hub, conn = self.hub, self.conn
        try:
            await refresh(hub, conn, cmd.token)
        except ProtocolError as exc:
            if "expired" in exc.message:
                raise CentrifugeError(ReplyCode.TOKEN_EXPIRED, "token expired", cmd.id) from None
            conn.close(Disconnect.INVALID_TOKEN, "invalid token")  # as Centrifugo does
            return None
        identity = conn.identity
        result: dict[str, Any] = {"client": conn.conn_id, "version": __version__}
        result.update(_ttl(identity.expires if identity else None))
        return encode_reply(cmd.id, "refresh", result).decode()
