"""tidings inside a FastAPI app: router under a prefix, publish from handlers, hub.accept."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, WebSocket

from tests.support import ASGI_WS, DIRECT_WS, native, running, ws_url
from tidings import Hub


def make_app(hub: Hub) -> FastAPI:
    app = FastAPI(lifespan=hub.lifespan)
    app.include_router(hub.router, prefix="/rt")

    @app.post("/orders/{oid}/pay")
    async def pay(oid: int) -> dict[str, int]:
        pub = await hub.publish(f"orders/{oid}", {"status": "paid"})
        return {"offset": pub.offset}

    @app.websocket("/custom")
    async def custom(ws: WebSocket) -> None:
        async with hub.accept(ws, user="alice") as conn:
            await conn.subscribe("chat/+")
            async for pub in conn:
                await ws.send_json({"seen": pub.channel, "data": pub.data})

    return app


# uvicorn's own websocket protocol, and tidings' subclass of it with the direct
# write path (``uvicorn app:app --ws tidings.server.wsproto:DirectWSProtocol``)
@pytest.mark.parametrize("ws", [ASGI_WS, DIRECT_WS], ids=["uvicorn-ws", "direct-ws"])
async def test_fastapi_prefix_handlers_and_custom_endpoint(ws: str) -> None:
    hub = Hub()
    app = make_app(hub)
    async with running(hub, app, ws=ws) as base:
        async with native(base, "/rt/ws") as sub:
            await sub.request({"type": "subscribe", "channel": "orders/+"})
            (conn,) = hub.connections.values()
            # frames written straight to the socket with tidings' protocol only
            assert (conn._direct is not None) == (ws == DIRECT_WS)
            async with httpx.AsyncClient() as http:
                r = await http.post(f"{base}/orders/7/pay")
                assert r.status_code == 200
                r2 = await http.post(f"{base}/rt/api/publish",
                                     json={"channel": "orders/8", "data": 1})
                assert r2.json()["result"]["offset"] == 1
                health = await http.get(f"{base}/rt/health")
                assert health.status_code == 200
            pub = await sub.next("publication")
            assert (pub["channel"], pub["data"]) == ("orders/7", {"status": "paid"})
            assert (await sub.next("publication"))["channel"] == "orders/8"
        import json

        import websockets

        async with websockets.connect(ws_url(base, "/custom")) as ws:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert welcome["type"] == "welcome" and welcome["user"] == "alice"
            from tests.support import wait_until

            await wait_until(lambda: hub.index.has("chat/+"), what="custom subscription")
            await hub.publish("chat/lobby", "hello")
            got = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert got == {"seen": "chat/lobby", "data": "hello"}
