"""Every route of a hub: the websocket endpoints, the HTTP API, health, metrics,
and the AsyncAPI document of the protocol and the app's typed channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Route, Router, WebSocketRoute

from tidings.endpoints.centrifuge import CentrifugeEndpoint
from tidings.endpoints.http_api import api_endpoint, health_endpoint
from tidings.endpoints.metrics import metrics_endpoint
from tidings.endpoints.native import NativeEndpoint
from tidings.endpoints.schema import asyncapi_endpoint, docs_endpoint
from tidings.endpoints.streams import PubEndpoint, PullEndpoint, PushEndpoint, SubEndpoint

if TYPE_CHECKING:
    from tidings.core.hub import HubCore

__all__ = ["build_router"]


def build_router(hub: HubCore) -> Router:
    """Every route of a hub, flat. A FastAPI ``APIRouter`` when FastAPI is
    installed (``app.include_router(hub.router, prefix=...)``), else a Starlette
    ``Router``; both mount with Starlette's ``Mount(prefix, app=hub.router)``."""
    routes: list[BaseRoute] = [
        WebSocketRoute("/ws", NativeEndpoint(hub), name="tidings_ws"),
        WebSocketRoute("/ws/pub/{channel:path}", PubEndpoint(hub), name="tidings_pub"),
        WebSocketRoute("/ws/sub/{pattern:path}", SubEndpoint(hub), name="tidings_sub"),
        WebSocketRoute("/ws/push/{queue:path}", PushEndpoint(hub), name="tidings_push"),
        WebSocketRoute("/ws/pull/{queue:path}", PullEndpoint(hub), name="tidings_pull"),
        WebSocketRoute("/connection/websocket", CentrifugeEndpoint(hub),
                       name="tidings_centrifuge"),
        Route("/api/{method}", api_endpoint(hub), methods=["POST"], name="tidings_api"),
        Route("/health", health_endpoint(hub), methods=["GET"], name="tidings_health"),
        Route("/metrics", metrics_endpoint(hub), methods=["GET"], name="tidings_metrics"),
        Route("/asyncapi.json", asyncapi_endpoint(hub), methods=["GET"],
              name="tidings_asyncapi"),
        Route("/asyncapi", docs_endpoint(), methods=["GET"], name="tidings_docs"),
    ]
    try:  # FastAPI's include_router wants its own router class
        from fastapi import APIRouter
    except ImportError:
        return Router(routes=routes)
    return APIRouter(routes=routes)
