"""Events on the wire: Confluent framing around an Avro body.

A record value is ``0x00`` + the writer schema's registry id (4 bytes, big
endian) + the Avro binary body, exactly what Confluent's ``AvroSerializer``
writes, so any stock deserializer reads opsflow's topics and opsflow reads
records written by stock serializers.

Decoding resolves the writer's schema (fetched by id, once) against the
latest schema of the event type, so records written with any earlier
published version come back as the current model: the replay guarantee.

Encoding writes with the latest schema of the event type under its subject.
By default the codec registers that schema on first use (idempotent), which
suits the embedded stack and tests. With ``SCHEMA_REGISTRY_AUTO_REGISTER=false``
it only looks the schema up: provisioning is then the one writer of the
registry, the services need no write rights on it, and a process whose
contracts were never provisioned says so instead of registering them behind
the operator's back.

cavro (Avro in Cython) does the Avro work: on ``order.received`` it decodes
1.67x and encodes 1.46x as many records a second as fastavro (``make bench``'s
codec case, the same bytes either way), and the codec is most of what the
runtime spends on an event beside the broker client. Schema ids are cached
per codec, so the registry is asked once per schema, not once per record.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import cavro
import pydantic
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from opsflow.contracts.catalogue import Catalogue, EventType, catalogue, record_full_name
from opsflow.contracts.events import Event
from opsflow.errors import BadInputError, RetryableError
from opsflow.settings import RegistrySettings

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")
# Records decode to dicts, the shape ``from_avro`` takes; timestamps come back as
# UTC datetimes. UUIDs are left as text for the model to parse: cavro builds
# ``uuid.UUID`` objects in Python, pydantic in Rust (decode plus ``from_avro`` of
# an order: 122 -> 99 us, 5,000 varied orders under load, the same models).
_OPTIONS = cavro.DEFAULT_OPTIONS.replace(record_decodes_to_dict=True, return_uuid_object=False)


def _schema(schema: dict[str, Any]) -> cavro.Schema:
    return cavro.Schema(json.dumps(schema), options=_OPTIONS)


class WireCodec:
    """Encodes events to and decodes them from Confluent-framed Avro.

    Whether it registers the latest schemas or only looks them up is
    ``SCHEMA_REGISTRY_AUTO_REGISTER`` (``RegistrySettings``), read once here.

    Args:
        registry: a client of any Confluent-compatible schema registry.
        contracts: the catalogue of event types (the repository's by default).
    """

    def __init__(self, registry: SchemaRegistryClient, contracts: Catalogue | None = None) -> None:
        self._registry = registry
        self.contracts = contracts or catalogue()
        self._auto_register = RegistrySettings().schema_registry_auto_register
        self._latest: dict[str, tuple[int, cavro.Schema]] = {}
        self._writers: dict[int, tuple[EventType, cavro.Schema]] = {}
        # Per writer schema id: what reads its bodies as the latest schema of its type.
        self._readers: dict[int, Any] = {}

    def _latest_schema(self, event_type: EventType) -> tuple[int, cavro.Schema]:
        cached = self._latest.get(event_type.name)
        if cached is None:
            schema = Schema(json.dumps(event_type.latest_schema), "AVRO")
            if self._auto_register:
                # Registering is idempotent: it returns the existing id when the
                # schema is already under the subject (as after provisioning).
                schema_id = _call(self._registry.register_schema, event_type.subject, schema)
            else:
                schema_id = self._registered_id(event_type, schema)
            cached = (schema_id, _schema(event_type.latest_schema))
            self._latest[event_type.name] = cached
        return cached

    def _registered_id(self, event_type: EventType, schema: Schema) -> int:
        """The id provisioning gave the latest schema of ``event_type``; never registers.

        Raises:
            RetryableError: the subject does not hold that schema (no subject, or only
                older versions). Retryable, not bad input: the record is fine and goes
                through once provisioning has run, without restarting anything.
        """
        try:
            found = _call(self._registry.lookup_schema, event_type.subject, schema)
        except SchemaRegistryError as err:
            if err.http_status_code != 404:
                raise
            raise RetryableError(
                f"schema registry: subject {event_type.subject} does not hold "
                f"{event_type.name} v{event_type.latest_version} ({err.error_message}) and "
                "SCHEMA_REGISTRY_AUTO_REGISTER is off: run provisioning "
                "(python -m opsflow.provision) with this release's schemas"
            ) from err
        schema_id: int = found.schema_id
        return schema_id

    def _writer_schema(self, schema_id: int) -> tuple[EventType, cavro.Schema]:
        cached = self._writers.get(schema_id)
        if cached is None:
            event_type, parsed = writer_schema(self._registry, self.contracts, schema_id)
            cached = (event_type, _schema(parsed))
            self._writers[schema_id] = cached
        return cached

    def _reader(self, schema_id: int) -> tuple[EventType, Any]:
        """The event type of a writer schema id, and what reads its bodies as the latest
        schema: the writer's own schema when it is the latest, else the writer's resolved
        to the latest (the resolution is worked out once per writer, not per record)."""
        event_type, writer = self._writer_schema(schema_id)
        reader = self._readers.get(schema_id)
        if reader is None:
            latest_id, latest = self._latest_schema(event_type)
            reader = writer if schema_id == latest_id else latest.reader_for_writer(writer)
            self._readers[schema_id] = reader
        return event_type, reader

    def encode(self, event: Event) -> bytes:
        """The event's record value: header, then the body written with the latest schema."""
        event_type = self.contracts[event.event_type]
        schema_id, parsed = self._latest_schema(event_type)
        body: bytes = parsed.binary_encode(event.to_avro())
        return _HEADER.pack(MAGIC_BYTE, schema_id) + body

    def decode(self, data: bytes | None) -> Event:
        """The event a record value holds, as the latest model of its type.

        Raises:
            BadInputError: not Confluent-framed, an unknown schema id, a record
                no contract defines, or a body that does not match its schema.
            RetryableError: the registry could not be asked.
        """
        if data is None or len(data) < _HEADER.size:
            raise BadInputError(f"record value of {len(data or b'')} bytes is not Confluent-framed")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise BadInputError(f"record value starts with byte {magic}, not the magic byte 0")
        event_type, reader = self._reader(schema_id)
        try:
            datum = reader.binary_decode(data[_HEADER.size :])
            return event_type.model.from_avro(datum)
        except (
            EOFError,
            ValueError,
            TypeError,
            IndexError,
            cavro.CavroException,
            pydantic.ValidationError,
        ) as err:
            raise BadInputError(
                f"{event_type.name} body does not match schema id {schema_id}: {err}"
            ) from err


def writer_schema(
    registry: SchemaRegistryClient, contracts: Catalogue, schema_id: int
) -> tuple[EventType, dict[str, Any]]:
    """The event type whose version the registry's schema ``schema_id`` is, and that schema.

    Raises:
        BadInputError: an id the registry does not know, or a record no contract defines.
        RetryableError: the registry could not be asked, or refused the credentials.
    """
    try:
        schema = _call(registry.get_schema, schema_id)
    except SchemaRegistryError as err:
        raise BadInputError(f"unknown schema id {schema_id}: {err.error_message}") from err
    parsed: dict[str, Any] = json.loads(schema.schema_str or "{}")
    name = record_full_name(parsed)
    try:
        return contracts.by_record_name(name), parsed
    except KeyError as err:
        raise BadInputError(
            f"schema id {schema_id} is record {name}, which no contract defines"
        ) from err


def _call(method: Any, *args: Any) -> Any:
    """Call the registry, telling a refusal (bad input) from an outage (retry).

    A registry that refuses opsflow's credentials (401, 403) is an outage too, not
    bad input: every record would otherwise be dead-lettered as "unknown schema
    id" until someone fixed the credentials (``RegistrySettings.auth_variable``);
    retried, the partition waits and nothing is lost. So is a registry whose
    certificate is not trusted (``SCHEMA_REGISTRY_SSL_CA_LOCATION``).
    """
    try:
        return method(*args)
    except SchemaRegistryError as err:
        if err.http_status_code in (401, 403):
            raise RetryableError(
                f"the schema registry refused the credentials ({err.http_status_code} "
                f"{err.error_message}); check {RegistrySettings().auth_variable()}"
            ) from err
        if err.http_status_code >= 500:
            raise RetryableError(f"schema registry error: {err.error_message}") from err
        raise
    except Exception as err:  # connection errors come from the HTTP library underneath
        raise RetryableError(RegistrySettings().describe_failure(err)) from err
