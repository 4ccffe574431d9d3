"""Error codes and websocket close codes of the native protocol (SPEC 6.1).

Reply errors keep the connection open; close codes end it. The two are
different types on purpose, as in centrifuge: a client must never have to
guess whether an error was fatal.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["CloseCode", "ErrorCode"]


class ErrorCode(StrEnum):
    """Codes of ``{"type": "error"}`` frames. The connection stays open."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    BAD_PATTERN = "bad_pattern"
    BAD_CHANNEL = "bad_channel"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    NOT_AVAILABLE = "not_available"  # the broker does not offer it (history, presence...)
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """Websocket close codes tidings uses (RFC 6455 section 7.4)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    POLICY_VIOLATION = 1008  # repeated abuse, auth refused in the first frame
    MESSAGE_TOO_BIG = 1009  # frame above the hard size limit
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # outbox overflow with the ``disconnect`` policy
