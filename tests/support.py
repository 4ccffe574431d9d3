"""Helpers for tests that run a real server: free ports, in-process uvicorn, subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import orjson
import uvicorn
import websockets

from tidings import Hub
from tidings.server.app import create_app

TIMEOUT = 10.0
LEAN = "lean"  # tidings' own server: what `tidings serve` runs
DIRECT_WS = "tidings.server.wsproto:DirectWSProtocol"  # `tidings serve --server uvicorn`
ASGI_WS = "websockets-sansio"  # plain ASGI sends, as when embedded in any server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running(hub: Hub, app: Any = None, ws: str = LEAN,
                  deflate: bool = False) -> AsyncIterator[str]:
    """Serve ``hub`` (or ``app``) in this event loop with tidings' own server
    (``ws=LEAN``, as ``tidings serve``) or with uvicorn and the given websocket
    protocol (``deflate``: offering permessage-deflate, uvicorn's default);
    yield the base URL."""
    if ws == LEAN:
        async with lean_server(hub, app) as server:
            assert server.address is not None
            yield f"http://127.0.0.1:{server.address[1]}"
        return
    port = free_port()
    config = uvicorn.Config(
        app if app is not None else create_app(hub), host="127.0.0.1", port=port,
        log_level="warning", ws=ws, ws_per_message_deflate=deflate,
        lifespan="on", ws_max_size=hub.limits.frame_hard,
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server exited before starting")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)


@contextlib.asynccontextmanager
async def lean_server(hub: Hub, app: Any = None, **options: Any) -> AsyncIterator[Any]:
    """tidings' own server for ``hub`` (or ``app``) on a free port, as ``tidings
    serve`` runs it; ``options`` go to ``LeanServer`` (``ping_interval``, ...)."""
    from tidings.server.lean import LeanServer
    from tidings.server.runner import close_hub_connections, websocket_routes

    server = LeanServer(app if app is not None else create_app(hub),
                        ws_routes=websocket_routes(hub) if app is None else (),
                        max_size=hub.limits.frame_hard, **options)
    await server.startup()
    await server.listen("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.shutdown(partial(close_hub_connections, hub) if app is None else None,
                              TIMEOUT)


def ws_url(base: str, path: str = "/ws") -> str:
    return "ws://" + base.removeprefix("http://") + path


@contextlib.asynccontextmanager
async def native(base: str, path: str = "/ws") -> AsyncIterator[NativeClient]:
    async with websockets.connect(ws_url(base, path), max_size=None) as ws:
        client = NativeClient(ws)
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome"
        yield client


class NativeClient:
    """A bare websocket speaking the native protocol, for protocol-level tests."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self._next_id = 0

    @property
    def conn_id(self) -> str:
        return str(self.welcome["conn_id"])

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def request(self, frame: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send with a fresh id; return the reply/error/pong with that id (others are kept)."""
        self._next_id += 1
        rid = self._next_id
        await self.send({**frame, "id": rid})
        deadline = time.monotonic() + timeout
        while True:
            got = await self.recv(max(0.01, deadline - time.monotonic()))
            if got.get("id") == rid and got["type"] in ("reply", "error", "pong"):
                return got
            self.pending.append(got)

    async def subscribe(self, channel: str, recover: Any = None) -> dict[str, Any]:
        """Subscribe (with ``recover``, a position, if given); the reply's result."""
        frame: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if recover is not None:
            frame["recover"] = recover
        reply = await self.request(frame)
        assert reply["type"] == "reply", reply
        result: dict[str, Any] = reply["result"]
        return result

    @property
    def pending(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_pending"):
            self._pending: list[dict[str, Any]] = []
        return self._pending

    async def next(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame of type ``kind`` (pending frames first)."""
        for i, frame in enumerate(self.pending):
            if frame["type"] == kind:
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            got = await self.recv(max(0.01, deadline - time.monotonic()))
            if got["type"] == kind:
                return got
            self.pending.append(got)


def http_post(base: str, method: str, body: Any, headers: dict[str, str] | None = None
              ) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api/{method}", data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def apost(base: str, method: str, body: Any, headers: dict[str, str] | None = None
                ) -> tuple[int, Any]:
    return await asyncio.to_thread(http_post, base, method, body, headers)


class ServeProcess:
    """``tidings serve`` in a subprocess on a free port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidings.server.cli", "serve", "--port", str(self.port),
             "--log-level", "warning", *args],
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise RuntimeError(f"tidings serve exited with {self.proc.returncode}: {out}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError("tidings serve did not become healthy")
            time.sleep(0.05)

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout else ""


@contextlib.contextmanager
def serve_process(*args: str, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    proc = ServeProcess(*args, env=env)
    try:
        yield proc
    finally:
        proc.kill()
        if proc.proc.stdout:
            proc.proc.stdout.close()


def health_status(base: str) -> int:
    """The status ``GET {base}/health`` answers (503 while the broker is down)."""
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def wait_health(base: str, status: int, within: float = 20.0) -> float:
    """Poll ``/health`` until it answers ``status``; the seconds that took
    (TimeoutError after ``within``)."""
    started = time.monotonic()
    while (await asyncio.to_thread(health_status, base)) != status:
        if time.monotonic() - started > within:
            raise TimeoutError(f"/health did not answer {status} within {within} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def wait_until(predicate: Any, timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Wait for ``predicate()`` to hold, checking each 10 ms; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Sink:
    """An ASGI ``send`` that records frames; ``gate`` blocks writes (a stalled client)."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.changed = asyncio.Event()

    async def __call__(self, message: Any) -> None:
        await self.gate.wait()
        if message["type"] == "websocket.send":
            self.frames.append(orjson.loads(message.get("text") or message["bytes"]))
        else:
            self.frames.append(dict(message))
        self.changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not predicate(self.frames):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]
