"""The order workflow's event types: one model per ``schemas/<event type>/vN.avsc``.

Each mirrors its schema's latest version (the contract tests hold them
together) and names the topic that carries it; every one is keyed by
``order_id``, the workflow instance.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, ClassVar

from pydantic import Field

from opsflow.contracts import (
    ANY_PRODUCER,
    AvroInt,
    AvroLong,
    AvroRecord,
    Emitters,
    Event,
    TimestampMillis,
    Topic,
)
from services.contracts.topics import DISPATCH, ORDERS, POD, POD_REJECTS, POLICY_CHECK, REVIEW

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


class OrderEvent(Event):
    """An event of the order workflow: every one names its order, which keys it."""

    order_id: str


class OrderReceived(OrderEvent):
    """``order.received`` v2: an order was accepted into opsflow."""

    event_type: ClassVar[str] = "order.received"
    contract_version: ClassVar[int] = 2
    topic: ClassVar[Topic] = ORDERS
    emitted_by: ClassVar[Emitters] = Emitters(external=ANY_PRODUCER)

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


class PolicyChecked(OrderEvent):
    """``policy.checked`` v2: the policy rules judged an order."""

    event_type: ClassVar[str] = "policy.checked"
    contract_version: ClassVar[int] = 2
    topic: ClassVar[Topic] = POLICY_CHECK
    emitted_by: ClassVar[Emitters] = Emitters(services={"policy-check"})

    outcome: PolicyOutcome
    reason_codes: list[str]
    reasons: list[Reason]
    rules_version: str
    destination: Address | None = None


class ReviewRequested(OrderEvent):
    """``review.requested`` v1: a review task was opened with a deadline."""

    event_type: ClassVar[str] = "review.requested"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = REVIEW
    emitted_by: ClassVar[Emitters] = Emitters(services={"review"})

    task_id: str
    tier: ReviewTier
    due_at: TimestampMillis
    reason_codes: list[str]
    reasons: list[Reason]


class ReviewClaimed(OrderEvent):
    """``review.claimed`` v1: a reviewer took a review task."""

    event_type: ClassVar[str] = "review.claimed"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = REVIEW
    emitted_by: ClassVar[Emitters] = Emitters(services={"review"})

    task_id: str
    actor: Actor
    tier: ReviewTier


class ReviewReleased(OrderEvent):
    """``review.released`` v1: a claimed task went back to the queue undecided."""

    event_type: ClassVar[str] = "review.released"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = REVIEW
    emitted_by: ClassVar[Emitters] = Emitters(services={"review"})

    task_id: str
    actor: Actor
    tier: ReviewTier
    reason: str | None = None


class ReviewDecided(OrderEvent):
    """``review.decided`` v1: a person approved or rejected the order."""

    event_type: ClassVar[str] = "review.decided"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = REVIEW
    emitted_by: ClassVar[Emitters] = Emitters(services={"review"})

    task_id: str
    actor: Actor
    tier: ReviewTier
    decision: ReviewDecision
    reason: str


class ReviewEscalated(OrderEvent):
    """``review.escalated`` v1: the SLA passed and the task moved up a tier."""

    event_type: ClassVar[str] = "review.escalated"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = REVIEW
    emitted_by: ClassVar[Emitters] = Emitters(services={"review"})

    task_id: str
    previous_tier: ReviewTier
    tier: ReviewTier
    breached_due_at: TimestampMillis
    due_at: TimestampMillis


class ReviewSlaBreached(OrderEvent):
    """``review.sla_breached`` v1: the last tier's SLA passed too."""

    event_type: ClassVar[str] = "review.sla_breached"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = REVIEW
    emitted_by: ClassVar[Emitters] = Emitters(services={"review"})

    task_id: str
    tier: ReviewTier
    due_at: TimestampMillis


class DispatchRequested(OrderEvent):
    """``dispatch.requested`` v1: intent to book, recorded before calling the carrier."""

    event_type: ClassVar[str] = "dispatch.requested"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = DISPATCH
    emitted_by: ClassVar[Emitters] = Emitters(services={"dispatch"})

    dispatch_id: str
    carrier: str
    attempt: AvroInt
    destination: Address


class DispatchExecuted(OrderEvent):
    """``dispatch.executed`` v1: the carrier accepted the booking."""

    event_type: ClassVar[str] = "dispatch.executed"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = DISPATCH
    emitted_by: ClassVar[Emitters] = Emitters(services={"dispatch"})

    dispatch_id: str
    carrier: str
    attempt: AvroInt
    booking_reference: str
    tracking_url: str | None = None
    estimated_delivery_at: TimestampMillis | None = None


class DispatchFailed(OrderEvent):
    """``dispatch.failed`` v1: a dispatch attempt failed."""

    event_type: ClassVar[str] = "dispatch.failed"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = DISPATCH
    emitted_by: ClassVar[Emitters] = Emitters(services={"dispatch"})

    dispatch_id: str
    carrier: str
    attempt: AvroInt
    failure_class: DispatchFailureClass
    reason: str
    retries_exhausted: bool
    next_attempt_at: TimestampMillis | None = None


class PodCaptured(OrderEvent):
    """``pod.captured`` v1: a proof of delivery was matched to an order."""

    event_type: ClassVar[str] = "pod.captured"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = POD
    emitted_by: ClassVar[Emitters] = Emitters(external={"carrier"})

    carrier: str
    booking_reference: str
    delivered_at: TimestampMillis
    received_by: str
    signature_ref: str | None = None
    photo_ref: str | None = None


class PodRejected(OrderEvent):
    """``pod.rejected`` v1: a proof of delivery could not be accepted."""

    event_type: ClassVar[str] = "pod.rejected"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = POD_REJECTS
    emitted_by: ClassVar[Emitters] = Emitters(external={"carrier"})

    carrier: str | None = None
    booking_reference: str | None = None
    reason_code: PodRejectionCode
    reason: str
    # The refused body as text: up to 16 KiB and a note on how long it was.
    raw_payload: Annotated[str, Field(max_length=20_000)]


EVENTS: tuple[type[OrderEvent], ...] = (
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
"""Every event type of the order workflow, in the order the workflow meets them."""

MODELS: Mapping[str, type[OrderEvent]] = MappingProxyType({e.event_type: e for e in EVENTS})
"""Event type name (``"order.received"``) -> its class."""
