"""What the parts of the Redis broker share: the key names, and the link to Redis.

Every key of a channel carries the channel as a hash tag, so on a Redis
Cluster all of a channel's keys (offset and epoch, history, presence, its
queue) land in one slot and one script can touch them together.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["RedisKeys", "RedisLink"]


class RedisLink(Protocol):
    """The broker's connection as its parts (history, presence, queues) use it."""

    @property
    def client(self) -> Any:
        """The redis-py client (standalone or cluster), or None while not connected."""

    @property
    def up(self) -> bool:
        """False while Redis is unreachable."""

    @property
    def closing(self) -> bool:
        """True once the broker is closing."""

    async def call(self, method: str, *args: Any) -> Any:
        """One client call; ``BrokerUnavailable`` while down or on a Redis error."""


class RedisKeys:
    """Key and channel names under one ``prefix``."""

    __slots__ = ("all", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.all = f"{prefix}:all".encode()  # every node's inbox for broadcasts and orders

    @staticmethod
    def tag(channel: str) -> str:
        """A hash tag for the channel's keys: braces escaped so every key of a
        channel lands in the same cluster slot whatever its name holds."""
        return "{" + channel.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") + "}"

    def chan(self, channel: str) -> bytes:
        """The pub/sub channel of a tidings channel (or glob)."""
        return f"{self.prefix}:c:{channel}".encode()

    def shard_chan(self, channel: str) -> bytes:
        """The sharded pub/sub channel (Redis Cluster)."""
        return f"{self.prefix}:{self.tag(channel)}:s".encode()

    def channel_of(self, raw_channel: bytes) -> str:
        """The tidings channel of a pub/sub channel made by :meth:`chan`."""
        return raw_channel[len(self.prefix) + 3:].decode()

    def meta(self, channel: str) -> str:
        """The hash of the channel's offset ``o`` and epoch ``e``."""
        return f"{self.prefix}:{self.tag(channel)}:m"

    def stream(self, channel: str) -> str:
        """The channel's history stream."""
        return f"{self.prefix}:{self.tag(channel)}:h"

    def presence(self, channel: str) -> tuple[str, str]:
        """The channel's member data hash and member -> expiry sorted set."""
        tag = self.tag(channel)
        return f"{self.prefix}:{tag}:pm", f"{self.prefix}:{tag}:pz"

    def inbox(self, node: str) -> bytes:
        """A node's own pub/sub channel (direct messages)."""
        return f"{self.prefix}:n:{node}".encode()

    def queue_root(self, queue: str) -> str:
        """The stem of a work queue's keys."""
        return f"{self.prefix}:{self.tag(queue)}:q"
