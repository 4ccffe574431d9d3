"""tidings' own HTTP/1.1 and websocket server: what ``tidings serve`` runs.

uvicorn costs a websocket connection about 20 KiB of Python objects and every
incoming frame an ``asyncio.Queue`` hop plus the ``websockets`` state machine.
This server is one ``asyncio.Protocol`` object per connection (slots, no
buffers while idle) speaking just enough HTTP/1.1 for the API, the health and
metrics endpoints and the demo page, and RFC 6455 for the websockets, with
the sans-I/O pieces in :mod:`tidings.protocol.http` and
:mod:`tidings.protocol.frames`. Applications still see plain ASGI (``http``,
``websocket`` and ``lifespan`` scopes), so the hub, its endpoints and any
Starlette app run unchanged; websocket routes handed over as ``ws_routes``
are matched here directly, without the app's middleware and routing frames
staying alive for the connection's lifetime. Every websocket offers the
``tidings.direct`` extension (see :mod:`tidings.server.wsproto`): the hub
writes pre-built frames straight to the socket.

Incoming frames are parsed in ``data_received`` and handed to the app's
``receive`` from a deque: a burst of frames is read by the endpoint in one
task step, without an event-loop turn per frame. Reading pauses while more
than 64 messages wait. One server-wide timer pings idle websockets every
``ping_interval`` seconds and closes with 1011 those that left a ping
unanswered for a whole interval; it also closes HTTP connections that stay
silent (idle keep-alive, a stalled request) for ``http_idle`` seconds. The
connection itself is :class:`tidings.server.peer.Peer`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tidings.server.peer import (
    ASGI_VERSION,
    EXTENSION,
    ASGIApp,
    ClientDisconnected,
    Message,
    Peer,
)

__all__ = ["EXTENSION", "ClientDisconnected", "LeanServer", "bind_listeners", "loop_factory",
           "run"]

log = logging.getLogger("tidings.server")


def bind_listeners(host: str | None, port: int, backlog: int = 4096) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as
    ``loop.create_server(host, port)`` binds), resolved and bound in this thread.
    uvloop would resolve through libuv's thread pool, whose four threads then
    stay for the life of the process, and a process with threads pays more for
    every system call on a socket (its file table is shared: each call takes
    and drops a reference atomically): about 4 % of a ``write``, measured."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # one socket per family, as asyncio binds
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class LeanServer:
    """Serves an ASGI ``app``; see the module docstring."""

    def __init__(self, app: ASGIApp, *, ws_routes: Sequence[Any] = (),
                 max_size: int = 1 << 20, max_body: int = 16 << 20,
                 ping_interval: float | None = 20.0, http_idle: float = 10.0) -> None:
        self.app = app
        self.ws_routes = list(ws_routes)
        self.max_size = max_size
        self.max_body = max_body
        self.ping_interval = ping_interval
        # one timer for every connection: HTTP ones idle for a tick (http_idle / 2
        # to http_idle seconds) close, websockets get a ping check every few ticks
        self.tick = min(ping_interval or http_idle, http_idle / 2)
        self._ping_every = max(1, round((ping_interval or 0) / self.tick))
        self._ticks = 0
        self.peers: set[Peer] = set()
        self.state: dict[str, Any] = {}
        self.address: tuple[str, int] | None = None
        self.servers: list[asyncio.Server] = []
        self._lifespan: asyncio.Task[None] | None = None
        self._lifespan_in: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan_out: asyncio.Queue[Message] = asyncio.Queue()
        self._ticker: asyncio.TimerHandle | None = None
        # the loop it serves on, kept: asyncio.get_running_loop() costs a getpid()
        # system call on CPython 3.11 (its fork check)
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- lifespan ----------------------------------------------------------------

    async def _lifespan_step(self, event: str) -> None:
        if self._lifespan is None or self._lifespan.done():
            return
        await self._lifespan_in.put({"type": f"lifespan.{event}"})
        getter = asyncio.ensure_future(self._lifespan_out.get())
        done, _ = await asyncio.wait({getter, self._lifespan},
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            if event == "startup":
                self._lifespan.result()  # raises what the app raised
                raise RuntimeError("the app ended its lifespan during startup")
            return
        answer = getter.result()
        if answer["type"].endswith(".failed"):
            raise RuntimeError(f"lifespan {event} failed: {answer.get('message', '')}")

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}

        async def send(message: Message) -> None:
            await self._lifespan_out.put(message)

        self._lifespan = asyncio.get_running_loop().create_task(
            self.app(scope, self._lifespan_in.get, send))  # type: ignore[arg-type]
        await self._lifespan_step("startup")

    async def shutdown_app(self) -> None:
        await self._lifespan_step("shutdown")

    # -- sockets -----------------------------------------------------------------

    async def listen(self, host: str = "127.0.0.1", port: int = 8000,
                     sockets: Sequence[socket.socket] | None = None) -> None:
        loop = self.loop = asyncio.get_running_loop()
        if sockets:
            for sock in sockets:
                self.servers.append(await loop.create_server(
                    lambda: Peer(self), sock=sock, backlog=4096))
        else:
            for sock in bind_listeners(host, port):
                self.servers.append(await loop.create_server(
                    lambda: Peer(self), sock=sock, backlog=4096))
        name = self.servers[0].sockets[0].getsockname()
        self.address = (str(name[0]), int(name[1]))
        self._ticker = loop.call_later(self.tick, self._tick)

    def _tick(self) -> None:
        self._ticks += 1
        ping = bool(self.ping_interval) and self._ticks % self._ping_every == 0
        for peer in list(self.peers):
            peer.tick(ping)
        self._ticker = (self.loop or asyncio.get_running_loop()).call_later(self.tick,
                                                                          self._tick)

    def stop_listening(self) -> None:
        for server in self.servers:
            server.close()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def shutdown(self, before_close: Callable[[], Awaitable[None]] | None = None,
                       timeout: float = 2.0) -> None:
        """Stop listening; ``before_close`` (the hub closes its websockets with
        1001 there); let running requests finish, at most ``timeout`` seconds;
        drop what is left; end the app's lifespan (if :meth:`startup` ran it)."""
        self.stop_listening()
        if before_close is not None:
            await before_close()
        await self.close_peers(timeout)
        await self.shutdown_app()

    async def close_peers(self, timeout: float) -> None:
        """Let running requests finish (bounded), then drop every connection."""
        tasks = [p.task for p in self.peers if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for peer in list(self.peers):
            if peer.task is not None:
                peer.task.cancel()
            peer.transport.close()
        for server in self.servers:
            await server.wait_closed()


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run: ``uvloop`` (``auto`` picks it when it is installed,
    as uvicorn does) or the standard ``asyncio`` one (None)."""
    if loop not in ("auto", "asyncio", "uvloop"):
        raise ValueError(f"unknown loop {loop!r}: auto, asyncio or uvloop")
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ValueError("loop 'uvloop' needs uvloop: pip install 'tidings[uvloop]'"
                             ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(app: ASGIApp, *, host: str, port: int, ws_routes: Sequence[Any] = (),
        max_size: int = 1 << 20, sockets: Sequence[socket.socket] | None = None,
        before_close: Callable[[], Awaitable[None]] | None = None,
        loop: str = "auto", ready: Callable[[], None] | None = None) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down cleanly (exit status 0).

    ``before_close`` runs after the listening sockets close and before open
    connections are dropped (the hub closes its websockets with 1001 there);
    ``ready`` once the app has started and the sockets listen.
    """
    factory = loop_factory(loop)

    async def main() -> None:
        server = LeanServer(app, ws_routes=ws_routes, max_size=max_size)
        await server.startup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.listen(host, port, sockets)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", host, port, exc)
            await server.shutdown_app()
            raise SystemExit(1) from None
        assert server.address is not None
        if ready is not None:
            ready()
        log.info("tidings serving on http://%s:%d (%s loop)", *server.address,
                 type(asyncio.get_running_loop()).__module__.split(".")[0])
        await stop.wait()
        log.info("shutting down")
        await server.shutdown(before_close)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
