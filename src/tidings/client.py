"""Placeholder replaced below."""

from __future__ import annotations

__all__ = ["Client"]


class Client:
    pass
