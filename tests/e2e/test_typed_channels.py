"""Typed channels: a FastAPI app declares two channel types; every publish path
refuses invalid data with the error location and delivers valid data."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import websockets
from fastapi import FastAPI
from pydantic import BaseModel, Field

from tests.e2e.test_centrifuge import cf_url
from tests.support import TIMEOUT, apost, native, running, ws_url
from tidings import Hub, ProtocolError


class OrderUpdate(BaseModel):
    order_id: int
    status: str
    items: list[str] = Field(default_factory=list)


class Reading(BaseModel):
    sensor: str
    value: float


@pytest.fixture
async def app() -> AsyncIterator[tuple[Hub, str]]:
    hub = Hub()
    hub.channel("orders/+", OrderUpdate)
    hub.channel("sensors/#", Reading)
    api = FastAPI(lifespan=hub.lifespan)
    api.include_router(hub.router)
    async with running(hub, api) as base:
        yield hub, base


async def test_hub_publish_validates_and_takes_models(app: tuple[Hub, str]) -> None:
    hub, base = app
    async with native(base) as c:
        await c.request({"type": "subscribe", "channel": "orders/+"})
        with pytest.raises(ProtocolError) as info:
            await hub.publish("orders/1", {"order_id": "x", "status": "new"})
        assert info.value.code == "bad_request"
        assert "order_id: Input should be a valid integer" in info.value.message
        pub = await hub.publish("orders/1", OrderUpdate(order_id=1, status="new"))
        assert pub.offset == 1  # the refused one got no offset
        got = await c.next("publication")
        assert got["data"] == {"order_id": 1, "status": "new", "items": []}
        await hub.publish("other", {"free": "form"})  # untyped channels are untouched


async def test_http_api(app: tuple[Hub, str]) -> None:
    _, base = app
    status, body = await apost(base, "publish", {"channel": "sensors/a/b",
                                                 "data": {"sensor": "t1"}})
    assert status == 400
    assert "value: Field required" in body["error"]["message"]
    status, body = await apost(base, "publish", {"channel": "sensors/a/b",
                                                 "data": {"sensor": "t1", "value": "21.5"}})
    assert status == 200 and body["result"]["offset"] == 1


async def test_native_publish(app: tuple[Hub, str]) -> None:
    _, base = app
    async with native(base) as c:
        await c.request({"type": "subscribe", "channel": "orders/+"})
        reply = await c.request({"type": "publish", "channel": "orders/7",
                                 "data": {"order_id": 7}})
        assert (reply["type"], reply["code"]) == ("error", "bad_request")
        assert "status: Field required" in reply["message"]
        reply = await c.request({"type": "publish", "channel": "orders/7",
                                 "data": {"order_id": 7, "status": "paid"}})
        assert reply["result"]["offset"] == 1  # the connection stayed open
        assert (await c.next("publication"))["data"]["status"] == "paid"


async def test_raw_producer(app: tuple[Hub, str]) -> None:
    _, base = app
    async with native(base) as c:
        await c.request({"type": "subscribe", "channel": "sensors/#"})
        async with websockets.connect(ws_url(base, "/ws/pub/sensors/x?ack=1")) as raw:
            await raw.send('{"sensor": "s", "value": "hot"}')
            error = json.loads(await asyncio.wait_for(raw.recv(), TIMEOUT))
            assert error["error"]["code"] == "bad_request"
            assert "value: Input should be a valid number" in error["error"]["message"]
            await raw.send('{"sensor": "s", "value": 3}')
            ack = json.loads(await asyncio.wait_for(raw.recv(), TIMEOUT))
            assert ack["offset"] == 1
        got = await c.next("publication")
        assert got["data"] == {"sensor": "s", "value": 3.0}


async def test_centrifuge_publish(app: tuple[Hub, str]) -> None:
    _, base = app
    async with websockets.connect(cf_url(base)) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        assert "connect" in json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        await ws.send(json.dumps({"id": 2, "publish": {"channel": "orders/9",
                                                       "data": {"status": 5}}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert reply["error"]["code"] == 107  # bad request
        assert "order_id: Field required" in reply["error"]["message"]
        await ws.send(json.dumps({"id": 3, "publish": {"channel": "orders/9",
                                                       "data": {"order_id": 9,
                                                                "status": "ok"}}}))
        assert "publish" in json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def test_asyncapi_route_and_docs_page(app: tuple[Hub, str]) -> None:
    import httpx

    _, base = app
    async with httpx.AsyncClient() as client:
        doc = (await client.get(base + "/asyncapi.json")).json()
        page = await client.get(base + "/asyncapi")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {"/ws", "orders/+", "sensors/#"} <= addresses
    assert doc["components"]["schemas"]["OrderUpdate"]["required"] == ["order_id", "status"]
    assert page.status_code == 200
    assert 'fetch("asyncapi.json")' in page.text
    assert "<script src" not in page.text  # nothing fetched from elsewhere
    assert "https://" not in page.text
