from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.protocol import ErrorCode, ProtocolError, pattern_matches
from tidings.protocol.names import validate_channel, validate_pattern


@pytest.mark.parametrize("name", ["a", "chat/room1", "$sys/x", "a b/c", "é/ü", "x" * 255])
def test_valid_channels(name: str) -> None:
    assert validate_channel(name) == name


@pytest.mark.parametrize(
    "name", ["", "a//b", "/a", "a/", "a/+", "a/#", "a+b", "x" * 256, "a\x00b", 5, None]
)
def test_invalid_channels(name: object) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_channel(name)
    assert info.value.code is ErrorCode.BAD_CHANNEL


@pytest.mark.parametrize("name", ["#", "+", "a/+", "a/#", "+/+/c", "a/+/#", "chat/room1"])
def test_valid_patterns(name: str) -> None:
    assert validate_pattern(name) == name


@pytest.mark.parametrize("name", ["", "a/#/b", "a#", "a/b+", "##", "a//b", "x" * 256, 3])
def test_invalid_patterns(name: object) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_pattern(name)
    assert info.value.code is ErrorCode.BAD_PATTERN


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a", False),
        ("a/+", "a/b/c", False),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("a/+/c", "a/x/c", True),
        ("#", "$sys/x", False),  # first-level wildcards never match '$' channels
        ("+/x", "$sys/x", False),
        ("$sys/#", "$sys/x", True),
        ("$sys/+", "$sys/x", True),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
    ],
)
def test_pattern_semantics(pattern: str, channel: str, expected: bool) -> None:
    assert pattern_matches(pattern, channel) is expected


def test_plus_matches_an_empty_level() -> None:
    # channels may not have empty levels, but the matcher follows MQTT anyway
    assert pattern_matches("a/+/b", "a//b")


@given(st.text(max_size=40))
def test_validation_raises_only_protocol_error(name: str) -> None:
    for validate in (validate_channel, validate_pattern):
        try:
            validate(name)
        except ProtocolError:
            pass
