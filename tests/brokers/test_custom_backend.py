"""A backend written outside tidings, in a few lines, passes the conformance suite.

It proves the Broker interface is small: pub/sub, events and node messages
over an in-process bus, nothing else. It states that (no positions, history,
presence or queue store), so those tests skip with the reason and the hub
refuses those features with NotAvailable instead of faking them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support import apost, native, running
from tidings import Hub, Publication
from tidings.brokers.base import Broker, BrokerHandler, BrokerHealth, Capabilities
from tidings.exceptions import NotAvailable
from tidings.protocol.names import pattern_matches
from tidings.testing import World, hubs_on
from tidings.testing.pubsub import *  # noqa: F403 - the suite's tests


class TinyBroker:
    """Every node of one ``bus`` in one process: the whole Broker contract."""

    capabilities = Capabilities(direct=True)

    def __init__(self, bus: dict[str, TinyBroker]) -> None:
        self.url = "tiny://"
        self.bus = bus
        self.patterns: set[str] = set()
        self.node = ""
        self.handler: BrokerHandler | None = None

    async def connect(self, node_id: str, handler: BrokerHandler) -> None:
        self.node, self.handler = node_id, handler
        self.bus[node_id] = self
        handler.on_broker_state(BrokerHealth(True))

    async def close(self) -> None:
        self.bus.pop(self.node, None)

    def wants(self, channel: str) -> bool:
        return any(pattern_matches(p, channel) for p in self.patterns)

    async def publish(self, channel: str, data: Any, *, sender: str | None = None,
                      history: Any = None, text: str | None = None) -> Publication:
        pub = Publication(channel, data, 0, "", sender, int(time.time() * 1000))
        for node in list(self.bus.values()):
            if node.wants(channel) and node.handler is not None:
                node.handler.on_publication(pub)
        return pub

    async def publish_event(self, channel: str, frame: str) -> None:
        for node in list(self.bus.values()):
            if node.wants(channel) and node.handler is not None:
                node.handler.on_event(channel, frame)

    async def subscribe(self, pattern: str) -> None:
        self.patterns.add(pattern)

    async def unsubscribe(self, pattern: str) -> None:
        self.patterns.discard(pattern)

    async def send_node(self, node_id: str, payload: bytes) -> None:
        node = self.bus.get(node_id)
        if node is not None and node.handler is not None:
            node.handler.on_node_message(payload)

    async def send_all(self, payload: bytes) -> None:
        for node in list(self.bus.values()):
            if node.handler is not None:
                node.handler.on_node_message(payload)

    def health(self) -> BrokerHealth:
        return BrokerHealth(True)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    bus: dict[str, TinyBroker] = {}
    async with hubs_on(lambda: TinyBroker(bus)) as make:
        yield make


def test_it_is_a_broker() -> None:
    assert isinstance(TinyBroker({}), Broker)


async def test_what_it_does_not_offer_is_refused(world: World) -> None:
    hub: Hub = world()
    await hub.start()
    assert hub.capabilities.offered() == ["pubsub", "direct"]
    assert hub.info()["capabilities"] == ["pubsub", "direct"]
    with pytest.raises(NotAvailable, match="history is not available on the tiny broker"):
        await hub.history("chat")
    with pytest.raises(NotAvailable, match="presence"):
        await hub.presence("chat")
    assert (await hub.position("chat")).offset == 0
    assert type(hub.queue(f"q{uuid.uuid4().hex[:6]}")).__name__ == "WorkQueue"  # in process


async def test_clients_are_told_not_available(world: World) -> None:
    hub = world()
    async with running(hub) as base, native(base) as client:
        reply = await client.request({"type": "history", "channel": "chat"})
        assert (reply["code"], reply["message"]) == (
            "not_available", "history is not available on the tiny broker")
        reply = await client.request({"type": "subscribe", "channel": "chat",
                                      "recover": {"offset": 1, "epoch": "e"}})
        assert reply["result"]["recovered"] is False  # subscribed, told it did not recover
        status, body = await apost(base, "presence", {"channel": "chat"})
        assert status == 200 and body["error"]["code"] == 108
        assert "presence is not available" in body["error"]["message"]
