"""The Broker interface every backend implements.

A hub talks to exactly one broker. The broker carries publications between
hubs (nodes), assigns stream positions, and routes by interest: a hub
``subscribe``s to the channels and patterns its own clients want (the hub
refcounts them: first local subscriber -> ``subscribe``, last one gone ->
``unsubscribe``) and the broker hands it only matching publications.

Patterns and native wildcards. The hub always names interest with MQTT
patterns (``a/+/c``, ``a/#``). A backend maps each onto the narrowest native
subscription that covers it and, where that native form is wider, filters
exactly on receipt with :func:`tidings.protocol.pattern_matches`:

- memory: the pattern itself (the bus keeps a topic trie);
- Redis: PSUBSCRIBE with ``+`` -> ``*`` within a level is impossible in glob
  syntax, so ``a/+/c`` -> ``a/*/c`` and ``a/#`` -> ``a*`` (and ``a``), then exact
  filtering on receipt;
- NATS: ``/`` -> ``.``, ``+`` -> ``*``, ``#`` -> ``>`` (plus the parent subject);
- AMQP topic exchanges: ``+`` -> ``*``, ``#`` -> ``#``;
- MQTT: native;
- Kafka: none (no wildcard subscription of this kind): every node reads the
  one bus topic and filters, at the cost of reading every publication.
No other needs a firehose subscription to serve a pattern.

Contracts every backend keeps:

- ``publish`` returns the publication's (offset, epoch); offsets of one
  channel increase by exactly 1 and are global across nodes; the epoch
  changes whenever the channel's history may have been lost.
- Publications of one channel reach every interested node in offset order.
- Delivery is at-most-once between nodes (pub/sub); history closes gaps.
- ``on_publication`` and friends are called on the hub's event loop and must
  not block; the handler never raises into the broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, runtime_checkable

import orjson

from tidings.protocol.native import encode_join_leave
from tidings.types import HistoryPage, Member, Publication, StreamPos

__all__ = [
    "Broker",
    "BrokerHandler",
    "BrokerHealth",
    "Capabilities",
    "HistoryOptions",
    "HistoryStore",
    "MemberEvent",
    "NowaitPublisher",
    "PipelinedBroker",
    "PipelinedPublisher",
    "PresenceStore",
    "QueueStore",
    "QueueStoreProvider",
    "QueueStoreStats",
    "StoredItem",
    "capabilities_of",
    "outcome_of",
    "settle_future",
    "transition",
]

# what a pipelined publish (``publish_then``) hands its callback
PublishOutcome = Publication | BaseException
PublishDone = Callable[[PublishOutcome], None]


def settle_future(future: asyncio.Future[Publication], outcome: PublishOutcome) -> None:
    """A ``publish_then`` callback that completes ``future`` (``publish_soon``)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def outcome_of(future: asyncio.Future[Publication]) -> PublishOutcome:
    """A completed publish future as a ``publish_then`` outcome."""
    if future.cancelled():
        return asyncio.CancelledError()
    exc = future.exception()
    return exc if exc is not None else future.result()


