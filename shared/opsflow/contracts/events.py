"""One model per event type, mirroring the latest ``schemas/<event type>/vN.avsc``.

The schemas are the contract (they are what the registry and other languages see);
these classes let Python services build and read events with type checking. The
contract tests walk each schema next to its model, so the two cannot drift apart
unnoticed: when a schema gets a new version, its model follows it and its
``contract_version`` is raised to match.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar

from pydantic import model_validator

from opsflow.contracts.envelope import Envelope
from opsflow.contracts.lineage import current as current_lineage
from opsflow.contracts.record import AvroInt, AvroLong, AvroRecord, TimestampMillis

# --- enums (values are the Avro symbols, in schema order) -------------------------------


class CustomerRiskTier(StrEnum):
    """``opsflow.events.CustomerRiskTier``."""

    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"


class PolicyOutcome(StrEnum):
    """``opsflow.events.PolicyOutcome``."""

    AUTO_APPROVED = "AUTO_APPROVED"
    NEEDS_REVIEW = "NEEDS_REVIEW"
    REJECTED = "REJECTED"


class ReviewTier(StrEnum):
    """``opsflow.events.ReviewTier``."""

    REVIEWER = "REVIEWER"
    SUPERVISOR = "SUPERVISOR"


class ActorRole(StrEnum):
    """``opsflow.events.ActorRole``."""

    REVIEWER = "REVIEWER"
    SUPERVISOR = "SUPERVISOR"


class ReviewDecision(StrEnum):
    """``opsflow.events.ReviewDecision``."""

    APPROVED = "APPROVED"
    REJECTED = "REJECTED"


class DispatchFailureClass(StrEnum):
    """``opsflow.events.DispatchFailureClass``."""

    TRANSIENT = "TRANSIENT"
    PERMANENT = "PERMANENT"


class PodRejectionCode(StrEnum):
    """``opsflow.events.PodRejectionCode``."""

    MALFORMED = "MALFORMED"
    UNKNOWN_BOOKING = "UNKNOWN_BOOKING"
    NOT_DISPATCHED = "NOT_DISPATCHED"
    OTHER = "OTHER"


# --- records nested in events --------------------------------------------------------


class Address(AvroRecord):
    """``opsflow.events.Address``: a postal delivery address."""

    name: str
    street: str
    city: str
    postal_code: str
    country: str


class OrderItem(AvroRecord):
    """``opsflow.events.OrderItem``: one order line."""

    sku: str
    description: str
    quantity: AvroInt
    unit_price_minor: AvroLong


class Reason(AvroRecord):
    """``opsflow.events.Reason``: a reason code with its human explanation."""

    code: str
    message: str


class Actor(AvroRecord):
    """``opsflow.events.Actor``: the authenticated person who acted."""

    user_id: str
    display_name: str
    role: ActorRole


# --- events --------------------------------------------------------------------------


class Event(AvroRecord):
    """Base of every event: the envelope first, then the order id that keys it on Kafka.

    Subclasses set ``event_type`` (the schema directory name) and ``contract_version``
    (the schema version the model mirrors, written into new envelopes).
    """

    event_type: ClassVar[str]
    contract_version: ClassVar[int]

    envelope: Envelope
    order_id: str

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
        order_id: str,
        idempotency_key: str,
        producer: str,
        caused_by: Envelope | None = None,
        occurred_at: datetime | None = None,
    ) -> Envelope:
        """A new envelope for an event of this type, so producers cannot get the
        correlation id, the causation chain or the contract version wrong.

        Args:
            caused_by: the envelope of the event that caused this one, if any.
        """
        return Envelope.new(
            correlation_id=order_id,
            idempotency_key=idempotency_key,
            producer=producer,
            contract_version=cls.contract_version,
            causation_id=str(caused_by.event_id) if caused_by else None,
            occurred_at=occurred_at,
        )


class OrderReceived(Event):
    """``order.received`` v2: an order was accepted into opsflow."""

    event_type: ClassVar[str] = "order.received"
    contract_version: ClassVar[int] = 2

    customer_id: str
    customer_name: str
    customer_risk_tier: CustomerRiskTier
    amount_minor: AvroLong
    currency: str
    destination: Address
    items: list[OrderItem]
    placed_at: TimestampMillis
    notes: str | None = None
    sales_channel: str | None = None


class PolicyChecked(Event):
    """``policy.checked`` v1: the policy rules judged an order."""

    event_type: ClassVar[str] = "policy.checked"
    contract_version: ClassVar[int] = 1

    outcome: PolicyOutcome
    reason_codes: list[str]
    reasons: list[Reason]
    rules_version: str


class ReviewRequested(Event):
    """``review.requested`` v1: a review task was opened with a deadline."""

    event_type: ClassVar[str] = "review.requested"
    contract_version: ClassVar[int] = 1

    task_id: str
    tier: ReviewTier
    due_at: TimestampMillis
    reason_codes: list[str]
    reasons: list[Reason]


class ReviewClaimed(Event):
    """``review.claimed`` v1: a reviewer took a review task."""

    event_type: ClassVar[str] = "review.claimed"
    contract_version: ClassVar[int] = 1

    task_id: str
    actor: Actor
    tier: ReviewTier


class ReviewReleased(Event):
    """``review.released`` v1: a claimed task went back to the queue undecided."""

    event_type: ClassVar[str] = "review.released"
    contract_version: ClassVar[int] = 1

    task_id: str
    actor: Actor
    tier: ReviewTier
    reason: str | None = None


class ReviewDecided(Event):
    """``review.decided`` v1: a person approved or rejected the order."""

    event_type: ClassVar[str] = "review.decided"
    contract_version: ClassVar[int] = 1

    task_id: str
    actor: Actor
    tier: ReviewTier
    decision: ReviewDecision
    reason: str


class ReviewEscalated(Event):
    """``review.escalated`` v1: the SLA passed and the task moved up a tier."""

    event_type: ClassVar[str] = "review.escalated"
    contract_version: ClassVar[int] = 1

    task_id: str
    previous_tier: ReviewTier
    tier: ReviewTier
    breached_due_at: TimestampMillis
    due_at: TimestampMillis


class ReviewSlaBreached(Event):
    """``review.sla_breached`` v1: the last tier's SLA passed too."""

    event_type: ClassVar[str] = "review.sla_breached"
    contract_version: ClassVar[int] = 1

    task_id: str
    tier: ReviewTier
    due_at: TimestampMillis


