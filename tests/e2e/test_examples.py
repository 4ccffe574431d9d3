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
from tests.support import ASGI_WS, TIMEOUT, NativeClient, native, ws_url
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


# -- examples/chat.py: rooms, auth, direct messages, the gateway, exception handlers --

async def chat_login(base: str, user: str) -> str:
    import examples.chat

    status, body = await post(base, "/login", {"user": user,
                                               "password": examples.chat.USERS[user]})
    assert status == 200
    return str(body["token"])


async def chat_join(client: NativeClient, room: str) -> None:
    got = await client.request({"type": "subscribe", "channel": f"chat/{room}",
                                "join_leave": True})
    assert got["type"] == "reply", got


async def member_event(client: NativeClient, kind: str, conn_id: str) -> dict[str, Any]:
    """The ``join``/``leave`` of ``conn_id`` (one's own join and earlier ones come too)."""
    while True:
        event = await client.next(kind)
        if event["member"]["conn_id"] == conn_id:
            return event


async def refused(base: str, path: str) -> int:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(ws_url(base, path)):
            pass
    return int(info.value.response.status_code)


@pytest.mark.parametrize("entry", ["/rt/ws", "/gateway"])
async def test_chat_rooms_auth_direct_messages_and_error_handlers(
        entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under uvicorn, straight to the chat socket or through the gateway route."""
    chat = fresh("chat", monkeypatch, "memory://")
    async with serve(chat.hub, chat.app, ws=ASGI_WS) as base:
        status, _ = await post(base, "/login", {"user": "alice", "password": "guess"})
        assert status == 401
        tokens = {user: await chat_login(base, user) for user in ("alice", "bob", "carol")}
        for bad in (f"{entry}?token=forged", f"{entry}?token={tokens['bob'][:-2]}"):
            assert await refused(base, bad) == 403
        if entry == "/gateway":  # the gateway checks at the edge: no token, no socket
            assert await refused(base, entry) == 403
        else:  # no token in the handshake: the first frame must bring one
            async with websockets.connect(ws_url(base, entry)) as anonymous:
                await anonymous.send(json.dumps({"type": "subscribe", "channel": "chat/lobby"}))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(anonymous.recv(), TIMEOUT)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        async with (native(base, f"{entry}?token={tokens['alice']}") as alice,
                    native(base, f"{entry}?token={tokens['carol']}") as carol):
            assert (alice.welcome["user"], carol.welcome["user"]) == ("alice", "carol")
            await chat_join(alice, "lobby")
            await chat_join(carol, "lobby")
            async with native(base, f"{entry}?token={tokens['bob']}") as bob:
                await chat_join(bob, "lobby")
                for other in (alice, carol):
                    join = await member_event(other, "join", bob.conn_id)
                    assert join["member"] == {"conn_id": bob.conn_id, "user": "bob"}
                presence = await bob.request({"type": "presence", "channel": "chat/lobby"})
                members = presence["result"]["presence"]
                assert sorted(m["user"] for m in members.values()) == ["alice", "bob", "carol"]

                # a message in the room reaches everyone in it, validated by its type
                await bob.request({"type": "publish", "channel": "chat/lobby",
                                   "data": {"text": "hi all"}})
                for other in (alice, carol):
                    pub = await other.next("publication")
                    assert (pub["data"], pub["sender"]) == ({"text": "hi all"}, bob.conn_id)
                bad = await bob.request({"type": "publish", "channel": "chat/lobby",
                                         "data": {"text": ""}})
                assert bad["code"] == "bad_request" and "text:" in bad["message"]

                # the hooks' domain exceptions, as the on_error handler words them
                got = await bob.request({"type": "publish", "channel": "chat/news",
                                         "data": {"text": "breaking"}})
                assert (got["code"], got["message"]) == (
                    "forbidden", "only carol may post in 'chat/news'")
                got = await bob.request({"type": "subscribe", "channel": "chat/attic"})
                assert (got["code"], got["message"]) == (
                    "not_found", "there is no room 'attic'")
                assert (await bob.request({"type": "ping"}))["type"] == "pong"  # still open
                got = await carol.request({"type": "publish", "channel": "chat/news",
                                           "data": {"text": "breaking"}})
                assert got["type"] == "reply"

                # direct messages: to a conn_id from presence, and to a user over HTTP
                sent = await alice.request({"type": "send", "to": bob.conn_id,
                                            "data": {"text": "psst"}})
                assert sent["result"] == {"sent": 1}
                assert await bob.next("message") == {
                    "type": "message", "from": alice.conn_id, "data": {"text": "psst"}}
                dm = "/dm/bob"
                # no bearer: 401 (older FastAPI versions of HTTPBearer answer 403)
                assert (await post(base, dm, {"text": "lunch?"}))[0] in (401, 403)
                import httpx

                async with httpx.AsyncClient() as http:
                    for tok, expected in (("forged", 401), (tokens["alice"], 200)):
                        response = await http.post(
                            base + dm, json={"text": "lunch?"}, timeout=TIMEOUT,
                            headers={"Authorization": f"Bearer {tok}"})
                        assert response.status_code == expected
                assert await bob.next("message") == {
                    "type": "message", "from": "alice", "data": {"text": "lunch?"}}
                # carol got neither: her next frame is the room's next message
                await alice.request({"type": "publish", "channel": "chat/lobby",
                                     "data": {"text": "bye bob"}})
                pub = await carol.next("publication")
                assert pub["data"] == {"text": "bye bob"}
                assert [f for f in carol.pending if f["type"] == "message"] == []
            # bob left: the room sees him go, and presence no longer lists him
            leave = await member_event(alice, "leave", bob.conn_id)
            assert leave["member"] == {"conn_id": bob.conn_id, "user": "bob"}
            presence = await alice.request({"type": "presence", "channel": "chat/lobby"})
            assert sorted(m["user"] for m in presence["result"]["presence"].values()) == [
                "alice", "carol"]
            history = await alice.request({"type": "history", "channel": "chat/lobby"})
            assert [p["data"]["text"] for p in history["result"]["publications"]] == [
                "hi all", "bye bob"]


@pytest.mark.redis
async def test_chat_on_redis_across_two_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers of the chat on one Redis: alice on one, bob through the other's
    gateway; the room, its presence and both kinds of direct message cross."""
    from tests.brokers.conftest import REDIS_URL, redis_ping

    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    url = f"{REDIS_URL}?prefix=ex{uuid.uuid4().hex[:8]}"
    one = fresh("chat", monkeypatch, url)
    hub1, app1 = one.hub, one.app
    two = fresh("chat", monkeypatch, url)  # a second worker: its own hub, the same code
    async with serve(hub1, app1, ws=ASGI_WS) as base1, serve(two.hub, two.app,
                                                             ws=ASGI_WS) as base2:
        alice_token, bob_token = await chat_login(base1, "alice"), await chat_login(base2, "bob")
        async with (native(base1, f"/rt/ws?token={alice_token}") as alice,
                    native(base2, f"/gateway?token={bob_token}") as bob):
            assert alice.welcome["node"] == hub1.node and bob.welcome["node"] == two.hub.node
            await chat_join(alice, "lobby")
            await chat_join(bob, "lobby")
            await member_event(alice, "join", bob.conn_id)
            presence = await alice.request({"type": "presence", "channel": "chat/lobby"})
            assert {m["user"]: m["conn_id"] for m in presence["result"]["presence"].values()
                    } == {"alice": alice.conn_id, "bob": bob.conn_id}
            await bob.request({"type": "publish", "channel": "chat/lobby",
                               "data": {"text": "from node two"}})
            pub = await alice.next("publication")
            assert (pub["data"], pub["sender"]) == ({"text": "from node two"}, bob.conn_id)

            sent = await alice.request({"type": "send", "to": bob.conn_id,
                                        "data": {"text": "psst"}})
            assert sent["result"] == {"sent": 1}
            assert await bob.next("message") == {
                "type": "message", "from": alice.conn_id, "data": {"text": "psst"}}
            import httpx

            async with httpx.AsyncClient() as http:  # bob's node, alice's user
                response = await http.post(base2 + "/dm/alice", json={"text": "hey"},
                                           headers={"Authorization": f"Bearer {bob_token}"},
                                           timeout=TIMEOUT)
                assert response.status_code == 200
            assert await alice.next("message") == {
                "type": "message", "from": "bob", "data": {"text": "hey"}}
