"""Schema evolution rules: the seven Confluent compatibility levels.

Decisions come from Apache Avro's own ``ReaderWriterCompatibilityChecker``;
this module only maps a level to which (reader, writer) pairs must pass:

- BACKWARD: the new schema reads data written with the previous one.
- FORWARD: the previous schema reads data written with the new one.
- FULL: both.
- ``*_TRANSITIVE``: the same against every earlier version, not only the last.
- NONE: anything goes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType


class CompatibilityLevel(StrEnum):
    """The compatibility levels of the Confluent Schema Registry API."""

    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"


def parse_schema(schema: str | dict[str, Any]) -> avro.schema.Schema:
    """Parse an Avro schema given as JSON text or as a decoded JSON value.

    Raises:
        avro.errors.SchemaParseException: the schema is not valid Avro.
        json.JSONDecodeError: the text is not JSON.
    """
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return avro.schema.parse(text)


def _reads(reader: avro.schema.Schema, writer: avro.schema.Schema) -> list[str]:
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)  # type: ignore[no-untyped-call]
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    kinds = ", ".join(sorted({i.value for i in result.incompatibilities}))
    where = ", ".join(sorted(result.locations))
    return [f"{kinds} ({', '.join(sorted(result.messages))}) at {where}"]


def incompatibilities(
    new: avro.schema.Schema,
    previous: Sequence[avro.schema.Schema],
    level: CompatibilityLevel,
) -> list[str]:
    """Say why ``new`` may not follow ``previous`` (oldest first) under ``level``.

    Returns:
        Human-readable reasons; an empty list means compatible.
    """
    if level is CompatibilityLevel.NONE or not previous:
        return []
    against = previous if level.name.endswith("TRANSITIVE") else previous[-1:]
    backward = level.name.startswith(("BACKWARD", "FULL"))
    forward = level.name.startswith(("FORWARD", "FULL"))
    reasons: list[str] = []
    for old in reversed(against):
        if backward:
            reasons += [f"new schema cannot read old data: {m}" for m in _reads(new, old)]
        if forward:
            reasons += [f"old schema cannot read new data: {m}" for m in _reads(old, new)]
    return reasons
