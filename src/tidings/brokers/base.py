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
- MQTT: native.
None of them needs a firehose subscription to serve a pattern.

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

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tidings.types import HistoryPage, Member, Publication, StreamPos

__all__ = [
    "Broker",
    "BrokerHandler",
    "BrokerHealth",
    "HistoryOptions",
    "HistoryStore",
    "PresenceStore",
]


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
class BrokerHealth:
    up: bool
    reason: str = ""


class BrokerHandler(Protocol):
    """What a broker calls back into: the hub."""

    def on_publication(self, pub: Publication) -> None:
        """A publication on a channel this node subscribed to (or matching a pattern)."""

    def on_event(self, channel: str, frame: str) -> None:
        """A transient, position-less frame for a channel (join/leave)."""

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
    ) -> Publication:
        """Assign the next position in ``channel``, keep it in history, fan it out.

        Returns the publication as delivered (with offset, epoch and ts).
        """

    async def publish_event(self, channel: str, frame: str) -> None:
        """Fan a transient frame (no position, no history) out to interested nodes."""

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
