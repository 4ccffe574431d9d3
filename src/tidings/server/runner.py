"""The one seam where ``tidings serve`` picks its server.

The default is tidings' own HTTP/1.1 + websocket server
(:mod:`tidings.server.lean`); ``server="uvicorn"`` runs uvicorn with the
direct write path of :mod:`tidings.server.wsproto` instead. The hub and the
protocol code do not know which one runs them: both speak ASGI and offer the
``tidings.direct`` extension.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from types import FrameType
from typing import Any, Literal

from tidings.hub import Hub
from tidings.protocol.codes import CloseCode
from tidings.server.app import create_app

__all__ = ["GC_THRESHOLDS", "MAX_OPEN_FILES", "SERVERS", "prepare_process", "raise_open_files",
           "run", "tune_gc"]

log = logging.getLogger("tidings.server")

SERVERS = ("tidings", "uvicorn")
ServerName = Literal["tidings", "uvicorn"]
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """The garbage collector's settings for a long-running server process, applied
    once it is listening (its app built and started).

    Everything loaded by now (modules, the app, the hub, the started broker) is
    frozen out of every later collection, so a full collection no longer walks it; and young objects
    are collected after 20,000 net allocations instead of 700, so the objects
    of publishes in flight (a Redis round trip) mostly die young instead of
    being promoted and scanned again. Measured with a Redis broker and a fast
    producer: the collector took about a third of the server's CPU before
    (full collections of ~40 ms each), under 2 % after. Reference counting
    still frees nearly everything at once; only cycles wait a little longer.
    It runs once the server listens: frozen before the app was built, the
    app's own objects (some 19,000, the HTTP API's pydantic models among them)
    were left to every full collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


MAX_OPEN_FILES = 1 << 20  # Linux's default fs.nr_open


def raise_open_files() -> int:
    """Raise this process's soft limit of open files to its hard limit, as Go
    programs and nginx do: every connection is a file, and with the usual soft
    limit of 1,024 the 1,025th client would be refused. Returns the soft limit
    now in force (unchanged where it cannot be raised)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files limit stays at %d: %s", soft, exc)
            return soft
        soft = target
    log.info("open files limit: %d", soft)
    return soft


def prepare_process() -> None:
    """What ``tidings serve`` sets up in its process before it builds its app
    (the collector is tuned later, once it listens: :func:`tune_gc`)."""
    raise_open_files()


def websocket_routes(hub: Hub) -> list[Any]:
    """The hub's websocket routes, which the lean server matches itself."""
    from starlette.routing import WebSocketRoute

    return [route for route in hub.router.routes if isinstance(route, WebSocketRoute)]


async def close_hub_connections(hub: Hub) -> None:
    """Shutdown, once no new connection comes in: websockets get 1001 first."""
    hub.queues.close()
    await hub.close_all(CloseCode.GOING_AWAY, "server shutting down", timeout=1.5)


def run(hub: Hub, *, host: str, port: int, log_level: str = "info",
        sockets: Any = None, server: ServerName = "tidings", loop: str = "auto") -> None:
    """Serve ``hub`` (with the demo page) until SIGINT/SIGTERM; exit status 0.
    ``loop``: auto (uvloop when installed), asyncio or uvloop."""
    if server == "uvicorn":
        _run_uvicorn(hub, host=host, port=port, log_level=log_level, sockets=sockets,
                     loop=loop)
        return
    if server != "tidings":
        raise ValueError(f"unknown server {server!r}: one of {', '.join(SERVERS)}")
    from tidings.server import lean

    prepare_process()
    lean.run(create_app(hub), host=host, port=port, ws_routes=websocket_routes(hub),
             max_size=hub.limits.frame_hard, sockets=sockets,
             before_close=lambda: close_hub_connections(hub), loop=loop, ready=tune_gc)


def _run_uvicorn(hub: Hub, *, host: str, port: int, log_level: str, sockets: Any,
                 loop: str) -> None:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn, plus: close websockets with 1001 first, exit 0 on SIGTERM/SIGINT."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after shutdown, which would turn a
            # clean stop into "killed by SIGTERM"; the SPEC wants exit status 0.
            self._captured_signals.clear()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                tune_gc()

        async def shutdown(self, sockets: Any = None) -> None:
            for listener in self.servers:  # stop accepting before closing the others
                listener.close()
            await close_hub_connections(hub)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        create_app(hub),
        host=host,
        port=port,
        log_level=log_level,
        ws="tidings.server.wsproto:DirectWSProtocol",
        ws_max_size=hub.limits.frame_hard,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
        loop=loop,
    )
    prepare_process()
    asyncio.run(_Server(config).serve(sockets=sockets))
