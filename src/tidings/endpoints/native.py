"""The native protocol at ``/ws`` (SPEC 6.1), over the shared session core.

Frames are decoded by :mod:`tidings.protocol.native` (sans-I/O), commands run
the shared operations of :mod:`tidings.core.operations`, and every command
gets exactly one answer (``reply``, ``pong`` or ``error``); an error never
closes the connection. Unexpected exceptions are logged with context and
answered with ``internal``, never with a traceback.

Publishes take the fast paths the broker declares
(:class:`~tidings.brokers.base.NowaitPublisher`: no coroutine, no task;
:class:`~tidings.brokers.base.PipelinedPublisher`: up to ``MAX_PIPELINED`` in
flight, answered in order).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING, Any

from tidings._version import __version__
from tidings.asgi import Message, Receive, Scope
from tidings.brokers.base import PublishOutcome
from tidings.core import operations
from tidings.core.connection import Connection, ConnectionKind
from tidings.core.permissions import check, check_now
from tidings.core.queue import Consumer, QueueItem
from tidings.endpoints.gate import refresh
from tidings.endpoints.session import (
    MAX_PIPELINED,
    InFlight,
    WebSocketSession,
    frame_guard,
    payload_of,
    position_of,
    receive_message,
)
from tidings.protocol.codes import CloseCode, ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.native import (
    Ack,
    Command,
    Connect,
    History,
    Nack,
    Ping,
    Presence,
    PresenceStats,
    Publish,
    Pull,
    Refresh,
    RequestId,
    Send,
    Subscribe,
    Unsubscribe,
    decode_command,
    decode_publish,
    encode_error,
    encode_item,
    encode_pong,
    encode_position_reply,
    encode_reply,
    encode_welcome,
    peek_id,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from tidings.core.hub import HubCore

__all__ = ["InlinePublishes", "NativeEndpoint", "handle_command", "send_error", "serve_native",
           "welcome_frame"]

log = logging.getLogger("tidings.endpoints.native")


def welcome_frame(hub: HubCore, conn: Connection) -> str:
    return encode_welcome(conn.conn_id, hub.node, __version__, conn.user).decode()


async def serve_native(hub: HubCore, conn: Connection, receive: Receive) -> None:
    """Run the native protocol on ``conn`` until the client goes away.

    If the server can hand over frames from its read callback (``on_messages``
    of the direct transport), a connection's publishes after its first are
    handled right there (:class:`InlinePublishes`; not before: most connections
    only subscribe, and idle ones are many).
    """
    limits = hub.limits
    loop = asyncio.get_running_loop()
    # With a remote broker, a run of publishes is pipelined: the next one starts
    # before the previous reply (the broker keeps their order); any other command
    # waits for them first, so what a client does after publishing sees it.
    pipelined = hub.pipelined
    nowait = hub.can_publish_nowait  # in-process broker: a publish never waits
    inflight: InFlight | None = None  # made on first use: idle sockets are many
    idle = limits.idle_timeout
    message: Message | None = None
    data: str | bytes | None = None
    cmd: Command | None = None
    while not conn.closed:
        # nothing of the last frame is held while waiting: the frame, its JSON and
        # the command would stay with every idle connection (~0.5 KiB each)
        message = data = cmd = None
        if idle:
            message = await receive_message(receive, conn, idle)
            if message is None:
                return
        else:  # inline: one frame less held by every idle connection
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
        data = payload_of(message)
        if data is None:
            continue
        if not frame_guard(hub, conn, data):
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
        if isinstance(cmd, Publish) and hub.can_publish is None and not idle:
            inflight = _go_inline(hub, conn, inflight)  # a publisher: its next ones inline
        if nowait and isinstance(cmd, Publish) and hub.can_publish is None:
            _publish_now(hub, conn, cmd.id, cmd.channel, cmd.data)  # no coroutine, no task
            continue
        if pipelined and isinstance(cmd, Publish):
            if inflight is None:
                inflight = InFlight()
            await inflight.room(MAX_PIPELINED)
            if hub.can_publish is not None:  # a hook may need awaiting: a task keeps order
                task = loop.create_task(handle_command(hub, conn, cmd))
                inflight.count += 1
                task.add_done_callback(inflight.finished)
            else:
                _publish_soon(hub, conn, cmd.id, cmd.channel, cmd.data, inflight)
            continue
        if inflight is not None and inflight.count:
            await inflight.drain()
        await handle_command(hub, conn, cmd)


def _go_inline(hub: HubCore, conn: Connection, inflight: InFlight | None) -> InFlight | None:
    """Let the reader take ``conn``'s publishes from now on, if it can
    (:class:`InlinePublishes`); the window in flight the loop shares with it."""
    direct: Any = conn.direct
    if (hub.limits.rate is not None or direct is None
            or getattr(direct, "on_messages", False) is not None
            or not (hub.can_publish_nowait or hub.pipelined)):
        return inflight  # no such server, a limit to apply per frame, or taken already
    if hub.pipelined and inflight is None:
        inflight = InFlight()
    # no task step per publish: the reader publishes (and, in process, answers);
    # order holds: the server hands frames over only while this loop waits with
    # none queued, and the loop drains the window before any other command
    direct.on_messages = InlinePublishes(hub, conn, inflight)
    return inflight


class InlinePublishes:
    """The ``on_messages`` handler of a native connection, once it published (no
    ``can_publish`` hook, no rate or idle limit): it takes the frames of one read
    up to the first that is not a well-formed ``publish`` (which, with the rest,
    goes to ``serve_native``'s loop, which answers it in order), in one scope of
    the write policy (:mod:`tidings.core.flush`), so each publication and its
    reply go out in the turn the frame was read in (on an in-process broker).
    There, consecutive publishes to one channel are one batch (one fan-out, one
    write per subscriber), as a raw producer's are; on a pipelined broker each
    one is started at once (``publish_then``), up to ``MAX_PIPELINED`` in flight
    (the rest wait in the loop). One small object, for publishers only.
    """

    __slots__ = ("conn", "hub", "inflight")

    def __init__(self, hub: HubCore, conn: Connection, inflight: InFlight | None) -> None:
        self.hub = hub
        self.conn = conn
        self.inflight = inflight  # a pipelined broker's window, shared with the loop

    def __call__(self, frames: list[str | bytes]) -> int:
        flusher = self.hub.flusher
        flusher.enter()
        try:
            return self._handle(frames)
        finally:
            flusher.leave()

    def _handle(self, frames: list[str | bytes]) -> int:
        hub, conn, inflight = self.hub, self.conn, self.inflight
        limits = hub.limits
        run: list[tuple[RequestId, str, Any]] = []  # publishes to one channel in a row
        taken = len(frames)
        for i, data in enumerate(frames):
            if conn.closed:
                break
            if not frame_guard(hub, conn, data):
                break  # closing with 1009
            cmd = (decode_publish(data, max_depth=limits.max_depth, max_name=limits.max_name)
                   if len(data) <= limits.frame_soft else None)
            if cmd is None or (inflight is not None and inflight.count >= MAX_PIPELINED):
                taken = i  # anything else, errors too, or a full window: for the loop
                break
            if inflight is not None:
                _publish_soon(hub, conn, *cmd, inflight)
                continue
            if run and run[0][1] != cmd[1]:
                self._publish_run(run)
            run.append(cmd)
        self._publish_run(run)
        return taken

    def _publish_run(self, run: list[tuple[RequestId, str, Any]]) -> None:
        if len(run) == 1 or (run and self.hub.channel_types.active):  # typed: each answers
            for rid, channel, data in run:
                _publish_now(self.hub, self.conn, rid, channel, data)
        elif run:
            _publish_batch(self.hub, self.conn, run)
        run.clear()


def _publish_batch(hub: HubCore, conn: Connection, run: list[tuple[RequestId, str, Any]]
                   ) -> None:
    """Publishes to one channel read together: one batch (consecutive offsets),
    each answered in order."""
    channel = run[0][1]
    try:
        check_now(hub, "publish", conn, channel)
        pubs = hub.publisher.publish_many_nowait(channel, [(data, None) for _, _, data in run],
                                                 sender=conn.conn_id)
    except ProtocolError as exc:
        for rid, _, _ in run:
            send_error(hub, conn, rid, exc.code, exc.message)
        return
    except Exception:
        log.exception("node %s: publish from %s failed", hub.node, conn.conn_id)
        for rid, _, _ in run:
            send_error(hub, conn, rid, ErrorCode.INTERNAL, "internal error")
        return
    for (rid, _, _), pub in zip(run, pubs, strict=True):
        conn.send_frame(encode_position_reply(rid, pub.offset, pub.epoch).decode())


def _publish_now(hub: HubCore, conn: Connection, rid: RequestId, channel: str,
                 data: Any) -> None:
    """A native ``publish`` on an in-process broker with no hook to await: what
    ``handle_command`` does, without its coroutines."""
    try:
        check_now(hub, "publish", conn, channel)
        # the channel was validated with the command (decode_command, decode_publish)
        pub = hub.publisher.publish_valid_nowait(channel, data, conn.conn_id)
    except ProtocolError as exc:
        send_error(hub, conn, rid, exc.code, exc.message)
        return
    except Exception:
        log.exception("node %s: publish from %s failed", hub.node, conn.conn_id)
        send_error(hub, conn, rid, ErrorCode.INTERNAL, "internal error")
        return
    conn.send_frame(encode_position_reply(rid, pub.offset, pub.epoch).decode())


def _publish_soon(hub: HubCore, conn: Connection, rid: RequestId, channel: str, data: Any,
                  inflight: InFlight) -> None:
    """A native ``publish`` on a pipelined broker without a task or a future:
    checked now, started now (so publishes keep their order), answered when it
    completes."""
    try:
        check_now(hub, "publish", conn, channel)
    except ProtocolError as exc:
        send_error(hub, conn, rid, exc.code, exc.message)
        return

    def answer(outcome: PublishOutcome) -> None:
        inflight.finished()
        if isinstance(outcome, asyncio.CancelledError):
            return
        position = position_of(outcome, conn)
        if position is None:
            send_error(hub, conn, rid, ErrorCode.INTERNAL, "internal error")
        else:
            conn.send_frame(encode_reply(rid, position).decode())

    try:
        hub.publisher.publish_then(channel, data, sender=conn.conn_id, done=answer)
    except ProtocolError as exc:
        send_error(hub, conn, rid, exc.code, exc.message)
        return
    except Exception:
        log.exception("node %s: publish from %s failed", hub.node, conn.conn_id)
        send_error(hub, conn, rid, ErrorCode.INTERNAL, "internal error")
        return
    inflight.count += 1  # after: a refused publish (it raises) is not counted


class NativeEndpoint(WebSocketSession):
    kind = ConnectionKind.NATIVE

    def run(self, scope: Scope, receive: Receive, conn: Connection) -> Awaitable[None]:
        # not a coroutine itself: one frame less held by every open connection
        conn.send_frame(welcome_frame(self.hub, conn))
        if scope.get("tidings.connect_id") is not None:  # answer a first-frame ``connect``
            conn.send_frame(encode_reply(scope["tidings.connect_id"],
                                         {"conn_id": conn.conn_id, "user": conn.user}).decode())
        return serve_native(self.hub, conn, receive)




# -- commands ------------------------------------------------------------------

def send_error(hub: HubCore, conn: Connection, rid: Any, code: ErrorCode, message: str) -> None:
    hub.stats.errors[code.value] += 1
    conn.send_frame(encode_error(rid, code, message).decode())


async def handle_command(hub: HubCore, conn: Connection, cmd: Command) -> None:
    """Apply one decoded command; reply or error on ``conn``."""
    try:
        result = await _apply(hub, conn, cmd)
    except Exception as exc:
        code, message = operations.classify(hub, conn, type(cmd).__name__, exc)
        send_error(hub, conn, cmd.id, code, message)
        return
    if result is not None:
        conn.send_frame(result)


async def _apply(hub: HubCore, conn: Connection, cmd: Command) -> str | None:
    if isinstance(cmd, Publish):
        await check(hub, "publish", conn, cmd.channel)
        pub = await hub.publisher.publish(cmd.channel, cmd.data, sender=conn.conn_id)
        return encode_reply(cmd.id, {"offset": pub.offset, "epoch": pub.epoch}).decode()
    if isinstance(cmd, Subscribe):
        await _subscribe(hub, conn, cmd)
        return None
    if isinstance(cmd, Unsubscribe):
        if not await hub.unsubscribe(conn, cmd.channel):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"not subscribed to {cmd.channel!r}")
        return encode_reply(cmd.id, {}).decode()
    if isinstance(cmd, Ping):
        return encode_pong(cmd.id).decode()
    if isinstance(cmd, Send):
        sent = await hub.send(cmd.to, cmd.data, sender=conn.conn_id)
        if sent == 0:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such connection")
        return encode_reply(cmd.id, {"sent": sent}).decode()
    if isinstance(cmd, Presence):
        await check(hub, "presence", conn, cmd.channel)
        members = await hub.presence(cmd.channel)
        return encode_reply(
            cmd.id, {"presence": {m.conn_id: m.to_dict() for m in members}}
        ).decode()
    if isinstance(cmd, PresenceStats):
        await check(hub, "presence", conn, cmd.channel)
        return encode_reply(cmd.id, await hub.presence_stats(cmd.channel)).decode()
    if isinstance(cmd, History):
        page = await operations.history(hub, conn, cmd.channel, since=cmd.since,
                                        limit=cmd.limit, reverse=cmd.reverse)
        return encode_reply(cmd.id, {
            "publications": [p.to_dict() for p in page.publications],
            "offset": page.offset, "epoch": page.epoch, "recovered": page.recovered,
        }).decode()
    if isinstance(cmd, Pull):
        _pull(hub, conn, cmd)
        return None
    if isinstance(cmd, Ack):
        queue = hub.queue(cmd.queue)
        if not queue.holds(conn, cmd.item) or not queue.ack(cmd.item):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"item {cmd.item!r} is not yours in flight")
        return encode_reply(cmd.id, {}).decode()
    if isinstance(cmd, Nack):
        queue = hub.queue(cmd.queue)
        if not queue.holds(conn, cmd.item) or not queue.nack(
            cmd.item, delay=cmd.delay, requeue=cmd.requeue
        ):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"item {cmd.item!r} is not yours in flight")
        return encode_reply(cmd.id, {}).decode()
    if isinstance(cmd, Connect):
        return encode_reply(cmd.id, {"conn_id": conn.conn_id, "user": conn.user}).decode()
    if isinstance(cmd, Refresh):
        return encode_reply(cmd.id, await refresh(hub, conn, cmd.token)).decode()
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "unsupported command")  # pragma: no cover


async def _subscribe(hub: HubCore, conn: Connection, cmd: Subscribe) -> None:
    def reply(sub: operations.Subscribed) -> str:
        return encode_reply(cmd.id, {
            "recovered": sub.recovered, "publications": [p.to_dict() for p in sub.publications],
            "offset": sub.offset, "epoch": sub.epoch,
        }).decode()

    await operations.subscribe(hub, conn, cmd.channel, join_leave=cmd.join_leave,
                               recover=cmd.recover, reply=reply)


def _pull(hub: HubCore, conn: Connection, cmd: Pull) -> None:
    queue = hub.queue(cmd.queue)
    # the reply goes first; items follow as ``item`` frames
    conn.send_frame(encode_reply(cmd.id, {"queue": cmd.queue, "max": cmd.max}).decode())
    consumer = queue.consumer_of(conn)
    if consumer is not None:
        consumer.max_in_flight = cmd.max
        queue.add_consumer(consumer)  # re-dispatch with the new credit
        return
    name = cmd.queue

    def deliver(item: QueueItem) -> None:
        data = item.data
        if isinstance(data, bytes):  # a binary frame pushed raw: as native subscribers get it
            data = {"b64": base64.b64encode(data).decode("ascii")}
        conn.send_frame(encode_item(name, item.id, data, item.attempts).decode())

    queue.add_consumer(Consumer(deliver, cmd.max, owner=conn))
