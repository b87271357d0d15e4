"""Causally consistent event histories of orders, for projection tests and the rebuild bench.

Each order goes the way orders go in the workflow: received; policy-checked
(auto-approved, sent to review, or rejected); reviewed (claimed, sometimes
released and claimed again, sometimes escalated and breached, then decided);
dispatched (sometimes after failed attempts, sometimes failing for good);
delivered. Every event names its cause, and times move forward.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Producer

from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.topics import topic_name
from services.contracts import (
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

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
COUNTRIES = ["DE", "FR", "NL", "AT", "PL", "IT", "ES", "SE"]
REVIEWERS = [
    Actor(user_id="ada", display_name="Ada Reviewer", role=ActorRole.REVIEWER),
    Actor(user_id="alan", display_name="Alan Reviewer", role=ActorRole.REVIEWER),
]
SUPERVISOR = Actor(user_id="grace", display_name="Grace Supervisor", role=ActorRole.SUPERVISOR)


class _History:
    def __init__(self, order_id: str, at: datetime) -> None:
        self.order_id, self.at, self.events, self.last = order_id, at, list[Event](), None

    def add(self, model: type[Event], minutes: float, **fields: Any) -> Event:
        self.at += timedelta(minutes=minutes)
        envelope = model.envelope_for(
            key=self.order_id,
            idempotency_key=f"{model.event_type}:{self.order_id}:{len(self.events)}",
            producer=model.emitted_by.example,
            caused_by=self.last.envelope if self.last else None,
            occurred_at=self.at,
        )
        event = model(envelope=envelope, order_id=self.order_id, **fields)
        self.events.append(event)
        self.last = event
        return event


def order_history(rng: random.Random, order_id: str, at: datetime) -> list[Event]:
    """One order's events, in causal order."""
    h = _History(order_id, at)
    country = rng.choice(COUNTRIES)
    amount = rng.randrange(1_000, 400_000)
    h.add(
        OrderReceived,
        0,
        customer_id=f"cust-{rng.randrange(200)}",
        customer_name=rng.choice(["Acme GmbH", "Globex BV", "Initech SA", "Umbrella AB"]),
        customer_risk_tier=rng.choice(list(CustomerRiskTier)),
        amount_minor=amount,
        currency="EUR",
        destination=Address(
            name="Receiving",
            street="Hafenstr. 1",
            city="Hamburg",
            postal_code="20457",
            country=country,
        ),
        items=[
            OrderItem(
                sku=f"SKU-{rng.randrange(50)}",
                description="Crate",
                quantity=1,
                unit_price_minor=amount,
            )
        ],
        placed_at=h.at,
        sales_channel=rng.choice(["web", "edi", None]),
    )
    roll = rng.random()
    if roll < 0.08:
        h.add(
            PolicyChecked,
            0.01,
            outcome=PolicyOutcome.REJECTED,
            reason_codes=["RESTRICTED_DESTINATION"],
            reasons=[Reason(code="RESTRICTED_DESTINATION", message="not shipped there")],
            rules_version="v1",
        )
        return h.events
    if roll < 0.33:
        reasons = [Reason(code="AMOUNT_OVER_LIMIT", message="over the auto-approve limit")]
        h.add(
            PolicyChecked,
            0.01,
            outcome=PolicyOutcome.NEEDS_REVIEW,
            reason_codes=["AMOUNT_OVER_LIMIT"],
            reasons=reasons,
            rules_version="v1",
        )
        task = f"task-{order_id}"
        h.add(
            ReviewRequested,
            0.01,
            task_id=task,
            tier=ReviewTier.REVIEWER,
            due_at=h.at + timedelta(hours=2),
            reason_codes=["AMOUNT_OVER_LIMIT"],
            reasons=reasons,
        )
        decider = rng.choice(REVIEWERS)
        tier = ReviewTier.REVIEWER
        if rng.random() < 0.2:
            h.add(ReviewClaimed, rng.uniform(1, 30), task_id=task, actor=decider, tier=tier)
            h.add(
                ReviewReleased,
                rng.uniform(1, 30),
                task_id=task,
                actor=decider,
                tier=tier,
                reason="shift over",
            )
        if rng.random() < 0.15:
            due = h.at + timedelta(hours=2)
            h.add(
                ReviewEscalated,
                121,
                task_id=task,
                previous_tier=tier,
                tier=ReviewTier.SUPERVISOR,
                breached_due_at=due,
                due_at=due + timedelta(hours=1),
            )
            tier, decider = ReviewTier.SUPERVISOR, SUPERVISOR
            if rng.random() < 0.3:
                h.add(
                    ReviewSlaBreached, 61, task_id=task, tier=tier, due_at=due + timedelta(hours=1)
                )
        h.add(ReviewClaimed, rng.uniform(1, 60), task_id=task, actor=decider, tier=tier)
        approved = rng.random() < 0.8
        h.add(
            ReviewDecided,
            rng.uniform(1, 20),
            task_id=task,
            actor=decider,
            tier=tier,
            decision=ReviewDecision.APPROVED if approved else ReviewDecision.REJECTED,
            reason="checked with the customer" if approved else "could not verify the buyer",
        )
        if not approved:
            return h.events
    else:
        h.add(
            PolicyChecked,
            0.01,
            outcome=PolicyOutcome.AUTO_APPROVED,
            reason_codes=[],
            reasons=[],
            rules_version="v1",
        )
    dispatch = f"disp-{order_id}"
    attempts = 1 + (rng.random() < 0.1) + (rng.random() < 0.05)
    for attempt in range(1, attempts + 1):
        address = Address(
            name="Receiving",
            street="Hafenstr. 1",
            city="Hamburg",
            postal_code="20457",
            country=country,
        )
        h.add(
            DispatchRequested,
            0.01,
            dispatch_id=dispatch,
            carrier="stand-in",
            attempt=attempt,
            destination=address,
        )
        last = attempt == attempts
        if not last:
            h.add(
                DispatchFailed,
                0.01,
                dispatch_id=dispatch,
                carrier="stand-in",
                attempt=attempt,
                failure_class=DispatchFailureClass.TRANSIENT,
                reason="carrier answered 503",
                retries_exhausted=False,
            )
    if rng.random() < 0.03:
        h.add(
            DispatchFailed,
            0.01,
            dispatch_id=dispatch,
            carrier="stand-in",
            attempt=attempts,
            failure_class=DispatchFailureClass.PERMANENT,
            reason="destination refused",
            retries_exhausted=True,
        )
        return h.events
    booking = f"BK-{order_id}"
    h.add(
        DispatchExecuted,
        0.01,
        dispatch_id=dispatch,
        carrier="stand-in",
        attempt=attempts,
        booking_reference=booking,
    )
    if rng.random() < 0.9:
        h.add(
            PodCaptured,
            rng.uniform(600, 3000),
            carrier="stand-in",
            booking_reference=booking,
            delivered_at=h.at,
            received_by="front desk",
        )
    return h.events


def histories(count: int, *, seed: int = 7, run: str = "h", days: int = 3) -> Iterator[list[Event]]:
    """``count`` orders' histories, received over ``days`` days."""
    rng = random.Random(seed)
    for n in range(count):
        start = T0 + timedelta(seconds=rng.uniform(0, days * 86_400))
        yield order_history(rng, f"{run}-{n:07d}", start)


def publish(
    bootstrap: str, codec: WireCodec, events: Iterator[Event] | list[Event], *, prefix: str
) -> int:
    """Write events to their topics (``prefix`` + contract topic), keyed by order id."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10_000}
    )
    sent = 0
    for event in events:
        producer.produce(
            topic_name(event.topic, prefix=prefix),
            key=event.order_id.encode(),
            value=codec.encode(event),
            headers=[("opsflow-event-type", event.event_type.encode())],
        )
        sent += 1
        if sent % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    return sent
