"""The event contracts of opsflow: Avro schemas in ``schemas/`` and their typed Python face.

- ``catalogue()``: every event type with its topic, subject and schema versions.
- ``MODELS`` and the event classes: pydantic models mirroring the latest schemas,
  with ``to_avro()`` / ``from_avro()`` for fastavro.
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
from opsflow.contracts.envelope import Envelope
from opsflow.contracts.events import (
    MODELS,
    Actor,
    ActorRole,
    Address,
    CustomerRiskTier,
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    Event,
    OrderItem,
    OrderReceived,
    PodCaptured,
    PodRejected,
    PodRejectionCode,
    PolicyChecked,
    PolicyOutcome,
    Reason,
    ReviewClaimed,
    ReviewDecided,
    ReviewDecision,
    ReviewEscalated,
    ReviewReleased,
    ReviewRequested,
    ReviewSlaBreached,
    ReviewTier,
)
from opsflow.contracts.evolution import REPLAY_LEVEL, check_evolution
from opsflow.contracts.record import AvroInt, AvroLong, AvroRecord, TimestampMillis
from opsflow.contracts.topics import EVENT_TOPICS, Topic, subject_name

__all__ = [
    "ENVELOPE_FILE",
    "EVENT_TOPICS",
    "MODELS",
    "REPLAY_LEVEL",
    "SCHEMAS_DIR_VARIABLE",
    "Actor",
    "ActorRole",
    "Address",
    "AvroInt",
    "AvroLong",
    "AvroRecord",
    "Catalogue",
    "CustomerRiskTier",
    "DispatchExecuted",
    "DispatchFailed",
    "DispatchFailureClass",
    "DispatchRequested",
    "Envelope",
    "Event",
    "EventType",
    "OrderItem",
    "OrderReceived",
    "PodCaptured",
    "PodRejected",
    "PodRejectionCode",
    "PolicyChecked",
    "PolicyOutcome",
    "Reason",
    "ReviewClaimed",
    "ReviewDecided",
    "ReviewDecision",
    "ReviewEscalated",
    "ReviewReleased",
    "ReviewRequested",
    "ReviewSlaBreached",
    "ReviewTier",
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
