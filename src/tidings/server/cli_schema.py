"""``tidings asyncapi`` and ``tidings typescript`` (SPEC 4): print the protocol's
schemas and, with ``--app module:hub``, the app's typed channels beside them
(:mod:`tidings.endpoints.schema`)."""

from __future__ import annotations

import importlib
import json

from tidings.endpoints.schema import app_asyncapi, app_typescript
from tidings.hub import Hub

__all__ = ["load_hub", "print_asyncapi", "print_typescript"]


def load_hub(spec: str) -> Hub:
    """The hub named by ``module:attribute`` (as uvicorn names an app)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--app wants module:attribute (e.g. myapp.main:hub), not {spec!r}")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"cannot load {spec!r}: {exc}") from None
    if not isinstance(value, Hub):
        raise SystemExit(f"{spec!r} is a {type(value).__name__}, not a tidings Hub")
    return value


def print_asyncapi(app: str | None = None) -> int:
    """Print the AsyncAPI 3 document (with the app's channels) as JSON."""
    print(json.dumps(app_asyncapi(load_hub(app) if app else None), indent=2,
                     ensure_ascii=False))
    return 0


def print_typescript(app: str | None = None) -> int:
    """Print the TypeScript declarations (with the app's channels)."""
    print(app_typescript(load_hub(app) if app else None), end="")
    return 0
