"""Event contracts: an application's Avro schemas and their typed Python face.

- ``Topic`` and ``Event``: what an application's topics and event types are
  (pydantic models mirroring its latest schemas, with ``to_avro()`` /
  ``from_avro()`` for fastavro); the envelope every event starts with.
- ``Emitters``: who may emit an event type (``Event.emitted_by``), checked by
  ingest, by every consumer and, as printed by ``opsflow acls``, by the broker.
- ``catalogue()``: every event type with its topic, subject and schema versions.
- ``check_evolution()``: the BACKWARD_TRANSITIVE gate that keeps every record on
  the topics readable by the newest schema, since the topics are the replay source.
"""

from __future__ import annotations

from opsflow.contracts.catalogue import (
    ENVELOPE_FILE,
    SCHEMAS_DIR_VARIABLE,
    Catalogue,
    EventType,
    catalogue,
    load_catalogue,
    read_envelope,
    read_versions,
    record_full_name,
    schemas_dir,
)
from opsflow.contracts.emitters import ANY_PRODUCER, Emitters, ForbiddenProducerError
from opsflow.contracts.envelope import Envelope
from opsflow.contracts.events import Event
from opsflow.contracts.evolution import REPLAY_LEVEL, check_evolution
from opsflow.contracts.record import AvroInt, AvroLong, AvroRecord, TimestampMillis
from opsflow.contracts.topics import Topic, subject_name

__all__ = [
    "ANY_PRODUCER",
    "ENVELOPE_FILE",
    "REPLAY_LEVEL",
    "SCHEMAS_DIR_VARIABLE",
    "AvroInt",
    "AvroLong",
    "AvroRecord",
    "Catalogue",
    "Emitters",
    "Envelope",
    "Event",
    "EventType",
    "ForbiddenProducerError",
    "TimestampMillis",
    "Topic",
    "catalogue",
    "check_evolution",
    "load_catalogue",
    "read_envelope",
    "read_versions",
    "record_full_name",
    "schemas_dir",
    "subject_name",
]
