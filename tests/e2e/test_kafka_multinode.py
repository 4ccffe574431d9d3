"""Two `tidings serve --broker kafka://...` processes on one private tansu (a
Kafka-protocol server): cross-node publish to wildcard subscribers, +1 offsets
from both nodes, direct messages, recovery from the other node's history, and
presence and shared queues refused or kept in process as stated."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.brokers.conftest import TansuServer
from tests.support import apost, native, serve_process


@pytest.fixture(scope="module")
def kafka_url() -> Iterator[str]:
    server = TansuServer()
    try:
        yield f"{server.url}&prefix=e2e{uuid.uuid4().hex[:8]}"
    finally:
        server.stop()


async def test_two_serve_nodes_on_kafka(kafka_url: str) -> None:
    with serve_process("--broker", kafka_url) as n1, serve_process("--broker", kafka_url) as n2:
        async with native(n1.base) as a, native(n2.base) as b:
            assert a.welcome["node"] != b.welcome["node"]
            # wildcard subscribers on one node, publications from the other
            await a.subscribe("news/+")
            await a.subscribe("site/#")
            for channel in ("news/sport", "site", "site/a.b/c", "other/x", "news/x/y"):
                status, body = await apost(n2.base, "publish", {"channel": channel,
                                                                "data": channel})
                assert status == 200, body
                assert body["result"]["offset"] == 1
            got = [(await a.next("publication"))["channel"] for _ in range(3)]
            assert sorted(got) == ["news/sport", "site", "site/a.b/c"]
            # +1 offsets and one epoch whichever node publishes; live in that order
            await b.subscribe("news/sport")
            offsets, epochs = [], set()
            for i in range(10):
                node = (n1, n2)[i % 2]
                status, body = await apost(node.base, "publish",
                                           {"channel": "news/sport", "data": i})
                assert status == 200
                offsets.append(body["result"]["offset"])
                epochs.add(body["result"]["epoch"])
            assert offsets == list(range(2, 12)) and len(epochs) == 1
            for client in (a, b):
                live = [(await client.next("publication"))["offset"] for _ in range(10)]
                assert live == offsets
            # direct send across nodes
            sent = await b.request({"type": "send", "to": a.conn_id, "data": "psst"})
            assert sent["result"] == {"sent": 1}
            assert await a.next("message") == {"type": "message", "from": b.conn_id,
                                                "data": "psst"}
            # presence is refused, not answered with one node's members
            reply = await a.request({"type": "presence", "channel": "news/sport"})
            assert reply["type"] == "error" and reply["code"] == "not_available", reply
            status, info = await apost(n1.base, "info", {})
            assert status == 200, info
            assert info["result"]["nodes"][0]["capabilities"] == [
                "pubsub", "positions", "history", "direct"]

        # recovery from the other node of 20 publications missed while away
        async with native(n1.base) as c:
            await c.subscribe("feed")
            await apost(n1.base, "publish", {"channel": "feed", "data": "seen"})
            last = await c.next("publication")
        for i in range(20):
            status, _ = await apost((n1, n2)[i % 2].base, "publish",
                                    {"channel": "feed", "data": i})
            assert status == 200
        async with native(n2.base) as c:
            result = await c.subscribe("feed", {"offset": last["offset"],
                                                 "epoch": last["epoch"]})
            assert result["recovered"] is True and result["epoch"] == last["epoch"]
            assert [p["data"] for p in result["publications"]] == list(range(20))
            assert [p["offset"] for p in result["publications"]] == list(range(2, 22))
            await apost(n1.base, "publish", {"channel": "feed", "data": "live"})
            frame = await c.next("publication")
            assert (frame["data"], frame["offset"]) == ("live", 22)
            assert not [f for f in c.pending if f["type"] == "publication"]  # no duplicate
