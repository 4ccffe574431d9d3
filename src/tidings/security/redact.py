"""Keep secrets out of logs: tokens in URLs and headers, JWTs, API keys, and the
passwords of broker URLs.

uvicorn logs every request path *with* its query string, so a browser that
puts its JWT in ``?token=`` would leave it in every access log. ``tidings
serve`` installs :class:`RedactingFilter` on uvicorn's loggers and on the root
handlers; apps that embed the hub can call :func:`install` themselves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["MASK", "RedactingFilter", "install", "redact"]

MASK: Final = "***"

_PATTERNS: Final = (
    # ?token=..., &access_token=..., api_key=... in URLs and form bodies
    re.compile(r"(?i)([?&;](?:token|access_token|jwt|api_key|apikey|key)=)[^&\s\"']+"),
    # Authorization: Bearer ... / apikey ...
    re.compile(r"(?i)(\b(?:bearer|apikey)\s+)[^\s\"',]+"),
    # X-API-Key: ... in dumped headers
    re.compile(r"(?i)(x-api-key[\"']?\s*[:=,]\s*[\"']?)[^\s\"',)]+"),
    # the password of a broker URL: redis://user:secret@host, amqp://guest:guest@...
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+(?=@)"),
    # anything shaped like a JWT (also a ``token.<jwt>`` subprotocol)
    re.compile(r"()\beyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with tokens, keys and the given ``secrets`` masked."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message and string arguments."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def _clean(self, value: Any) -> Any:
        return redact(value, self.secrets) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, self.secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(self._clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._clean(v) for k, v in record.args.items()}
        return True


_LOGGERS: Final = ("uvicorn", "uvicorn.access", "uvicorn.error", "tidings", "tidings.access")


def install(secrets: Iterable[str] = ()) -> RedactingFilter:
    """Put a :class:`RedactingFilter` on uvicorn's and tidings' loggers and on the
    root logger's handlers (records of child loggers pass through those)."""
    filt = RedactingFilter(secrets)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(filt)
        for handler in logger.handlers:
            handler.addFilter(filt)
    for handler in logging.getLogger().handlers:
        handler.addFilter(filt)
    return filt
