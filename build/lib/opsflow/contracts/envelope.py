"""The envelope: metadata every event carries, whatever its payload.

It mirrors ``schemas/envelope.avsc``, which every event schema inlines as its first
field, so deduplication, tracing and audit work the same way on every topic.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from opsflow.contracts.record import AvroInt, AvroRecord, TimestampMillis


class Envelope(AvroRecord):
    """Mirrors ``opsflow.events.Envelope``; see the schema's field docs for the meaning."""

    event_id: uuid.UUID
    idempotency_key: str
    occurred_at: TimestampMillis
    correlation_id: str
    causation_id: str | None = None
    producer: str
    contract_version: AvroInt

    @classmethod
    def new(
        cls,
        *,
        correlation_id: str,
        idempotency_key: str,
        producer: str,
        contract_version: int,
        causation_id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> Envelope:
        """An envelope for a new event: a fresh event id, and now as occurrence time unless
        the fact happened earlier (pass ``occurred_at`` then)."""
        return cls(
            event_id=uuid.uuid4(),
            idempotency_key=idempotency_key,
            occurred_at=occurred_at or datetime.now(UTC),
            correlation_id=correlation_id,
            causation_id=causation_id,
            producer=producer,
            contract_version=contract_version,
        )
