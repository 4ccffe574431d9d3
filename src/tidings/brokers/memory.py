"""``memory://``: the embedded broker, one process, no outside service.

``memory://`` gives each broker a private bus. ``memory://<name>`` shares one
bus among every broker of the process with that name, which is how several
hubs (nodes) in one process, e.g. in tests, see each other.

History is kept in the bus (a bounded deque per channel, trimmed by size and
age). Everything is lost when the process exits: that is the point of the
memory broker.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from tidings.brokers.base import BrokerHandler, BrokerHealth, HistoryOptions
from tidings.protocol.index import SubscriptionIndex
from tidings.types import HistoryPage, Member, Publication, StreamPos

__all__ = ["MemoryBroker", "MemoryBus"]

_SWEEP_EVERY = 4096  # publications between sweeps of idle channel state
_IDLE_STATE_SECONDS = 3600.0


def new_epoch() -> str:
    return secrets.token_hex(4)


class _Channel:
    __slots__ = ("epoch", "history", "last", "offset", "ttl")

    def __init__(self) -> None:
        self.offset = 0
        self.epoch = new_epoch()
        self.history: deque[tuple[float, Publication]] = deque()
        self.ttl = 0.0
        self.last = time.monotonic()


class MemoryBus:
    """The shared state behind one or more :class:`MemoryBroker`."""

    def __init__(self) -> None:
        self.nodes: dict[str, BrokerHandler] = {}
        self.index: SubscriptionIndex[str] = SubscriptionIndex()
        self.channels: dict[str, _Channel] = {}
        self.presence: dict[str, dict[str, Member]] = {}
        self._since_sweep = 0

    def channel(self, name: str) -> _Channel:
        state = self.channels.get(name)
        if state is None:
            state = self.channels[name] = _Channel()
        return state

    def trim(self, state: _Channel, opts: HistoryOptions, now: float) -> None:
        hist = state.history
        if hist.maxlen != opts.size:  # the size rule changed (or this is a new channel)
            hist = state.history = deque(hist, maxlen=opts.size)
        state.ttl = opts.ttl
        horizon = now - opts.ttl
        while hist and hist[0][0] < horizon:
            hist.popleft()

    def sweep(self, now: float) -> None:
        """Forget channels idle for an hour with no history (new epoch if reused)."""
        idle = [
            name for name, st in self.channels.items()
            if not st.history and now - st.last > _IDLE_STATE_SECONDS
        ]
        for name in idle:
            del self.channels[name]


_named_buses: dict[str, MemoryBus] = {}


class MemoryBroker:
    """In-process broker. Publishing is synchronous fan-out to interested hubs."""

    def __init__(self, url: str = "memory://", *, bus: MemoryBus | None = None) -> None:
        # ``bus`` lets an owner of shared state (the ipc relay) give each of its
        # participants a view of one bus without going through a process-wide name.
        self.url = url
        if bus is None:
            name = urlsplit(url).netloc
            bus = _named_buses.setdefault(name, MemoryBus()) if name else MemoryBus()
        self._bus = bus
        self._node: str | None = None
        self._patterns: set[str] = set()

    # -- lifecycle ----------------------------------------------------------

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        if node_id in self._bus.nodes:
            raise ValueError(f"node id {node_id!r} already on this memory bus")
        self._node = node_id
        self._bus.nodes[node_id] = handler
        handler.on_broker_state(BrokerHealth(True))

    async def close(self) -> None:
        node = self._node
        if node is None:
            return
        for pattern in self._patterns:
            self._bus.index.remove(pattern, node)
        self._patterns.clear()
        self._bus.nodes.pop(node, None)
        self._node = None

    def health(self) -> BrokerHealth:
        return BrokerHealth(self._node is not None, "" if self._node else "not connected")

    # -- pub/sub ------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
        text: str | None = None,
    ) -> Publication:
        return self.publish_nowait(channel, data, sender=sender, history=history, text=text)

    def publish_nowait(
        self,
        channel: str,
        data: Any,
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
        text: str | None = None,
    ) -> Publication:
        """``publish`` without a coroutine: in-process publishing never waits."""
        state = self._bus.channels.get(channel) or self._bus.channel(channel)
        offset = state.offset = state.offset + 1
        pub = Publication(channel, data, offset, state.epoch, sender, int(time.time() * 1000),
                          text)  # positional: a keyword costs a dict in the class call
        self._store_and_fan_out(state, history, (pub,))
        return pub

    def publish_many_nowait(
        self,
        channel: str,
        items: Iterable[tuple[Any, str | None]],
        *,
        sender: str | None = None,
        history: HistoryOptions | None = None,
    ) -> list[Publication]:
        """Publish ``(data, text)`` items of one sender to one channel, in order, at
        consecutive offsets; each subscribing node gets them in one call."""
        state = self._bus.channels.get(channel) or self._bus.channel(channel)
        offset = state.offset
        epoch = state.epoch
        ts = int(time.time() * 1000)
        pubs = [Publication(channel, data, offset + i, epoch, sender, ts, text)
                for i, (data, text) in enumerate(items, 1)]
        if not pubs:
            return pubs
        state.offset = offset + len(pubs)
        self._store_and_fan_out(state, history, pubs)
        return pubs

    def _store_and_fan_out(self, state: _Channel, history: HistoryOptions | None,
                           pubs: Sequence[Publication]) -> None:
        """History, the idle-state sweep and delivery to every subscribing node."""
        bus = self._bus
        now = time.monotonic()
        state.last = now
        if history is not None and history.size > 0 and history.ttl > 0:  # enabled
            hist = state.history
            if (hist.maxlen != history.size or state.ttl != history.ttl
                    or (hist and hist[0][0] < now - history.ttl)):
                bus.trim(state, history, now)
                hist = state.history
            for pub in pubs:
                hist.append((now, pub))  # the deque's maxlen drops the oldest
        elif state.history:
            state.history.clear()
        bus._since_sweep += len(pubs)
        if bus._since_sweep >= _SWEEP_EVERY:
            bus._since_sweep = 0
            bus.sweep(now)
        nodes = bus.nodes
        for node in bus.index.match(pubs[0].channel):
            handler = nodes.get(node)
            if handler is not None:
                if len(pubs) == 1:
                    handler.on_publication(pubs[0])
                else:
                    handler.on_publications(pubs)

    async def publish_event(self, channel: str, frame: str) -> None:
        nodes = self._bus.nodes
        for node in self._bus.index.match(channel):
            handler = nodes.get(node)
            if handler is not None:
                handler.on_event(channel, frame)

    async def subscribe(self, pattern: str) -> None:
        if self._node is not None and pattern not in self._patterns:
            self._patterns.add(pattern)
            self._bus.index.add(pattern, self._node)

    async def unsubscribe(self, pattern: str) -> None:
        if self._node is not None and pattern in self._patterns:
            self._patterns.discard(pattern)
            self._bus.index.remove(pattern, self._node)

    async def send_node(self, node_id: str, payload: bytes) -> None:
        handler = self._bus.nodes.get(node_id)
        if handler is not None:
            handler.on_node_message(payload)

    async def send_all(self, payload: bytes) -> None:
        for handler in list(self._bus.nodes.values()):
            handler.on_node_message(payload)

    # -- history ------------------------------------------------------------

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        state = self._bus.channels.get(channel)
        if state is None:
            state = self._bus.channel(channel)
        horizon = time.monotonic() - state.ttl  # a quiet channel ages out too
        pubs = [pub for at, pub in state.history if at >= horizon]
        recovered = True
        if since is not None:
            if since.epoch != state.epoch:
                recovered = False
                pubs = []
            elif since.offset < state.offset:
                first = pubs[0].offset if pubs else state.offset + 1
                if since.offset + 1 < first:
                    recovered = False  # the gap left the window
                pubs = [p for p in pubs if p.offset > since.offset]
            else:
                pubs = []
        if reverse:
            pubs.reverse()
        if limit is not None:
            pubs = pubs[:limit]
        return HistoryPage(pubs, state.offset, state.epoch, recovered)

    async def remove_history(self, channel: str) -> None:
        state = self._bus.channels.get(channel)
        if state is not None:
            state.history.clear()
            state.epoch = new_epoch()

    async def position(self, channel: str) -> StreamPos:
        state = self._bus.channel(channel)
        return StreamPos(state.offset, state.epoch)

    # -- presence -----------------------------------------------------------

    async def add_member(self, channel: str, member: Member) -> None:
        self._bus.presence.setdefault(channel, {})[member.conn_id] = member

    async def remove_member(self, channel: str, conn_id: str) -> None:
        members = self._bus.presence.get(channel)
        if members is not None:
            members.pop(conn_id, None)
            if not members:
                del self._bus.presence[channel]

    async def members(self, channel: str) -> list[Member]:
        return list(self._bus.presence.get(channel, {}).values())
