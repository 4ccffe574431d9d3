"""``tidings asyncapi`` and ``tidings typescript`` (SPEC 4): print the protocol's schemas."""

from __future__ import annotations

import json

from tidings.protocol.schema import asyncapi, typescript

__all__ = ["print_asyncapi", "print_typescript"]


def print_asyncapi() -> int:
    """Print the AsyncAPI 3 document of ``/ws`` as JSON; the exit status."""
    print(json.dumps(asyncapi(), indent=2, ensure_ascii=False))
    return 0


def print_typescript() -> int:
    """Print the TypeScript declarations of every frame of ``/ws``; the exit status."""
    print(typescript(), end="")
    return 0
