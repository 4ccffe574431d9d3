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

Standalone servers, with no Python to declare a model in, give a JSON Schema
instead: ``JsonSchema(schema_dict)`` (or ``JsonSchema.load(path)``), what
``tidings serve --config`` builds from ``[[channels]] pattern = ... schema =
"order.schema.json"``. Data valid by the schema is published unchanged.

The first matching declaration wins, in the order they were made.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tidings.protocol.codes import ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import pattern_matches, validate_pattern

try:
    import pydantic
except ImportError:  # pragma: no cover - typed channels need pydantic, the rest does not
    pydantic = None  # type: ignore[assignment]

__all__ = ["ChannelTypes", "Checker", "JsonSchema", "checker_for"]

_CACHE_MAX = 10_000  # channel -> its declaration, remembered for names seen before


@dataclass(frozen=True)
class JsonSchema:
    """A channel type given as a JSON Schema document (any draft ``jsonschema``
    knows; ``$schema`` picks it, 2020-12 by default). ``name`` titles it in the
    generated AsyncAPI and TypeScript (default: the schema's ``title``)."""

    schema: dict[str, Any]
    name: str | None = None
    source: str = field(default="", compare=False)  # the file it came from, for errors

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> JsonSchema:
        """The schema in the JSON file at ``path``; ``ValueError`` if it cannot be read."""
        try:
            schema = json.loads(Path(path).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read JSON Schema {path}: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"JSON Schema {path} must hold an object")
        return cls(schema, name, str(path))

    @property
    def title(self) -> str:
        """What the generated documents call the type: ``name``, else the schema's
        ``title``, else the file's name (``order.schema.json`` -> ``Order``)."""
        if self.name or self.schema.get("title"):
            return str(self.name or self.schema["title"])
        stem = Path(self.source).name.split(".")[0]
        return "".join(part[:1].upper() + part[1:] for part in re.split(r"\W+", stem))


class Checker(Protocol):
    """What a declaration checks data with: a pydantic ``TypeAdapter`` or a
    compiled JSON Schema."""

    def check(self, data: Any) -> Any: ...  # the JSON value to publish; raises ProtocolError

    def json_schema(self, ref_template: str) -> dict[str, Any]: ...


class PydanticChecker:
    __slots__ = ("adapter", "pattern")

    def __init__(self, pattern: str, type_: Any) -> None:
        if pydantic is None:
            raise ImportError("typed channels need pydantic: pip install pydantic")
        self.pattern = pattern
        self.adapter = pydantic.TypeAdapter(type_)

    def check(self, data: Any) -> Any:
        if isinstance(data, pydantic.BaseModel):
            data = data.model_dump(mode="json")
        try:
            value = self.adapter.validate_python(data)
        except pydantic.ValidationError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"invalid data for {self.pattern}: {describe(exc)}") from None
        return self.adapter.dump_python(value, mode="json")

    def json_schema(self, ref_template: str) -> dict[str, Any]:
        schema: dict[str, Any] = self.adapter.json_schema(ref_template=ref_template,
                                                          mode="serialization")
        return schema


