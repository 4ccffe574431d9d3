"""Channels and MQTT patterns as NATS subjects (see :mod:`tidings.brokers.nats`).

A channel level becomes one subject token, percent-escaped: everything but
``A-Z a-z 0-9 _ - ~`` is written as ``%XX`` of its UTF-8 bytes, so a token
never holds ``.``, ``*``, ``>``, whitespace or control characters, is never
empty, and every valid channel round-trips. ``+`` -> ``*``; ``#`` -> ``>``
plus the parent subject (``a/#`` also matches ``a``).
"""

from __future__ import annotations

from urllib.parse import quote, unquote

__all__ = ["channel_of_tokens", "subjects_for", "token_for"]


def token_for(level: str) -> str:
    """One channel level as a NATS subject token: ``%XX`` for all but
    ``A-Za-z0-9_-~`` (so never ``.``, ``*``, ``>``, whitespace or empty)."""
    return quote(level, safe="").replace(".", "%2E")


def channel_of_tokens(tokens: str) -> str:
    """The channel a subject's tokens (after the prefix) name."""
    return "/".join(unquote(t) for t in tokens.split("."))


def subjects_for(pattern: str) -> list[str]:
    """The NATS subject(s), after the prefix, covering an MQTT pattern or channel."""
    levels = pattern.split("/")
    tokens = ["*" if lv == "+" else token_for(lv) for lv in levels]
    if levels[-1] == "#":
        head = tokens[:-1]
        return [".".join([*head, ">"]), ".".join(head)] if head else [">"]
    return [".".join(tokens)]