@dataclass(frozen=True, slots=True)
class HistoryOptions:
    """How much history a channel keeps: ``size`` publications, ``ttl`` seconds.

    ``size == 0`` or ``ttl == 0`` turns history off (offsets still advance).
    """

    size: int = 0
    ttl: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.ttl > 0


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A member joined or left a channel: what ``publish_event`` carries.

    Brokers carry it as the text of :meth:`encode` and hand that text to
    ``on_event``; the hub decodes it and each protocol's codec encodes it for
    its subscribers (the text is the native ``join``/``leave`` frame, so nodes
    of any version understand each other).
    """

    kind: Literal["join", "leave"]
    channel: str
    conn_id: str
    user: str | None = None

    def encode(self) -> str:
        return encode_join_leave(self.kind, self.channel, self.conn_id, self.user).decode()

    @classmethod
    def decode(cls, text: str | bytes) -> MemberEvent | None:
        """The event of ``text``; None if it is not one (logged by the caller)."""
        try:
            obj = orjson.loads(text)
            kind, channel, member = obj["type"], obj["channel"], obj["member"]
            conn_id, user = member["conn_id"], member.get("user")
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            return None
        if kind not in ("join", "leave") or not isinstance(channel, str):
            return None
        return cls(kind, channel, str(conn_id), user if isinstance(user, str) else None)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a broker offers beyond live pub/sub, stated by the broker itself.

    A broker sets ``capabilities`` (a class attribute is fine). The hub answers
    :class:`~tidings.exceptions.NotAvailable` (``not_available`` on the wire,
    naming the broker) for a feature that is off, and ``/api/info`` and the
    startup log list them. A feature that is off is never approximated: no
    made-up offsets, no node-local presence passed off as global.

    - ``positions``: ``publish`` assigns global +1 offsets per channel and an
      epoch; without it publications carry offset 0 and recovery is refused.
    - ``history``: the broker is a :class:`HistoryStore` (history, recovery).
    - ``presence``: the broker is a :class:`PresenceStore` across nodes.
    - ``queues``: the broker is a :class:`QueueStoreProvider` whose store holds
      work queues shared by every node (else queues are per process).
    - ``direct``: ``send_node``/``send_all`` reach other nodes (direct messages
      and user-wide orders across nodes).
    """

    positions: bool = False
    history: bool = False
    presence: bool = False
    queues: bool = False
    direct: bool = True

    def offered(self) -> list[str]:
        """Names of the features on, pub/sub first, for logs and ``/api/info``."""
        names = ["pubsub"]
        names += [name for name in ("positions", "history", "presence", "queues", "direct")
                  if getattr(self, name)]
        return names


def capabilities_of(broker: object) -> Capabilities:
    """``broker.capabilities`` when it states them, else what its type implements."""
    stated = getattr(broker, "capabilities", None)
    if isinstance(stated, Capabilities):
        return stated
    history = isinstance(broker, HistoryStore)
    store = broker.queue_store() if isinstance(broker, QueueStoreProvider) else None
    return Capabilities(positions=history, history=history,
                        presence=isinstance(broker, PresenceStore), queues=store is not None)


@dataclass(frozen=True, slots=True)
class BrokerHealth:
    up: bool
    reason: str = ""


def transition(handler: BrokerHandler | None, old: BrokerHealth,
               new: BrokerHealth) -> BrokerHealth:
    """``new``, after telling ``handler`` if it changes up/down: the duty of
    calling ``on_broker_state`` exactly once per transition, in one place."""
    if new.up != old.up and handler is not None:
        handler.on_broker_state(new)
    return new


class BrokerHandler(Protocol):
    """What a broker calls back into: the hub."""

    def on_publication(self, pub: Publication) -> None:
        """A publication on a channel this node subscribed to (or matching a pattern)."""

    def on_publications(self, pubs: Sequence[Publication]) -> None:
        """Several consecutive publications of one channel, in order (a batch)."""

    def on_event(self, channel: str, frame: str) -> None:
        """A transient, position-less event of a channel: the text of a
        :class:`MemberEvent` (join/leave), as ``publish_event`` was given it."""

    def on_node_message(self, payload: bytes) -> None:
        """A message addressed to this node (direct send) or to every node (broadcast)."""

    def on_broker_state(self, health: BrokerHealth) -> None:
        """The broker went up or down; called once per transition."""


