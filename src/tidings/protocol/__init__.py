"""Sans-I/O wire protocol: names, codes, and the native JSON codec."""

from tidings.protocol.codes import CloseCode, ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import is_pattern, pattern_matches, validate_channel, validate_pattern

__all__ = [
    "CloseCode",
    "ErrorCode",
    "ProtocolError",
    "is_pattern",
    "pattern_matches",
    "validate_channel",
    "validate_pattern",
]
