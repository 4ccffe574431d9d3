"""ASGI endpoints: the native protocol at ``/ws`` and the raw streams (SPEC 6).

Endpoints are plain ASGI apps (no per-message Starlette wrapper), mounted by
:func:`build_router` together with the HTTP API. Each connection runs one
reader (this coroutine) and one writer task (in :class:`Connection`); no
endpoint ever blocks on a queue, so shutdown never waits on an idle consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.routing import BaseRoute, Route, Router, WebSocketRoute

from tidings.brokers.base import PublishOutcome
from tidings.connection import Connection, ConnectionKind
from tidings.dispatch import handle_command, send_error
from tidings.exceptions import BrokerError, BrokerUnavailable, HookError, HubError
from tidings.gate import admit
from tidings.permissions import Action, check, check_now
from tidings.protocol.codes import CloseCode, ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import validate_channel, validate_pattern
from tidings.protocol.native import (
    Publish,
    decode_command,
    dumps,
    encode_reply,
    encode_welcome,
    loads,
    peek_id,
)
from tidings.queue import Consumer, QueueItem, WorkQueue
from tidings.types import Publication

DIRECT = "tidings.direct"  # ASGI extension of tidings.server.wsproto
_MAX_PIPELINED = 1024  # publishes of one connection in flight at once (remote brokers)

if TYPE_CHECKING:
    from tidings.hub import Hub

__all__ = ["build_router", "serve_native", "welcome_frame"]

log = logging.getLogger("tidings.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def welcome_frame(hub: Hub, conn: Connection) -> str:
    from tidings._version import __version__

    return encode_welcome(conn.conn_id, hub.node, __version__, conn.user).decode()


def _query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(raw).items()}


async def _refuse(send: Send, code: int, reason: str) -> None:
    await send({"type": "websocket.close", "code": code, "reason": reason[:120]})


async def _receive(receive: Receive, conn: Connection, idle: float | None) -> Message | None:
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


async def _pace(conn: Connection) -> None:
    """A raw producer above ``Limits.rate`` frames/s waits for its next token:
    its frames are not refused (a raw stream has no error frame), they are read
    later, and TCP slows the producer down."""
    loop = asyncio.get_running_loop()
    delay = conn.frame_delay(loop.time())
    while delay > 0.0:  # a timer, not a condition to wait for: the bucket refills
        await asyncio.sleep(delay)
        delay = conn.frame_delay(loop.time())


def next_frame_guard(hub: Hub, conn: Connection, data: str | bytes) -> bool:
    """False (and the connection closing with 1009) for a frame above the hard
    size limit. Every endpoint checks it before looking at the frame."""
    if len(data) <= hub.limits.frame_hard:
        return True
    hub.stats.errors["frame_hard_limit"] += 1
    conn.close(CloseCode.MESSAGE_TOO_BIG, "frame above the hard size limit", flush=False)
    return False


def _payload(message: Message) -> str | bytes | None:
    text = message.get("text")
    return text if text is not None else message.get("bytes")


async def serve_native(hub: Hub, conn: Connection, receive: Receive) -> None:
    """Run the native protocol on ``conn`` until the client goes away."""
    limits = hub.limits
    loop = asyncio.get_running_loop()
    # With a remote broker, a run of publishes is pipelined: the next one starts
    # before the previous reply (the broker keeps their order); any other command
    # waits for them first, so what a client does after publishing sees it.
    pipelined = getattr(hub.broker, "pipelined", False)
    nowait = hub.can_publish_nowait  # in-process broker: a publish never waits
    inflight: _InFlight | None = None  # made on first use: idle sockets are many
    idle = limits.idle_timeout
    while not conn.closed:
        if idle:
            maybe = await _receive(receive, conn, idle)
            if maybe is None:
                return
            message = maybe
        else:  # inline: one frame less held by every idle connection
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
        data = _payload(message)
        if data is None:
            continue
        if not next_frame_guard(hub, conn, data):
            return
        if not conn.allow_frame(loop.time()):
            send_error(hub, conn, peek_id(data), ErrorCode.RATE_LIMITED,
                       "too many frames per second")
            if conn.violations >= limits.max_violations:
                conn.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded repeatedly")
                return
            continue
        if len(data) > limits.frame_soft:
            send_error(hub, conn, peek_id(data), ErrorCode.TOO_LARGE,
                       f"frame larger than {limits.frame_soft} bytes")
            continue
        try:
            cmd = decode_command(data, max_depth=limits.max_depth, max_name=limits.max_name)
        except ProtocolError as exc:
            send_error(hub, conn, exc.id, exc.code, exc.message)
            continue
        if nowait and isinstance(cmd, Publish) and hub.can_publish is None:
            _publish_now(hub, conn, cmd)  # no coroutine, no task
            continue
        if pipelined and isinstance(cmd, Publish):
            if inflight is None:
                inflight = _InFlight()
            await inflight.room(_MAX_PIPELINED)
            if hub.can_publish is not None:  # a hook may need awaiting: a task keeps order
                task = loop.create_task(handle_command(hub, conn, cmd))
                inflight.count += 1
                task.add_done_callback(inflight.finished)
            else:
                _publish_soon(hub, conn, cmd, inflight)
            continue
        if inflight is not None and inflight.count:
            await inflight.drain()
        await handle_command(hub, conn, cmd)


def _publish_now(hub: Hub, conn: Connection, cmd: Publish) -> None:
    """A native ``publish`` on an in-process broker with no hook to await: what
    ``handle_command`` does, without its coroutines."""
    try:
        check_now(hub, "publish", conn, cmd.channel)
        pub = hub.publish_nowait(cmd.channel, cmd.data, sender=conn.conn_id)
    except ProtocolError as exc:
        send_error(hub, conn, cmd.id, exc.code, exc.message)
        return
    except Exception:
        log.exception("node %s: publish from %s failed", hub.node, conn.conn_id)
        send_error(hub, conn, cmd.id, ErrorCode.INTERNAL, "internal error")
        return
    conn.send_frame(encode_reply(cmd.id, {"offset": pub.offset, "epoch": pub.epoch}).decode())


def _publish_soon(hub: Hub, conn: Connection, cmd: Publish, inflight: _InFlight) -> None:
    """A native ``publish`` on a pipelined broker without a task or a future:
    checked now, started now (so publishes keep their order), answered when it
    completes."""
    rid = cmd.id
    try:
        check_now(hub, "publish", conn, cmd.channel)
    except ProtocolError as exc:
        send_error(hub, conn, rid, exc.code, exc.message)
        return

    def answer(outcome: PublishOutcome) -> None:
        inflight.finished()
        if isinstance(outcome, asyncio.CancelledError):
            return
        position = _position(outcome, conn)
        if position is None:
            send_error(hub, conn, rid, ErrorCode.INTERNAL, "internal error")
        else:
            conn.send_frame(encode_reply(rid, position).decode())

    try:
        hub.publish_then(cmd.channel, cmd.data, sender=conn.conn_id, done=answer)
    except ProtocolError as exc:
        send_error(hub, conn, rid, exc.code, exc.message)
        return
    except Exception:
        log.exception("node %s: publish from %s failed", hub.node, conn.conn_id)
        send_error(hub, conn, rid, ErrorCode.INTERNAL, "internal error")
        return
    inflight.count += 1  # after: a refused publish (it raises) is not counted


def _position(outcome: PublishOutcome, conn: Connection) -> dict[str, Any] | None:
    """What a completed publish answers: the publication's position, offset 0
    and no epoch when the broker was down (delivered locally, SPEC 7), None
    after an unexpected failure (logged)."""
    if isinstance(outcome, Publication):
        return {"offset": outcome.offset, "epoch": outcome.epoch}
    if isinstance(outcome, BrokerUnavailable):
        return {"offset": 0, "epoch": ""}
    log.error("publish from %s failed: %r", conn.conn_id, outcome)
    return None


class _InFlight:
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


class _Endpoint:
    """Base of the websocket endpoints: accept, register, always unregister."""

    kind = ConnectionKind.RAW

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # origin, auth (handshake or first frame), limits: see tidings.gate
        admission = await admit(self.hub, scope, receive, send)
        if admission is None:
            return
        try:  # no await since admit(): the connection limits hold
            conn = self.hub.register(send, kind=self.kind, identity=admission.identity,
                                     ip=admission.ip,
                                     direct=scope.get("extensions", {}).get(DIRECT))
        except HubError:
            await _refuse(send, CloseCode.TRY_AGAIN_LATER, "server not running")
            return
        try:
            if admission.connected_by_frame and self.kind is ConnectionKind.NATIVE:
                scope["tidings.connect_id"] = admission.connect_id
            await self.run(scope, receive, conn)
        finally:
            await conn.wait_closed(0.5)
            await self.hub.unregister(conn)

    def run(self, scope: Scope, receive: Receive, conn: Connection) -> Awaitable[None]:
        raise NotImplementedError


class NativeEndpoint(_Endpoint):
    kind = ConnectionKind.NATIVE

    def run(self, scope: Scope, receive: Receive, conn: Connection) -> Awaitable[None]:
        # not a coroutine itself: one frame less held by every open connection
        conn.send_frame(welcome_frame(self.hub, conn))
        if scope.get("tidings.connect_id") is not None:  # answer a first-frame ``connect``
            conn.send_frame(encode_reply(scope["tidings.connect_id"],
                                         {"conn_id": conn.conn_id, "user": conn.user}).decode())
        return serve_native(self.hub, conn, receive)


async def _permitted(hub: Hub, action: Action, conn: Connection, name: str) -> bool:
    """Permission for a raw stream; refused: close 1008 (1011 if a hook crashed)."""
    try:
        await check(hub, action, conn, name)
    except ProtocolError as exc:
        conn.close(CloseCode.POLICY_VIOLATION, exc.message)
        return False
    except HookError:
        conn.close(CloseCode.INTERNAL_ERROR, "internal error")
        return False
    return True


def _raw_data(payload: str | bytes) -> Any:
    """A raw frame as a publication value: JSON as parsed, other text as a string."""
    return _raw_value(payload)[0]


def _raw_value(payload: str | bytes) -> tuple[Any, str | None]:
    """``_raw_data`` plus the frame itself when it is JSON text (published as is)."""
    if isinstance(payload, bytes):
        return payload, None
    try:
        return loads(payload), payload
    except ProtocolError:
        return payload, None


class _Window(_InFlight):
    """A producer's publishes in flight (``Hub.publish_then``); each one's ack
    (``?ack=1``) is sent as it completes, which is the order they were made in."""

    __slots__ = ("ack", "conn")

    def __init__(self, conn: Connection, ack: bool) -> None:
        super().__init__()
        self.conn = conn
        self.ack = ack

    def settled(self, outcome: PublishOutcome) -> None:
        """The ``publish_then`` callback of each publish this window started."""
        self.finished()
        if isinstance(outcome, asyncio.CancelledError):
            return
        position = _position(outcome, self.conn)
        if position is None:
            self.conn.close(CloseCode.INTERNAL_ERROR, "internal error")
        elif self.ack:
            self.conn.send_frame(dumps(position).decode())


class PubEndpoint(_Endpoint):
    """``/ws/pub/{channel}``: every frame is published to the channel."""

    async def run(self, scope: Scope, receive: Receive, conn: Connection) -> None:
        hub = self.hub
        try:
            channel = validate_channel(scope["path_params"]["channel"], hub.limits.max_name)
        except ProtocolError as exc:
            conn.close(CloseCode.POLICY_VIOLATION, exc.message)
            return
        if not await _permitted(hub, "publish", conn, channel):
            return
        ack = _query(scope).get("ack") in ("1", "true")
        # in-process broker: publish at once; remote broker with pipelining: keep up
        # to _MAX_PIPELINED in flight (no task each; they complete in order, so
        # acks go out in order); any other: one after another
        mode = ("nowait" if hub.can_publish_nowait
                else "soon" if getattr(hub.broker, "pipelined", False) else "await")
        window = _Window(conn, ack)
        idle = hub.limits.idle_timeout
        sender = conn.conn_id
        frame_hard = hub.limits.frame_hard
        paced = hub.limits.rate is not None
        loop = asyncio.get_running_loop()

        def take(payload: str | bytes) -> bool:
            """Publish one frame without waiting; False: not now (the window is full)."""
            if mode == "await" or (mode == "soon" and window.count >= _MAX_PIPELINED):
                return False
            if conn.closed or (len(payload) > frame_hard
                               and not next_frame_guard(hub, conn, payload)):
                return True
            data, text = _raw_value(payload)
            if mode == "nowait":
                pub = hub.publish_nowait(channel, data, sender=sender, text=text)
                if ack:
                    conn.send_frame(dumps({"offset": pub.offset, "epoch": pub.epoch}).decode())
            else:
                hub.publish_then(channel, data, sender=sender, text=text, done=window.settled)
                window.count += 1  # after: a refused publish (it raises) is not counted
            return True

        def take_many(payloads: list[str | bytes]) -> int:
            """Publish frames read together without waiting; how many were taken
            (fewer when the window fills, or above ``Limits.rate``: the rest come
            through ``receive``). On an in-process broker they are published as
            one batch."""
            if paced:
                now = loop.time()
                allowed = 0
                while allowed < len(payloads) and conn.frame_delay(now) == 0.0:
                    allowed += 1
                payloads = payloads[:allowed]
            if mode != "nowait":
                taken = 0
                for payload in payloads:
                    if not take(payload):
                        break
                    taken += 1
                return taken
            if conn.closed:
                return len(payloads)
            items = []
            for payload in payloads:
                if len(payload) > frame_hard and not next_frame_guard(hub, conn, payload):
                    break  # closing: the frames before it still count
                items.append(_raw_value(payload))
            if items:
                pubs = hub.publish_many_nowait(channel, items, sender=sender)
                if ack:
                    for pub in pubs:
                        conn.send_frame(dumps({"offset": pub.offset,
                                               "epoch": pub.epoch}).decode())
            return len(payloads)

        direct = scope.get("extensions", {}).get(DIRECT)
        if mode != "await" and not idle and direct is not None and hasattr(direct, "on_messages"):
            # tidings' own server: frames are published from the read callback, no
            # task step per frame; this loop gets those ``take_many`` hands back
            direct.on_messages = take_many

        while not conn.closed:
            if idle:
                maybe = await _receive(receive, conn, idle)
                if maybe is None:
                    return
                message = maybe
            else:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
            payload = _payload(message)
            if payload is None:
                continue
            if paced:
                await _pace(conn)
            if mode != "await":
                await window.room(_MAX_PIPELINED)
                take(payload)
                continue
            if not next_frame_guard(hub, conn, payload):
                return
            data, text = _raw_value(payload)
            pub = await hub.publish(channel, data, sender=sender, text=text)
            if ack:
                conn.send_frame(dumps({"offset": pub.offset, "epoch": pub.epoch}).decode())


class SubEndpoint(_Endpoint):
    """``/ws/sub/{pattern}``: each matching publication's data, one frame each."""

    async def run(self, scope: Scope, receive: Receive, conn: Connection) -> None:
        hub = self.hub
        try:
            pattern = validate_pattern(scope["path_params"]["pattern"], hub.limits.max_name)
        except ProtocolError as exc:
            conn.close(CloseCode.POLICY_VIOLATION, exc.message)
            return
        if not await _permitted(hub, "subscribe", conn, pattern):
            return
        await hub.subscribe(conn, pattern)
        while await _receive(receive, conn, None) is not None:
            pass  # frames from a raw subscriber are ignored


