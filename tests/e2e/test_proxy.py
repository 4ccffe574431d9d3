"""WebSocketProxy: a gateway endpoint forwarding to an upstream websocket."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from tests.support import ASGI_WS, LEAN, native, running, ws_url
from tidings import Hub
from tidings.endpoints.proxy import WebSocketProxy


def gateway(upstream: str) -> FastAPI:
    app = FastAPI()

    @app.websocket("/gw")
    async def gw(ws: WebSocket) -> None:
        await WebSocketProxy(ws, upstream)()

    return app


async def test_both_directions_and_close_codes_from_upstream() -> None:
    backend = Hub()
    async with running(backend) as up, running(Hub(), gateway(ws_url(up))) as gw_base, \
            native(gw_base, "/gw") as client:
        assert client.welcome["node"] == backend.node  # the welcome came from upstream
        await client.request({"type": "subscribe", "channel": "news"})
        await backend.publish("news", {"via": "proxy"})
        assert (await client.next("publication"))["data"] == {"via": "proxy"}
        await backend.close_all(4003, "kicked")
        with pytest.raises(websockets.ConnectionClosed) as info:
            await client.recv(5)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4003, "kicked")


async def test_binary_and_close_code_from_the_client() -> None:
    seen: asyncio.Queue[object] = asyncio.Queue()
    upstream_app = FastAPI()

    @upstream_app.websocket("/echo")
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(message.get("code", 1000))
                if message.get("bytes") is not None:
                    await ws.send_bytes(message["bytes"][::-1])
                else:
                    await ws.send_text(message["text"].upper())
        except WebSocketDisconnect as exc:
            await seen.put(exc.code)

    async with running(Hub(), upstream_app) as up, running(Hub(), gateway(ws_url(up, "/echo"))
                                                           ) as gw_base:
        async with websockets.connect(ws_url(gw_base, "/gw")) as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 5) == "HI"
            await ws.send(b"\x01\x02")
            assert await asyncio.wait_for(ws.recv(), 5) == b"\x02\x01"
            await ws.close(4000, "bye")
        assert await asyncio.wait_for(seen.get(), 5) == 4000


async def test_unreachable_upstream_closes_the_client_1011() -> None:
    from tests.support import free_port

    async with running(Hub(), gateway(f"ws://127.0.0.1:{free_port()}/ws")) as gw_base, \
            websockets.connect(ws_url(gw_base, "/gw")) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 15)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011


@pytest.mark.parametrize("server", [ASGI_WS, "wsproto"])
async def test_a_client_that_leaves_ends_the_proxy_without_an_error(server: str) -> None:
    """uvicorn's wsproto and websockets-sansio answer a close to a client that is
    gone with WebSocketDisconnect: the proxy returns, it does not raise it."""
    outcomes: asyncio.Queue[BaseException | None] = asyncio.Queue()
    app = FastAPI()

    @app.websocket("/gw")
    async def gw(ws: WebSocket) -> None:
        try:
            await WebSocketProxy(ws, upstream)()
        except Exception as exc:
            await outcomes.put(exc)
            raise
        await outcomes.put(None)

    async with running(Hub()) as up, running(Hub(), app, ws=server) as gw_base:
        upstream = ws_url(up)
        for _ in range(3):
            async with native(gw_base, "/gw") as client:
                assert (await client.request({"type": "ping"}))["type"] == "pong"
            assert await asyncio.wait_for(outcomes.get(), 5) is None


def _echo_handshake_app() -> FastAPI:
    """An upstream that picks the last subprotocol offered and answers with the
    query string and the subprotocols it saw."""
    app = FastAPI()

    @app.websocket("/hs")
    async def hs(ws: WebSocket) -> None:
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol=offered[-1] if offered else None)
        await ws.send_json({"query": ws.scope["query_string"].decode(), "offered": offered})
        await ws.close()

    return app


@pytest.mark.parametrize("ws", [ASGI_WS, LEAN], ids=["uvicorn", "lean"])
async def test_subprotocols_and_the_query_string_reach_the_upstream(ws: str) -> None:
    """The upstream is connected first: it sees the client's subprotocols and
    query string (appended to its own), and the client is accepted with the
    subprotocol the upstream chose."""
    async with running(Hub(), _echo_handshake_app()) as up, \
            running(Hub(), gateway(ws_url(up, "/hs?via=gw")), ws=ws) as gw_base:
        async with websockets.connect(ws_url(gw_base, "/gw?token=abc&x=1"),
                                      subprotocols=["v1", "v2"]) as client:
            assert client.subprotocol == "v2"
            seen = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert seen == {"query": "via=gw&token=abc&x=1", "offered": ["v1", "v2"]}
        async with websockets.connect(ws_url(gw_base, "/gw")) as client:
            assert client.subprotocol is None
            seen = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert seen == {"query": "via=gw", "offered": []}


async def test_the_query_string_can_be_kept_back() -> None:
    app = FastAPI()

    @app.websocket("/gw")
    async def gw(ws: WebSocket) -> None:
        await WebSocketProxy(ws, upstream, forward_query=False)()

    async with running(Hub(), _echo_handshake_app()) as up, running(Hub(), app) as gw_base:
        upstream = ws_url(up, "/hs")
        async with websockets.connect(ws_url(gw_base, "/gw?token=secret")) as client:
            seen = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert seen["query"] == ""


async def test_an_upstream_that_refuses_closes_the_client_1011_with_its_status() -> None:
    app = FastAPI()

    @app.websocket("/no")
    async def no(ws: WebSocket) -> None:
        await ws.close(code=1008)  # before accepting: an HTTP 403 answer

    async with running(Hub(), app) as up, running(Hub(), gateway(ws_url(up, "/no"))) as gw_base, \
            websockets.connect(ws_url(gw_base, "/gw")) as client:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(client.recv(), 15)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011,
                                                                  "upstream refused: HTTP 403")
