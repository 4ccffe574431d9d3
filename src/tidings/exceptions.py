"""Exceptions of tidings.

All derive from one root::

    TidingsError
     +-- ProtocolError          a frame/name refused by the codec (carries an ErrorCode)
     +-- HubError               misuse of the hub (not started, closed)
     +-- HookError              a hub callback (permission hook, authenticator) failed
     +-- AuthError              a token was refused (tidings.security.auth)
     +-- BrokerError            the broker failed or is unreachable
     |    +-- BrokerUnavailable
     |    +-- QueueFull         a durable queue is at its length bound
     |    +-- NotAvailable      the broker does not offer this feature (history, ...)
     +-- ClientError            raised by tidings.Client
          +-- ReplyError        the server answered a request with an error frame
          +-- ClientClosed      the client was closed
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BrokerError",
    "BrokerUnavailable",
    "ClientClosed",
    "ClientError",
    "HookError",
    "HubError",
    "NotAvailable",
    "QueueFull",
    "ReplyError",
    "TidingsError",
]


class TidingsError(Exception):
    """Root of every exception tidings raises on purpose."""


class HubError(TidingsError):
    """The hub was used in a state that does not allow it (not started, closed)."""


class AuthError(TidingsError):
    """A token was refused. ``reason`` is safe to show: it never holds the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HookError(TidingsError):
    """A hub callback raised an exception no handler took; it was logged, and
    the client gets ``internal`` (or a refused handshake)."""


class BrokerError(TidingsError):
    """The broker failed."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached right now; local delivery still works."""


class QueueFull(BrokerError):
    """A push was refused because the queue holds its maximum number of items.

    Durable queues refuse rather than trim: trimming would drop the oldest
    items, which nobody has processed yet."""


class NotAvailable(BrokerError):
    """The broker does not offer ``feature`` (see ``Capabilities``): a clear
    refusal instead of a wrong offset or a silent drop."""

    def __init__(self, feature: str, broker: str) -> None:
        super().__init__(f"{feature} is not available on the {broker} broker")
        self.feature = feature
        self.broker = broker


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
