"""dispatch: approved orders become carrier bookings, each recorded before and after.

Two steps, each a handler, each replay-safe:

1. A decision (``policy.checked``, or a reviewer's ``review.decided``):
   an approval claims the order's one dispatch and emits ``dispatch.requested``;
   a refusal is recorded as the order's decision. Log before effect: the request
   is committed to the dispatch topic before anyone calls the carrier.
   ``policy.checked`` carries the order's destination, so an auto-approved
   order is claimed from that one record (dispatch does not read the orders
   topic: no join to wait for); one sent to review leaves its destination for
   the reviewer's approval. The first decision stands (``opsflow.nodes.effect.
   Claims``): a later, contradicting one is dead-lettered with the reason.
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
from typing import Any

from opsflow.contracts.lineage import current
from opsflow.nodes.effect import Claims
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

log = logging.getLogger("services.dispatch")

SETTINGS = DispatchSettings()

service = Service(
    "dispatch",
    consumes=[POLICY_CHECK, REVIEW, DISPATCH],
    produces=[DISPATCH],
    concurrency=SETTINGS.concurrency,
)


@service.dependency
async def claims() -> AsyncIterator[Claims]:
    """The orders' decisions and destinations (``effect_claims``), over a pool closed on
    the loop that opened it when the service stops (left open, it reports errors on
    stderr at exit)."""
    async with Claims.from_settings(service.name, size=min(SETTINGS.concurrency, 16)) as found:
        yield found


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
async def decided_by_policy(check: PolicyChecked, claims: Claims) -> DispatchRequested | None:
    # A v1 record carries no destination: it is there if the dispatch of that time,
    # which read the orders topic, kept it (README: upgrading).
    details = None if check.destination is None else {"destination": check.destination.to_avro()}
    match check.outcome:
        case PolicyOutcome.AUTO_APPROVED:
            return await _request(check.order_id, claims, details)
        case PolicyOutcome.NEEDS_REVIEW if details is not None:
            await claims.remember(check.order_id, details)
        case PolicyOutcome.REJECTED:
            await claims.decline(check.order_id, check.envelope.idempotency_key)
    return None


@service.handler
async def decided_by_reviewer(decision: ReviewDecided, claims: Claims) -> DispatchRequested | None:
    if decision.decision is ReviewDecision.APPROVED:
        return await _request(decision.order_id, claims)
    await claims.decline(decision.order_id, decision.envelope.idempotency_key)
    return None


async def _request(
    order_id: str, claims: Claims, details: dict[str, Any] | None = None
) -> DispatchRequested | None:
    """Claim the order's dispatch under the request's key (known before the event
    exists), then emit the request; None when the order was dispatched already."""
    lineage = current()
    assert lineage is not None, "handlers run inside the runtime's lineage"
    claimed = await claims.claim(order_id, lineage.next_key(DispatchRequested.event_type), details)
    if claimed is None:
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
        destination=Address.model_validate(claimed["destination"]),
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
