"""The field-by-field reference of the topics, as Markdown generated from the catalogue.

``docs/contracts.md`` is prose written by people (wire format, headers, how to
read the topics) around one generated part: the topics, event types and every
field of every event type, with the Avro ``doc`` of each. Generating that part
from ``schemas/`` is what keeps it true: a new field or version changes the
rendering, and the tests fail until the file is regenerated
(``opsflow contracts docs --update docs/contracts.md``). The generated part sits
between two marker comments, so the prose around it stays hand-editable.

Nested records are flattened into dotted paths (``actor.user_id``, ``items[].sku``)
because that is how a reader (and a warehouse table) addresses them; the envelope,
identical in every event, is listed once rather than in every table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from opsflow.contracts.bounds import MAX_ITEMS, MAX_TEXT
from opsflow.contracts.catalogue import Catalogue, EventType, catalogue, record_full_name
from opsflow.contracts.evolution import REPLAY_LEVEL
from opsflow.contracts.headers import (
    DEAD_LETTER_HEADERS,
    EVENT_HEADERS,
    OPTIONAL_DEAD_LETTER_HEADERS,
)
from opsflow.errors import BadInputError
from opsflow.topics import dead_letter_topic

BEGIN_MARKER = (
    "<!-- BEGIN event reference: generated from schemas/ by "
    "`opsflow contracts docs --update docs/contracts.md`; do not edit by hand -->"
)
END_MARKER = "<!-- END event reference -->"

_Named = dict[str, dict[str, Any]]
"""Named Avro types (records, enums) met so far in one schema, by full name: a later
use of the same type is just its name, and must be expanded like the first."""


def _full_name(schema: Mapping[str, Any], namespace: str | None) -> str:
    return record_full_name({**schema, "namespace": schema.get("namespace", namespace)})


def _resolve(schema: Any, named: _Named, namespace: str | None) -> Any:
    """``schema`` with a reference to an earlier named type replaced by its definition."""
    if isinstance(schema, str):
        for candidate in (schema, f"{namespace}.{schema}"):
            if candidate in named:
                return named[candidate]
        return schema
    if isinstance(schema, dict) and schema.get("type") in ("record", "enum", "fixed"):
        named.setdefault(_full_name(schema, namespace), schema)
    return schema


def _nullable(schema: Any) -> tuple[bool, Any]:
    """``(True, X)`` for the union ``["null", X]`` (an optional X), else ``(False, schema)``."""
    if isinstance(schema, list) and "null" in schema and len(schema) == 2:
        return True, next(branch for branch in schema if branch != "null")
    return False, schema


def _type_text(schema: Any, named: _Named, namespace: str | None) -> str:
    """How a reader would name the type: ``string (uuid)``, ``enum Tier: A, B``, ..."""
    schema = _resolve(schema, named, namespace)
    if isinstance(schema, str):
        return schema.rsplit(".", 1)[-1] if "." in schema else schema
    if isinstance(schema, list):
        return "union of " + ", ".join(_type_text(s, named, namespace) for s in schema)
    kind = schema["type"]
    if isinstance(kind, dict | list):
        return _type_text(kind, named, namespace)
    if kind == "record":
        return f"record `{schema['name']}`"
    if kind == "enum":
        text = f"enum `{schema['name']}`: {', '.join(schema['symbols'])}"
        if "default" in schema:
            text += f" (a symbol unknown to the reader reads as {schema['default']})"
        return text
    if kind == "array":
        return f"array of {_type_text(schema['items'], named, namespace)}"
    if kind == "map":
        return f"map of {_type_text(schema['values'], named, namespace)}"
    logical = schema.get("logicalType")
    return f"{kind} ({logical})" if logical else str(kind)


def _presence(field: Mapping[str, Any], optional: bool) -> str:
    if "default" not in field:
        return "optional, no default" if optional else "required"
    default = json.dumps(field["default"])
    return f"optional, default `{default}`" if optional else f"default `{default}`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _children(schema: Any, named: _Named, namespace: str | None) -> tuple[str, Any] | None:
    """The record a field's rows continue into, with the path suffix to get there."""
    schema = _resolve(_nullable(schema)[1], named, namespace)
    if not isinstance(schema, dict):
        return None
    if isinstance(schema["type"], dict | list):
        return _children(schema["type"], named, namespace)
    if schema["type"] == "record":
        return ".", schema
    if schema["type"] in ("array", "map"):
        inner = _children(
            schema["items" if schema["type"] == "array" else "values"], named, namespace
        )
        if inner is not None:
            return ("[]" if schema["type"] == "array" else "{}") + inner[0], inner[1]
    return None


def _rows(
    record: Mapping[str, Any], named: _Named, prefix: str, *, skip: frozenset[str] = frozenset()
) -> Iterator[str]:
    """One table row per field of ``record``, then the rows of the fields inside it."""
    namespace = record.get("namespace")
    _resolve(dict(record), named, namespace)
    for field in record["fields"]:
        path = prefix + field["name"]
        if field["name"] in skip:
            yield (
                f"| `{path}` | record `Envelope` | required | "
                f"{_cell(field.get('doc', ''))} Its fields are listed under The envelope. |"
            )
            continue
        optional, inner = _nullable(field["type"])
        yield (
            f"| `{path}` | {_cell(_type_text(inner, named, namespace))} | "
            f"{_presence(field, optional)} | {_cell(field.get('doc', ''))} |"
        )
        nested = _children(field["type"], named, namespace)
        if nested is not None:
            suffix, child = nested
            yield from _rows(child, named, path + suffix)


