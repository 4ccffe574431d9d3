"""The Centrifuge protocol at /connection/websocket with the real centrifuge-python SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import websockets
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    JoinContext,
    LeaveContext,
    PublicationContext,
    ReplyError,
    SubscribedContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from tests.support import TIMEOUT, apost, native, running, ws_url
from tidings import Hub
from tidings.core.connection import Connection, ConnectionKind
from tidings.endpoints.centrifuge import CentrifugeEndpoint
from tidings.protocol.codes import CloseCode
from tidings.security.auth import JWTAuth, encode_jwt

SECRET = "centrifuge-test-secret"


def cf_url(base: str) -> str:
    return ws_url(base, "/connection/websocket")


class ClientEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.connected: asyncio.Queue[ConnectedContext] = asyncio.Queue()
        self.connecting: asyncio.Queue[ConnectingContext] = asyncio.Queue()
        self.disconnected: asyncio.Queue[DisconnectedContext] = asyncio.Queue()

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self.connected.put_nowait(ctx)

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self.connecting.put_nowait(ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.disconnected.put_nowait(ctx)


class SubEvents(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.pubs: asyncio.Queue[PublicationContext] = asyncio.Queue()
        self.subscribed: asyncio.Queue[SubscribedContext] = asyncio.Queue()
        self.unsubscribed: asyncio.Queue[UnsubscribedContext] = asyncio.Queue()
        self.joins: asyncio.Queue[JoinContext] = asyncio.Queue()
        self.leaves: asyncio.Queue[LeaveContext] = asyncio.Queue()

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.pubs.put_nowait(ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.put_nowait(ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self.unsubscribed.put_nowait(ctx)

    async def on_join(self, ctx: JoinContext) -> None:
        self.joins.put_nowait(ctx)

    async def on_leave(self, ctx: LeaveContext) -> None:
        self.leaves.put_nowait(ctx)

    async def data(self, n: int) -> list[Any]:
        return [(await get(self.pubs)).pub.data for _ in range(n)]


async def get(queue: asyncio.Queue[Any]) -> Any:
    return await asyncio.wait_for(queue.get(), TIMEOUT)


@asynccontextmanager
async def sdk(base: str, **kwargs: Any) -> AsyncIterator[Client]:
    """A connected centrifuge-python client (``events`` kwarg: ClientEvents)."""
    client = Client(cf_url(base), proxy=None, timeout=TIMEOUT, **kwargs)
    await client.connect()
    try:
        yield client
    finally:
        await client.disconnect()


async def subscribed(client: Client, channel: str, **options: Any) -> tuple[Any, SubEvents]:
    events = SubEvents()
    sub = client.new_subscription(channel, events, **options)
    await sub.subscribe()
    await sub.ready(TIMEOUT)
    return sub, events


def cf_connections(hub: Hub) -> list[Connection]:
    return [c for c in hub.connections.values() if c.kind is ConnectionKind.CENTRIFUGE]


async def test_publications_from_every_side(server: tuple[Hub, str]) -> None:
    hub, base = server
    events = ClientEvents()
    async with sdk(base, events=events) as client:
        connected = await get(events.connected)
        assert connected.client in hub.connections
        _sub, got = await subscribed(client, "chat:index")
        await client.publish("chat:index", {"from": "sdk"})
        status, body = await apost(base, "publish", {"channel": "chat:index",
                                                     "data": {"from": "http"}})
        assert status == 200, body
        async with native(base) as peer:
            reply = await peer.request({"type": "publish", "channel": "chat:index",
                                        "data": {"from": "native"}})
            assert reply["type"] == "reply"
        pubs = [await get(got.pubs) for _ in range(3)]
        assert [p.pub.data for p in pubs] == [{"from": "sdk"}, {"from": "http"},
                                              {"from": "native"}]
        assert [p.pub.offset for p in pubs] == [1, 2, 3]
        assert pubs[0].pub.info is not None and pubs[0].pub.info.client == connected.client


async def test_native_subscriber_sees_sdk_publications(server: tuple[Hub, str]) -> None:
    _hub, base = server
    async with native(base) as peer, sdk(base) as client:
        await peer.request({"type": "subscribe", "channel": "news"})
        await client.publish("news", [1, 2])
        pub = await peer.next("publication")
        assert (pub["channel"], pub["data"], pub["offset"]) == ("news", [1, 2], 1)


async def test_history_and_presence(server: tuple[Hub, str]) -> None:
    hub, base = server
    async with sdk(base) as client:
        sub, _got = await subscribed(client, "room")
        for i in range(5):
            await hub.publish("room", i)
        page = await sub.history(limit=10)
        assert [p.data for p in page.publications] == [0, 1, 2, 3, 4]
        assert page.offset == 5 and page.epoch
        newest = await client.history("room", limit=2, reverse=True)
        assert [p.data for p in newest.publications] == [4, 3]
        position_only = await client.history("room")  # limit 0: the position alone
        assert position_only.publications == [] and position_only.offset == 5
        since = await client.history("room", limit=-1, since=_pos(2, page.epoch))
        assert [p.data for p in since.publications] == [2, 3, 4]
        with pytest.raises(ReplyError) as info:
            await client.history("room", limit=10, since=_pos(2, "another-epoch"))
        assert info.value.code == 112

        presence = await sub.presence()
        assert list(presence.clients) == [client.client_id]
        stats = await client.presence_stats("room")
        assert (stats.num_clients, stats.num_users) == (1, 0)


def _pos(offset: int, epoch: str) -> Any:
    from centrifuge import StreamPosition

    return StreamPosition(offset=offset, epoch=epoch)


async def test_join_and_leave(server: tuple[Hub, str]) -> None:
    _hub, base = server
    async with sdk(base) as watcher:
        _sub, got = await subscribed(watcher, "lobby", join_leave=True)
        async with sdk(base) as other:
            await subscribed(other, "lobby")
            join = await get(got.joins)
            assert join.info.client == other.client_id
        leave = await get(got.leaves)
        assert leave.info.client == join.info.client


async def test_recovery_after_a_server_side_disconnect(server: tuple[Hub, str]) -> None:
    hub, base = server
    events = ClientEvents()
    async with sdk(base, events=events, min_reconnect_delay=0.3,
                   max_reconnect_delay=0.5) as client:
        assert (await get(events.connecting)).reason == "connect called"
        await get(events.connected)
        _sub, got = await subscribed(client, "orders", recoverable=True, positioned=True)
        first = await get(got.subscribed)
        assert first.recoverable and first.positioned and not first.was_recovering
        await hub.publish("orders", 1)
        assert await got.data(1) == [1]

        (conn,) = cf_connections(hub)
        conn.close(CloseCode.TRY_AGAIN_LATER, "outbox overflow")  # as a slow consumer
        connecting = await get(events.connecting)
        assert connecting.code == 3008  # non-terminal: the SDK reconnects
        for i in (2, 3, 4):  # missed while disconnected
            await hub.publish("orders", i)
        await get(events.connected)
        again = await get(got.subscribed)
        assert again.was_recovering and again.recovered
        await hub.publish("orders", 5)  # live again
        assert await got.data(4) == [2, 3, 4, 5]
        assert got.pubs.empty()


async def test_recovery_races_live_publications() -> None:
    """Publications keep coming while the SDK resubscribes: each offset once, in order."""
    hub = Hub()
    async with running(hub) as base:
        events = ClientEvents()
        async with sdk(base, events=events, min_reconnect_delay=0.05,
                       max_reconnect_delay=0.1) as client:
            _sub, got = await subscribed(client, "ticks", recoverable=True)
            stop = asyncio.Event()

            async def publisher() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    await hub.publish("ticks", i)
                    await asyncio.sleep(0.002)

            task = asyncio.create_task(publisher())
            for _ in range(3):
                await asyncio.sleep(0.1)
                for conn in cf_connections(hub):
                    conn.close(CloseCode.GOING_AWAY, "restart")
                await get(events.connected)
            await asyncio.sleep(0.1)
            stop.set()
            await task
            last = (await hub.position("ticks")).offset
            seen: list[int] = []
            while len(seen) < last:
                seen.append((await get(got.pubs)).pub.offset)
            assert seen == list(range(1, last + 1))


async def test_errors_are_replies(server: tuple[Hub, str]) -> None:
    _hub, base = server
    events = ClientEvents()
    async with sdk(base, events=events) as client:
        with pytest.raises(ReplyError) as info:
            await client.rpc("anything", {})
        assert info.value.code == 104
        with pytest.raises(ReplyError) as info:
            await client.publish("$sys/x", 1)
        assert info.value.code == 103
        with pytest.raises(ReplyError) as info:
            await client.publish("chat/+", 1)
        assert info.value.code == 107
        bad = SubEvents()
        sub = client.new_subscription("bad/+", bad)
        await sub.subscribe()
        unsubscribed = await get(bad.unsubscribed)
        assert unsubscribed.code == 107
        await client.publish("still/connected", 1)  # the connection stayed open
        assert events.disconnected.empty()


async def test_jwt_connect() -> None:
    hub = Hub(auth=JWTAuth(SECRET, leeway=0))
    async with running(hub) as base:
        token = encode_jwt({"sub": "alice", "exp": int(time.time()) + 3600}, SECRET)
        async with sdk(base, token=token) as client:
            sub, _got = await subscribed(client, "room")
            presence = await sub.presence()
            assert [c.user for c in presence.clients.values()] == ["alice"]
            with pytest.raises(ReplyError) as info:  # publishing is not granted
                await client.publish("room", 1)
            assert info.value.code == 103

        # an expired token: the SDK gets 109 and asks get_token for a fresh one
        fresh: list[str] = []

        async def get_token() -> str:
            fresh.append(encode_jwt({"sub": "bob", "exp": int(time.time()) + 60}, SECRET))
            return fresh[-1]

        expired = encode_jwt({"sub": "bob", "exp": int(time.time()) - 10}, SECRET)
        events = ClientEvents()
        async with sdk(base, token=expired, get_token=get_token, events=events,
                       min_reconnect_delay=0.05) as client:
            await get(events.connected)
            assert len(fresh) == 1
            assert [c.user for c in hub.connections.values()] == ["bob"]

        # a forged token: closed with 3500, and the SDK stops
        events = ClientEvents()
        client = Client(cf_url(base), token=encode_jwt({"sub": "eve"}, "wrong"), proxy=None,
                        events=events)
        await client.connect()
        disconnected = await get(events.disconnected)
        assert disconnected.code == 3500
        # no token at all: error 101, terminal as well
        events = ClientEvents()
        client = Client(cf_url(base), proxy=None, events=events)
        await client.connect()
        assert (await get(events.disconnected)).code == 101


# --- the wire, without the SDK ---------------------------------------------------------


async def _replies(ws: Any, ids: set[int], pushes: list[dict[str, Any]] | None = None
                   ) -> dict[int, dict[str, Any]]:
    """Replies by id (frames may hold several, newline-separated); pushes aside."""
    got: dict[int, dict[str, Any]] = {}
    while not ids <= set(got):
        frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
        for line in frame.split("\n"):
            reply = json.loads(line)
            if reply.get("id"):
                got[reply["id"]] = reply
            elif pushes is not None:
                pushes.append(reply)
    return got


async def test_json_streaming_on_the_wire(server: tuple[Hub, str]) -> None:
    hub, base = server
    async with websockets.connect(cf_url(base)) as ws:
        await ws.send('{"id":1,"connect":{"name":"raw"}}\n'
                      '{"id":2,"subscribe":{"channel":"wire"}}')
        replies = await _replies(ws, {1, 2})
        assert replies[1]["connect"]["client"] in hub.connections
        assert replies[1]["connect"]["ping"] == 25 and replies[1]["connect"]["pong"] is True
        assert replies[2]["subscribe"]["offset"] == 0
        await ws.send('{"id":3,"publish":{"channel":"wire","data":"x"}}\n'
                      '{"id":4,"presence_stats":{"channel":"wire"}}\n'
                      "{}")  # a pong: no reply
        pushes: list[dict[str, Any]] = []
        replies = await _replies(ws, {3, 4}, pushes)
        assert replies[3] == {"id": 3, "publish": {}}
        assert replies[4] == {"id": 4, "presence_stats": {"num_clients": 1, "num_users": 0}}
        push = pushes[0] if pushes else json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert push["push"]["channel"] == "wire" and push["push"]["pub"]["data"] == "x"
        await ws.send('{"id":5,"subscribe":{"channel":"wire"}}\n{"id":6,"ping":{}}')
        replies = await _replies(ws, {5, 6})
        assert replies[5]["error"]["code"] == 105
        assert replies[6] == {"id": 6, "ping": {}}
        await ws.send("not json")  # no id to answer: disconnect "bad request"
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 3501


async def test_first_command_must_be_connect(server: tuple[Hub, str]) -> None:
    _hub, base = server
    async with websockets.connect(cf_url(base)) as ws:
        await ws.send('{"id":1,"subscribe":{"channel":"x"}}')
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 3501


async def test_server_pings() -> None:
    hub = Hub()
    app = Starlette(routes=[WebSocketRoute("/connection/websocket",
                                           CentrifugeEndpoint(hub, ping_interval=0.2))],
                    lifespan=hub.lifespan)
    async with running(hub, app=app) as base, websockets.connect(cf_url(base)) as ws:
        await ws.send('{"id":1,"connect":{}}')
        reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert reply["connect"]["ping"] == 1
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "{}"
        await ws.send("{}")  # the pong
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "{}"
