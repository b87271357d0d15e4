"""The base of every event: the envelope, the topic that carries it, the key that routes it.

An application's event types subclass ``Event`` (see ``opsflow.application``):
one pydantic model per schema directory (``schemas/<event type>/vN.avsc``),
mirroring its latest version. The schemas are the contract (they are what the
registry and other languages see); the models let Python services build and
read events with type checking. The contract tests walk each schema next to its
model, so the two cannot drift apart unnoticed: when a schema gets a new
version, its model follows it and its ``contract_version`` is raised to match.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import model_validator

from opsflow.contracts.emitters import Emitters
from opsflow.contracts.envelope import Envelope
from opsflow.contracts.lineage import current as current_lineage
from opsflow.contracts.record import AvroRecord
from opsflow.contracts.topics import Topic
from opsflow.errors import ConfigurationError


class Event(AvroRecord):
    """Base of every event: the envelope first, then the event's own fields.

    Subclasses set ``event_type`` (the schema directory name), ``contract_version``
    (the schema version the model mirrors, written into new envelopes),
    ``topic`` (the topic that carries it, whose ``key`` field every event on it
    has: its value keys the record on Kafka and is the envelope's correlation id)
    and ``emitted_by`` (who may write it; see ``opsflow.contracts.emitters``).
    """

    event_type: ClassVar[str]
    contract_version: ClassVar[int]
    topic: ClassVar[Topic]
    emitted_by: ClassVar[Emitters]

    envelope: Envelope

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """A concrete event type must have its topic's key as a string field, checked
        when the class is defined rather than when its first record is keyed."""
        super().__pydantic_init_subclass__(**kwargs)
        topic = cls.__dict__.get("topic")
        if topic is None:
            return  # an abstract base (say, the events of one workflow)
        if not isinstance(topic, Topic):
            raise ConfigurationError(
                f"event class {cls.__name__}", f"has topic {topic!r}", "Give it an opsflow Topic."
            )
        if not isinstance(getattr(cls, "emitted_by", None), Emitters):
            raise ConfigurationError(
                f"event class {cls.__name__}",
                "does not say who may emit it",
                "Add `emitted_by: ClassVar[Emitters] = Emitters(services={...})` naming the"
                " services that write it (or `external=` the producers that send it).",
            )
        field = cls.model_fields.get(topic.key)
        if field is None or field.annotation is not str:
            raise ConfigurationError(
                f"event class {cls.__name__}",
                f"has no str field {topic.key!r}, the key of topic {topic.value!r}",
                f"Add `{topic.key}: str` (every event on the topic is keyed by it).",
            )

    @property
    def key(self) -> str:
        """The record key: the value of the topic's key field (the instance's id)."""
        key: str = getattr(self, self.topic.key)
        return key

    @model_validator(mode="before")
    @classmethod
    def _derive_envelope(cls, data: Any) -> Any:
        """Inside a handler, an event built without an envelope gets one derived from the
        input being handled (see ``opsflow.contracts.lineage``); elsewhere it is required."""
        if isinstance(data, dict) and "envelope" not in data:
            lineage = current_lineage()
            if lineage is not None:
                return {
                    **data,
                    "envelope": lineage.envelope_for(cls.event_type, cls.contract_version),
                }
        return data

    @classmethod
    def envelope_for(
        cls,
        *,
        key: str,
        idempotency_key: str,
        producer: str,
        caused_by: Envelope | None = None,
        occurred_at: datetime | None = None,
    ) -> Envelope:
        """A new envelope for an event of this type, so producers cannot get the
        correlation id, the causation chain or the contract version wrong.

        Args:
            key: the instance's id (the topic's key field), its correlation id.
            caused_by: the envelope of the event that caused this one, if any.
        """
        return Envelope.new(
            correlation_id=key,
            idempotency_key=idempotency_key,
            producer=producer,
            contract_version=cls.contract_version,
            causation_id=str(caused_by.event_id) if caused_by else None,
            occurred_at=occurred_at,
        )