class JsonSchemaChecker:
    __slots__ = ("pattern", "schema", "validator")

    def __init__(self, pattern: str, declared: JsonSchema) -> None:
        try:
            import jsonschema
        except ImportError:
            raise ImportError("JSON Schema channels need jsonschema: "
                              "pip install 'tidings[schema]'") from None
        cls = jsonschema.validators.validator_for(declared.schema,
                                                  default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(declared.schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "the root"
            raise ValueError(f"bad JSON Schema {declared.source or 'for ' + pattern}"
                             f" at {where}: {exc.message}") from None
        self.pattern = pattern
        self.schema = declared.schema
        self.validator = cls(declared.schema)

    def check(self, data: Any) -> Any:
        if pydantic is not None and isinstance(data, pydantic.BaseModel):
            data = data.model_dump(mode="json")
        errors = sorted(self.validator.iter_errors(data), key=lambda e: [str(p) for p in e.path])
        if errors:
            parts = [f"{'/'.join(str(p) for p in e.path) or 'data'}: {e.message}"
                     for e in errors[:10]]
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"invalid data for {self.pattern}: {'; '.join(parts)}")
        return data

    def json_schema(self, ref_template: str) -> dict[str, Any]:
        """The schema with its local ``$defs`` references pointed where the
        documents put the definitions (``ref_template``)."""
        def move(node: Any) -> Any:
            if isinstance(node, dict):
                ref = node.get("$ref")
                out = {k: move(v) for k, v in node.items()}
                if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
                    out["$ref"] = ref_template.format(model=ref.rsplit("/", 1)[1])
                return out
            if isinstance(node, list):
                return [move(v) for v in node]
            return node

        schema: dict[str, Any] = move(self.schema)
        schema.pop("$schema", None)
        schema.pop("$id", None)
        if "definitions" in schema:
            schema.setdefault("$defs", {}).update(schema.pop("definitions"))
        return schema


def checker_for(label: str, type_: Any) -> Checker:
    """The checker of ``type_`` (a :class:`JsonSchema` or a pydantic type);
    ``label`` names it in error messages (``invalid data for <label>: ...``)."""
    if isinstance(type_, JsonSchema):
        return JsonSchemaChecker(label, type_)
    return PydanticChecker(label, type_)


class ChannelTypes:
    """The typed channels of one hub (or the typed queues: names are matched the
    same way)."""

    __slots__ = ("_by_channel", "_rules", "active")

    def __init__(self) -> None:
        self._rules: list[tuple[str, Any, Checker]] = []  # (pattern, type, checker)
        self._by_channel: dict[str, Checker | None] = {}
        # True once a type is declared (else publishing skips the checks);
        # an attribute, not a property: every publish reads it
        self.active = False

    def declare(self, pattern: str, type_: Any, *, max_name: int = 1024) -> None:
        """``type_``: a :class:`JsonSchema`, or anything ``pydantic.TypeAdapter`` takes."""
        validate_pattern(pattern, max_name)
        self._rules.append((pattern, type_, checker_for(pattern, type_)))
        self._by_channel.clear()
        self.active = True

    def declarations(self) -> list[tuple[str, Any]]:
        """(pattern, type) of every declaration, in order (for generated docs)."""
        return [(pattern, type_) for pattern, type_, _ in self._rules]

    def json_schemas(self, ref_template: str) -> list[tuple[str, Any, dict[str, Any]]]:
        """(pattern, type, JSON Schema of the type) of every declaration, as
        subscribers get the data (the dumped form: defaults filled in); nested
        models under ``$defs``, referenced with ``ref_template``."""
        return [(pattern, type_, checker.json_schema(ref_template))
                for pattern, type_, checker in self._rules]

    def _rule(self, channel: str) -> Checker | None:
        try:
            return self._by_channel[channel]
        except KeyError:
            pass
        found = next((checker for p, _, checker in self._rules
                      if pattern_matches(p, channel)), None)
        if len(self._by_channel) >= _CACHE_MAX:
            self._by_channel.clear()
        self._by_channel[channel] = found
        return found

    def check(self, channel: str, data: Any, text: str | None) -> tuple[Any, str | None]:
        """``(data, text)`` to publish on ``channel``: validated and dumped to JSON
        values when the channel is typed (``text`` dropped: the dump is what goes
        out); a model instance on an untyped channel is dumped as it is."""
        checker = self._rule(channel)
        if checker is None:
            if pydantic is not None and isinstance(data, pydantic.BaseModel):
                return data.model_dump(mode="json"), None
            return data, text
        checked = checker.check(data)
        # JSON Schema keeps the data as it is, so a producer's own text stays valid
        return checked, (text if checked is data else None)


def describe(exc: Any) -> str:
    """Pydantic's errors as ``location: message`` pairs (``data`` is the root)."""
    parts = []
    for error in exc.errors(include_url=False):
        where = "/".join(str(part) for part in error["loc"]) or "data"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