@runtime_checkable
class Broker(Protocol):
    """Transport between hubs. One file per technology under ``tidings.brokers``."""

    url: str

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        """Open connections and start delivering to ``handler``."""

    async def close(self) -> None:
        """Stop delivering and release everything. Idempotent."""

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
        text: str | None = None,
    ) -> Publication:
        """Assign the next position in ``channel``, keep it in history, fan it out.

        ``text``, when given, is ``data``'s JSON text as the publisher sent it:
        a broker may carry or deliver it as is instead of encoding ``data`` again.

        Returns the publication as delivered (with offset, epoch and ts).
        """

    async def publish_event(self, channel: str, frame: str) -> None:
        """Fan an event's text (``MemberEvent.encode()``; no position, no history)
        out to the nodes interested in ``channel``, this one included."""

    async def subscribe(self, pattern: str) -> None:
        """Start receiving publications of ``pattern`` (channel or MQTT pattern)."""

    async def unsubscribe(self, pattern: str) -> None:
        """Stop receiving publications of ``pattern``."""

    async def send_node(self, node_id: str, payload: bytes) -> None:
        """Deliver ``payload`` to one node's ``on_node_message``."""

    async def send_all(self, payload: bytes) -> None:
        """Deliver ``payload`` to every node's ``on_node_message``, this one included."""

    def health(self) -> BrokerHealth:
        """Current state, without I/O."""


@runtime_checkable
class NowaitPublisher(Protocol):
    """The fast path of an in-process broker (``memory://``): a publish is done
    (positioned, kept, fanned out) before the call returns, so the hub publishes
    a raw producer's frames straight from the socket's read callback, without a
    coroutine. Never raises ``BrokerUnavailable`` (there is nothing to reach)."""

    def publish_nowait(self, channel: str, data: Any, *, sender: str | None = None,
                       history: HistoryOptions | None = None,
                       text: str | None = None) -> Publication:
        """``publish``, synchronously."""
        ...

    def publish_many_nowait(self, channel: str, items: Sequence[tuple[Any, str | None]], *,
                            sender: str | None = None,
                            history: HistoryOptions | None = None) -> list[Publication]:
        """Several ``(data, text)`` publications of one channel, in order."""
        ...


@runtime_checkable
class PipelinedPublisher(Protocol):
    """The fast path of a remote broker that keeps the order of publishes
    issued without waiting for each other (Redis): a connection keeps up to
    ``MAX_PIPELINED`` in flight, with no task and no future each."""

    def publish_then(self, channel: str, data: Any, *, sender: str | None = None,
                     history: HistoryOptions | None = None, text: str | None = None,
                     done: PublishDone) -> None:
        """Start ``publish`` now; ``done`` gets the publication, or the exception
        (``BrokerUnavailable`` while down), in the order the publishes were started
        (maybe before this returns)."""
        ...


class PipelinedBroker:
    """A base for brokers written around ``publish_then`` (a PipelinedPublisher):
    ``publish`` and ``publish_soon`` are that one path with a future, so the
    three keep one order."""

    def publish_then(self, channel: str, data: Any, *, sender: str | None = None,
                     history: HistoryOptions | None = None, text: str | None = None,
                     done: PublishDone) -> None:
        raise NotImplementedError

    async def publish(self, channel: str, data: Any, *, sender: str | None = None,
                      history: HistoryOptions | None = None,
                      text: str | None = None) -> Publication:
        return await self.publish_soon(channel, data, sender=sender, history=history,
                                       text=text)

    def publish_soon(self, channel: str, data: Any, *, sender: str | None = None,
                     history: HistoryOptions | None = None,
                     text: str | None = None) -> asyncio.Future[Publication]:
        """``publish`` without a coroutine: the future gets the publication (or
        ``BrokerUnavailable``); publishes started in order reach the server in order."""
        future: asyncio.Future[Publication] = asyncio.get_running_loop().create_future()
        self.publish_then(channel, data, sender=sender, history=history, text=text,
                          done=partial(settle_future, future))
        return future


@runtime_checkable
class HistoryStore(Protocol):
    """History and stream positions of channels."""

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        """Publications after ``since`` (all kept ones when None), oldest first
        (newest first with ``reverse``), at most ``limit``; ``recovered`` is False
        when ``since`` is in another epoch or older than the window."""

    async def remove_history(self, channel: str) -> None:
        """Forget a channel's history; its epoch changes."""

    async def position(self, channel: str) -> StreamPos:
        """The channel's current (last offset, epoch)."""


