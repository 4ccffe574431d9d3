"""Typed channels: what a channel carries, declared once, checked on every publish.

``hub.channel("orders/+", OrderUpdate)`` registers a Pydantic model (or any
type ``pydantic.TypeAdapter`` accepts) for a channel pattern. Every publish on
a matching channel, whatever its source (``hub.publish``, the HTTP API, a
native ``publish``, a raw ``/ws/pub`` frame, a Centrifuge ``publish``), is
validated before it gets an offset: invalid data is refused with
``bad_request`` and pydantic's error locations, and nothing is published.
Valid data is published as the type dumps it to JSON (defaults filled in,
values coerced), so subscribers always see the declared shape. A model
instance may be published directly.

The first matching declaration wins, in the order they were made.
"""

from __future__ import annotations

from typing import Any

from tidings.protocol.codes import ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import pattern_matches, validate_pattern

try:
    import pydantic
except ImportError:  # pragma: no cover - typed channels need pydantic, the rest does not
    pydantic = None  # type: ignore[assignment]

__all__ = ["ChannelTypes"]

_CACHE_MAX = 10_000  # channel -> its declaration, remembered for names seen before


class ChannelTypes:
    """The typed channels of one hub."""

    __slots__ = ("_by_channel", "_rules", "active")

    def __init__(self) -> None:
        self._rules: list[tuple[str, Any, Any]] = []  # (pattern, type, TypeAdapter)
        self._by_channel: dict[str, tuple[str, Any] | None] = {}
        # True once a channel type is declared (else publishing skips the checks);
        # an attribute, not a property: every publish reads it
        self.active = False

    def declare(self, pattern: str, type_: Any, *, max_name: int = 1024) -> None:
        if pydantic is None:
            raise ImportError("typed channels need pydantic: pip install pydantic")
        validate_pattern(pattern, max_name)
        self._rules.append((pattern, type_, pydantic.TypeAdapter(type_)))
        self._by_channel.clear()
        self.active = True

    def declarations(self) -> list[tuple[str, Any]]:
        """(pattern, type) of every declaration, in order (for generated docs)."""
        return [(pattern, type_) for pattern, type_, _ in self._rules]

    def json_schemas(self, ref_template: str) -> list[tuple[str, Any, dict[str, Any]]]:
        """(pattern, type, JSON Schema of the type) of every declaration, as
        subscribers get the data (the dumped form: defaults filled in); nested
        models under ``$defs``, referenced with ``ref_template``."""
        return [(pattern, type_, adapter.json_schema(ref_template=ref_template,
                                                     mode="serialization"))
                for pattern, type_, adapter in self._rules]

    def _rule(self, channel: str) -> tuple[str, Any] | None:
        try:
            return self._by_channel[channel]
        except KeyError:
            pass
        found = next(((p, adapter) for p, _, adapter in self._rules
                      if pattern_matches(p, channel)), None)
        if len(self._by_channel) >= _CACHE_MAX:
            self._by_channel.clear()
        self._by_channel[channel] = found
        return found

    def check(self, channel: str, data: Any, text: str | None) -> tuple[Any, str | None]:
        """``(data, text)`` to publish on ``channel``: validated and dumped to JSON
        values when the channel is typed (``text`` dropped: the dump is what goes
        out); a model instance on an untyped channel is dumped as it is."""
        rule = self._rule(channel)
        if rule is None:
            if pydantic is not None and isinstance(data, pydantic.BaseModel):
                return data.model_dump(mode="json"), None
            return data, text
        pattern, adapter = rule
        if pydantic is not None and isinstance(data, pydantic.BaseModel):
            data = data.model_dump(mode="json")
        try:
            value = adapter.validate_python(data)
        except pydantic.ValidationError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"invalid data for {pattern}: {describe(exc)}") from None
        return adapter.dump_python(value, mode="json"), None


def describe(exc: Any) -> str:
    """Pydantic's errors as ``location: message`` pairs (``data`` is the root)."""
    parts = []
    for error in exc.errors(include_url=False):
        where = "/".join(str(part) for part in error["loc"]) or "data"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
