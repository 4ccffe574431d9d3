"""``tidings.Hub``: the engine of :mod:`tidings.core.hub` with its endpoints.

:class:`~tidings.core.hub.HubCore` is everything a hub does (publish, send,
subscribe, presence, history, queues, the broker's callbacks) and knows no
route. This class adds the two ways an app puts it on the web, which need the
endpoints layer above the core: ``hub.router`` to mount and ``hub.accept`` for
a websocket of your own endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.routing import Router
from starlette.websockets import WebSocket

from tidings.core.connection import Connection, ConnectionKind
from tidings.core.hub import HubCore, HubStats, PermissionHook
from tidings.endpoints.native import serve_native, welcome_frame
from tidings.endpoints.router import build_router
from tidings.protocol.codes import CloseCode
from tidings.security.auth import Identity, select_subprotocol

__all__ = ["Hub", "HubStats", "PermissionHook"]

log = logging.getLogger("tidings.hub")


class Hub(HubCore):
    __doc__ = HubCore.__doc__

    _router: Router | None = None

    @property
    def router(self) -> Router:
        """Routes to mount: ``/ws``, the raw streams, ``/api/...``, ``/health``, ``/metrics``."""
        if self._router is None:
            self._router = build_router(self)
        return self._router

    @asynccontextmanager
    async def accept(
        self, ws: WebSocket, *, user: str | None = None, info: Any = None,
        identity: Identity | None = None,
    ) -> AsyncIterator[Connection]:
        """Accept a websocket in your own endpoint and get a hub connection.

        ``async for pub in conn`` yields the publications of its subscriptions;
        send to the client with ``conn.send_json``. The hub reads the socket
        for you: client frames are native-protocol commands (subscribe, ping,
        ...), and when the client goes away or the server shuts down the
        connection closes, which ends the ``async for`` (no hang on shutdown).
        ``identity`` (from :class:`tidings.security.auth.RequireIdentity`, say)
        gives the connection its user, token grants and expiry.
        """
        await ws.accept(subprotocol=select_subprotocol(ws.scope))
        conn = self.register(ws.send, kind=ConnectionKind.APP, user=user, info=info,
                             identity=identity)
        conn.send_frame(welcome_frame(self, conn))

        async def pump() -> None:
            try:
                await serve_native(self, conn, ws.receive)
            except Exception as exc:  # the socket failed under us
                log.debug("reader of %s ended: %r", conn.conn_id, exc)
            finally:
                conn.close(CloseCode.NORMAL)

        reader = asyncio.get_running_loop().create_task(pump())
        try:
            yield conn
        finally:
            conn.close(CloseCode.NORMAL)
            await conn.wait_closed(1.0)
            reader.cancel()
            await self.unregister(conn)