class PushEndpoint(_Endpoint):
    """``/ws/push/{queue}``: each frame becomes one queue item."""

    PIPELINE = 256  # pushes to a shared store in flight per producer, confirmed in order

    async def run(self, scope: Scope, receive: Receive, conn: Connection) -> None:
        hub = self.hub
        queue = hub.queue(scope["path_params"]["queue"])
        ack = _query(scope).get("ack") in ("1", "true")
        if queue.shared:
            await self._pipelined(queue, ack, receive, conn)
            return
        while True:
            message = await _receive(receive, conn, hub.limits.idle_timeout)
            if message is None:
                return
            payload = _payload(message)
            if payload is None:
                continue
            if hub.limits.rate is not None:
                await _pace(conn)
            try:
                item_id = await queue.push(_raw_data(payload))
            except (HubError, BrokerError) as exc:  # closed, store down, queue full
                conn.close(CloseCode.TRY_AGAIN_LATER, str(exc))
                return
            if ack:
                conn.send_frame(dumps({"item": item_id}).decode())

    async def _pipelined(self, queue: WorkQueue, ack: bool, receive: Receive,
                         conn: Connection) -> None:
        """With a shared store each push is a round trip: awaiting each before
        reading the next frame would cap a producer at one item per round trip.
        Up to PIPELINE pushes are in flight (the store batches them, in order);
        confirmations go out in order; a full window stops reading (backpressure)."""
        window = asyncio.Semaphore(self.PIPELINE)
        order: asyncio.Queue[asyncio.Task[str] | None] = asyncio.Queue()

        async def confirm() -> None:
            while (task := await order.get()) is not None:
                try:
                    item_id = await task
                except (HubError, BrokerError) as exc:  # closed, store down, queue full
                    conn.close(CloseCode.TRY_AGAIN_LATER, str(exc))
                    continue  # the pushes after it still settle (they may have landed)
                finally:
                    window.release()
                if ack and not conn.closed:
                    conn.send_frame(dumps({"item": item_id}).decode())

        confirmer = asyncio.get_running_loop().create_task(confirm())
        try:
            while not conn.closed:
                message = await _receive(receive, conn, self.hub.limits.idle_timeout)
                if message is None:
                    return
                payload = _payload(message)
                if payload is None:
                    continue
                if self.hub.limits.rate is not None:
                    await _pace(conn)
                await window.acquire()
                order.put_nowait(asyncio.ensure_future(queue.push(_raw_data(payload))))
        finally:
            order.put_nowait(None)  # frames already read are pushed all the same
            await asyncio.shield(confirmer)


