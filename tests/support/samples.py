"""Realistic sample events, one per event type, with every optional field set.

Shared by the contract tests and the wire-format tests on the real stack.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from opsflow.contracts import Envelope, Event
from services.contracts import (
    MODELS,
    Actor,
    ActorRole,
    Address,
    CustomerRiskTier,
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
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

# --- samples: one realistic event per type, every optional field set ---------------------

T0 = datetime(2025, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)
ORDER = "ord-20250314-0042"
REVIEWER = Actor(user_id="u-7f3a", display_name="Ada Reviewer", role=ActorRole.REVIEWER)
REASONS = [Reason(code="AMOUNT_OVER_LIMIT", message="Order total 1,250.00 EUR exceeds 1,000.00")]
ADDRESS = Address(
    name="Grace Hopper", street="Hauptstr. 5", city="Berlin", postal_code="10115", country="DE"
)


def envelope(model: type[Event], n: int) -> Envelope:
    return Envelope(
        event_id=uuid.UUID(int=n),
        idempotency_key=f"{model.event_type}:{ORDER}:{n}",
        occurred_at=T0 + timedelta(minutes=n),
        correlation_id=ORDER,
        causation_id=str(uuid.UUID(int=n - 1)),
        producer=model.emitted_by.example,
        contract_version=model.contract_version,
    )


def sample(event_type: str) -> Event:
    model = MODELS[event_type]
    common: dict[str, Any] = {"envelope": envelope(model, 1), "order_id": ORDER}
    review: dict[str, Any] = {"task_id": "task-1", "tier": ReviewTier.REVIEWER}
    dispatch: dict[str, Any] = {"dispatch_id": "disp-1", "carrier": "dhl", "attempt": 2}
    samples: dict[str, Event] = {
        "order.received": OrderReceived(
            **common,
            customer_id="cust-9",
            customer_name="Grace Hopper",
            customer_risk_tier=CustomerRiskTier.MEDIUM,
            amount_minor=125_000,
            currency="EUR",
            destination=ADDRESS,
            items=[
                OrderItem(sku="SKU-1", description="Widget", quantity=3, unit_price_minor=25_000),
                OrderItem(sku="SKU-2", description="Gadget", quantity=1, unit_price_minor=50_000),
            ],
            placed_at=T0 - timedelta(hours=1),
            notes="Leave at reception",
            sales_channel="web",
        ),
        "policy.checked": PolicyChecked(
            **common,
            outcome=PolicyOutcome.NEEDS_REVIEW,
            reason_codes=["AMOUNT_OVER_LIMIT"],
            reasons=REASONS,
            rules_version="2025.03.1",
            destination=ADDRESS,
        ),
        "review.requested": ReviewRequested(
            **common,
            **review,
            due_at=T0 + timedelta(hours=4),
            reason_codes=["AMOUNT_OVER_LIMIT"],
            reasons=REASONS,
        ),
        "review.claimed": ReviewClaimed(**common, **review, actor=REVIEWER),
        "review.released": ReviewReleased(
            **common, **review, actor=REVIEWER, reason="Going off shift"
        ),
        "review.decided": ReviewDecided(
            **common,
            **review,
            actor=REVIEWER,
            decision=ReviewDecision.APPROVED,
            reason="Known customer, verified by phone",
        ),
        "review.escalated": ReviewEscalated(
            **common,
            task_id="task-1",
            previous_tier=ReviewTier.REVIEWER,
            tier=ReviewTier.SUPERVISOR,
            breached_due_at=T0 + timedelta(hours=4),
            due_at=T0 + timedelta(hours=6),
        ),
        "review.sla_breached": ReviewSlaBreached(
            **common, task_id="task-1", tier=ReviewTier.SUPERVISOR, due_at=T0 + timedelta(hours=6)
        ),
        "dispatch.requested": DispatchRequested(**common, **dispatch, destination=ADDRESS),
        "dispatch.executed": DispatchExecuted(
            **common,
            **dispatch,
            booking_reference="BK-123456",
            tracking_url="https://track.example/BK-123456",
            estimated_delivery_at=T0 + timedelta(days=2),
        ),
        "dispatch.failed": DispatchFailed(
            **common,
            **dispatch,
            failure_class=DispatchFailureClass.TRANSIENT,
            reason="carrier API timed out after 10s",
            retries_exhausted=False,
            next_attempt_at=T0 + timedelta(minutes=5),
        ),
        "pod.captured": PodCaptured(
            **common,
            carrier="dhl",
            booking_reference="BK-123456",
            delivered_at=T0 + timedelta(days=2),
            received_by="G. Hopper",
            signature_ref="s3://pod/BK-123456/signature.png",
            photo_ref="s3://pod/BK-123456/photo.jpg",
        ),
        "pod.rejected": PodRejected(
            **common,
            carrier="dhl",
            booking_reference="BK-999999",
            reason_code=PodRejectionCode.UNKNOWN_BOOKING,
            reason="no dispatch with booking reference BK-999999",
            raw_payload='{"booking": "BK-999999", "signed_by": "?"}',
        ),
    }
    return samples[event_type]
