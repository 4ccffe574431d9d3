"""The raw streams (SPEC 6.2): ``/ws/pub``, ``/ws/sub``, ``/ws/push``, ``/ws/pull``.

A raw stream carries bare payloads, no envelope: a producer's frames are
publications or queue items, a consumer's frames are their data. Errors close
the stream (there is no error frame), except ``/ws/pull``'s malformed acks.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from tidings.asgi import Receive, Scope
from tidings.brokers.base import PublishOutcome
from tidings.core.connection import Connection
from tidings.core.permissions import Action, check
from tidings.core.queue import Consumer, QueueItem, WorkQueue
from tidings.endpoints.native import send_error
from tidings.endpoints.session import (
    DIRECT,
    MAX_PIPELINED,
    InFlight,
    WebSocketSession,
    frame_guard,
    pace,
    payload_of,
    position_of,
    query_params,
    receive_message,
)
from tidings.exceptions import BrokerError, HookError, HubError
from tidings.protocol.codes import CloseCode, ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import validate_channel, validate_pattern
from tidings.protocol.native import dumps, loads

if TYPE_CHECKING:
    from tidings.core.hub import HubCore

__all__ = ["PubEndpoint", "PullEndpoint", "PushEndpoint", "SubEndpoint"]

async def _permitted(hub: HubCore, action: Action, conn: Connection, name: str) -> bool:
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
        return orjson.loads(payload), payload
    except orjson.JSONDecodeError:
        return payload, None


class _Window(InFlight):
    """A producer's publishes in flight (``HubCore.publish_then``); each one's ack
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
        position = position_of(outcome, self.conn)
        if position is None:
            self.conn.close(CloseCode.INTERNAL_ERROR, "internal error")
        elif self.ack:
            self.conn.send_frame(dumps(position).decode())


class PubEndpoint(WebSocketSession):
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
        ack = query_params(scope).get("ack") in ("1", "true")
        # in-process broker: publish at once; remote broker with pipelining: keep up
        # to MAX_PIPELINED in flight (no task each; they complete in order, so
        # acks go out in order); any other: one after another
        mode = ("nowait" if hub.can_publish_nowait
                else "soon" if hub.pipelined else "await")
        window = _Window(conn, ack)
        idle = hub.limits.idle_timeout
        sender = conn.conn_id
        frame_hard = hub.limits.frame_hard
        paced = hub.limits.rate is not None
        loop = asyncio.get_running_loop()
        publish_valid = hub.publisher.publish_valid_nowait

        def take(payload: str | bytes) -> bool:
            """Publish one frame without waiting; False: not now (the window is full)."""
            if mode == "await" or (mode == "soon" and window.count >= MAX_PIPELINED):
                return False
            if conn.closed or (len(payload) > frame_hard
                               and not frame_guard(hub, conn, payload)):
                return True
            data, text = _raw_value(payload)
            try:
                if mode == "nowait":
                    pub = publish_valid(channel, data, sender, text)  # validated above
                    if ack:
                        conn.send_frame(dumps({"offset": pub.offset,
                                               "epoch": pub.epoch}).decode())
                else:
                    hub.publisher.publish_then(channel, data, sender=sender, text=text,
                                               done=window.settled)
                    window.count += 1  # after: a refused publish (it raises) is not counted
            except ProtocolError as exc:  # refused (a typed channel): said, not dropped
                _refuse(hub, conn, exc)
            return True

        flusher = hub.flusher

        def take_many(payloads: list[str | bytes]) -> int:
            """Publish frames read together without waiting; how many were taken
            (fewer when the window fills, or above ``Limits.rate``: the rest come
            through ``receive``). On an in-process broker they are published as
            one batch. One read is one scope of the write policy
            (:mod:`tidings.core.flush`): its publications and acks go out in
            this turn."""
            flusher.enter()
            try:
                if len(payloads) == 1 and not paced:  # a producer's lone frame
                    return 1 if take(payloads[0]) else 0
                return publish_read(payloads)
            finally:
                flusher.leave()

        def publish_read(payloads: list[str | bytes]) -> int:
            if paced:
                now = loop.time()
                allowed = 0
                while allowed < len(payloads) and conn.frame_delay(now) == 0.0:
                    allowed += 1
                payloads = payloads[:allowed]
            if mode != "nowait" or hub.channel_types.active or len(payloads) == 1:
                # typed: each frame answers; a lone frame: no batch to build
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
                if len(payload) > frame_hard and not frame_guard(hub, conn, payload):
                    break  # closing: the frames before it still count
                items.append(_raw_value(payload))
            if items:
                pubs = hub.publisher.publish_many_nowait(channel, items, sender=sender)
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
                maybe = await receive_message(receive, conn, idle)
                if maybe is None:
                    return
                message = maybe
            else:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
            payload = payload_of(message)
            if payload is None:
                continue
            if paced:
                await pace(conn)
            if mode != "await":
                await window.room(MAX_PIPELINED)
                take(payload)
                continue
            if not frame_guard(hub, conn, payload):
                return
            data, text = _raw_value(payload)
            try:
                pub = await hub.publisher.publish(channel, data, sender=sender, text=text)
            except ProtocolError as exc:
                _refuse(hub, conn, exc)
                continue
            if ack:
                conn.send_frame(dumps({"offset": pub.offset, "epoch": pub.epoch}).decode())