class PullEndpoint(_Endpoint):
    """``/ws/pull/{queue}``: items one frame each; acked when written, or by
    ``{"ack": true}`` frames with ``?ack=manual`` (oldest unacked first)."""

    async def run(self, scope: Scope, receive: Receive, conn: Connection) -> None:
        hub = self.hub
        queue = hub.queue(scope["path_params"]["queue"])
        params = _query(scope)
        manual = params.get("ack") == "manual"
        try:
            max_in_flight = max(1, min(10_000, int(params.get("max", "1" if manual else "64"))))
        except ValueError:
            conn.close(CloseCode.POLICY_VIOLATION, "max must be an integer")
            return
        order: list[str] = []  # in-flight item ids, oldest first (manual mode)

        def deliver(item: QueueItem) -> None:
            data = item.data
            payload = data if isinstance(data, bytes) else dumps(data).decode()
            if manual:
                order.append(item.id)
                conn.send_frame(payload)
            else:
                conn.send_frame(payload, on_sent=partial(queue.ack, item.id))

        consumer = Consumer(deliver, max_in_flight, owner=conn)
        queue.add_consumer(consumer)
        while True:
            message = await _receive(receive, conn, None)
            if message is None:
                return
            if not manual:
                continue
            payload = _payload(message)
            try:
                acked = payload is not None and loads(payload) == {"ack": True}
            except ProtocolError:
                acked = False
            if not acked:
                send_error(hub, conn, None, ErrorCode.BAD_REQUEST, 'expected {"ack": true}')
                continue
            while order and not queue.holds(conn, order[0]):
                order.pop(0)  # taken back (timeout) meanwhile
            if order:
                queue.ack(order.pop(0))


