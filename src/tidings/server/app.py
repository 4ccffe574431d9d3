"""The standalone ``tidings serve`` application: the hub's routes plus the demo page."""

from __future__ import annotations

from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route

from tidings.hub import Hub

__all__ = ["create_app"]


def _demo_page() -> str:
    return resources.files("tidings.server").joinpath("static/index.html").read_text("utf-8")


def create_app(hub: Hub) -> Starlette:
    """An ASGI app serving ``hub`` at ``/`` with the demo page at ``/``."""
    page = _demo_page()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    return Starlette(
        routes=[Route("/", index, methods=["GET"]), Mount("", app=hub.router)],
        lifespan=hub.lifespan,
    )
