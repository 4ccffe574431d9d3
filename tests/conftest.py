from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import ASGI_WS, DIRECT_WS, LEAN, running
from tidings import Hub


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with Hub() as h:
        yield h


@pytest.fixture(params=[LEAN, DIRECT_WS, ASGI_WS], ids=["lean", "direct", "asgi"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Hub, str]]:
    """A hub with default settings on a free port, served three ways: by tidings'
    own server (`tidings serve`), by uvicorn with the direct write path
    (`--server uvicorn`) and by uvicorn with plain ASGI sends (embedded)."""
    h = Hub()
    async with running(h, ws=request.param) as base:
        yield h, base
