"""dispatch: approved orders become carrier bookings, each recorded before and after.

Three steps, each a handler, each replay-safe:

1. ``order.received``: remember the destination (approvals do not carry it).
2. An approval (``policy.checked`` auto-approved, or ``review.decided``
   approved): claim the order's one dispatch and emit ``dispatch.requested``.
   Log before effect: the request is committed to the dispatch topic before
   anyone calls the carrier.
3. ``dispatch.requested`` (read back from the dispatch topic): book the
   carrier with the request's idempotency key and emit ``dispatch.executed``
   with the booking reference, or ``dispatch.failed`` with the reason
   (permanent refusal, or retries exhausted): the exception path the operator
   works from, never a silent drop.

Under kill -9 at any moment, a request whose outcome was not committed is
booked again after the restart with the same idempotency key, and the carrier
returns the booking it already made: one accepted booking per approved order.
Bookings run concurrently (``DISPATCH_CONCURRENCY``), one order's steps in order.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from opsflow.contracts.lineage import current
from opsflow.runtime import Service
from services.contracts import (
    DISPATCH,
    ORDERS,
    POLICY_CHECK,
    REVIEW,
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    OrderReceived,
    PolicyChecked,
    PolicyOutcome,
    ReviewDecided,
    ReviewDecision,
)
from services.dispatch.carrier import Booking, Carrier
from services.dispatch.config import DispatchSettings
from services.dispatch.orders import Orders

log = logging.getLogger("services.dispatch")

SETTINGS = DispatchSettings()

service = Service(
    "dispatch",
    consumes=[ORDERS, POLICY_CHECK, REVIEW, DISPATCH],
    produces=[DISPATCH],
    concurrency=SETTINGS.concurrency,
)


@service.dependency
async def orders() -> AsyncIterator[Orders]:
    """The database pool, closed on the loop that opened it when the service stops
    (left open, it reports errors on stderr at exit)."""
    pool = Orders(size=min(SETTINGS.concurrency, 16))
    try:
        yield pool
    finally:
        await pool.close()


@service.dependency
async def carrier() -> AsyncIterator[Carrier]:
    """The carrier's HTTP client, its session closed when the service stops."""
    client = Carrier(SETTINGS)
    try:
        yield client
    finally:
        await client.close()


# Handlers build events without an envelope: the runtime derives it from the
# input's (a model validator mypy cannot see, hence the call-arg ignores).


@service.handler
async def remember(order: OrderReceived, orders: Orders) -> None:
    await orders.remember(order)


@service.handler
async def approved_by_policy(check: PolicyChecked, orders: Orders) -> DispatchRequested | None:
    if check.outcome is not PolicyOutcome.AUTO_APPROVED:
        return None
    return await _request(check.order_id, orders)


@service.handler
async def approved_by_reviewer(decision: ReviewDecided, orders: Orders) -> DispatchRequested | None:
    if decision.decision is not ReviewDecision.APPROVED:
        return None
    return await _request(decision.order_id, orders)


async def _request(order_id: str, orders: Orders) -> DispatchRequested | None:
    """Claim the order's dispatch under the request's key (known before the event
    exists), then emit the request; None when the order was dispatched already."""
    lineage = current()
    assert lineage is not None, "handlers run inside the runtime's lineage"
    destination = await orders.claim(order_id, lineage.next_key(DispatchRequested.event_type))
    if destination is None:
        log.warning(
            "already dispatched: approval ignored",
            extra={"order_id": order_id, "correlation_id": order_id},
        )
        return None
    return DispatchRequested(  # type: ignore[call-arg]
        order_id=order_id,
        dispatch_id=f"dsp-{order_id}",
        carrier=SETTINGS.carrier,
        attempt=1,
        destination=destination,
    )


@service.handler
async def book(request: DispatchRequested, carrier: Carrier) -> DispatchExecuted | DispatchFailed:
    outcome = await carrier.book(
        request.envelope.idempotency_key,
        {
            "order_id": request.order_id,
            "dispatch_id": request.dispatch_id,
            "destination": request.destination.to_avro(),
        },
    )
    if isinstance(outcome, Booking):
        return DispatchExecuted(  # type: ignore[call-arg]
            order_id=request.order_id,
            dispatch_id=request.dispatch_id,
            carrier=request.carrier,
            attempt=outcome.attempts,
            booking_reference=outcome.reference,
            tracking_url=outcome.tracking_url,
            estimated_delivery_at=outcome.estimated_delivery_at,
        )
    log.warning(
        "dispatch failed",
        extra={
            "order_id": request.order_id,
            "correlation_id": request.order_id,
            "reason": outcome.reason,
            "permanent": outcome.permanent,
        },
    )
    return DispatchFailed(  # type: ignore[call-arg]
        order_id=request.order_id,
        dispatch_id=request.dispatch_id,
        carrier=request.carrier,
        attempt=outcome.attempts,
        failure_class=(
            DispatchFailureClass.PERMANENT if outcome.permanent else DispatchFailureClass.TRANSIENT
        ),
        reason=outcome.reason,
        retries_exhausted=not outcome.permanent,
    )
