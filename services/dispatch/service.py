"""dispatch: approved orders become carrier bookings, each recorded before and after.

Two steps, each a handler, each replay-safe:

1. An approval (``policy.checked`` auto-approved, or ``review.decided``
   approved): claim the order's one dispatch and emit ``dispatch.requested``.
   Log before effect: the request is committed to the dispatch topic before
   anyone calls the carrier. ``policy.checked`` carries the order's
   destination, so an auto-approved order is claimed from that one record
   (dispatch does not read the orders topic: no join to wait for); one sent to
   review leaves its destination in the table for the reviewer's approval.
2. ``dispatch.requested`` (read back from the dispatch topic): book the
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
from uuid import UUID

from opsflow.contracts.lineage import current
from opsflow.runtime import Service
from services.contracts import (
    DISPATCH,
    POLICY_CHECK,
    REVIEW,
    Address,
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
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
    consumes=[POLICY_CHECK, REVIEW, DISPATCH],
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
async def approved_by_policy(check: PolicyChecked, orders: Orders) -> DispatchRequested | None:
    # A v1 record carries no destination: the table has it if the dispatch of
    # that time, which read the orders topic, kept it (README: upgrading).
    known = None if check.destination is None else (check.destination, check.envelope.event_id)
    if check.outcome is PolicyOutcome.AUTO_APPROVED:
        return await _request(check.order_id, orders, known)
    if check.outcome is PolicyOutcome.NEEDS_REVIEW and known is not None:
        await orders.remember(check.order_id, *known)
    return None


@service.handler
async def approved_by_reviewer(decision: ReviewDecided, orders: Orders) -> DispatchRequested | None:
    if decision.decision is not ReviewDecision.APPROVED:
        return None
    return await _request(decision.order_id, orders)


async def _request(
    order_id: str, orders: Orders, known: tuple[Address, UUID] | None = None
) -> DispatchRequested | None:
    """Claim the order's dispatch under the request's key (known before the event
    exists), then emit the request; None when the order was dispatched already."""
    lineage = current()
    assert lineage is not None, "handlers run inside the runtime's lineage"
    key = lineage.next_key(DispatchRequested.event_type)
    destination = await orders.claim(order_id, key, known)
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