class DispatchRequested(Event):
    """``dispatch.requested`` v1: intent to book, recorded before calling the carrier."""

    event_type: ClassVar[str] = "dispatch.requested"
    contract_version: ClassVar[int] = 1

    dispatch_id: str
    carrier: str
    attempt: AvroInt
    destination: Address


class DispatchExecuted(Event):
    """``dispatch.executed`` v1: the carrier accepted the booking."""

    event_type: ClassVar[str] = "dispatch.executed"
    contract_version: ClassVar[int] = 1

    dispatch_id: str
    carrier: str
    attempt: AvroInt
    booking_reference: str
    tracking_url: str | None = None
    estimated_delivery_at: TimestampMillis | None = None


class DispatchFailed(Event):
    """``dispatch.failed`` v1: a dispatch attempt failed."""

    event_type: ClassVar[str] = "dispatch.failed"
    contract_version: ClassVar[int] = 1

    dispatch_id: str
    carrier: str
    attempt: AvroInt
    failure_class: DispatchFailureClass
    reason: str
    retries_exhausted: bool
    next_attempt_at: TimestampMillis | None = None


class PodCaptured(Event):
    """``pod.captured`` v1: a proof of delivery was matched to an order."""

    event_type: ClassVar[str] = "pod.captured"
    contract_version: ClassVar[int] = 1

    carrier: str
    booking_reference: str
    delivered_at: TimestampMillis
    received_by: str
    signature_ref: str | None = None
    photo_ref: str | None = None


class PodRejected(Event):
    """``pod.rejected`` v1: a proof of delivery could not be accepted."""

    event_type: ClassVar[str] = "pod.rejected"
    contract_version: ClassVar[int] = 1

    carrier: str | None = None
    booking_reference: str | None = None
    reason_code: PodRejectionCode
    reason: str
    raw_payload: str


MODELS: Mapping[str, type[Event]] = MappingProxyType(
    {
        model.event_type: model
        for model in (
            OrderReceived,
            PolicyChecked,
            ReviewRequested,
            ReviewClaimed,
            ReviewReleased,
            ReviewDecided,
            ReviewEscalated,
            ReviewSlaBreached,
            DispatchRequested,
            DispatchExecuted,
            DispatchFailed,
            PodCaptured,
            PodRejected,
        )
    }
)
"""Event type name (``"order.received"``) -> model class."""
