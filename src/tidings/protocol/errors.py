"""The codec's own error: the only exception decoding may raise."""

from __future__ import annotations

from tidings.exceptions import TidingsError
from tidings.protocol.codes import ErrorCode

__all__ = ["ProtocolError"]


class ProtocolError(TidingsError):
    """A frame or name the protocol refuses; carries the wire error code.

    ``id`` is the request id when it could be read, so the error frame can echo
    it and the client can match it to its request.
    """

    def __init__(self, code: ErrorCode, message: str, id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, id={self.id!r})"
