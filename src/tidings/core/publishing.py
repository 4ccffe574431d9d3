"""Publishing: a hub's publications to its broker (the fan-out in is
:mod:`tidings.core.fanout`).

A publish is checked (hub running, channel name valid, history options of the
channel), then handed to the broker: awaited (``publish``), synchronously on
an in-process broker (``publish_nowait``, ``publish_many_nowait`` for a burst
of one producer), or pipelined with the outcome to a callback or a future
(``publish_then``, ``publish_soon``). With the broker unreachable, local
subscribers still get the publication (SPEC 7).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from tidings.brokers.base import (
    NowaitPublisher,
    PipelinedPublisher,
    PublishDone,
    PublishOutcome,
    outcome_of,
    settle_future,
)
from tidings.exceptions import BrokerUnavailable, HubError
from tidings.protocol.names import validate_channel
from tidings.types import Publication

if TYPE_CHECKING:
    from tidings.brokers import Broker
    from tidings.brokers.base import HistoryOptions
    from tidings.core.channels import ChannelTypes
    from tidings.core.config import HistoryConfig, Limits
    from tidings.core.fanout import FanOut
    from tidings.core.hub import HubCore, HubStats

__all__ = ["Publisher"]


class Publisher:
    """Sends a hub's publications to its broker, by the fastest path the broker
    declares; owned by :class:`~tidings.core.hub.HubCore` (``hub.publisher``)."""

    __slots__ = ("_nowait", "_pipeline", "broker", "fanout", "history_config", "hub",
                 "limits", "stats", "types")

    def __init__(self, hub: HubCore, broker: Broker, fanout: FanOut) -> None:
        self.hub = hub  # for its state: running or not, and its event loop
        self.broker = broker
        self.fanout = fanout
        self.limits: Limits = hub.limits
        self.stats: HubStats = hub.stats
        self.history_config: HistoryConfig = hub.history_config
        self.types: ChannelTypes = hub.channel_types
        self._nowait: NowaitPublisher | None = (
            broker if isinstance(broker, NowaitPublisher) else None)
        self._pipeline: PipelinedPublisher | None = (
            broker if isinstance(broker, PipelinedPublisher) else None)

    async def publish(self, channel: str, data: Any, *, sender: str | None = None,
                      text: str | None = None) -> Publication:
        """Publish to a channel on every node; returns it with its offset and epoch.

        ``text``: ``data`` as JSON text, when the caller has it already (a raw
        producer's frame); raw-stream subscribers then get that text as is.
        """
        history = self._publishing(channel)
        if self.types.active:
            data, text = self.types.check(channel, data, text)
        try:
            return await self.broker.publish(channel, data, sender=sender, history=history,
                                             text=text)
        except BrokerUnavailable:
            return self._publish_locally(channel, data, sender, text)

    def _publishing(self, channel: str, count: int = 1) -> HistoryOptions:
        """What every publish checks first; the channel's history options."""
        if not self.hub.running:
            self.hub.require_started()
        validate_channel(channel, self.limits.max_name)  # a set lookup for names seen before
        self.stats.publications_in += count
        return self.history_config.options(channel)

    def _publish_locally(self, channel: str, data: Any, sender: str | None,
                         text: str | None) -> Publication:
        """SPEC 7: with the broker unreachable, local subscribers still get it;
        its position is unknown (offset 0, epoch "")."""
        pub = Publication(channel, data, 0, "", sender, int(time.time() * 1000), text=text)
        self.fanout.on_publication(pub)
        return pub

    @property
    def can_publish_nowait(self) -> bool:
        """True when the broker publishes synchronously (a :class:`NowaitPublisher`)."""
        return self._nowait is not None

    @property
    def pipelined(self) -> bool:
        """True when the broker keeps the order of publishes issued without
        waiting (a :class:`PipelinedPublisher`)."""
        return self._pipeline is not None

    def publish_nowait(self, channel: str, data: Any, *, sender: str | None = None,
                       text: str | None = None) -> Publication:
        """:meth:`publish` without a coroutine, for brokers that never wait
        (``can_publish_nowait``): a raw producer's frames are published straight
        from the socket's read callback."""
        validate_channel(channel, self.limits.max_name)
        return self.publish_valid_nowait(channel, data, sender, text)

    def publish_valid_nowait(self, channel: str, data: Any, sender: str | None = None,
                             text: str | None = None) -> Publication:
        """:meth:`publish_nowait` to a channel the caller has validated
        (``validate_channel`` with ``Limits.max_name``): an endpoint bound to one
        channel, or a command its parser checked. The per-frame path: no check
        twice, positional arguments."""
        if not self.hub.running:
            self.hub.require_started()
        nowait = self._nowait
        if nowait is None:
            raise HubError(f"the {self.broker.url} broker cannot publish without waiting")
        self.stats.publications_in += 1
        if self.types.active:
            data, text = self.types.check(channel, data, text)
        return nowait.publish_nowait(channel, data, sender=sender,
                                     history=self.history_config.options(channel), text=text)

    def publish_many_nowait(self, channel: str, items: Sequence[tuple[Any, str | None]], *,
                            sender: str | None = None) -> list[Publication]:
        """:meth:`publish_nowait` of several ``(data, text)`` items at once, in
        order (a burst of a raw producer's frames read together)."""
        history = self._publishing(channel, len(items))
        if self._nowait is None:
            raise HubError(f"the {self.broker.url} broker cannot publish without waiting")
        if self.types.active:  # all or none: one invalid item refuses the batch
            items = [self.types.check(channel, data, text) for data, text in items]
        return self._nowait.publish_many_nowait(channel, items, sender=sender, history=history)

    def publish_soon(self, channel: str, data: Any, *, sender: str | None = None,
                     text: str | None = None) -> asyncio.Future[Publication]:
        """Start a publish and return at once; the future gets the publication.

        Publishes started one after another reach the broker in that order, so
        a producer can keep many in flight without a task each. If the broker
        is unreachable the publication is delivered locally (as :meth:`publish`
        does) and the future raises ``BrokerUnavailable``.
        """
        if self._pipeline is None:  # no pipeline: a task keeps the order
            return asyncio.ensure_future(self.publish(channel, data, sender=sender, text=text))
        future: asyncio.Future[Publication] = self.hub.loop.create_future()
        self.publish_then(channel, data, sender=sender, text=text,
                          done=partial(settle_future, future))
        return future

    def publish_then(self, channel: str, data: Any, *, sender: str | None = None,
                     text: str | None = None, done: PublishDone) -> None:
        """:meth:`publish_soon` with a callback instead of a future: ``done`` gets
        the publication, or ``BrokerUnavailable`` after the local delivery, in
        the order the publishes were started (maybe before this returns). On a
        pipelined broker (Redis) no future and no loop handle per publish."""
        pipeline = self._pipeline
        if pipeline is None:
            self.publish_soon(channel, data, sender=sender, text=text).add_done_callback(
                lambda future: done(outcome_of(future)))
            return

        history = self._publishing(channel)
        if self.types.active:
            data, text = self.types.check(channel, data, text)

        def finished(outcome: PublishOutcome) -> None:
            if isinstance(outcome, BrokerUnavailable):
                self._publish_locally(channel, data, sender, text)
            done(outcome)

        pipeline.publish_then(channel, data, sender=sender, history=history, text=text,
                              done=finished)
