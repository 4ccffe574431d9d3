"""Typed channels: a FastAPI app declares two channel types; every publish path
refuses invalid data with the error location and delivers valid data."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import websockets
from fastapi import FastAPI
from pydantic import BaseModel, Field

from tests.e2e.test_centrifuge import cf_url
from tests.support import TIMEOUT, apost, http_post, native, running, serve_process, ws_url
from tidings import Hub, JsonSchema, ProtocolError
from tidings.endpoints.schema import app_asyncapi, app_typescript


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


# --- JSON Schema channel types: what `tidings serve` users declare in its config ----------

ORDER_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Order",
    "type": "object",
    "required": ["order_id", "status"],
    "properties": {"order_id": {"type": "integer"},
                   "status": {"enum": ["new", "paid"]},
                   "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}}},
    "$defs": {"line": {"type": "object", "required": ["sku"],
                       "properties": {"sku": {"type": "string"}}}},
}


async def test_json_schema_channel_refuses_with_the_location_and_keeps_valid_data() -> None:
    hub = Hub(channels=[("orders/+", JsonSchema(ORDER_SCHEMA))])
    async with running(hub) as base, native(base) as c:
        await c.request({"type": "subscribe", "channel": "orders/+"})
        reply = await c.request({"type": "publish", "channel": "orders/7",
                                 "data": {"order_id": 7, "status": "lost",
                                          "lines": [{"sku": 1}]}})
        assert reply["type"] == "error" and reply["code"] == "bad_request"
        assert "lines/0/sku: 1 is not of type 'string'" in reply["message"]
        assert "status: 'lost' is not one of ['new', 'paid']" in reply["message"]
        status, body = await apost(base, "publish", {"channel": "orders/7", "data": {}})
        assert status == 400 and "'order_id' is a required property" in body["error"]["message"]
        valid = {"order_id": 7, "status": "paid", "lines": [{"sku": "a", "extra": True}]}
        reply = await c.request({"type": "publish", "channel": "orders/7", "data": valid})
        assert reply["result"]["offset"] == 1  # the refused ones got no offset
        assert (await c.next("publication"))["data"] == valid  # unchanged, extras kept
        # the documents name it by its title and point its $ref at components
        doc = app_asyncapi(hub)
        assert doc["components"]["schemas"]["line"]["required"] == ["sku"]
        items = doc["components"]["schemas"]["Order"]["properties"]["lines"]["items"]
        assert items == {"$ref": "#/components/schemas/line"}
        assert '"orders/+": Order;' in app_typescript(hub)


def test_a_bad_json_schema_is_refused_at_declaration() -> None:
    with pytest.raises(ValueError, match=r"bad JSON Schema .* at type"):
        Hub(channels=[("a", JsonSchema({"type": "no-such-type"}))])


def test_serve_config_channels_from_schema_files(tmp_path: Path) -> None:
    (tmp_path / "order.schema.json").write_text(json.dumps(ORDER_SCHEMA))
    config = tmp_path / "tidings.toml"
    config.write_text('[[channels]]\npattern = "orders/+"\nschema = "order.schema.json"\n\n'
                      '[[channels]]\npattern = "ticks"\nschema = { type = "number" }\n')
    for workers in ("1", "2"):  # the workers get the schemas too
        with serve_process("--config", str(config), "--workers", workers) as server:
            for channel, data, want in (("orders/1", {"order_id": "x", "status": "new"},
                                         "order_id: 'x' is not of type 'integer'"),
                                        ("ticks", "high", "data: 'high' is not of type")):
                status, body = http_post(server.base, "publish",
                                         {"channel": channel, "data": data})
                assert status == 400, body
                assert want in body["error"]["message"]
            status, body = http_post(server.base, "publish", {"channel": "ticks", "data": 1.5})
            assert status == 200, body
    (tmp_path / "bad.json").write_text('{"type": 5}')
    config.write_text('[[channels]]\npattern = "x"\nschema = "bad.json"\n')
    out = subprocess.run([sys.executable, "-m", "tidings.server.cli", "serve", "--config",
                          str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "bad [[channels]] entry in config: bad JSON Schema" in out.stderr
    assert "bad.json at type" in out.stderr


# --- typed queue items and direct messages ------------------------------------------------


class Job(BaseModel):
    task: str
    retries: int = 0


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_typed_queue_refuses_invalid_items_on_every_push_path(broker: str) -> None:
    from tests.brokers.conftest import REDIS_URL, redis_ping, unavailable

    url = "memory://"
    if broker == "redis":  # a shared store: pushes are pipelined, the check is the same
        if not redis_ping(REDIS_URL):
            unavailable(f"no Redis at {REDIS_URL}")
        url = f"{REDIS_URL}?prefix=ty{uuid.uuid4().hex[:8]}"
    hub = Hub(url)
    hub.queue_type("jobs", Job)
    async with running(hub) as base:
        queue = hub.queue("jobs")
        with pytest.raises(ProtocolError) as info:
            await queue.push({"retries": 1})
        assert info.value.code == "bad_request"
        assert "invalid data for jobs: task: Field required" in info.value.message
        await queue.push(Job(task="a"))
        async with websockets.connect(ws_url(base, "/ws/push/jobs?ack=1")) as producer:
            await producer.send(json.dumps({"task": 5}))
            refused = json.loads(await asyncio.wait_for(producer.recv(), TIMEOUT))
            assert refused["error"]["code"] == "bad_request"
            assert "task: Input should be a valid string" in refused["error"]["message"]
            await producer.send(json.dumps({"task": "b", "retries": 2}))  # still open
            assert "item" in json.loads(await asyncio.wait_for(producer.recv(), TIMEOUT))
        other = hub.queue("untyped")
        await other.push({"anything": True})  # other queues are untouched
        got = []
        async with asyncio.timeout(TIMEOUT):
            async for item in queue.consume():
                got.append(item.data)
                await item.ack()
                if len(got) == 2:
                    break
        assert got == [{"task": "a", "retries": 0}, {"task": "b", "retries": 2}]


async def test_typed_direct_messages() -> None:
    hub = Hub()
    hub.message_type(Job)
    async with running(hub) as base, native(base) as a, native(base) as b:
        reply = await a.request({"type": "send", "to": b.welcome["conn_id"],
                                 "data": {"task": None}})
        assert reply["type"] == "error" and reply["code"] == "bad_request"
        assert "invalid data for messages: task: Input should be a valid string" in \
            reply["message"]
        reply = await a.request({"type": "send", "to": b.welcome["conn_id"],
                                 "data": {"task": "x"}})
        assert reply["result"] == {"sent": 1}
        message = await b.next("message")
        assert message["data"] == {"task": "x", "retries": 0}  # dumped as the type has it
        assert message["from"] == a.welcome["conn_id"]
        with pytest.raises(ProtocolError):
            await hub.send(b.welcome["conn_id"], {"nope": 1})
        with pytest.raises(ProtocolError):
            await hub.broadcast([1, 2])
        await hub.send_user("nobody", Job(task="y"))  # a model instance is fine


def test_documents_of_a_hub_without_queue_or_message_types() -> None:
    """Nothing declared: no queue or message channels in the AsyncAPI document;
    the TypeScript maps are there, empty, and messages carry ``unknown``."""
    hub = Hub()
    doc = app_asyncapi(hub)
    assert not [k for k in doc["channels"] if k.startswith(("queue", "messages", "app"))]
    declarations = app_typescript(hub)
    assert "export interface QueueTypes {\n\n}" in declarations
    assert "export type MessageData = unknown;" in declarations
    hub.queue_type("jobs", JsonSchema({"title": "Job", "type": "object"}))
    assert app_asyncapi(hub)["channels"]["queue1"]["address"] == "jobs"
    assert '"jobs": Job;' in app_typescript(hub)