@runtime_checkable
class PresenceStore(Protocol):
    """Who is in a channel, across every node."""

    async def add_member(self, channel: str, member: Member) -> None: ...

    async def remove_member(self, channel: str, conn_id: str) -> None: ...

    async def members(self, channel: str) -> list[Member]: ...


@dataclass(frozen=True, slots=True)
class StoredItem:
    """An item a :class:`QueueStore` leased to this node.

    ``attempts`` counts the deliveries *before* this one, so the hub's
    consumer logic (which counts a delivery when it hands the item to a
    consumer) carries on where the previous holder left off, on any node.
    """

    id: str
    data: Any
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class QueueStoreStats:
    """A queue as the store sees it, across every node."""

    length: int = 0  # waiting to be fetched
    in_flight: int = 0  # leased to some node, not acked
    delayed: int = 0  # nacked with a delay, not due yet
    oldest_age: float = 0.0  # seconds the oldest waiting item has waited


@runtime_checkable
class QueueStore(Protocol):
    """Work-queue items shared by every node (durable as far as the store is).

    The hub keeps the consumer side (credit, round robin, per-consumer
    in-flight, visibility timers) and uses a store only as the source and
    sink of items, so a backend implements five plain operations. Leases are
    per node: an item fetched by a node is in flight until that node acks or
    requeues it, or until its lease expires (the node died) and another node
    ``claim``s it. Implementations: Redis streams
    (:mod:`~tidings.brokers.redis.queue`) and the relay's in-memory store for
    ``ipc://`` workers (:mod:`~tidings.brokers.memory_queue`); ``memory://``
    has no store and keeps the in-process queue.
    """

    async def push(self, queue: str, data: Any) -> str:
        """Append an item; returns its id. Raises QueueFull at the length bound."""

    async def fetch(self, queue: str, count: int, *, block: float) -> list[StoredItem]:
        """Lease up to ``count`` waiting items to this node, oldest first, waiting
        up to ``block`` s for the first (0: do not wait)."""

    async def ack(self, queue: str, item_ids: Sequence[str]) -> int:
        """Remove done items; returns how many were still in flight."""

    async def requeue(self, queue: str, item_id: str, attempts: int, *,
                      delay: float = 0.0, dead: bool = False) -> bool:
        """Give a leased item back (to the tail, or after ``delay`` s) with its
        ``attempts`` so far, or move it to ``<queue>.dead`` with ``dead``;
        atomically, so the item is neither lost nor duplicated. False if this
        node no longer held it."""

    async def claim(self, queue: str, *, min_idle: float, count: int,
                    max_attempts: int) -> list[StoredItem]:
        """Lease to this node up to ``count`` items whose lease expired (leased
        ``min_idle`` s ago and never settled: their node died or hung); those
        already delivered ``max_attempts`` times go to ``<queue>.dead`` instead.

        A store whose server gives a dead node's items back by itself when its
        connection closes (RabbitMQ) sets ``lease_expiry = False`` and returns
        no items here; the conformance suite then skips the claim test."""

    async def release_delayed(self, queue: str) -> float | None:
        """Make due delayed items waiting again; seconds until the next is due."""

    async def stats(self, queue: str) -> QueueStoreStats:
        """Length, in flight, delayed and oldest age, across every node.

        A store whose server does not say how many items other nodes hold
        (RabbitMQ without its management API) sets ``in_flight_local = True``
        and counts this node's in ``in_flight``."""

    async def release(self, queue: str) -> None:
        """This node stopped fetching ``queue``: free what fetching held."""


@runtime_checkable
class QueueStoreProvider(Protocol):
    """A broker that can hold work queues shared by its nodes."""

    def queue_store(self) -> QueueStore | None:
        """The store, or None when this broker keeps queues in process."""
