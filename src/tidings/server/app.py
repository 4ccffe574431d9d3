"""The standalone ``tidings serve`` application: the hub's routes plus the demo page."""

from __future__ import annotations

from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route

from tidings.hub import Hub

__all__ = ["create_app"]


def _static(name: str) -> str:
    return resources.files("tidings.server").joinpath(f"static/{name}").read_text("utf-8")


def _demo_page() -> str:
    return _static("index.html")


def create_app(hub: Hub) -> Starlette:
    """An ASGI app serving ``hub`` at ``/`` with the demo page at ``/`` and the
    JavaScript client (the ESM build of clients/js) at ``/tidings-client.js``."""
    page = _demo_page()
    client_js = _static("tidings-client.js")

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def client(request: Request) -> Response:
        return Response(client_js, media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    return Starlette(
        routes=[Route("/", index, methods=["GET"]),
                Route("/tidings-client.js", client, methods=["GET"]),
                Mount("", app=hub.router)],
        lifespan=hub.lifespan,
    )
