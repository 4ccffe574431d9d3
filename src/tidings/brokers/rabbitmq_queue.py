"""Work queues in RabbitMQ quorum queues, shared by every node of an ``amqp://`` broker.

Queue ``jobs`` is three quorum queues (durable, replicated where the cluster
has replicas), declared with the same arguments by every node:

- ``<prefix>.q.jobs``: the items. ``x-delivery-limit`` (``?delivery_limit=``,
  default 20) and a dead-letter route to ``<prefix>.q.jobs.dead``: an item
  whose holders keep dying (a poison message that crashes nodes) is
  dead-lettered by RabbitMQ itself. ``x-max-length`` (``?queue_max_len=``,
  default 1,000,000 ready items) with ``x-overflow: reject-publish``: a push
  beyond it is nacked and raises :class:`~tidings.exceptions.QueueFull`
  (refused, never trimmed). The bound is RabbitMQ's: a quorum queue admits
  one item past it before it refuses (measured on 3.10).
- ``<prefix>.q.jobs.dead``: dead letters (the tidings queue ``jobs.dead``),
  ``drop-head`` at the same bound, since refusing would leave the item nowhere.
- ``<prefix>.q.jobs.delay``: nacked-with-delay items, each with a per-message
  TTL; RabbitMQ dead-letters an expired one back to ``jobs``.

How the :class:`~tidings.brokers.base.QueueStore` operations map:

- push: a persistent publish with a publisher confirm, ``message_id`` = the
  item id, the attempts so far in the ``x-tidings-attempts`` header.
- fetch(count): a consumer *window*: ``basic.qos(prefetch=count)``, a
  consumer, wait until the items known to be waiting (``queue.declare``'s
  count, at most ``count``) have arrived, or for the first one up to
  ``block`` when the queue is empty (no polling), then ``basic.cancel``. The
  prefetch bounds what RabbitMQ sends, so a node never holds more items than
  its consumers have credit for (a standing consumer would hold items that
  other nodes' idle consumers could take); a delivery that lands after the
  window closed is kept for the next fetch, or given back by ``release``.
  A fetch of at most 3 items uses ``basic.get`` instead. A fetched item is
  unacked on this node's channel: that is its lease.
- ack: ``basic.ack``.
- requeue: a confirmed publish of a copy (same id, new attempts header) to the
  tail, to ``.delay`` (``expiration`` = the delay) or to ``.dead``, then
  ``basic.ack`` of the original. If the node dies between the two, the item
  exists twice (at-least-once; the Redis store does this atomically).
- claim: nothing to do. A lease ends when the holder's channel closes (the
  node died or lost its connection): RabbitMQ puts the item back itself and
  counts it in ``x-delivery-count``; the next fetch adds that count to the
  attempts and dead-letters an item that is out of attempts, as Redis's
  claim does. A node that hangs while connected keeps its items until
  RabbitMQ's ``consumer_timeout`` (server setting, 30 min by default).
- release_delayed: nothing to do (RabbitMQ expires them back).
- release: ``basic.nack`` (requeue) of window deliveries never handed out.
- stats: ``length`` (ready items) and ``delayed`` from ``queue.declare``;
  ``in_flight`` is **this node's** unacked items (AMQP does not report other
  consumers' unacked count without the management plugin); ``oldest_age``
  is not known (0.0): AMQP cannot look at a queue's head without taking it.

Delayed items expire in queue order: RabbitMQ only expires the head of a
queue, so an item with a short delay behind one with a long delay waits for it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import DeliveryError

from tidings.brokers.base import QueueStoreStats, StoredItem
from tidings.brokers.plain_wire import decode_data, encode_data
from tidings.exceptions import BrokerUnavailable, QueueFull

if TYPE_CHECKING:
    from tidings.brokers.rabbitmq import RabbitMQBroker

__all__ = ["RabbitMQQueueStore"]

ATTEMPTS = "x-tidings-attempts"
DEAD_ID = "x-tidings-dead-id"
DEAD_ATTEMPTS = "x-tidings-dead-attempts"
DEAD_QUEUE = "x-tidings-dead-queue"
GET_MAX = 3  # a fetch of at most this many items uses basic.get (one round trip each)
WINDOW = 0.05  # longest wait for items known to be waiting to arrive in a window


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class RabbitMQQueueStore:
    """The :class:`~tidings.brokers.base.QueueStore` of a :class:`RabbitMQBroker`."""

    lease_expiry = False  # RabbitMQ requeues a closed channel's unacked items itself
    in_flight_local = True  # queue.declare counts the ready items only

    def __init__(self, broker: RabbitMQBroker, *, delivery_limit: int = 20,
                 max_len: int = 1_000_000) -> None:
        self._broker = broker
        self.delivery_limit = delivery_limit
        self.max_len = max_len
        self._channel: AbstractChannel | None = None
        self._generation = -1
        self._declared: dict[str, tuple[AbstractQueue, AbstractQueue, AbstractQueue]] = {}
        # queue -> item id -> its delivery on our channel (the lease)
        self._held: dict[str, dict[str, tuple[int, AbstractIncomingMessage]]] = {}
        self._max_attempts: dict[str, int] = {}
        self._late: dict[str, deque[tuple[int, AbstractIncomingMessage]]] = {}
        self._prefetch: tuple[int, int] = (-1, 0)  # (channel generation, prefetch set)
        self._lock = asyncio.Lock()

    # -- names -----------------------------------------------------------------

    def amqp_name(self, queue: str) -> str:
        return f"{self._broker.prefix}.q.{queue}"

    @staticmethod
    def _is_dead(queue: str) -> bool:
        return queue.endswith(".dead") and len(queue) > 5

    def _arguments(self, queue: str) -> dict[str, Any]:
        """Every node declares a queue with exactly these (RabbitMQ refuses others)."""
        args: dict[str, Any] = {"x-queue-type": "quorum", "x-max-length": self.max_len,
                                "x-delivery-limit": self.delivery_limit}
        if self._is_dead(queue):
            args["x-overflow"] = "drop-head"  # a dead letter of a dead letter is dropped
        else:
            args["x-overflow"] = "reject-publish"
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = self.amqp_name(queue + ".dead")
        return args

    # -- channel ---------------------------------------------------------------

    async def _open(self) -> AbstractChannel:
        """Our channel on the broker's current connection (a new one after a
        reconnect: leases of the old one ended with it)."""
        broker = self._broker
        conn = broker.connection
        channel = self._channel
        if channel is not None and self._generation == broker.generation and not channel.is_closed:
            return channel
        async with self._lock:
            channel = self._channel
            if (channel is None or self._generation != broker.generation
                    or channel.is_closed):
                try:
                    channel = await conn.channel(publisher_confirms=True)
                except Exception as exc:
                    raise BrokerUnavailable(f"cannot open a RabbitMQ channel: {exc}") from exc
                self._channel = channel
                self._generation = broker.generation
                self._declared.clear()
                self._held.clear()
            return channel

    async def _queues(self, queue: str) -> tuple[AbstractQueue, AbstractQueue, AbstractQueue]:
        """(items, dead letters, delayed) of ``queue``, declared on our channel."""
        channel = await self._open()
        found = self._declared.get(queue)
        if found is not None:
            return found
        dead_name = queue if self._is_dead(queue) else queue + ".dead"
        try:
            main = await channel.declare_queue(self.amqp_name(queue), durable=True,
                                               arguments=self._arguments(queue))
            dead = main if dead_name == queue else await channel.declare_queue(
                self.amqp_name(dead_name), durable=True, arguments=self._arguments(dead_name))
            delay = await channel.declare_queue(
                self.amqp_name(queue) + ".delay", durable=True, arguments={
                    "x-queue-type": "quorum", "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.amqp_name(queue)})
        except Exception as exc:
            raise BrokerUnavailable(f"cannot declare RabbitMQ queue {queue!r}: {exc}") from exc
        found = self._declared[queue] = (main, dead, delay)
        return found

    async def _publish(self, routing_key: str, body: bytes, item_id: str,
                       headers: dict[str, Any], *, expiration: float | None = None) -> None:
        channel = await self._open()
        message = aio_pika.Message(body, message_id=item_id, headers=headers,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   expiration=expiration)
        try:
            await channel.default_exchange.publish(message, routing_key=routing_key)
        except DeliveryError:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"publish to RabbitMQ queue failed: {exc}") from exc

    # -- the store ------------------------------------------------------------------

    async def push(self, queue: str, data: Any) -> str:
        await self._queues(queue)
        item_id = uuid.uuid4().hex
        try:
            await self._publish(self.amqp_name(queue), encode_data(data), item_id,
                                {ATTEMPTS: 0})
        except DeliveryError as exc:  # nacked: x-overflow reject-publish at the bound
            raise QueueFull(f"queue {queue!r} holds {self.max_len} items") from exc
        return item_id

    def _item(self, queue: str, message: AbstractIncomingMessage) -> StoredItem:
        headers = message.headers or {}
        redelivered = _int(headers.get("x-delivery-count"))
        attempts = _int(headers.get(ATTEMPTS)) + redelivered
        item_id = message.message_id or uuid.uuid4().hex
        data = decode_data(message.body)
        if self._is_dead(queue):  # a dead letter: the shape the memory queue gives it
            if DEAD_ID in headers:
                data = {"id": str(headers[DEAD_ID]), "data": data,
                        "attempts": _int(headers.get(DEAD_ATTEMPTS)),
                        "queue": str(headers.get(DEAD_QUEUE, ""))}
            else:  # dead-lettered by RabbitMQ at the delivery limit
                data = {"id": item_id, "data": data,
                        "attempts": _int(headers.get(ATTEMPTS)) + self.delivery_limit + 1,
                        "queue": queue[:-5]}
            attempts = redelivered
        return StoredItem(item_id, data, attempts)

    async def fetch(self, queue: str, count: int, *, block: float) -> list[StoredItem]:
        if count <= 0:
            return []
        # aiormq closes a channel whose RPC is cancelled, which would end every
        # lease on it: the round trips run in a task of their own, and what a
        # cancelled fetch got is kept for the next one
        task = asyncio.get_running_loop().create_task(self._messages(queue, count, block))
        try:
            messages = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(partial(self._keep_late, queue))
            raise
        generation = self._generation
        held = self._held.setdefault(queue, {})
        out: list[StoredItem] = []
        for message in messages:
            item = self._item(queue, message)
            limit = self._max_attempts.get(queue)
            if limit is not None and not self._is_dead(queue) and item.attempts >= limit:
                await self._bury(queue, item, message)  # out of attempts, as on Redis
                continue
            held[item.id] = (generation, message)
            out.append(item)
        return out

    async def _messages(self, queue: str, count: int,
                        block: float) -> list[AbstractIncomingMessage]:
        main = (await self._queues(queue))[0]
        messages = self._take_late(queue, count)
        want = count - len(messages)
        if want > 0:
            ready = await self._ready(queue)
            if ready > 0 and want <= GET_MAX:
                messages += await self._get(queue, main, min(want, ready))
            elif ready > 0 or (block > 0 and not messages):
                # wait for the first one when empty; else only as long as a burst takes
                wait = block if ready == 0 else min(block or WINDOW, WINDOW)
                messages += await self._window(queue, main, want, max(1, min(want, ready)),
                                               wait)
        return messages

    def _keep_late(self, queue: str, task: asyncio.Task[list[AbstractIncomingMessage]]
                   ) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        generation = self._generation
        self._late.setdefault(queue, deque()).extend((generation, m) for m in task.result())

    async def _ready(self, queue: str) -> int:
        """Items waiting in ``queue`` (a ``queue.declare`` round trip)."""
        channel = await self._open()
        try:
            declared = await channel.declare_queue(self.amqp_name(queue), durable=True,
                                                   arguments=self._arguments(queue))
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read RabbitMQ queue {queue!r}: {exc}") from exc
        return declared.declaration_result.message_count or 0

    async def _get(self, queue: str, main: AbstractQueue,
                   count: int) -> list[AbstractIncomingMessage]:
        """Up to ``count`` items by ``basic.get``: one round trip each."""
        out: list[AbstractIncomingMessage] = []
        while len(out) < count:
            try:
                message = await main.get(no_ack=False, fail=False)
            except Exception as exc:
                raise BrokerUnavailable(f"basic.get from {queue!r} failed: {exc}") from exc
            if message is None:
                break
            out.append(message)
        return out

    async def _window(self, queue: str, main: AbstractQueue, want: int, expect: int,
                      wait: float) -> list[AbstractIncomingMessage]:
        """Up to ``want`` items in one consumer window: ``basic.qos(want)``, a
        consumer, wait (at most ``wait`` s) for ``expect`` deliveries, cancel.
        The prefetch bounds what RabbitMQ sends to ``want``, so the node never
        holds more than its consumers asked for; a delivery that lands after
        the window closed is kept for the next fetch (it is leased to us)."""
        channel = await self._open()
        generation = self._generation
        got: list[AbstractIncomingMessage] = []
        late = self._late.setdefault(queue, deque())
        enough = asyncio.Event()
        window_open = [True]

        async def delivered(message: AbstractIncomingMessage) -> None:
            if window_open[0]:
                got.append(message)
                if len(got) >= expect:
                    enough.set()
            else:
                late.append((generation, message))

        try:
            if self._prefetch != (generation, want):
                await channel.set_qos(prefetch_count=want)
                self._prefetch = (generation, want)
            tag = await main.consume(delivered, no_ack=False)
            try:
                await asyncio.wait_for(enough.wait(), wait)
            except TimeoutError:
                pass
            finally:
                await main.cancel(tag)
        except asyncio.CancelledError:
            window_open[0] = False
            late.extend((generation, m) for m in got)
            raise
        except Exception as exc:
            window_open[0] = False
            late.extend((generation, m) for m in got)
            raise BrokerUnavailable(f"consuming from {queue!r} failed: {exc}") from exc
        window_open[0] = False
        return got

    def _take_late(self, queue: str, count: int) -> list[AbstractIncomingMessage]:
        """Deliveries of an earlier window that landed after it closed."""
        late = self._late.get(queue)
        out: list[AbstractIncomingMessage] = []
        while late and len(out) < count:
            generation, message = late.popleft()
            if generation == self._generation:  # else: that channel closed, it went back
                out.append(message)
        return out

    def _lease(self, queue: str, item_id: str) -> AbstractIncomingMessage | None:
        """Take this node's delivery of ``item_id``; None if it holds none now."""
        found = self._held.get(queue, {}).pop(item_id, None)
        if found is None:
            return None
        generation, message = found
        if generation != self._generation or self._channel is None or self._channel.is_closed:
            return None  # that channel closed: RabbitMQ put the item back
        return message

    async def ack(self, queue: str, item_ids: Sequence[str]) -> int:
        done = 0
        for item_id in item_ids:
            message = self._lease(queue, item_id)
            if message is None:
                continue
            try:
                await message.ack()
            except Exception as exc:
                raise BrokerUnavailable(f"ack on RabbitMQ failed: {exc}") from exc
            done += 1
        return done

    async def _bury(self, queue: str, item: StoredItem,
                    message: AbstractIncomingMessage) -> None:
        if not self._is_dead(queue):  # a dead letter of a dead letter is dropped
            await self._publish(self.amqp_name(queue + ".dead"), message.body, item.id, {
                ATTEMPTS: 0, DEAD_ID: item.id, DEAD_ATTEMPTS: item.attempts,
                DEAD_QUEUE: queue})
        await message.ack()

    async def requeue(self, queue: str, item_id: str, attempts: int, *,
                      delay: float = 0.0, dead: bool = False) -> bool:
        message = self._lease(queue, item_id)
        if message is None:
            return False
        try:
            if dead:
                await self._bury(queue, StoredItem(item_id, None, attempts), message)
                return True
            target = self.amqp_name(queue) + (".delay" if delay > 0 else "")
            try:
                await self._publish(target, message.body, item_id, {ATTEMPTS: attempts},
                                    expiration=delay if delay > 0 else None)
            except DeliveryError:  # refused (queue at its bound): back where it was
                await message.nack(requeue=True)
                return True
            await message.ack()
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"requeue on RabbitMQ failed: {exc}") from exc
        return True

    async def claim(self, queue: str, *, min_idle: float, count: int,
                    max_attempts: int) -> list[StoredItem]:
        """RabbitMQ returns the items of a closed channel itself; remember the
        attempt limit for the fetches that get them back."""
        self._max_attempts[queue] = max_attempts
        return []

    async def release_delayed(self, queue: str) -> float | None:
        return None  # RabbitMQ expires delayed items back into the queue itself

    async def stats(self, queue: str) -> QueueStoreStats:
        main, _, delay = await self._queues(queue)
        channel = await self._open()
        try:
            ready = await channel.declare_queue(main.name, durable=True,
                                                arguments=self._arguments(queue))
            delayed = await channel.declare_queue(delay.name, durable=True,
                                                  arguments=delay.arguments)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read RabbitMQ queue {queue!r}: {exc}") from exc
        length = ready.declaration_result.message_count or 0
        n_delayed = delayed.declaration_result.message_count or 0
        return QueueStoreStats(length, len(self._held.get(queue, {})), n_delayed, 0.0)

    async def release(self, queue: str) -> None:
        """Give back deliveries that landed after a window closed and were never
        handed out (this node stopped fetching ``queue``)."""
        for message in self._take_late(queue, 1 << 30):
            try:
                await message.nack(requeue=True)
            except Exception:  # the channel is gone: RabbitMQ put it back anyway
                pass

    async def close(self) -> None:
        """Close our channel: RabbitMQ puts back whatever this node still held."""
        channel, self._channel = self._channel, None
        self._declared.clear()
        self._held.clear()
        self._late.clear()
        if channel is not None and not channel.is_closed:
            try:
                await channel.close()
            except Exception:  # the connection is going away too
                pass
