"""Where a refund stands, from its events: the "now:" line of ``opsflow trace``.

The furthest step reached decides, not the last event by time: a late claim
of the approval task does not undo a payout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from opsflow.application import Verdict
from opsflow.contracts import Event
from opsflow.trace import latest, minutes, stamp
from services.refunds.contracts import (
    ApprovalClaimed,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    ApprovalSlaBreached,
    CheckOutcome,
    Decision,
    PayoutFailed,
    PayoutRequested,
    RefundChecked,
    RefundPaid,
    RefundRequested,
)


def verdict(
    events: Sequence[Event], now: datetime, written_at: Mapping[str, datetime] | None = None
) -> Verdict:
    """Where the refund is waiting now (``events`` in time order)."""
    paid = latest(events, RefundPaid)
    if paid is not None:
        return Verdict(
            "paid",
            f"paid back {paid.amount_minor / 100:,.2f} {paid.currency} "
            f"({paid.payout_reference}) at {stamp(paid.envelope.occurred_at)}",
            True,
        )
    failed = latest(events, PayoutFailed)
    if failed is not None:
        kind = "refused" if failed.permanent else "failed after every attempt"
        return Verdict("payout_failed", f"payout {kind}: {failed.reason}", True)
    requested = latest(events, PayoutRequested)
    if requested is not None:
        waited = minutes(now - requested.envelope.occurred_at)
        return Verdict("paying", f"waiting for the payment partner for {waited}", False)
    decided = latest(events, ApprovalDecided)
    if decided is not None:
        by = f"{decided.actor.display_name} ({decided.actor.role.value.lower()})"
        if decided.decision is Decision.REJECTED:
            return Verdict("rejected", f"rejected by {by}: {decided.reason}", True)
        return Verdict("approved", f"approved by {by}; the payout is next", False)
    task = latest(events, ApprovalRequested)
    if task is not None:
        breached = latest(events, ApprovalSlaBreached)
        escalated = latest(events, ApprovalEscalated)
        claimed = latest(events, ApprovalClaimed)
        due = escalated.due_at if escalated else task.due_at
        tier = "the finance lead" if escalated else "an agent"
        held = f", claimed by {claimed.actor.display_name}" if claimed else ""
        late = "; its SLA was breached" if breached else ""
        left = due - now
        timing = (
            f"due in {minutes(left)}"
            if left.total_seconds() >= 0
            else f"overdue by {minutes(left)}"
        )
        return Verdict("awaiting_approval", f"waiting for {tier}{held}, {timing}{late}", False)
    check = latest(events, RefundChecked)
    if check is not None:
        if check.outcome is CheckOutcome.REJECTED:
            return Verdict(
                "rejected", f"rejected by the rules: {', '.join(check.reason_codes)}", True
            )
        return Verdict("checked", f"{check.outcome.value.lower()}; the next step is next", False)
    if latest(events, RefundRequested) is not None:
        return Verdict("requested", "waiting for the refund check", False)
    return Verdict("unknown", "no refund events", False)


def summary(event: Event) -> str:
    """The facts worth a line in ``opsflow trace``."""
    if isinstance(event, RefundRequested):
        return f"{event.amount_minor / 100:,.2f} {event.currency}, {event.reason.value.lower()}"
    if isinstance(event, RefundChecked):
        codes = f" ({', '.join(event.reason_codes)})" if event.reason_codes else ""
        return f"{event.outcome.value}{codes}, rules {event.rules_version}"
    if isinstance(event, ApprovalDecided):
        return f"{event.decision.value}: {event.reason}"
    if isinstance(event, RefundPaid):
        return f"{event.payout_reference}, attempt {event.attempts}"
    if isinstance(event, PayoutFailed):
        return event.reason
    return ""
