"""Commands of the native protocol, applied to the hub for one connection.

Every command gets exactly one answer (``reply``, ``pong`` or ``error``); an
error never closes the connection. Unexpected exceptions are logged with
context and answered with ``internal``, never with a traceback.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any

from tidings.connection import Connection
from tidings.exceptions import BrokerUnavailable, HookError
from tidings.gate import refresh
from tidings.permissions import check
from tidings.protocol.codes import ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import is_pattern
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
    Send,
    Subscribe,
    Unsubscribe,
    encode_error,
    encode_item,
    encode_pong,
    encode_reply,
)
from tidings.queue import Consumer, QueueItem

if TYPE_CHECKING:
    from tidings.hub import Hub

__all__ = ["handle_command", "send_error"]

log = logging.getLogger("tidings.dispatch")


def send_error(hub: Hub, conn: Connection, rid: Any, code: ErrorCode, message: str) -> None:
    hub.stats.errors[code.value] += 1
    conn.send_frame(encode_error(rid, code, message).decode())


async def handle_command(hub: Hub, conn: Connection, cmd: Command) -> None:
    """Apply one decoded command; reply or error on ``conn``."""
    try:
        result = await _apply(hub, conn, cmd)
    except ProtocolError as exc:
        send_error(hub, conn, cmd.id, exc.code, exc.message)
        return
    except HookError:  # logged with its context where it happened
        send_error(hub, conn, cmd.id, ErrorCode.INTERNAL, "internal error")
        return
    except BrokerUnavailable as exc:  # expected during an outage: no traceback
        send_error(hub, conn, cmd.id, ErrorCode.INTERNAL, f"broker unavailable: {exc}")
        return
    except Exception:
        log.exception("node %s: %s from %s failed", hub.node, type(cmd).__name__, conn.conn_id)
        send_error(hub, conn, cmd.id, ErrorCode.INTERNAL, "internal error")
        return
    if result is not None:
        conn.send_frame(result)


async def _apply(hub: Hub, conn: Connection, cmd: Command) -> str | None:
    if isinstance(cmd, Publish):
        await check(hub, "publish", conn, cmd.channel)
        pub = await hub.publish(cmd.channel, cmd.data, sender=conn.conn_id)
        return encode_reply(cmd.id, {"offset": pub.offset, "epoch": pub.epoch}).decode()
    if isinstance(cmd, Subscribe):
        return await _subscribe(hub, conn, cmd)
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
        await check(hub, "history", conn, cmd.channel)
        page = await hub.history(cmd.channel, since=cmd.since, limit=cmd.limit,
                                 reverse=cmd.reverse)
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


async def _subscribe(hub: Hub, conn: Connection, cmd: Subscribe) -> str | None:
    channel = cmd.channel
    if channel not in conn.subs and len(conn.subs) >= hub.limits.max_subscriptions:
        raise ProtocolError(
            ErrorCode.FORBIDDEN, f"too many subscriptions (limit {hub.limits.max_subscriptions})"
        )
    await check(hub, "subscribe", conn, channel)
    if is_pattern(channel):
        await hub.subscribe(conn, channel, join_leave=cmd.join_leave)
        return encode_reply(cmd.id, {"recovered": False, "publications": [],
                                     "offset": 0, "epoch": ""}).decode()
    # Hold live publications until the reply (and any replay) is queued, so the
    # client sees reply -> replayed -> live, each offset once.
    conn.hold()
    try:
        await hub.subscribe(conn, channel, join_leave=cmd.join_leave)
        try:
            if cmd.recover is not None:
                page = await hub.history(channel, since=cmd.recover)
                pubs = page.publications if page.recovered else []
                result = {"recovered": page.recovered,
                          "publications": [p.to_dict() for p in pubs],
                          "offset": page.offset, "epoch": page.epoch}
                top: int | None = page.offset
            else:
                pos = await hub.position(channel)
                result = {"recovered": False, "publications": [], "offset": pos.offset,
                          "epoch": pos.epoch}
                top = pos.offset
        except BrokerUnavailable:
            # subscribed locally; the position is unknown until the broker is back
            result = {"recovered": False, "publications": [], "offset": 0, "epoch": ""}
            top = None
    except BaseException:
        conn.release()
        raise
    conn.send_frame(encode_reply(cmd.id, result).decode())
    conn.release(None if top is None else {channel: top})
    return None


def _pull(hub: Hub, conn: Connection, cmd: Pull) -> None:
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
