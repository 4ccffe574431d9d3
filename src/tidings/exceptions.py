"""Exceptions of tidings.

All derive from one root::

    TidingsError
     +-- ProtocolError          a frame/name refused by the codec (carries an ErrorCode)
     +-- HubError               misuse of the hub (not started, closed)
     +-- BrokerError            the broker failed or is unreachable
     |    +-- BrokerUnavailable
     +-- ClientError            raised by tidings.Client
          +-- ReplyError        the server answered a request with an error frame
          +-- ClientClosed      the client was closed
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "ClientClosed",
    "ClientError",
    "HubError",
    "ReplyError",
    "TidingsError",
]


class TidingsError(Exception):
    """Root of every exception tidings raises on purpose."""


class HubError(TidingsError):
    """The hub was used in a state that does not allow it (not started, closed)."""


class BrokerError(TidingsError):
    """The broker failed."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached right now; local delivery still works."""


class ClientError(TidingsError):
    """Error raised by :class:`tidings.Client`."""


class ReplyError(ClientError):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ClientClosed(ClientError):
    """The client was closed while a request was pending."""
