"""The HTTP API: Centrifugo shapes (the real `cent` client), errors, health, metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import cent
import pytest

from tests.support import apost, native


def cent_client(base: str) -> cent.Client:
    return cent.Client(base + "/api", api_key="")


async def test_cent_publish_reaches_a_native_subscriber(server) -> None:
    _hub, base = server
    async with native(base) as sub:
        await sub.request({"type": "subscribe", "channel": "orders/1", "join_leave": False})
        client = cent_client(base)
        result = await asyncio.to_thread(
            client.publish, cent.PublishRequest(channel="orders/1", data={"status": "paid"})
        )
        assert result.offset == 1
        assert result.epoch
        pub = await sub.next("publication")
        assert pub["data"] == {"status": "paid"}
        assert (pub["offset"], pub["epoch"]) == (result.offset, result.epoch)


async def test_cent_methods(server) -> None:
    hub, base = server
    client = cent_client(base)
    async with native(base) as a:
        await a.request({"type": "subscribe", "channel": "room"})
        for i in range(3):
            await asyncio.to_thread(client.publish, cent.PublishRequest(channel="room", data=i))
        await a.next("publication")
        presence = await asyncio.to_thread(client.presence, cent.PresenceRequest(channel="room"))
        assert list(presence.presence) == [a.conn_id]
        stats = await asyncio.to_thread(client.presence_stats,
                                        cent.PresenceStatsRequest(channel="room"))
        assert (stats.num_clients, stats.num_users) == (1, 0)
        history = await asyncio.to_thread(client.history,
                                          cent.HistoryRequest(channel="room", limit=10))
        assert [p.data for p in history.publications] == [0, 1, 2]
        assert history.offset == 3
        since = await asyncio.to_thread(client.history, cent.HistoryRequest(
            channel="room", limit=-1, since=cent.StreamPosition(offset=1, epoch=history.epoch)))
        assert [p.offset for p in since.publications] == [2, 3]
        with pytest.raises(cent.CentApiResponseError) as info:
            await asyncio.to_thread(client.history, cent.HistoryRequest(
                channel="room", limit=-1, since=cent.StreamPosition(offset=1, epoch="other")))
        assert info.value.code == 112
        channels = await asyncio.to_thread(client.channels, cent.ChannelsRequest())
        assert channels.channels["room"].num_clients == 1
        info_result = await asyncio.to_thread(client.info, cent.InfoRequest())
        assert info_result.nodes[0].uid == hub.node
        assert info_result.nodes[0].num_clients == 1
        await asyncio.to_thread(client.history_remove, cent.HistoryRemoveRequest(channel="room"))
        after = await asyncio.to_thread(client.history,
                                        cent.HistoryRequest(channel="room", limit=10))
        assert after.publications == [] and after.epoch != history.epoch
        bc = await asyncio.to_thread(client.broadcast, cent.BroadcastRequest(
            channels=["room", "other"], data="both"))
        assert [r.result.offset for r in bc.responses] == [4, 1]
        batch = await asyncio.to_thread(client.batch, cent.BatchRequest(requests=[
            cent.PublishRequest(channel="room", data="b1"),
            cent.PresenceStatsRequest(channel="room"),
        ]))
        assert batch.replies[0].offset == 5
        assert batch.replies[1].num_clients == 1
        await asyncio.to_thread(client.disconnect, cent.DisconnectRequest(user="nobody"))


async def test_server_side_subscribe_and_disconnect_by_user() -> None:
    from tests.support import running
    from tidings import Hub

    hub = Hub()
    async with running(hub) as base, native(base) as anon:
        # give this connection a user as an auth layer would
        conn = hub.connections[anon.conn_id]
        conn.user = "alice"
        hub.users["alice"] = {conn}
        status, _ = await apost(base, "subscribe", {"user": "alice", "channel": "news"})
        assert status == 200
        from tests.support import wait_until

        await wait_until(lambda: "news" in conn.subs, what="server-side subscribe")
        await apost(base, "publish", {"channel": "news", "data": 1})
        assert (await anon.next("publication"))["data"] == 1
        await apost(base, "disconnect", {"user": "alice"})
        import websockets

        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await anon.recv(5)


@pytest.mark.parametrize(
    ("method", "body", "status", "code"),
    [
        ("publish", b"{not json", 400, 107),
        ("publish", {"data": 1}, 400, 107),
        ("publish", {"channel": "a/+", "data": 1}, 400, 107),
        ("publish", {"channel": "a"}, 400, 107),
        ("publish", [1, 2], 400, 107),
        ("nope", {}, 404, 104),
        ("history", {"channel": "a", "limit": "x"}, 400, 107),
        ("broadcast", {"channels": "a", "data": 1}, 400, 107),
        ("connections", {"limit": -1}, 400, 107),
        ("connections", {"user": 5}, 400, 107),
        ("validate", {"channel": "a/#", "data": 1}, 400, 107),
        ("validate", {"channel": "a"}, 400, 107),
    ],
)
async def test_bad_requests_get_4xx_with_error_body(server, method, body, status, code) -> None:
    _, base = server
    got_status, got = await apost(base, method, body)
    assert got_status == status
    assert got["error"]["code"] == code
    assert got["error"]["message"]


async def test_console_methods(server) -> None:
    """What the console reads: connections, queues, channel types, validate."""
    hub, base = server
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int

    hub.channel("points/+", Point)
    async with native(base) as ann, native(base) as anon:
        await ann.request({"type": "subscribe", "channel": "points/+"})
        _, body = await apost(base, "connections", {})
        conns = {c["conn_id"]: c for c in body["result"]["connections"]}
        assert body["result"]["total"] == 2 and body["result"]["node"] == hub.node
        mine = conns[ann.welcome["conn_id"]]
        assert (mine["protocol"], mine["subscriptions"], mine["num_subs"]) == (
            "native", ["points/+"], 1)
        assert anon.welcome["conn_id"] in conns
        _, body = await apost(base, "connections", {"limit": 1})
        assert len(body["result"]["connections"]) == 1 and body["result"]["total"] == 2
        _, body = await apost(base, "connections", {"user": "nobody"})
        assert body["result"] == {"node": hub.node, "total": 0, "connections": []}

    await hub.queue("jobs").push({"n": 1})
    _, body = await apost(base, "queues", {})
    assert body["result"]["queues"]["jobs"]["length"] == 1

    _, body = await apost(base, "channel_types", {})
    (declared,) = body["result"]["channel_types"]
    assert (declared["pattern"], declared["name"]) == ("points/+", "Point")
    assert declared["schema"]["properties"]["x"]["type"] == "integer"

    status, body = await apost(base, "validate", {"channel": "points/1", "data": {"x": "1"}})
    assert status == 200 and body["result"] == {"valid": True, "data": {"x": 1}}
    status, body = await apost(base, "validate", {"channel": "points/1", "data": {"x": "a"}})
    assert status == 400 and "x: Input should be a valid integer" in body["error"]["message"]
    status, body = await apost(base, "validate", {"channel": "free", "data": [1]})
    assert body["result"]["valid"] is True
    assert (await hub.position("points/1")).offset == 0  # validate published nothing


async def test_health_and_metrics(server) -> None:
    _hub, base = server
    async with native(base) as a:
        await a.request({"type": "subscribe", "channel": "m"})
        await apost(base, "publish", {"channel": "m", "data": 1})
        await a.next("publication")
        await a.request({"type": "frobnicate"})

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, r.read().decode()

        status, body = await asyncio.to_thread(get, "/health")
        assert status == 200
        assert '"broker":"up"' in body
        status, text = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        assert "tidings_connections 1.0" in text
        assert "tidings_subscriptions 1.0" in text
        assert "tidings_deliveries_total 1.0" in text
        assert 'tidings_errors_total{code="unknown_type"} 1.0' in text
        assert "tidings_broker_up 1.0" in text
