"""The broker is down: every protocol subscribes, publishes and answers the same way.

The command logic of the native endpoint, the Centrifuge endpoint and the HTTP
API is one (tidings.core.operations). These tests pin the outage policy on each
path, with a real private Redis killed mid-session: a subscription succeeds at an
unknown position (offset 0, no epoch, ``recovered: false``) and delivers live
publications; nothing is left half-subscribed; nothing logs a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import websockets
from centrifuge import Client as CentrifugeClient

from tests.brokers.conftest import RedisServer
from tests.brokers.test_redis_faults import wait_health
from tests.e2e.test_centrifuge import SubEvents, cf_url, get
from tests.support import TIMEOUT, apost, native, running
from tidings import Hub
from tidings.protocol.centrifuge import FLAG_REJECT_UNRECOVERED

pytestmark = pytest.mark.redis


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None]


async def test_centrifuge_subscribe_during_outage(caplog: pytest.LogCaptureFixture) -> None:
    """The reproduced bug: the SDK got error 100 and a traceback, stayed subscribed
    server-side with every live publication dropped, and got 105 on retry."""
    caplog.set_level(logging.DEBUG, logger="tidings")
    server = RedisServer()
    try:
        hub = Hub(server.url)
        async with running(hub) as base:
            server.kill()
            await wait_health(base, 503, within=10)
            client = CentrifugeClient(cf_url(base), proxy=None, timeout=TIMEOUT)
            await client.connect()
            try:
                events = SubEvents()
                sub = client.new_subscription("outage", events)
                await sub.subscribe()
                ctx = await get(events.subscribed)  # subscribed, not an error
                assert ctx.recovered is False
                await hub.publish("outage", {"n": 1})  # delivered locally meanwhile
                pub = await get(events.pubs)
                assert pub.pub.data == {"n": 1}
                conn = next(c for c in hub.connections.values() if "outage" in c.subs)
                assert conn.subs == {"outage"}

                await sub.unsubscribe()
                await sub.subscribe()  # a retry is not "already subscribed" (105)
                assert (await get(events.subscribed)).recovered is False
            finally:
                await client.disconnect()
            await recovering_during_outage(hub, base)
        assert tracebacks(caplog) == []
    finally:
        server.stop()


async def centrifuge_frames(base: str) -> Any:
    ws = await websockets.connect(cf_url(base))
    await ws.send(json.dumps({"id": 1, "connect": {}}))
    assert "connect" in json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    return ws


async def recovering_during_outage(hub: Hub, base: str) -> None:
    """Recovery while the broker is down: ``recovered: false`` and live delivery;
    with the reject-unrecovered flag a temporary error (100), and not subscribed."""
    async with await centrifuge_frames(base) as ws:
        await ws.send(json.dumps({"id": 2, "subscribe": {
            "channel": "back", "recover": True, "offset": 3, "epoch": "old"}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert reply["subscribe"]["was_recovering"] is True
        assert reply["subscribe"].get("recovered", False) is False
        await hub.publish("back", "live")
        push = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert push["push"]["pub"]["data"] == "live"
        await ws.send(json.dumps({"id": 3, "subscribe": {
            "channel": "strict", "recover": True, "offset": 3, "epoch": "old",
            "flag": FLAG_REJECT_UNRECOVERED}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert reply["error"]["code"] == 100  # temporary: the SDK retries later
        assert not hub.index.has("strict")


async def test_native_and_http_api_during_outage(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tidings")
    server = RedisServer()
    try:
        hub = Hub(server.url)
        async with running(hub) as base, native(base) as client:
            server.kill()
            await wait_health(base, 503, within=10)
            reply = await client.request({"type": "subscribe", "channel": "n",
                                          "recover": {"offset": 2, "epoch": "e"}})
            assert reply["result"] == {"recovered": False, "publications": [],
                                       "offset": 0, "epoch": ""}
            status, body = await apost(base, "publish", {"channel": "n", "data": "live"})
            assert status == 200 and body["result"] == {"offset": 0, "epoch": ""}
            assert (await client.next("publication"))["data"] == "live"
            # history needs the broker: a clear error, the connection stays open
            reply = await client.request({"type": "history", "channel": "n"})
            assert reply["type"] == "error" and reply["code"] == "internal"
            assert "broker unavailable" in reply["message"]
            status, body = await apost(base, "history", {"channel": "n", "limit": 5})
            assert status == 503
            assert body["error"]["code"] == 100 and "broker unavailable" in body["error"]["message"]
            assert (await client.request({"type": "ping"}))["type"] == "pong"

            server.start()
            await wait_health(base, 200, within=20)
            status, body = await apost(base, "publish", {"channel": "n", "data": "back"})
            assert status == 200 and body["result"]["offset"] == 1
            pub = await client.next("publication")
            assert (pub["data"], pub["offset"]) == ("back", 1)
        assert tracebacks(caplog) == []
    finally:
        server.stop()


async def test_refused_recovery_leaves_nothing_behind() -> None:
    """Centrifuge's reject-unrecovered flag: error 112, and not subscribed after it."""
    hub = Hub("memory://")
    async with running(hub) as base:
        await hub.publish("kept", 1)
        async with await centrifuge_frames(base) as ws:
            await ws.send(json.dumps({"id": 2, "subscribe": {
                "channel": "kept", "recover": True, "offset": 1, "epoch": "another",
                "flag": FLAG_REJECT_UNRECOVERED}}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert reply["error"]["code"] == 112
            assert all("kept" not in c.subs for c in hub.connections.values())
            assert hub.index.has("kept") is False
            await ws.send(json.dumps({"id": 3, "subscribe": {"channel": "kept"}}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert reply["subscribe"]["offset"] == 1  # a retry is not "already subscribed"