class SubEndpoint(WebSocketSession):
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
        while await receive_message(receive, conn, None) is not None:
            pass  # frames from a raw subscriber are ignored


def _refuse(hub: HubCore, conn: Connection, exc: ProtocolError) -> None:
    """A raw producer's frame refused (invalid for the channel's or queue's type):
    an ``{"error": ...}`` frame, and the connection stays open."""
    hub.stats.errors[exc.code.value] += 1
    conn.send_frame(dumps({"error": {"code": exc.code.value, "message": exc.message}}).decode())


class PushEndpoint(WebSocketSession):
    """``/ws/push/{queue}``: each frame becomes one queue item."""

    PIPELINE = 256  # pushes to a shared store in flight per producer, confirmed in order

    async def run(self, scope: Scope, receive: Receive, conn: Connection) -> None:
        hub = self.hub
        queue = hub.queue(scope["path_params"]["queue"])
        ack = query_params(scope).get("ack") in ("1", "true")
        if queue.shared:
            await self._pipelined(queue, ack, receive, conn)
            return
        while True:
            message = await receive_message(receive, conn, hub.limits.idle_timeout)
            if message is None:
                return
            payload = payload_of(message)
            if payload is None:
                continue
            if hub.limits.rate is not None:
                await pace(conn)
            try:
                item_id = await queue.push(_raw_data(payload))
            except ProtocolError as exc:  # invalid for the queue's type
                _refuse(hub, conn, exc)
                continue
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
                except ProtocolError as exc:  # invalid for the queue's type
                    _refuse(self.hub, conn, exc)
                    continue
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
                message = await receive_message(receive, conn, self.hub.limits.idle_timeout)
                if message is None:
                    return
                payload = payload_of(message)
                if payload is None:
                    continue
                if self.hub.limits.rate is not None:
                    await pace(conn)
                await window.acquire()
                order.put_nowait(asyncio.ensure_future(queue.push(_raw_data(payload))))
        finally:
            order.put_nowait(None)  # frames already read are pushed all the same
            await asyncio.shield(confirmer)


class PullEndpoint(WebSocketSession):
    """``/ws/pull/{queue}``: items one frame each; acked when written, or by
    ``{"ack": true}`` frames with ``?ack=manual`` (oldest unacked first)."""

    async def run(self, scope: Scope, receive: Receive, conn: Connection) -> None:
        hub = self.hub
        queue = hub.queue(scope["path_params"]["queue"])
        params = query_params(scope)
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
            message = await receive_message(receive, conn, None)
            if message is None:
                return
            if not manual:
                continue
            payload = payload_of(message)
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


