"""``WebSocketProxy``: forward a client websocket to an upstream one (an API gateway).

::

    @app.websocket("/ws")
    async def gateway(ws: WebSocket):
        await WebSocketProxy(ws, "ws://realtime:8000/ws")()

The upstream is connected before the client is accepted, so the client gets
the subprotocol the upstream chose among those it asked for (forwarded in the
upstream handshake), and the client's query string is appended to the
upstream URL (``?token=...`` reaches the upstream; ``forward_query=False``
keeps it back). Both directions are then pumped concurrently; text stays text
and binary stays binary; when either side closes, the other is closed with
the same code and reason (1011 if the upstream cannot be reached or refuses
the handshake, with the reason saying which; 1006-like drops become 1011 /
1001). Nothing is buffered beyond the websockets library's own bounded
queue, so a slow side slows the forwarding instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from tidings.protocol.codes import CloseCode

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

__all__ = ["WebSocketProxy"]

log = logging.getLogger("tidings.endpoints.proxy")

_RESERVED = {1005, 1006, 1015}  # codes that may not be sent in a close frame


def _sendable(code: int | None, fallback: int) -> int:
    if code is None or code in _RESERVED or not (1000 <= code < 5000):
        return fallback
    return code


class WebSocketProxy:
    """Forward ``client`` (a Starlette/FastAPI websocket) to ``upstream`` (a ws URL).

    ``headers`` are sent to the upstream in its handshake (e.g. an
    ``Authorization`` the gateway adds), with the subprotocols the client
    asked for; the client's query string is appended to ``upstream`` unless
    ``forward_query`` is false. The client is accepted once the upstream is
    connected, with the upstream's subprotocol, if the app did not accept it
    already: its handshake waits for the upstream's (``open_timeout`` at the
    most; keep it below your clients' own handshake timeouts). Awaiting the
    proxy returns when both sides are closed.
    """

    def __init__(self, client: WebSocket, upstream: str, *,
                 headers: Mapping[str, str] | None = None, open_timeout: float = 10.0,
                 forward_query: bool = True) -> None:
        self.client = client
        self.upstream = upstream
        self.headers = dict(headers or {})
        self.open_timeout = open_timeout
        self.forward_query = forward_query

    def upstream_url(self) -> str:
        """``upstream`` with the client's query string (when forwarded) appended."""
        query = self.client.scope.get("query_string", b"").decode("latin-1")
        if not self.forward_query or not query:
            return self.upstream
        base, _, fragment = self.upstream.partition("#")
        joined = f"{base}{'&' if '?' in base else '?'}{query}"
        return f"{joined}#{fragment}" if fragment else joined

    async def __call__(self) -> None:
        from starlette.websockets import WebSocketState

        unaccepted = self.client.client_state is WebSocketState.CONNECTING
        asked = list(self.client.scope.get("subprotocols") or ()) if unaccepted else []
        url = self.upstream_url()
        try:
            upstream = await websockets.connect(
                url, additional_headers=self.headers, open_timeout=self.open_timeout,
                max_size=None, subprotocols=asked or None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            log.warning("proxy: cannot reach %s: %s", self.upstream, exc)
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if unaccepted:
                await self.client.accept()
            await self._close_client(CloseCode.INTERNAL_ERROR,
                                     f"upstream refused: HTTP {status}" if status
                                     else "upstream unavailable")
            return
        if unaccepted:
            await self.client.accept(subprotocol=upstream.subprotocol)
        async with upstream:
            to_upstream = asyncio.create_task(self._client_to_upstream(upstream))
            to_client = asyncio.create_task(self._upstream_to_client(upstream))
            done, pending = await asyncio.wait({to_upstream, to_client},
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in done:
                task.result()  # surface a bug, not a closed socket (those return)

    async def _client_to_upstream(self, upstream: ClientConnection) -> None:
        while True:
            message = await self.client.receive()
            if message["type"] == "websocket.disconnect":
                code = _sendable(message.get("code"), CloseCode.GOING_AWAY)
                await upstream.close(code, message.get("reason") or "")
                return
            try:
                if message.get("text") is not None:
                    await upstream.send(message["text"])
                elif message.get("bytes") is not None:
                    await upstream.send(message["bytes"])
            except ConnectionClosed:
                await self._close_client(*self._upstream_close(upstream))
                return

    async def _upstream_to_client(self, upstream: ClientConnection) -> None:
        try:
            async for data in upstream:
                if isinstance(data, bytes):
                    await self.client.send_bytes(data)
                else:
                    await self.client.send_text(data)
        except ConnectionClosed:
            pass
        await self._close_client(*self._upstream_close(upstream))

    @staticmethod
    def _upstream_close(upstream: ClientConnection) -> tuple[int, str]:
        received = upstream.protocol.close_rcvd
        if received is None:  # dropped without a close frame
            return CloseCode.INTERNAL_ERROR, "upstream connection lost"
        return _sendable(received.code, CloseCode.NORMAL), received.reason

    async def _close_client(self, code: int, reason: str) -> None:
        from starlette.websockets import WebSocketDisconnect

        # already closed: Starlette raises RuntimeError, or WebSocketDisconnect when
        # the server says the client is gone (uvicorn's wsproto and websockets-sansio)
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await self.client.close(code, reason)
