"""``tidings serve``'s process settings, applied by the runner before serving."""

from __future__ import annotations

import asyncio
import gc
import resource
from collections.abc import Iterator
from typing import Any

import pytest

from tidings import Hub
from tidings.server import lean, runner
from tidings.server.runner import GC_THRESHOLDS, tune_gc


@pytest.fixture
def gc_restored() -> Iterator[None]:
    before = gc.get_threshold()
    files = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        resource.setrlimit(resource.RLIMIT_NOFILE, files)


def test_tune_gc_freezes_what_is_loaded_and_raises_the_young_threshold(gc_restored: None) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 1000  # the modules loaded by now, at least
    assert GC_THRESHOLDS[0] > 700  # above CPython's default


@pytest.mark.parametrize("server", ["tidings", "uvicorn"])
def test_serve_tunes_the_collector_and_file_limit_before_it_serves(server: str, gc_restored: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # as a login shell may leave it
    seen: dict[str, Any] = {}

    def serving(*args: Any, **kwargs: Any) -> None:
        for arg in args:  # uvicorn's serve() coroutine: not run here
            if asyncio.iscoroutine(arg):
                arg.close()
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        seen["files"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    monkeypatch.setattr(lean, "run", serving)
    monkeypatch.setattr(runner.asyncio, "run", serving)
    runner.run(Hub("memory://"), host="127.0.0.1", port=0, server=server)  # type: ignore[arg-type]
    assert seen["threshold"] == GC_THRESHOLDS
    assert seen["frozen"] > 0
    # every connection is a file: the soft limit goes up to the hard one
    assert seen["files"] == (runner.MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard)
