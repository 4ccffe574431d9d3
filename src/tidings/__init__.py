"""tidings: real-time channels for Python web apps."""

from tidings._version import __version__
from tidings.client.client import Client
from tidings.core.channels import JsonSchema
from tidings.core.config import HistoryRule, Limits
from tidings.core.connection import Connection
from tidings.core.hooks import ErrorContext
from tidings.core.permissions import Rule
from tidings.core.queue import QueueItem, WorkQueue
from tidings.endpoints.proxy import WebSocketProxy
from tidings.exceptions import (
    AuthError,
    BrokerError,
    BrokerUnavailable,
    ClientClosed,
    ClientError,
    HookError,
    HubError,
    NotAvailable,
    QueueFull,
    ReplyError,
    TidingsError,
)
from tidings.hub import Hub
from tidings.protocol import CloseCode, ErrorCode, ProtocolError
from tidings.security.auth import JWTAuth, RequireIdentity, encode_jwt, token_from_scope
from tidings.types import HistoryPage, Member, Publication, StreamPos

__all__ = [
    "AuthError",
    "BrokerError",
    "BrokerUnavailable",
    "Client",
    "ClientClosed",
    "ClientError",
    "CloseCode",
    "Connection",
    "ErrorCode",
    "ErrorContext",
    "HistoryPage",
    "HistoryRule",
    "HookError",
    "Hub",
    "HubError",
    "JWTAuth",
    "JsonSchema",
    "Limits",
    "Member",
    "NotAvailable",
    "ProtocolError",
    "Publication",
    "QueueFull",
    "QueueItem",
    "ReplyError",
    "RequireIdentity",
    "Rule",
    "StreamPos",
    "TidingsError",
    "WebSocketProxy",
    "WorkQueue",
    "__version__",
    "encode_jwt",
    "token_from_scope",
]
