"""refund-payout: approved refunds are paid back through the payment partner, once each
(an effect step, ``opsflow.nodes.effect``).

1. ``refund.checked``: remember what the payout needs (the approval does not
   carry it); an auto-approved refund is claimed and requested at once.
2. ``refund.approval_decided`` approved: claim the refund's one payout under
   the request's key and emit ``refund.payout_requested``. Log before effect:
   the request is committed to the payouts topic before the partner is called.
3. ``refund.payout_requested`` (read back): pay with the request's idempotency
   key; emit ``refund.paid`` with the partner's reference, or
   ``refund.payout_failed`` (refused, or retries exhausted): the exception path
   an operator works from.

Under kill -9 at any moment, a request whose outcome was not committed is paid
again after the restart under the same key, and the partner answers with the
payout it already made: one payout per approved refund.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsflow.contracts.lineage import current
from opsflow.nodes.effect import Claims, Partner, Refused, Retry
from opsflow.runtime import Service
from services.refunds.contracts import (
    APPROVALS,
    CHECKS,
    PAYOUTS,
    ApprovalDecided,
    CheckOutcome,
    Decision,
    PayoutFailed,
    PayoutRequested,
    RefundChecked,
    RefundPaid,
)

log = logging.getLogger("services.refunds")


class PayoutSettings(BaseSettings):
    """``REFUND_PAYOUT_*`` variables, plus ``PAYMENTS_URL`` (the partner)."""

    model_config = SettingsConfigDict(env_prefix="REFUND_PAYOUT_", extra="ignore")

    payments_url: str = Field(default="http://127.0.0.1:8720", alias="PAYMENTS_URL")
    concurrency: int = Field(default=32, ge=1)
    timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=0.2, ge=0)
    backoff_max_s: float = Field(default=5.0, ge=0)


SETTINGS = PayoutSettings()

service = Service(
    "refund-payout",
    consumes=[CHECKS, APPROVALS, PAYOUTS],
    produces=[PAYOUTS],
    concurrency=SETTINGS.concurrency,
)


@service.dependency
async def claims() -> AsyncIterator[Claims]:
    async with Claims.from_settings(service.name, size=min(SETTINGS.concurrency, 8)) as found:
        yield found


@service.dependency
async def partner() -> AsyncIterator[Partner]:
    client = Partner(
        SETTINGS.payments_url.rstrip("/") + "/refunds",
        name="payment partner",
        concurrency=SETTINGS.concurrency,
        timeout_s=SETTINGS.timeout_s,
        retry=Retry(SETTINGS.max_attempts, SETTINGS.backoff_s, SETTINGS.backoff_max_s),
    )
    try:
        yield client
    finally:
        await client.close()


@service.handler
async def checked(check: RefundChecked, claims: Claims) -> PayoutRequested | None:
    await claims.remember(
        check.refund_id,
        {
            "customer_id": check.customer_id,
            "amount_minor": check.amount_minor,
            "currency": check.currency,
        },
    )
    if check.outcome is CheckOutcome.AUTO_APPROVED:
        return await _request(check.refund_id, claims)
    if check.outcome is CheckOutcome.REJECTED:
        await claims.decline(check.refund_id, check.envelope.idempotency_key)
    return None


@service.handler
async def decided(decision: ApprovalDecided, claims: Claims) -> PayoutRequested | None:
    # The refund's first decision stands: a later, contradicting one is dead-lettered.
    if decision.decision is Decision.APPROVED:
        return await _request(decision.refund_id, claims)
    await claims.decline(decision.refund_id, decision.envelope.idempotency_key)
    return None


async def _request(refund_id: str, claims: Claims) -> PayoutRequested | None:
    """Claim the refund's payout under the request's key (known before the event exists),
    then emit the request; None when it was requested already under another key."""
    lineage = current()
    assert lineage is not None, "handlers run inside the runtime's lineage"
    details = await claims.claim(refund_id, lineage.next_key(PayoutRequested.event_type))
    if details is None:
        log.warning("already paid out: approval ignored", extra={"correlation_id": refund_id})
        return None
    return PayoutRequested(refund_id=refund_id, **details)


@service.handler
async def pay(request: PayoutRequested, partner: Partner) -> RefundPaid | PayoutFailed:
    outcome = await partner.call(
        request.envelope.idempotency_key,
        {
            "refund_id": request.refund_id,
            "customer_id": request.customer_id,
            "amount_minor": request.amount_minor,
            "currency": request.currency,
        },
    )
    if isinstance(outcome, Refused):
        log.warning(
            "payout failed",
            extra={"correlation_id": request.refund_id, "reason": outcome.reason},
        )
        return PayoutFailed(  # type: ignore[call-arg]
            refund_id=request.refund_id,
            reason=outcome.reason,
            permanent=outcome.permanent,
            attempts=outcome.attempts,
        )
    return RefundPaid(  # type: ignore[call-arg]
        refund_id=request.refund_id,
        payout_reference=str(outcome.answer["payout_reference"]),
        amount_minor=request.amount_minor,
        currency=request.currency,
        attempts=outcome.attempts,
    )
