from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import ASGI_WS, DIRECT_WS, running
from tidings import Hub


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with Hub() as h:
        yield h


@pytest.fixture(params=[DIRECT_WS, ASGI_WS], ids=["direct", "asgi"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Hub, str]]:
    """A hub with default settings served by uvicorn on a free port, once with the
    direct write path of `tidings serve` and once with plain ASGI sends."""
    h = Hub()
    async with running(h, ws=request.param) as base:
        yield h, base
