"""What the conformance suites build on: hubs on one broker, recording subscribers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson
import pytest

from tidings.brokers.base import Broker
from tidings.core.connection import Connection
from tidings.hub import Hub

__all__ = ["Sink", "World", "hubs_on", "requires", "started", "subscriber"]


class World(Protocol):
    """A factory of hubs (nodes) that share one broker: ``world(**hub_options)``."""

    def __call__(self, **options: Any) -> Hub: ...


@contextlib.asynccontextmanager
async def hubs_on(broker: str | Callable[[], Broker]) -> AsyncIterator[World]:
    """A :class:`World` on ``broker`` (a URL, or a factory of broker objects for
    a backend that is not registered by scheme); every hub is stopped after."""
    hubs: list[Hub] = []

    def make(**options: Any) -> Hub:
        hub = Hub(broker if isinstance(broker, str) else broker(), **options)
        hubs.append(hub)
        return hub

    try:
        yield make
    finally:
        for hub in hubs:
            await hub.stop()


class Sink:
    """An ASGI ``send`` that records the frames a connection is sent."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def __call__(self, message: Any) -> None:
        if message["type"] == "websocket.send":
            self.frames.append(orjson.loads(message.get("text") or message["bytes"]))
        else:
            self.frames.append(dict(message))
        self.changed.set()

    async def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool],
                       timeout: float = 10.0) -> None:
        """Wait until ``predicate(frames)`` holds (fails after ``timeout`` s)."""
        async def until() -> None:
            while not predicate(self.frames):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    def publications(self) -> list[tuple[str, Any, int]]:
        """(channel, data, offset) of every publication frame, in arrival order."""
        return [(f["channel"], f["data"], f["offset"]) for f in self.of("publication")]


async def started(world: World, n: int = 2, **options: Any) -> list[Hub]:
    """``n`` started hubs of ``world``."""
    hubs = [world(**options) for _ in range(n)]
    for hub in hubs:
        await hub.start()
    return hubs


async def subscriber(hub: Hub, *patterns: str, user: str | None = None,
                     join_leave: bool = False) -> tuple[Connection, Sink]:
    """A connection of ``hub`` subscribed to ``patterns``, and what it receives."""
    sink = Sink()
    conn = hub.register(sink, user=user)
    for pattern in patterns:
        await hub.subscribe(conn, pattern, join_leave=join_leave)
    return conn, sink


def requires(hub: Hub, *features: str) -> None:
    """Skip the calling test, with the reason, unless the broker offers ``features``."""
    offered = hub.capabilities.offered()
    for feature in features:
        if feature not in offered:
            pytest.skip(f"{feature} is not available on the {hub.broker_name} broker "
                        f"(it offers {', '.join(offered)})")
