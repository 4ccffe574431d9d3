"""Channel names and MQTT-style patterns (SPEC 2).

Channels are ``/``-separated levels: 1-255 characters of UTF-8, no NUL, no
``+`` or ``#``, no empty level. Patterns use ``+`` (exactly one level, which may
be empty) and ``#`` (the rest, only as the last level; ``a/#`` also matches
``a``). As in MQTT, a wildcard in the first level never matches a channel that
starts with ``$``.
"""

from __future__ import annotations

from tidings.protocol.codes import ErrorCode
from tidings.protocol.errors import ProtocolError

__all__ = [
    "MAX_NAME_LENGTH",
    "is_pattern",
    "pattern_matches",
    "validate_channel",
    "validate_pattern",
]

MAX_NAME_LENGTH = 255


def _check_common(name: object, code: ErrorCode, what: str, max_length: int) -> str:
    if not isinstance(name, str):
        raise ProtocolError(code, f"{what} must be a string")
    if not name:
        raise ProtocolError(code, f"{what} must not be empty")
    if len(name) > max_length:
        raise ProtocolError(code, f"{what} is longer than {max_length} characters")
    if "\x00" in name:
        raise ProtocolError(code, f"{what} must not contain NUL")
    return name


_VALID_CHANNELS: set[str] = set()  # names that passed, checked again for length only
_VALID_CHANNELS_MAX = 4096


def validate_channel(name: object, max_length: int = MAX_NAME_LENGTH) -> str:
    """Return ``name`` if it is a valid channel, else raise ``bad_channel``."""
    if type(name) is str and name in _VALID_CHANNELS and len(name) <= max_length:
        return name  # every publish names its channel: most are seen before
    channel = _check_common(name, ErrorCode.BAD_CHANNEL, "channel", max_length)
    if "+" in channel or "#" in channel:
        raise ProtocolError(ErrorCode.BAD_CHANNEL, "channel must not contain '+' or '#'")
    if "" in channel.split("/"):
        raise ProtocolError(ErrorCode.BAD_CHANNEL, "channel must not have an empty level")
    if len(_VALID_CHANNELS) >= _VALID_CHANNELS_MAX:
        _VALID_CHANNELS.clear()
    _VALID_CHANNELS.add(channel)
    return channel


def validate_pattern(name: object, max_length: int = MAX_NAME_LENGTH) -> str:
    """Return ``name`` if it is a valid channel or pattern, else raise ``bad_pattern``."""
    pattern = _check_common(name, ErrorCode.BAD_PATTERN, "pattern", max_length)
    levels = pattern.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "#":
            if i != last:
                raise ProtocolError(ErrorCode.BAD_PATTERN, "'#' is only allowed as the last level")
        elif level == "+":
            continue
        elif "+" in level or "#" in level:
            raise ProtocolError(
                ErrorCode.BAD_PATTERN, "a wildcard must fill a whole level ('a/+/b', not 'a+')"
            )
        elif level == "":
            raise ProtocolError(ErrorCode.BAD_PATTERN, "pattern must not have an empty level")
    return pattern


def is_pattern(name: str) -> bool:
    """True when ``name`` holds a wildcard level (it was validated already)."""
    return "+" in name or "#" in name


def pattern_matches(pattern: str, channel: str) -> bool:
    """Reference matcher, MQTT semantics. The index uses a trie; this is the spec."""
    if channel.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    p_levels = pattern.split("/")
    c_levels = channel.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(c_levels):
            return False
        if p != "+" and p != c_levels[i]:
            return False
    return len(p_levels) == len(c_levels)
