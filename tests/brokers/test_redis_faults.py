"""Redis dies mid-stream and comes back: hubs stay up, report it once, recover."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import websockets

from tests.brokers.conftest import RedisServer
from tests.support import apost, native, running, wait_health, ws_url
from tidings import Hub

pytestmark = pytest.mark.redis






async def test_redis_killed_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tidings.hub")
    server = RedisServer()
    try:
        h1, h2 = Hub(server.url), Hub(server.url)
        async with running(h1) as base1, running(h2) as base2, native(base1) as client:
            await client.request({"type": "subscribe", "channel": "live"})
            await apost(base2, "publish", {"channel": "live", "data": "before"})
            assert (await client.next("publication"))["data"] == "before"

            server.kill()
            await wait_health(base1, 503, within=10)
            await wait_health(base2, 503, within=10)
            status, _ = await apost(base1, "publish", {"channel": "live", "data": "local"})
            assert status == 200  # local delivery goes on during the outage
            local = await client.next("publication")
            assert (local["data"], local["offset"]) == ("local", 0)
            # the pipelined paths answer the same way: position unknown, delivered here
            reply = await client.request({"type": "publish", "channel": "live", "data": "n"})
            assert reply["result"] == {"offset": 0, "epoch": ""}
            assert (await client.next("publication"))["data"] == "n"
            async with websockets.connect(ws_url(base1, "/ws/pub/live?ack=1")) as raw:
                await raw.send('"r"')
                ack = json.loads(await asyncio.wait_for(raw.recv(), 10))
            assert ack == {"offset": 0, "epoch": ""}
            assert (await client.next("publication"))["data"] == "r"
            assert (await client.request({"type": "ping"}))["type"] == "pong"
            async with native(base1) as newcomer:  # subscribing during the outage works too
                reply = await newcomer.request({"type": "subscribe", "channel": "fresh",
                                                "join_leave": True})
                assert reply["type"] == "reply"
                await apost(base1, "publish", {"channel": "fresh", "data": "hi"})
                assert (await newcomer.next("publication"))["data"] == "hi"

            server.start()  # same port
            await wait_health(base1, 200, within=20)
            await wait_health(base2, 200, within=20)
            status, _body = await apost(base2, "publish", {"channel": "live", "data": "after"})
            assert status == 200
            after = await client.next("publication")
            assert after["data"] == "after"
            # Redis lost everything: a new epoch, so clients can tell there was a gap
            assert after["epoch"] != local["epoch"]
        downs = [r for r in caplog.records if "is down" in r.getMessage()]
        ups = [r for r in caplog.records if "is up again" in r.getMessage()]
        assert len(downs) == 2 and len(ups) == 2  # one transition each per hub, no storm
    finally:
        server.stop()
