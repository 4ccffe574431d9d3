"""``tidings serve``'s process settings, applied by the runner before serving."""

from __future__ import annotations

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


def _unfrozen(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())  # frozen objects are in none


def _untuned() -> int:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # as a login shell may leave it
    return runner.MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard


def test_tidings_serve_tunes_the_collector_once_listening(gc_restored: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The file limit goes up before the app is built; the collector is tuned
    once it listens, so the app's own objects are frozen too."""
    raised = _untuned()
    seen: dict[str, Any] = {}

    def serving(app: Any, **kwargs: Any) -> None:
        seen["files"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert _unfrozen(app) and gc.get_threshold() == (700, 10, 10)  # not yet
        kwargs["ready"]()  # what lean.run calls once its sockets listen
        seen["app_frozen"] = not _unfrozen(app)
        seen["threshold"] = gc.get_threshold()

    monkeypatch.setattr(lean, "run", serving)
    runner.run(Hub("memory://"), host="127.0.0.1", port=0, server="tidings")
    assert seen == {"files": raised, "app_frozen": True, "threshold": GC_THRESHOLDS}


def test_uvicorn_serve_tunes_the_collector_once_started(gc_restored: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    raised = _untuned()
    seen: dict[str, Any] = {}

    async def main_loop(self: uvicorn.Server) -> None:  # started and listening: stop at once
        seen["files"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        seen["app_frozen"] = not _unfrozen(self.config.loaded_app)
        seen["threshold"] = gc.get_threshold()

    monkeypatch.setattr(uvicorn.Server, "main_loop", main_loop)
    runner.run(Hub("memory://"), host="127.0.0.1", port=0, server="uvicorn")
    assert seen == {"files": raised, "app_frozen": True, "threshold": GC_THRESHOLDS}