_TABLE_HEAD = "| field | Avro type | presence | meaning |\n|---|---|---|---|"


def _event_section(event: EventType) -> str:
    versions = ", ".join(f"v{n}" for n in event.versions)
    rows = "\n".join(_rows(event.latest_schema, {}, "", skip=frozenset({"envelope"})))
    return (
        f"### `{event.name}`\n\n"
        f"{_cell(str(event.latest_schema.get('doc', '')))}\n\n"
        f"- topic `{event.topic.value}`, key: the `{event.topic.key}` field\n"
        f"- record `{event.record_name}`, subject `{event.subject}`\n"
        f"- emitted by: {event.model.emitted_by.describe()}; consumers dead-letter a"
        " record whose envelope names another producer\n"
        f"- bounds: {_bounds(event)}\n"
        f"- published versions: {versions}; fields below are v{event.latest_version}'s\n\n"
        f"{_TABLE_HEAD}\n{rows}\n"
    )


def _bounds(event: EventType) -> str:
    """The bounds of the event's values (``opsflow.contracts.bounds``), with the fields
    that allow longer strings."""
    longer = []
    for name, info in event.model.model_fields.items():
        lengths = [getattr(m, "max_length", None) for m in info.metadata]
        limit = next((n for n in lengths if isinstance(n, int)), None)
        if limit is not None:
            longer.append(f"`{name}` {limit:,}")
    more = f" ({', '.join(longer)})" if longer else ""
    return (
        f"every string at most {MAX_TEXT:,} characters{more}, without control characters"
        f" but tab, line feed and carriage return; every list at most {MAX_ITEMS:,} items"
    )


def _header_table(headers: Mapping[str, str]) -> str:
    rows = "\n".join(f"| `{name}` | {_cell(text)} |" for name, text in headers.items())
    return f"| header | meaning |\n|---|---|\n{rows}"


def _dead_letter_header_table() -> str:
    rows = [
        f"| `{name}` | {presence} | {_cell(text)} |"
        for headers, presence in (
            (DEAD_LETTER_HEADERS, "always"),
            (OPTIONAL_DEAD_LETTER_HEADERS, "sometimes"),
        )
        for name, text in headers.items()
    ]
    return "| header | present | meaning |\n|---|---|---|\n" + "\n".join(rows)


def event_reference(contracts: Catalogue | None = None) -> str:
    """The generated part of ``docs/contracts.md``, markers included."""
    contracts = contracts if contracts is not None else catalogue()
    topics = contracts.topics
    topic_rows = "\n".join(
        f"| `{topic.value}` | `{dead_letter_topic(topic.value)}` | "
        + ", ".join(f"`{e.name}` (`{e.record_name}`)" for e in contracts.for_topic(topic))
        + " |"
        for topic in topics
    )
    envelope = contracts.envelope_schema
    envelope_rows = "\n".join(_rows(envelope, {}, "envelope."))
    events = "\n".join(
        _event_section(event) for topic in topics for event in contracts.for_topic(topic)
    )
    return (
        f"{BEGIN_MARKER}\n\n"
        "## Topics\n\n"
        "| topic | dead-letter topic | event types (record) |\n|---|---|---|\n"
        f"{topic_rows}\n\n"
        "## Record headers\n\n"
        "Header values are UTF-8 text. Records written by the services' runtime carry "
        "these; records written through the producer SDK (the ingest API, webhooks, the "
        "review inbox) carry none, so a reader must not require them.\n\n"
        f"{_header_table(EVENT_HEADERS)}\n\n"
        "A dead-lettered record keeps the original record's headers and adds these:\n\n"
        f"{_dead_letter_header_table()}\n\n"
        "## The envelope\n\n"
        f"{_cell(str(envelope.get('doc', '')))} Every event type has it as its first field, "
        "`envelope`.\n\n"
        f"{_TABLE_HEAD}\n{envelope_rows}\n\n"
        "## Event types\n\n"
        f"Fields are those of the latest version, which reads records written with every "
        f"earlier one ({REPLAY_LEVEL.name}). Nested fields are dotted paths; `[]` steps "
        "into the items of an array.\n\n"
        f"{events}\n"
        f"{END_MARKER}"
    )


def with_event_reference(text: str, contracts: Catalogue | None = None) -> str:
    """``text`` (a Markdown document) with its generated part replaced by a fresh one.

    Raises:
        BadInputError: ``text`` does not hold the begin and end markers, in that order.
    """
    start, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise BadInputError(
            "the document has no generated event reference: put the lines "
            f"{BEGIN_MARKER!r} and {END_MARKER!r} where it belongs"
        )
    return text[:start] + event_reference(contracts) + text[end + len(END_MARKER) :]
