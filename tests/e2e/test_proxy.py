"""WebSocketProxy: a gateway endpoint forwarding to an upstream websocket."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from tests.support import ASGI_WS, native, running, ws_url
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
