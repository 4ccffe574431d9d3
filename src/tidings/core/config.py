"""HubCore settings: limits, outbox policy, history rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tidings.brokers.base import HistoryOptions
from tidings.protocol.names import pattern_matches, validate_pattern

__all__ = ["HistoryRule", "Limits", "OverflowPolicy"]

OverflowPolicy = Literal["disconnect", "drop"]


@dataclass(slots=True)
class Limits:
    """Per-connection limits (SPEC 7). All sizes in bytes, times in seconds."""

    outbox_size: int = 1000  # queued frames before the overflow policy applies
    outbox_bytes: int = 1 << 20
    overflow: OverflowPolicy = "disconnect"
    frame_soft: int = 64 * 1024  # above: ``too_large`` error, connection stays
    frame_hard: int = 1 << 20  # above: close 1009
    max_subscriptions: int = 1000
    max_name: int = 255
    max_depth: int = 64
    idle_timeout: float | None = None  # close after this long without a client frame
    rate: float | None = None  # frames per second per connection (token bucket); None: off
    burst: int = 0  # bucket size; 0: same as ``rate``
    max_violations: int = 20  # consecutive limit violations before close 1008
    max_connections_per_user: int = 0  # 0: unlimited; over it: close 1008
    max_connections_per_ip: int = 0  # 0: unlimited; over it: close 1008
    auth_timeout: float = 5.0  # seconds for a first-frame ``connect`` when auth is on

    def __post_init__(self) -> None:
        if self.overflow not in ("disconnect", "drop"):
            raise ValueError("overflow must be 'disconnect' or 'drop'")
        if self.outbox_size < 1 or self.outbox_bytes < 1:
            raise ValueError("outbox limits must be positive")
        if not 0 < self.frame_soft <= self.frame_hard:
            raise ValueError("need 0 < frame_soft <= frame_hard")
        if self.max_connections_per_user < 0 or self.max_connections_per_ip < 0:
            raise ValueError("connection limits must be >= 0 (0: unlimited)")
        if self.auth_timeout <= 0:
            raise ValueError("auth_timeout must be > 0")


@dataclass(frozen=True, slots=True)
class HistoryRule:
    """History for channels matching ``pattern`` (first matching rule wins)."""

    pattern: str
    size: int
    ttl: float

    def __post_init__(self) -> None:
        validate_pattern(self.pattern)
        if self.size < 0 or self.ttl < 0:
            raise ValueError("history size and ttl must be >= 0")


@dataclass(slots=True)
class HistoryConfig:
    """Default history plus per-pattern overrides."""

    size: int = 0
    ttl: float = 0.0
    rules: list[HistoryRule] = field(default_factory=list)
    _cache: dict[str, HistoryOptions] = field(default_factory=dict)

    def options(self, channel: str) -> HistoryOptions:
        opts = self._cache.get(channel)
        if opts is None:
            opts = HistoryOptions(self.size, self.ttl)
            for rule in self.rules:
                if pattern_matches(rule.pattern, channel):
                    opts = HistoryOptions(rule.size, rule.ttl)
                    break
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[channel] = opts
        return opts