def build_router(hub: Hub) -> Router:
    """Every route of a hub, flat. A FastAPI ``APIRouter`` when FastAPI is
    installed (``app.include_router(hub.router, prefix=...)``), else a Starlette
    ``Router``; both mount with Starlette's ``Mount(prefix, app=hub.router)``."""
    from tidings.centrifuge_endpoint import CentrifugeEndpoint  # imports this module
    from tidings.server.api import api_endpoint, health_endpoint, metrics_endpoint

    routes: list[BaseRoute] = [
        WebSocketRoute("/ws", NativeEndpoint(hub), name="tidings_ws"),
        WebSocketRoute("/ws/pub/{channel:path}", PubEndpoint(hub), name="tidings_pub"),
        WebSocketRoute("/ws/sub/{pattern:path}", SubEndpoint(hub), name="tidings_sub"),
        WebSocketRoute("/ws/push/{queue:path}", PushEndpoint(hub), name="tidings_push"),
        WebSocketRoute("/ws/pull/{queue:path}", PullEndpoint(hub), name="tidings_pull"),
        WebSocketRoute("/connection/websocket", CentrifugeEndpoint(hub),
                       name="tidings_centrifuge"),
        Route("/api/{method}", api_endpoint(hub), methods=["POST"], name="tidings_api"),
        Route("/health", health_endpoint(hub), methods=["GET"], name="tidings_health"),
        Route("/metrics", metrics_endpoint(hub), methods=["GET"], name="tidings_metrics"),
    ]
    try:  # FastAPI's include_router wants its own router class
        from fastapi import APIRouter
    except ImportError:
        return Router(routes=routes)
    return APIRouter(routes=routes)
