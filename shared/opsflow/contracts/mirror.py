"""Does an event class mirror its schema? The check behind ``opsflow contracts check``.

The schemas are the contract (what the registry and other languages see) and
the classes their typed Python face, so the two must not drift apart: a field
added to one side only, a reordered field, a changed type, enum symbol,
default or nullability. Both sides are reduced to a *shape*, a nested tuple —
``("record", name, ((field, shape, default), ...))``, ``("enum", name,
symbols)``, ``("array", item)``, ``("nullable", inner)``, or a primitive such as
``("long",)``, ``("uuid",)``, ``("timestamp-millis",)`` — and compared path by
path, so a mismatch names the fields that differ.
"""

from __future__ import annotations

import types
import typing
import uuid
from enum import StrEnum
from typing import Any

from annotated_types import Le
from pydantic import AwareDatetime

from opsflow.contracts.catalogue import EventType
from opsflow.contracts.record import AvroRecord, TimestampMillis

REQUIRED = "<required>"
_TIMESTAMP_VALIDATORS = typing.get_args(TimestampMillis)[1:]


def avro_shape(schema: Any, named: dict[str, Any] | None = None, namespace: str = "") -> Any:
    """Reduce an Avro type to a shape; named types may be referenced after definition,
    by full name or by the name in the enclosing namespace."""
    named = {} if named is None else named
    if isinstance(schema, list):
        if len(schema) == 2 and schema[0] == "null":
            return ("nullable", avro_shape(schema[1], named, namespace))
        return ("union", tuple(avro_shape(branch, named, namespace) for branch in schema))
    if isinstance(schema, str):
        for name in (schema, f"{namespace}.{schema}"):
            if name in named:
                return named[name]
        return (schema,)
    kind = schema["type"]
    inner = schema.get("namespace", namespace)
    if kind == "record":
        fields = tuple(
            (field["name"], avro_shape(field["type"], named, inner), field.get("default", REQUIRED))
            for field in schema["fields"]
        )
        shape: Any = ("record", schema["name"], fields)
    elif kind == "enum":
        shape = ("enum", schema["name"], tuple(schema["symbols"]))
    elif kind == "array":
        return ("array", avro_shape(schema["items"], named, namespace))
    elif "logicalType" in schema:
        return (schema["logicalType"],)
    else:
        return avro_shape(kind, named, namespace)
    named[f"{inner}.{schema['name']}"] = shape
    return shape


def model_shape(annotation: Any, metadata: tuple[Any, ...] = ()) -> Any:
    """Reduce a model (or a field annotation) to the shape its Avro type must have."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return model_shape(args[0], metadata + tuple(annotation.__metadata__))
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if len(others) != 1 or len(args) != 2:
            return (f"unmapped union {annotation!r}: only T | None maps to Avro",)
        return ("nullable", model_shape(others[0]))
    if origin is list:
        return ("array", model_shape(args[0]))
    if isinstance(annotation, type) and issubclass(annotation, AvroRecord):
        fields = tuple(
            (
                name,
                model_shape(info.annotation, tuple(info.metadata)),
                REQUIRED if info.is_required() else info.default,
            )
            for name, info in annotation.model_fields.items()
        )
        return ("record", annotation.__name__, fields)
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return ("enum", annotation.__name__, tuple(m.value for m in annotation))
    if annotation is AwareDatetime and all(v in metadata for v in _TIMESTAMP_VALIDATORS):
        return ("timestamp-millis",)
    if annotation is uuid.UUID:
        return ("uuid",)
    if annotation is int and Le(2**31 - 1) in metadata:
        return ("int",)
    if annotation is int and Le(2**63 - 1) in metadata:
        return ("long",)
    simple = {str: "string", bool: "boolean", float: "double", bytes: "bytes"}
    return (simple.get(annotation, f"unmapped python type {annotation!r}"),)


def flatten(shape: Any, path: str = "") -> dict[str, str]:
    """A shape as ``{path: what is there}``, so a comparison lists only the differing
    paths (``items[].quantity``, ``notes?`` for the inside of a nullable)."""
    kind = shape[0]
    if kind == "record":
        out = {path or "<event>": f"record {shape[1]} {[f[0] for f in shape[2]]}"}
        for name, field_shape, default in shape[2]:
            here = f"{path}.{name}" if path else name
            out[f"{here} (default)"] = repr(default)
            out |= flatten(field_shape, here)
        return out
    if kind == "enum":
        return {path: f"enum {shape[1]} {list(shape[2])}"}
    if kind == "array":
        return flatten(shape[1], f"{path}[]")
    if kind == "nullable":
        return flatten(shape[1], f"{path}?")
    return {path: " ".join(map(str, shape))}


def mismatches(event: EventType) -> list[str]:
    """How ``event``'s class differs from its latest schema, one line per path
    (``<event type> v<N>: <path>: schema has ..., the class has ...``); empty when it
    mirrors it."""
    schema = flatten(avro_shape(event.latest_schema))
    model = flatten(model_shape(event.model))
    where = f"{event.name} v{event.latest_version}"
    return [
        f"{where}: {path}: the schema has {schema.get(path, 'nothing')}, "
        f"{event.model.__name__} has {model.get(path, 'nothing')}"
        for path in dict.fromkeys([*schema, *model])
        if schema.get(path) != model.get(path)
    ]
