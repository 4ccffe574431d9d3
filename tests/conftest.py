from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import running
from tidings import Hub


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with Hub() as h:
        yield h


@pytest.fixture
async def server() -> AsyncIterator[tuple[Hub, str]]:
    """A hub with default settings served by uvicorn on a free port."""
    h = Hub()
    async with running(h) as base:
        yield h, base
