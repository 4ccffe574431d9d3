"""The websocket session core every endpoint runs on (native, raw streams, Centrifuge).

One admission path (:func:`tidings.endpoints.gate.admit`: origin, token, limits),
one registration with the hub that is always undone, one way to read the next
client frame (idle timeout, disconnect), one frame-size guard and one pacing
rule. A protocol file adds only its frame handling on top: a protocol is one
file over this core, and the command logic they share is
:mod:`tidings.core.operations`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from tidings.asgi import Message, Receive, Scope, Send
from tidings.brokers.base import PublishOutcome
from tidings.core.connection import Connection, ConnectionKind
from tidings.endpoints.gate import admit
from tidings.exceptions import BrokerUnavailable, HubError
from tidings.protocol.codes import CloseCode
from tidings.types import Publication

if TYPE_CHECKING:
    from tidings.core.hub import HubCore

__all__ = [
    "DIRECT",
    "MAX_PIPELINED",
    "InFlight",
    "WebSocketSession",
    "frame_guard",
    "pace",
    "payload_of",
    "position_of",
    "query_params",
    "receive_message",
    "refuse",
]

log = logging.getLogger("tidings.endpoints")

DIRECT = "tidings.direct"  # ASGI extension of tidings.server.wsproto
MAX_PIPELINED = 1024  # publishes of one connection in flight at once (remote brokers)


def query_params(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(raw).items()}


async def refuse(send: Send, code: int, reason: str) -> None:
    await send({"type": "websocket.close", "code": code, "reason": reason[:120]})


async def receive_message(receive: Receive, conn: Connection, idle: float | None) -> Message | None:
    """Next client frame, or None when the socket is gone or went idle."""
    if idle:
        try:
            message = await asyncio.wait_for(receive(), idle)
        except TimeoutError:
            conn.close(CloseCode.NORMAL, "idle timeout")
            return None
    else:
        message = await receive()
    if message["type"] == "websocket.disconnect":
        return None
    return message


async def pace(conn: Connection) -> None:
    """A raw producer above ``Limits.rate`` frames/s waits for its next token:
    its frames are not refused (a raw stream has no error frame), they are read
    later, and TCP slows the producer down."""
    loop = asyncio.get_running_loop()
    delay = conn.frame_delay(loop.time())
    while delay > 0.0:  # a timer, not a condition to wait for: the bucket refills
        await asyncio.sleep(delay)
        delay = conn.frame_delay(loop.time())


def frame_guard(hub: HubCore, conn: Connection, data: str | bytes) -> bool:
    """False (and the connection closing with 1009) for a frame above the hard
    size limit. Every endpoint checks it before looking at the frame."""
    if len(data) <= hub.limits.frame_hard:
        return True
    hub.stats.errors["frame_hard_limit"] += 1
    conn.close(CloseCode.MESSAGE_TOO_BIG, "frame above the hard size limit", flush=False)
    return False


def payload_of(message: Message) -> str | bytes | None:
    text = message.get("text")
    return text if text is not None else message.get("bytes")


def position_of(outcome: PublishOutcome, conn: Connection) -> dict[str, Any] | None:
    """What a completed publish answers: the publication's position, offset 0
    and no epoch when the broker was down (delivered locally, SPEC 7), None
    after an unexpected failure (logged)."""
    if isinstance(outcome, Publication):
        return {"offset": outcome.offset, "epoch": outcome.epoch}
    if isinstance(outcome, BrokerUnavailable):
        return {"offset": 0, "epoch": ""}
    log.error("publish from %s failed: %r", conn.conn_id, outcome)
    return None


class InFlight:
    """A connection's publishes in flight, counted: ``room`` waits for a free
    slot, ``drain`` for none left (both O(1), no future per publish)."""

    __slots__ = ("count", "waiter")

    def __init__(self) -> None:
        self.count = 0
        self.waiter: asyncio.Future[None] | None = None

    def finished(self, _: object = None) -> None:
        """One publish completed (also a task's done callback)."""
        self.count -= 1
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def room(self, limit: int) -> None:
        await self._until(limit - 1)

    async def drain(self) -> None:
        await self._until(0)

    async def _until(self, most: int) -> None:
        while self.count > most:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


class WebSocketSession:
    """Base of the websocket endpoints: accept, register, always unregister."""

    kind = ConnectionKind.RAW

    def __init__(self, hub: HubCore) -> None:
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # origin, auth (handshake or first frame), limits: see tidings.endpoints.gate
        admission = await admit(self.hub, scope, receive, send)
        if admission is None:
            return
        try:  # no await since admit(): the connection limits hold
            conn = self.hub.register(send, kind=self.kind, identity=admission.identity,
                                     ip=admission.ip,
                                     direct=scope.get("extensions", {}).get(DIRECT))
        except HubError:
            await refuse(send, CloseCode.TRY_AGAIN_LATER, "server not running")
            return
        if admission.connected_by_frame and self.kind is ConnectionKind.NATIVE:
            scope["tidings.connect_id"] = admission.connect_id
        del admission  # not held for the connection's life: idle connections are many
        try:
            await self.run(scope, receive, conn)
        finally:
            await conn.wait_closed(0.5)
            await self.hub.unregister(conn)

    def run(self, scope: Scope, receive: Receive, conn: Connection) -> Awaitable[None]:
        """The protocol's part: runs until the client goes away."""
        raise NotImplementedError


