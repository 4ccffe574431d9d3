"""Every example of examples/ runs, against the brokers it names."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
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


async def test_typed_workers_on_redis_with_uvicorn_workers(tmp_path: Any) -> None:
    """Two uvicorn workers on Redis: a typed publish is checked on whichever worker
    takes it and reaches a websocket held by either; the TypeScript names both types."""
    import subprocess
    import sys

    from tests.brokers.conftest import REDIS_URL, redis_ping
    from tests.support import free_port

    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    port = free_port()
    env = {**os.environ,
           "TIDINGS_BROKER": f"{REDIS_URL}?prefix=ex{uuid.uuid4().hex[:8]}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.typed_workers:app", "--workers", "2",
         "--port", str(port), "--log-level", "warning"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _ = await post(base, "/api/info", {})
                if status == 200:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn workers did not start")
            await asyncio.sleep(0.2)
        async with websockets.connect(ws_url(base, "/ws")) as ws:
            await ws.recv()  # welcome
            await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": "docs/#"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "reply"
            for _ in range(6):  # the kernel spreads the requests over the two workers
                status, body = await post(base, "/api/publish", {
                    "channel": "docs/a/cursors", "data": {"user": "u", "x": -1, "y": 2}})
                assert status == 400 and "x: Input should be greater than or equal to 0" in (
                    body["error"]["message"])
                status, body = await post(base, "/api/publish", {
                    "channel": "docs/a/cursors", "data": {"user": "u", "x": 1, "y": 2}})
                assert status == 200
            status, body = await post(base, "/docs/a/edits", {"user": "u", "text": "hi"})
            assert status == 200
            got = [json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)) for _ in range(7)]
            assert [g["offset"] for g in got if g["channel"] == "docs/a/cursors"] == list(
                range(1, 7))  # every valid publish, whichever worker took it, in order
            assert got[-1]["data"] == {"user": "u", "text": "hi"}
    finally:
        proc.terminate()
        proc.wait(15)
    ts = subprocess.run([sys.executable, "-m", "tidings.server.cli", "typescript", "--app",
                         "examples.typed_workers:hub"], capture_output=True, text=True,
                        timeout=60, check=True).stdout
    assert '"docs/+/cursors": CursorMove;' in ts and "export interface DocEdit" in ts
