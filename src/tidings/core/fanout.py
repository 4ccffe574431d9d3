"""Fan-out: a node's publications and member events to its local subscribers.

What the broker delivers to a node ends here: the index gives the matching
connections and each gets the publication queued in its outbox, encoded once
per protocol by the codecs (:mod:`tidings.protocol.codec`), with no await per
subscriber.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tidings.brokers.base import MemberEvent
from tidings.core.connection import BatchFrames, Connection, deliver_all
from tidings.protocol.index import SubscriptionIndex
from tidings.types import Publication

if TYPE_CHECKING:
    from tidings.core.flush import Flusher
    from tidings.core.hub import HubStats

__all__ = ["FanOut"]

log = logging.getLogger("tidings.fanout")


class FanOut:
    """The broker callbacks that deliver: publications, batches, member events."""

    __slots__ = ("flusher", "index", "join_leave_index", "node", "stats")

    def __init__(self, node: str, stats: HubStats, flusher: Flusher) -> None:
        self.node = node
        self.stats = stats
        self.flusher = flusher  # a fan-out is one scope of the write policy
        self.index: SubscriptionIndex[Connection] = SubscriptionIndex()
        self.join_leave_index: SubscriptionIndex[Connection] = SubscriptionIndex()

    def on_publication(self, pub: Publication) -> None:
        """Broker callback: fan a publication out to the local subscribers."""
        self.stats.publications_out += 1
        conns = self.index.match(pub.channel)
        if not conns:
            return
        flusher = self.flusher
        # each frame kind is encoded once, by the first connection that needs it
        if flusher.depth:  # inside a producer's read: its scope holds
            deliver_all(conns, pub, flusher.through, flusher.turn)
        else:
            flusher.enter()
            try:
                deliver_all(conns, pub, flusher.through, flusher.turn)
            finally:
                flusher.leave()
        self.stats.deliveries += len(conns)

    def on_publications(self, pubs: Sequence[Publication]) -> None:
        """Broker callback: several consecutive publications of one channel."""
        self.stats.publications_out += len(pubs)
        conns = self.index.match(pubs[0].channel) if pubs else None
        if not conns:
            return
        flusher = self.flusher
        # framed and joined once per protocol for all of them
        batch = BatchFrames(pubs) if len(conns) > 1 else None
        if flusher.depth:
            for conn in conns:
                conn.deliver_many(pubs, batch)
        else:
            flusher.enter()
            try:
                for conn in conns:
                    conn.deliver_many(pubs, batch)
            finally:
                flusher.leave()
        self.stats.deliveries += len(conns) * len(pubs)

    def on_event(self, channel: str, frame: str) -> None:
        """Broker callback: a join/leave for the subscribers that asked for them,
        encoded once per protocol."""
        event = MemberEvent.decode(frame)
        if event is None:
            log.warning("node %s: not a member event on %r: %.80r", self.node, channel, frame)
            return
        conns = self.join_leave_index.match(channel)
        if not conns:
            return
        encoded: dict[str, str | None] = {}
        flusher = self.flusher
        flusher.enter()
        try:
            for conn in conns:
                codec = conn.codec
                if codec is None:
                    continue
                if codec.name not in encoded:
                    encoded[codec.name] = codec.join_leave(event.kind, event.channel,
                                                           event.conn_id, event.user)
                push = encoded[codec.name]
                if push is not None:
                    conn.send_frame(push)
        finally:
            flusher.leave()
