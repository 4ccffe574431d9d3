"""Every example of examples/ runs, against the brokers it names."""

from __future__ import annotations

import asyncio
import importlib
import json
import time
import uuid
from typing import Any

import pytest
import websockets

from tests.brokers.conftest import POSTGRES_URL, unavailable
from tests.support import TIMEOUT, ws_url
from tests.support import running as serve


async def post(base: str, path: str, body: Any) -> tuple[int, Any]:
    import httpx

    async with httpx.AsyncClient() as client:
        response = await client.post(base + path, json=body, timeout=TIMEOUT)
        return response.status_code, response.json()


def fresh(name: str, monkeypatch: pytest.MonkeyPatch, broker: str | None = None) -> Any:
    """The example module, imported anew (its hub is built at import)."""
    if broker is not None:
        monkeypatch.setenv("TIDINGS_BROKER", broker)
    module = importlib.import_module(f"examples.{name}")
    return importlib.reload(module)


async def test_queue_relay_every_job_once_and_a_clean_shutdown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    relay = fresh("queue_relay", monkeypatch, "memory://")
    async with serve(relay.hub, relay.app) as base:
        async with websockets.connect(ws_url(base, "/rt/ws/sub/jobs/done")) as done:
            async with websockets.connect(ws_url(base, "/rt/ws/push/jobs")) as producer:
                for i in range(10):
                    await producer.send(json.dumps({"n": i}))
            for i in range(10, 15):
                status, _ = await post(base, "/jobs", {"n": i})
                assert status == 200
            seen = [json.loads(await asyncio.wait_for(done.recv(), TIMEOUT))
                    for _ in range(15)]
        assert sorted(s["job"]["n"] for s in seen) == list(range(15))  # each job once
        assert {s["by"] for s in seen} <= {"w0", "w1"}
        started = time.monotonic()
    assert time.monotonic() - started < 5  # the workers' loops ended by themselves


async def test_postgres_push_reaches_websockets_on_another_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=2)
        await conn.close()
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable(f"no PostgreSQL at {POSTGRES_URL}: {exc}")
    url = f"{POSTGRES_URL}?prefix=ex{uuid.uuid4().hex[:8]}"
    one = fresh("postgres_push", monkeypatch, url)
    hub1, app1 = one.hub, one.app
    two = fresh("postgres_push", monkeypatch, url)  # a second node (another worker)
    async with (serve(hub1, app1) as base1, serve(two.hub, two.app) as base2,
                websockets.connect(ws_url(base2, "/ws")) as ws):
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": "orders/#"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "reply"
        status, body = await post(base1, "/push/orders/42", {"status": "paid"})
        assert status == 200 and body["offset"] == 1
        frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert (frame["channel"], frame["data"], frame["offset"]) == (
            "orders/42", {"status": "paid"}, 1)
