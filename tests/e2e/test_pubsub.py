"""Pub/sub over real sockets: native clients, the HTTP API, offsets."""

from __future__ import annotations

from tests.support import apost, native


async def test_subscribe_publish_and_http_publish(server) -> None:
    _hub, base = server
    async with native(base) as a, native(base) as b:
        reply = await a.request({"type": "subscribe", "channel": "chat/+"})
        assert reply["type"] == "reply"
        assert reply["result"]["recovered"] is False
        got = await b.request({"type": "publish", "channel": "chat/room1", "data": {"text": "hi"}})
        assert got["type"] == "reply"
        first = got["result"]["offset"]
        pub = await a.next("publication")
        assert pub["channel"] == "chat/room1"
        assert pub["data"] == {"text": "hi"}
        assert pub["offset"] == first
        assert pub["sender"] == b.conn_id
        status, body = await apost(base, "publish", {"channel": "chat/room1", "data": 2})
        assert status == 200
        assert body["result"]["offset"] == first + 1
        pub2 = await a.next("publication")
        assert (pub2["data"], pub2["offset"], pub2["epoch"]) == (2, first + 1, pub["epoch"])
        # another channel has its own offsets
        status, body = await apost(base, "publish", {"channel": "chat/room2", "data": 3})
        assert body["result"]["offset"] == 1
        assert (await a.next("publication"))["channel"] == "chat/room2"
