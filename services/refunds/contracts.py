"""The refund workflow's topics and event types: the typed face of ``schemas/``.

    refund.requested -> refund.checked (rules) -> refund.approval_* (a person, when
    the rules ask for one) -> refund.payout_requested -> refund.paid | refund.payout_failed

Every event is keyed by ``refund_id``: one refund's events stay on one
partition of each topic, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import ClassVar

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

REQUESTS = Topic("refund-requests", key="refund_id")
CHECKS = Topic("refund-checks", key="refund_id")
APPROVALS = Topic("refund-approvals", key="refund_id")
PAYOUTS = Topic("refund-payouts", key="refund_id")

TOPICS = (REQUESTS, CHECKS, APPROVALS, PAYOUTS)


class RefundReason(StrEnum):
    """``refunds.events.RefundReason``: why the customer asks for their money back."""

    DAMAGED = "DAMAGED"
    NOT_DELIVERED = "NOT_DELIVERED"
    WRONG_ITEM = "WRONG_ITEM"
    CHANGED_MIND = "CHANGED_MIND"


class CheckOutcome(StrEnum):
    """``refunds.events.CheckOutcome``."""

    AUTO_APPROVED = "AUTO_APPROVED"
    NEEDS_APPROVAL = "NEEDS_APPROVAL"
    REJECTED = "REJECTED"


class ApprovalTier(StrEnum):
    """``refunds.events.ApprovalTier``: who may decide, in escalation order."""

    AGENT = "AGENT"
    FINANCE_LEAD = "FINANCE_LEAD"


class ActorRole(StrEnum):
    """``refunds.events.ActorRole``."""

    REVIEWER = "REVIEWER"
    SUPERVISOR = "SUPERVISOR"


class Decision(StrEnum):
    """``refunds.events.Decision``."""

    APPROVED = "APPROVED"
    REJECTED = "REJECTED"


class Reason(AvroRecord):
    """``refunds.events.Reason``: a rule's code with its explanation."""

    code: str
    message: str


class Actor(AvroRecord):
    """``refunds.events.Actor``: the authenticated person who acted."""

    user_id: str
    display_name: str
    role: ActorRole


class RefundEvent(Event):
    """An event of the refund workflow: every one names its refund, which keys it."""

    refund_id: str


class RefundRequested(RefundEvent):
    """``refund.requested`` v1: a customer asked for money back on an order."""

    event_type: ClassVar[str] = "refund.requested"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = REQUESTS
    emitted_by: ClassVar[Emitters] = Emitters(external=ANY_PRODUCER)

    order_id: str
    customer_id: str
    amount_minor: AvroLong
    currency: str
    charged_minor: AvroLong
    reason: RefundReason
    purchased_at: TimestampMillis
    note: str | None = None


class RefundChecked(RefundEvent):
    """``refund.checked`` v1: the refund rules judged a request."""

    event_type: ClassVar[str] = "refund.checked"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = CHECKS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-check"})

    outcome: CheckOutcome
    reason_codes: list[str]
    reasons: list[Reason]
    rules_version: str
    customer_id: str
    amount_minor: AvroLong
    currency: str


class ApprovalRequested(RefundEvent):
    """``refund.approval_requested`` v1: a refund waits for a person, with a deadline."""

    event_type: ClassVar[str] = "refund.approval_requested"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = APPROVALS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-approval"})

    task_id: str
    tier: ApprovalTier
    due_at: TimestampMillis
    reason_codes: list[str]
    reasons: list[Reason]


class ApprovalClaimed(RefundEvent):
    """``refund.approval_claimed`` v1: a person took the approval task."""

    event_type: ClassVar[str] = "refund.approval_claimed"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = APPROVALS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-approval"})

    task_id: str
    actor: Actor
    tier: ApprovalTier


class ApprovalReleased(RefundEvent):
    """``refund.approval_released`` v1: a claimed task went back to the queue undecided."""

    event_type: ClassVar[str] = "refund.approval_released"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = APPROVALS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-approval"})

    task_id: str
    actor: Actor
    tier: ApprovalTier
    reason: str | None = None


class ApprovalDecided(RefundEvent):
    """``refund.approval_decided`` v1: a person approved or rejected the refund."""

    event_type: ClassVar[str] = "refund.approval_decided"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = APPROVALS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-approval"})

    task_id: str
    actor: Actor
    tier: ApprovalTier
    decision: Decision
    reason: str


class ApprovalEscalated(RefundEvent):
    """``refund.approval_escalated`` v1: the agents' SLA passed; the finance lead decides."""

    event_type: ClassVar[str] = "refund.approval_escalated"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = APPROVALS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-approval"})

    task_id: str
    previous_tier: ApprovalTier
    tier: ApprovalTier
    breached_due_at: TimestampMillis
    due_at: TimestampMillis


class ApprovalSlaBreached(RefundEvent):
    """``refund.approval_sla_breached`` v1: the finance lead's SLA passed too."""

    event_type: ClassVar[str] = "refund.approval_sla_breached"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = APPROVALS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-approval"})

    task_id: str
    tier: ApprovalTier
    due_at: TimestampMillis


class PayoutRequested(RefundEvent):
    """``refund.payout_requested`` v1: intent to pay, recorded before the payment
    partner is called."""

    event_type: ClassVar[str] = "refund.payout_requested"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = PAYOUTS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-payout"})

    customer_id: str
    amount_minor: AvroLong
    currency: str


class RefundPaid(RefundEvent):
    """``refund.paid`` v1: the payment partner confirmed the payout."""

    event_type: ClassVar[str] = "refund.paid"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = PAYOUTS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-payout"})

    payout_reference: str
    amount_minor: AvroLong
    currency: str
    attempts: AvroInt


class PayoutFailed(RefundEvent):
    """``refund.payout_failed`` v1: the payout was refused, or every attempt failed."""

    event_type: ClassVar[str] = "refund.payout_failed"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = PAYOUTS
    emitted_by: ClassVar[Emitters] = Emitters(services={"refund-payout"})

    reason: str
    permanent: bool
    attempts: AvroInt


EVENTS: tuple[type[RefundEvent], ...] = (
    RefundRequested,
    RefundChecked,
    ApprovalRequested,
    ApprovalClaimed,
    ApprovalReleased,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalSlaBreached,
    PayoutRequested,
    RefundPaid,
    PayoutFailed,
)
"""Every event type of the refund workflow, in the order the workflow meets them."""

MODELS: Mapping[str, type[RefundEvent]] = MappingProxyType({e.event_type: e for e in EVENTS})
