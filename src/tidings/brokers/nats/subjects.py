"""What the parts of the NATS broker share: subject and stream names, and the link to NATS.

A channel level becomes one subject token, percent-escaped: everything but
``A-Z a-z 0-9 _ - ~`` is written as ``%XX`` of its UTF-8 bytes, so a token
never holds ``.``, ``*``, ``>``, whitespace or control characters, is never
empty, and every valid channel round-trips. ``+`` -> ``*``; ``#`` -> ``>``
plus the parent subject (``a/#`` also matches ``a``).

The subjects of one ``prefix``, in one place so their spaces cannot overlap:

- ``<prefix>.h.<tokens>``: publishes, stored in stream ``<prefix>_H``;
- ``<prefix>.c.<tokens>``: live (the ``RePublish`` of ``.h``, join/leave events);
- ``<prefix>.p.<channel token>.<conn token>``: members, stream ``<prefix>_P``;
- ``<prefix>.n.<node token>`` and ``<prefix>.all``: node messages;
- ``<prefix>.q.<queue token>``: work queues, stream ``<prefix>_Q``;
- ``<prefix>.qz.<queue token>.<item id>``: delay records, stream ``<prefix>_QZ``.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol
from urllib.parse import quote, unquote

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tidings.brokers.base import BrokerHealth
from tidings.brokers.nats.wire import REQUEST_TIMEOUT

__all__ = [
    "STATE_CACHE_MAX",
    "NatsLink",
    "NatsSubjects",
    "channel_of_tokens",
    "subjects_for",
    "token_for",
]

STATE_CACHE_MAX = 100_000  # entries a per-channel cache holds before it starts over


def token_for(level: str) -> str:
    """One channel level as a NATS subject token: ``%XX`` for all but
    ``A-Za-z0-9_-~`` (so never ``.``, ``*``, ``>``, whitespace or empty)."""
    return quote(level, safe="").replace(".", "%2E")


def channel_of_tokens(tokens: str) -> str:
    """The channel a subject's tokens (after the prefix) name."""
    return "/".join(unquote(t) for t in tokens.split("."))


def subjects_for(pattern: str) -> list[str]:
    """The NATS subject(s), after the prefix, covering an MQTT pattern or channel."""
    levels = pattern.split("/")
    tokens = ["*" if lv == "+" else token_for(lv) for lv in levels]
    if levels[-1] == "#":
        head = tokens[:-1]
        return [".".join([*head, ">"]), ".".join(head)] if head else [">"]
    return [".".join(tokens)]


class NatsSubjects:
    """Subject and stream names under one ``prefix`` (the module docstring draws them)."""

    __slots__ = ("_channels", "_hist", "all", "delay_stream", "prefix", "presence_stream",
                 "queue_stream", "stream")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}_H"  # history and positions
        self.presence_stream = f"{prefix}_P"
        self.queue_stream = f"{prefix}_Q"
        self.delay_stream = f"{prefix}_QZ"
        self.all = f"{prefix}.all"  # every node's inbox for broadcasts and orders
        self._hist: dict[str, str] = {}  # channel -> history subject
        self._channels: dict[str, str] = {}  # live subject tokens -> channel

    def under(self, kind: str) -> str:
        """Every subject of one kind (``h``, ``c``, ``p``, ``q``, ``qz``): a stream's filter."""
        return f"{self.prefix}.{kind}.>"

    def live(self, channel: str) -> str:
        """The live subject of a channel."""
        return f"{self.prefix}.c.{subjects_for(channel)[0]}"

    def live_for(self, pattern: str) -> list[str]:
        """The live subjects covering a channel or MQTT pattern."""
        return [f"{self.prefix}.c.{s}" for s in subjects_for(pattern)]

    def hist(self, channel: str) -> str:
        """The history subject of a channel (cached: every publish asks)."""
        subject = self._hist.get(channel)
        if subject is None:
            if len(self._hist) > STATE_CACHE_MAX:
                self._hist.clear()
            subject = self._hist[channel] = f"{self.prefix}.h.{subjects_for(channel)[0]}"
        return subject

    def channel_of(self, subject: str) -> str:
        """The channel of a live subject (cached: every message received asks)."""
        tokens = subject[len(self.prefix) + 3:]
        channel = self._channels.get(tokens)
        if channel is None:
            if len(self._channels) > STATE_CACHE_MAX:
                self._channels.clear()
            channel = self._channels[tokens] = channel_of_tokens(tokens)
        return channel

    def member(self, channel: str, conn_id: str = "*") -> str:
        """A member's presence subject (``*``: every member of the channel)."""
        tail = conn_id if conn_id == "*" else token_for(conn_id)
        return f"{self.prefix}.p.{token_for(channel)}.{tail}"

    def node(self, node_id: str) -> str:
        """A node's own subject (direct messages)."""
        return f"{self.prefix}.n.{token_for(node_id)}"

    def queue(self, queue: str) -> str:
        """A work queue's subject."""
        return f"{self.prefix}.q.{token_for(queue)}"

    def delay(self, queue: str, item_id: str = "*") -> str:
        """The delay record of a queue's item (``*``: all of the queue's)."""
        return f"{self.prefix}.qz.{token_for(queue)}.{item_id}"


class NatsLink(Protocol):
    """The broker's connection as its parts (publishing, history, presence, queues) use it."""

    @property
    def client(self) -> NatsClient:
        """The NATS connection; ``BrokerUnavailable`` while there is none or it is down."""

    @property
    def connected(self) -> bool:
        """A connection is there and up (so :attr:`client` does not raise)."""

    @property
    def closing(self) -> bool:
        """True once the broker is closing."""

    @property
    def jetstream(self) -> bool:
        """False when the server has no JetStream: pub/sub only."""

    def health(self) -> BrokerHealth:
        """Up or down, and why."""

    def require_jetstream(self, feature: str) -> None:
        """``BrokerUnavailable`` while down, ``NotAvailable(feature)`` without JetStream."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task of the broker (cancelled when it closes)."""

    async def publish_core(self, subject: str, payload: bytes,
                           headers: dict[str, str] | None = None) -> None:
        """One core NATS message (no JetStream); ``BrokerUnavailable`` on failure."""

    async def api(self, what: str, body: dict[str, Any] | None = None, *,
                  timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """One JetStream API request; ``JetStreamError`` for an error answer."""

    async def ensure_stream(self, config: dict[str, Any]) -> None:
        """Create the stream unless it exists."""

    async def purge(self, stream: str, subject: str) -> None:
        """Drop the stream's messages on ``subject`` (a filter)."""

    async def scan(self, stream: str, subject: str, policy: str = "all") -> list[Msg]:
        """Every message of ``stream`` on ``subject``, oldest first."""
