"""Every error code of SPEC 6.1 over a real socket; the connection survives each."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from tests.support import native, running, ws_url
from tidings import Hub, Limits


async def expect_error(client, frame, code: str) -> None:  # type: ignore[no-untyped-def]
    got = await client.request(frame) if isinstance(frame, dict) else await _raw(client, frame)
    assert got["type"] == "error", got
    assert got["code"] == code, got
    assert got["message"]
    pong = await client.request({"type": "ping"})
    assert pong["type"] == "pong"


async def _raw(client, frame):  # type: ignore[no-untyped-def]
    await client.send(frame)
    return await client.next("error")


def boom(conn, channel):  # type: ignore[no-untyped-def]
    raise RuntimeError("hook failed")


async def test_every_error_code_keeps_the_connection() -> None:
    hub = Hub(can_publish=boom)
    async with running(hub) as base, native(base) as c:
        await expect_error(c, "not json", "bad_request")
        await expect_error(c, "[1]", "bad_request")
        await expect_error(c, {"type": "publish", "channel": "a"}, "bad_request")
        await expect_error(c, {"type": "frobnicate"}, "unknown_type")
        await expect_error(c, {"type": "subscribe", "channel": "a/#/b"}, "bad_pattern")
        await expect_error(c, {"type": "publish", "channel": "a//b", "data": 1}, "bad_channel")
        await expect_error(c, {"type": "publish", "channel": "$sys/x", "data": 1}, "forbidden")
        await expect_error(c, {"type": "unsubscribe", "channel": "never"}, "not_found")
        await expect_error(c, {"type": "ack", "queue": "q", "item": "nope"}, "not_found")
        await expect_error(c, json.dumps({"type": "publish", "channel": "a",
                                          "data": "x" * 70_000}), "too_large")
        await c.send({"id": "big", "type": "publish", "channel": "a", "data": "x" * 70_000})
        big = await c.next("error")
        assert (big["id"], big["code"]) == ("big", "too_large")  # matched to its request
        await expect_error(c, {"type": "publish", "channel": "a", "data": 1}, "internal")
        assert hub.stats.errors["internal"] == 1


async def test_rate_limit_then_close_1008() -> None:
    hub = Hub(limits=Limits(rate=5, burst=5, max_violations=10))
    async with running(hub) as base, native(base) as bad, native(base) as good:
        for _ in range(60):
            await bad.send({"type": "ping"})
        codes = []
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                codes.append((await bad.recv())["type"])
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        assert "pong" in codes and codes.count("error") >= 10
        assert (await good.request({"type": "ping"}))["type"] == "pong"  # others unaffected


async def test_frame_above_hard_limit_closes_1009() -> None:
    hub = Hub(limits=Limits(frame_soft=1000, frame_hard=10_000))
    async with running(hub) as base, websockets.connect(ws_url(base)) as ws:
        await ws.recv()
        await ws.send("x" * 20_000)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_idle_timeout_closes_a_silent_connection() -> None:
    hub = Hub(limits=Limits(idle_timeout=0.3))
    async with running(hub) as base, native(base) as idle, native(base) as chatty:

        async def keep_talking() -> None:
            while True:
                assert (await chatty.request({"type": "ping"}))["type"] == "pong"
                await asyncio.sleep(0.05)  # well inside the idle timeout

        talker = asyncio.create_task(keep_talking())
        try:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await idle.recv(timeout=5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1000
            assert info.value.rcvd.reason == "idle timeout"
            assert not talker.done()  # the talking one is still open
        finally:
            talker.cancel()
