"""Authentication, permissions, origins and connection limits over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI, WebSocket
from websockets.exceptions import InvalidStatus

from tests.support import NativeClient, apost, running, ws_url
from tidings import Hub, Limits
from tidings.core.permissions import Rule
from tidings.security.auth import (
    Identity,
    JWTAuth,
    RequireIdentity,
    WebSocketTokenBearer,
    encode_jwt,
)

SECRET = "test-secret-0123456789"


def token(sub: str = "alice", *, key: Any = SECRET, alg: str = "HS256", ttl: float = 60,
          **claims: Any) -> str:
    return encode_jwt({"sub": sub, "exp": time.time() + ttl, **claims}, key, alg)


def auth_hub(**kwargs: Any) -> Hub:
    limits = kwargs.pop("limits", Limits(auth_timeout=0.5))
    return Hub(auth=kwargs.pop("auth", JWTAuth(SECRET, leeway=0)), limits=limits, **kwargs)


@asynccontextmanager
async def client(base: str, tok: str | None = None, *, path: str = "/ws",
                 **kwargs: Any) -> AsyncIterator[NativeClient]:
    url = ws_url(base, path) + (f"?token={tok}" if tok else "")
    async with websockets.connect(url, max_size=None, **kwargs) as ws:
        c = NativeClient(ws)
        c.welcome = await c.recv()
        assert c.welcome["type"] == "welcome", c.welcome
        yield c


async def refused_at_handshake(base: str, tok: str | None = None, **kwargs: Any) -> int:
    url = ws_url(base) + (f"?token={tok}" if tok else "")
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, **kwargs):
            pass
    return info.value.response.status_code


async def closed_with(ws: Any) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


async def test_valid_token_by_query_header_and_subprotocol() -> None:
    async with running(auth_hub()) as base:
        async with client(base, token("alice")) as c:
            assert c.welcome["user"] == "alice"
            assert (await c.request({"type": "ping"}))["type"] == "pong"
        headers = {"Authorization": f"Bearer {token('bob')}"}
        async with client(base, additional_headers=headers) as c:
            assert c.welcome["user"] == "bob"
        protos: Any = ["tidings", f"token.{token('carol')}"]
        async with client(base, subprotocols=protos) as c:
            assert c.welcome["user"] == "carol"
            assert c.ws.subprotocol == "tidings"


async def test_bad_tokens_are_refused_with_403() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    payload = encode_jwt({"sub": "x", "exp": time.time() + 60}, SECRET).split(".")[1]
    none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + payload + "."  # {"alg":"none"}
    hub = auth_hub()
    async with running(hub) as base:
        for bad in (token(ttl=-30), token(key="wrong-secret"), none,
                    token(key=rsa_key, alg="RS256"), "garbage"):
            assert await refused_at_handshake(base, bad) == 403
        assert hub.stats.refusals["auth_invalid"] == 5
        assert not hub.connections


async def test_no_token_first_frame_deadline_and_wrong_first_frame() -> None:
    async with running(auth_hub()) as base:
        async with websockets.connect(ws_url(base)) as ws:  # silent: closed after 0.5 s
            started = time.monotonic()
            assert await closed_with(ws) == (1008, "authentication timeout")
            assert 0.4 < time.monotonic() - started < 5
        async with websockets.connect(ws_url(base)) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            assert await closed_with(ws) == (1008, "expected a connect frame")
        async with websockets.connect(ws_url(base)) as ws:
            await ws.send(json.dumps({"type": "connect", "token": token(ttl=-30)}))
            assert await closed_with(ws) == (1008, "authentication failed: token expired")


async def test_first_frame_connect() -> None:
    async with running(auth_hub()) as base, websockets.connect(ws_url(base)) as ws:
        await ws.send(json.dumps({"type": "connect", "id": 7, "token": token("dave")}))
        welcome = json.loads(await ws.recv())
        assert (welcome["type"], welcome["user"]) == ("welcome", "dave")
        reply = json.loads(await ws.recv())
        assert reply == {"type": "reply", "id": 7,
                         "result": {"conn_id": welcome["conn_id"], "user": "dave"}}


async def test_rs256_and_es256_public_keys() -> None:
    for alg, key in (("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                     ("ES256", ec.generate_private_key(ec.SECP256R1()))):
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        hub = auth_hub(auth=JWTAuth(public_key=public, algorithm=alg))
        async with running(hub) as base:
            async with client(base, token("erin", key=key, alg=alg)) as c:
                assert c.welcome["user"] == "erin"
            assert await refused_at_handshake(base, token("erin")) == 403  # HS256 against it


async def test_channels_claim_limits_subscriptions_and_grants_publish() -> None:
    async with running(auth_hub()) as base, \
            client(base, token("alice", channels=["public/#"])) as c:
        denied = await c.request({"type": "subscribe", "channel": "private/x"})
        assert (denied["type"], denied["code"]) == ("error", "forbidden")
        assert (await c.request({"type": "subscribe", "channel": "public/x"}))["type"] == "reply"
        pub = await c.request({"type": "publish", "channel": "public/x", "data": 1})
        assert pub["type"] == "reply"
        assert (await c.next("publication"))["data"] == 1
        no = await c.request({"type": "publish", "channel": "private/x", "data": 1})
        assert no["code"] == "forbidden"
        assert (await c.request({"type": "ping"}))["type"] == "pong"  # still open


async def test_defaults_private_channels_wildcards_and_publish() -> None:
    async with running(auth_hub(admins=["root"])) as base, \
            client(base, token("alice")) as alice, client(base, token("root")) as root:
        for pattern in ("user/bob/#", "user/+/inbox", "user/#", "#", "+/x", "$sys/x"):
            got = await alice.request({"type": "subscribe", "channel": pattern})
            assert got.get("code") == "forbidden", (pattern, got)
        for kind in ("presence", "history"):
            got = await alice.request({"type": kind, "channel": "user/bob/inbox"})
            assert got.get("code") == "forbidden", kind
        ok = await alice.request({"type": "subscribe", "channel": "user/alice/#"})
        assert ok["type"] == "reply"
        assert (await alice.request({"type": "subscribe", "channel": "chat/+"}))["type"] == "reply"
        no = await alice.request({"type": "publish", "channel": "chat/a", "data": 1})
        assert no["code"] == "forbidden"  # publishing needs a rule or a claim
        assert (await root.request({"type": "subscribe", "channel": "#"}))["type"] == "reply"
        assert (await root.request({"type": "publish", "channel": "chat/a", "data": 1}))[
            "type"] == "reply"
        dollar = await root.request({"type": "publish", "channel": "$sys/a", "data": 1})
        assert dollar["code"] == "forbidden"  # the server's, even for admins


async def test_rules_and_hooks() -> None:
    rules = [Rule("chat/#", subscribe=["authenticated"], publish=["authenticated"]),
             Rule("news/#", subscribe=["*"], publish=["editor"]),
             Rule("secret/#", subscribe=[])]

    async def can_history(conn: Any, channel: str) -> bool | None:
        return False if channel.startswith("chat/") else None

    hub = auth_hub(rules=rules, can_history=can_history)
    async with running(hub) as base, client(base, token("alice")) as alice, \
            client(base, token("editor")) as editor:
        assert (await alice.request({"type": "publish", "channel": "chat/r", "data": 1}))[
            "type"] == "reply"
        assert (await alice.request({"type": "publish", "channel": "news/x", "data": 1}))[
            "code"] == "forbidden"
        assert (await editor.request({"type": "publish", "channel": "news/x", "data": 1}))[
            "type"] == "reply"
        assert (await alice.request({"type": "subscribe", "channel": "secret/a"}))[
            "code"] == "forbidden"
        assert (await alice.request({"type": "history", "channel": "chat/r"}))[
            "code"] == "forbidden"
        assert (await alice.request({"type": "history", "channel": "news/x"}))[
            "type"] == "reply"


async def test_hook_errors_are_internal_or_handled() -> None:
    class RoomClosed(Exception):
        pass

    def can_subscribe(conn: Any, pattern: str) -> bool:
        if pattern == "closed":
            raise RoomClosed(pattern)
        if pattern == "boom":
            raise RuntimeError("bug in the hook")
        return True

    hub = Hub(can_subscribe=can_subscribe)
    seen: list[str] = []

    @hub.on_error(RoomClosed)
    async def closed_room(exc: RoomClosed, ctx: Any) -> bool:
        seen.append(f"{ctx.hook}:{ctx.name}")
        return False

    async with running(hub) as base, client(base) as c:
        assert (await c.request({"type": "subscribe", "channel": "closed"}))[
            "code"] == "forbidden"
        boom = await c.request({"type": "subscribe", "channel": "boom"})
        assert (boom["code"], boom["message"]) == ("internal", "internal error")
        assert "Traceback" not in json.dumps(boom)
        assert (await c.request({"type": "subscribe", "channel": "open"}))["type"] == "reply"
        assert seen == ["can_subscribe:closed"]
        assert hub.running


async def test_refresh_extends_and_expiry_closes() -> None:
    async with running(auth_hub()) as base:
        async with client(base, token("alice", ttl=1.0)) as c:
            got = await c.request({"type": "refresh", "token": token("alice", ttl=60)})
            assert got["type"] == "reply" and got["result"]["user"] == "alice"
            other = await c.request({"type": "refresh", "token": token("mallory")})
            assert other["code"] == "forbidden"
            await asyncio.sleep(1.5)
            assert (await c.request({"type": "ping"}))["type"] == "pong"  # still open
        async with client(base, token("alice", ttl=1.0)) as c:
            started = time.monotonic()
            assert await closed_with(c.ws) == (1008, "token expired")
            assert time.monotonic() - started < 5


async def test_foreign_origin_is_refused() -> None:
    hub = Hub(allowed_origins=["https://app.example.com"])
    async with running(hub) as base:
        assert await refused_at_handshake(base, origin="https://evil.example.net") == 403
        async with client(base, origin="https://app.example.com") as c:
            assert c.welcome["type"] == "welcome"
        async with client(base) as c:  # no Origin: not a browser
            assert c.welcome["type"] == "welcome"
        assert hub.stats.refusals["origin"] == 1


async def test_connections_per_user_and_per_ip() -> None:
    hub = auth_hub(limits=Limits(max_connections_per_user=2, auth_timeout=1))
    async with running(hub) as base, client(base, token("alice")), client(base, token("alice")):
        async with websockets.connect(ws_url(base) + f"?token={token('alice')}") as ws:
            assert await closed_with(ws) == (1008, "too many connections")
        async with client(base, token("bob")) as bob:  # other users are not affected
            assert bob.welcome["user"] == "bob"
    hub = Hub(limits=Limits(max_connections_per_ip=1))
    async with running(hub) as base, client(base):
        async with websockets.connect(ws_url(base)) as ws:
            assert await closed_with(ws) == (1008, "too many connections")
        assert hub.stats.refusals["connections_per_ip"] == 1


async def test_raw_streams_need_auth_and_permission() -> None:
    async with running(auth_hub()) as base:
        url = ws_url(base, "/ws/sub/user/bob/%23") + f"?token={token('alice')}"
        async with websockets.connect(url) as ws:
            code, reason = await closed_with(ws)
            assert code == 1008 and "private" in reason
        async with websockets.connect(ws_url(base, "/ws/sub/news")) as ws:
            assert (await closed_with(ws))[0] == 1008  # no token: deadline
        assert await refused_at_handshake(base, "garbage") == 403


async def test_api_keys_admin_and_publish_only() -> None:
    hub = Hub(api_key="admin-key-123", api_key_publish="pub-key-456")
    async with running(hub) as base:
        pub = {"X-API-Key": "pub-key-456"}
        status, body = await apost(base, "publish", {"channel": "a", "data": 1}, pub)
        assert status == 200 and "result" in body
        status, body = await apost(base, "info", {}, pub)
        assert status == 403 and body["error"]["code"] == 103
        status, body = await apost(base, "batch", {"commands": [
            {"publish": {"channel": "a", "data": 2}}, {"disconnect": {"user": "x"}}]}, pub)
        assert status == 200
        assert "publish" in body["replies"][0] and body["replies"][1]["error"]["code"] == 103
        status, _ = await apost(base, "info", {}, {"Authorization": "apikey admin-key-123"})
        assert status == 200
        status, _ = await apost(base, "publish", {"channel": "a", "data": 1},
                                {"X-API-Key": "nope"})
        assert status == 401
        text = await asyncio.to_thread(_get, base + "/metrics")
        assert 'tidings_refusals_total{reason="api_key"} 1.0' in text
        assert 'tidings_limit{name="frame_hard"} 1.048576e+06' in text


async def test_fastapi_dependencies_in_a_websocket_route() -> None:
    """As docs/security.md shows them: FastAPI injects the socket (they once
    asked for a query parameter named ``websocket`` and refused every client;
    the routes' annotations are resolved in this module's globals)."""
    app = FastAPI()

    @app.websocket("/token")
    async def raw(ws: WebSocket, tok: Annotated[str, Depends(WebSocketTokenBearer())]) -> None:
        await ws.accept()
        await ws.send_text(tok)

    @app.websocket("/who")
    async def who(ws: WebSocket,
                  ident: Annotated[Identity, Depends(RequireIdentity(JWTAuth(SECRET)))]) -> None:
        await ws.accept()
        await ws.send_text(ident.user or "")

    async with running(Hub(), app) as base:
        tok = token("zoe")
        for path, expected in (("/token", tok), ("/who", "zoe")):
            async with websockets.connect(ws_url(base, path) + f"?token={tok}") as ws:
                assert await asyncio.wait_for(ws.recv(), 5) == expected
        for path in ("/token", "/who", "/who?token=nope"):
            with pytest.raises(InvalidStatus) as info:
                async with websockets.connect(ws_url(base, path)):
                    pass
            assert info.value.response.status_code == 403, path


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_serve_with_jwt_secret_end_to_end(tmp_path: Any) -> None:
    from tests.support import serve_process

    config = tmp_path / "tidings.toml"
    config.write_text('[[permissions]]\npattern = "chat/#"\npublish = ["authenticated"]\n')
    with serve_process("--jwt-secret", SECRET, "--api-key", "admin-key-xyz",
                       "--config", str(config), "--log-level", "info") as server:
        tok = token("alice")

        async def scenario() -> None:
            async with client(server.base, tok) as c:
                assert c.welcome["user"] == "alice"
                assert (await c.request({"type": "subscribe", "channel": "chat/a"}))[
                    "type"] == "reply"
                got = await c.request({"type": "publish", "channel": "chat/a", "data": "hi"})
                assert got["type"] == "reply", got
                assert (await c.request({"type": "publish", "channel": "news", "data": 1}))[
                    "code"] == "forbidden"
            assert await refused_at_handshake(server.base, token(key="nope")) == 403
            async with websockets.connect(ws_url(server.base)) as ws:
                await ws.send(json.dumps({"type": "connect", "token": "bad"}))
                assert (await closed_with(ws))[0] == 1008

        asyncio.run(scenario())
        assert server.terminate() == 0
        out = server.output()
    assert "WebSocket /ws?token=***" in out, out  # the access log line, with the token masked
    assert tok not in out and tok.split(".")[2] not in out
    assert "admin-key-xyz" not in out
