"""Records as projections see them: the decoded Avro datum, not a pydantic model.

A rebuild reads every record of its topics, so the per-record cost decides
how fast a read model comes back. Building the typed model of each event
(``WireCodec.decode``) caps a single process at about 14,000 events/s on the
bench machine (``python -m tests.bench --only codec``); projections need the
fields, not the validation (the producers validated them before writing).
So a projection gets an ``EventRecord``: the event type, the envelope fields
it needs, the datum as plain dicts with logical types left as plain values
(timestamps as epoch milliseconds, ready for ``to_timestamp`` in SQL), and
where the record sits in the log.

The body is decoded by cavro (Avro in Cython), not fastavro: on the
projections' real schemas and the bench's event mix it decodes a record in
about 60% of fastavro's ``schemaless_reader`` time (3.6 against 6.3 us, 6.9
against 11.7 us on a busier machine, interleaved medians of 7 passes over
100,000 records), and decoding is the largest part of a rebuild. Both give
equal dicts for every event type.

Schema resolution is the same as the wire codec's: a record written with an
older version of its event type is read with the latest schema, so a field
added later is present with its default.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import cavro
from confluent_kafka import Message
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from opsflow.contracts.catalogue import Catalogue, catalogue, record_full_name
from opsflow.errors import BadInputError, RetryableError

_HEADER = struct.Struct(">bI")


@dataclass(slots=True)
class EventRecord:
    """One event of a topic, decoded for projecting.

    ``data`` is the whole datum (``data["envelope"]`` holds the envelope);
    timestamps in it are epoch milliseconds. ``key`` is the value of the topic's
    key field: the id of the workflow instance the event belongs to.
    """

    event_type: str
    data: dict[str, Any]
    key: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes

    @property
    def envelope(self) -> dict[str, Any]:
        return self.data["envelope"]  # type: ignore[no-any-return]

    @property
    def event_id(self) -> str:
        return self.data["envelope"]["event_id"]  # type: ignore[no-any-return]

    @property
    def occurred_at_ms(self) -> int:
        return self.data["envelope"]["occurred_at"]  # type: ignore[no-any-return]

    def value_sha256(self) -> bytes:
        """The hash of the record's bytes as written (the audit log keeps it)."""
        return hashlib.sha256(self.value).digest()


def _plain(schema: Any) -> Any:
    """The schema without logical types: the same bytes, read as plain values."""
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


def _schema(source: Any) -> cavro.Schema:
    """A cavro schema decoding records to dicts, logical types as plain values."""
    return cavro.Schema(_plain(source), record_decodes_to_dict=True, logical_types=())


class RecordDecoder:
    """Decodes Confluent-framed records into ``EventRecord``s, caching schemas by id.

    Args:
        registry: a client of the schema registry the records' ids refer to.
        contracts: the catalogue of event types (the repository's by default).
        event_types: the event types ``select`` decodes (None: all); the others are
            told apart by their schema id, before their body is decoded.
    """

    def __init__(
        self,
        registry: SchemaRegistryClient,
        contracts: Catalogue | None = None,
        *,
        event_types: Collection[str] | None = None,
    ) -> None:
        self._registry = registry
        self._contracts = contracts or catalogue()
        self._readers: dict[int, tuple[str, Any, str]] = {}
        self._wanted = None if event_types is None else frozenset(event_types)

    def _reader(self, schema_id: int) -> tuple[str, Any, str]:
        cached = self._readers.get(schema_id)
        if cached is None:
            try:
                schema = self._registry.get_schema(schema_id)
            except SchemaRegistryError as err:
                if err.http_status_code >= 500:
                    raise RetryableError(f"schema registry error: {err.error_message}") from err
                raise BadInputError(f"unknown schema id {schema_id}: {err.error_message}") from err
            except Exception as err:  # connection errors come from the HTTP library underneath
                raise RetryableError(f"schema registry unreachable: {err}") from err
            writer = json.loads(schema.schema_str or "{}")
            name = record_full_name(writer)
            try:
                event_type = self._contracts.by_record_name(name)
            except KeyError as err:
                raise BadInputError(
                    f"schema id {schema_id} is record {name}, which no contract defines"
                ) from err
            # Resolved against the latest schema only for older writers.
            decoder = _schema(writer)
            if _plain(writer) != _plain(event_type.latest_schema):
                decoder = _schema(event_type.latest_schema).reader_for_writer(decoder)
            cached = (event_type.name, decoder, event_type.topic.key)
            self._readers[schema_id] = cached
        return cached

    def decode(self, msg: Message) -> EventRecord:
        """The event a consumed record holds.

        Raises:
            BadInputError: not Confluent-framed, an unknown schema id, a record
                no contract defines, or a body that does not match its schema.
            RetryableError: the registry could not be asked.
        """
        record = self._decode(msg, None)
        assert record is not None
        return record

    def select(self, msg: Message) -> EventRecord | None:
        """Like ``decode``, but None for a record of an event type not asked for
        (``event_types``), whose body is then not decoded at all."""
        return self._decode(msg, self._wanted)

    def _decode(self, msg: Message, wanted: frozenset[str] | None) -> EventRecord | None:
        value = msg.value()
        if value is None or len(value) < _HEADER.size:
            raise BadInputError(
                f"record value of {len(value or b'')} bytes is not Confluent-framed"
            )
        magic, schema_id = _HEADER.unpack_from(value)
        if magic != 0:
            raise BadInputError(f"record value starts with byte {magic}, not the magic byte 0")
        event_type, decoder, key = self._readers.get(schema_id) or self._reader(schema_id)
        if wanted is not None and event_type not in wanted:
            return None
        try:
            data = decoder.binary_decode(value[_HEADER.size :])
        except (EOFError, ValueError, TypeError, IndexError, cavro.CavroException) as err:
            raise BadInputError(
                f"{event_type} body does not match schema id {schema_id}: {err}"
            ) from err
        # A record its declaration does not let that producer write is not projected.
        self._contracts.check_producer(event_type, data["envelope"]["producer"])
        return EventRecord(
            event_type,
            data,
            data[key],
            msg.topic(),  # type: ignore[arg-type]
            msg.partition(),  # type: ignore[arg-type]
            msg.offset(),  # type: ignore[arg-type]
            msg.timestamp()[1],
            value,
        )
