"""Where an order stands, and the facts of each of its events: ``opsflow trace``'s rules
for the order workflow (declared as the application's ``standing`` and ``summary``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from opsflow.application import Verdict
from opsflow.contracts import Event
from opsflow.trace import latest, minutes, stamp
from services.contracts import (
    Actor,
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    OrderReceived,
    PodCaptured,
    PodRejected,
    PolicyChecked,
    PolicyOutcome,
    ReviewClaimed,
    ReviewDecided,
    ReviewDecision,
    ReviewEscalated,
    ReviewReleased,
    ReviewRequested,
    ReviewSlaBreached,
)


def who(actor: Actor) -> str:
    """A person as a line names them: "Ana (reviewer)"."""
    return f"{actor.display_name} ({actor.role.value.lower()})"


def _due(due_at: datetime, now: datetime) -> str:
    left = due_at - now
    if left.total_seconds() >= 0:
        return f"SLA due in {minutes(left)}"
    return f"SLA overdue by {minutes(left)}"


def verdict(
    events: Sequence[Event], now: datetime, written_at: Mapping[str, datetime] | None = None
) -> Verdict:
    """Where the order is waiting now, from its events alone (``events`` in time order).

    The furthest step reached decides, not the last event by time: a late
    ``review.claimed`` does not undo a dispatch. The semantics are the services':
    dispatch writes ``dispatch.failed`` for good on a permanent refusal
    (``failure_class`` PERMANENT) or when its retries are exhausted, and a
    failure that is neither means another attempt follows.

    Args:
        written_at: event id -> when its record was written; the times said are
            these where known (see ``Step.at``), else the events' ``occurred_at``.
    """
    times = written_at or {}

    def at(event: Event) -> datetime:
        return times.get(str(event.envelope.event_id), event.envelope.occurred_at)

    pod = latest(events, PodCaptured)
    if pod is not None:
        return Verdict(
            "delivered",
            f"delivered at {stamp(pod.delivered_at)}, received by {pod.received_by} "
            f"(booking {pod.booking_reference})",
            True,
        )
    refused = latest(events, PodRejected)
    refusal = (
        f"; a proof of delivery was refused at {stamp(at(refused))} "
        f"({refused.reason_code.value}: {refused.reason})"
        if refused
        else ""
    )
    dispatch = [
        e for e in events if isinstance(e, DispatchRequested | DispatchExecuted | DispatchFailed)
    ]
    if dispatch:
        last = max(dispatch, key=lambda e: _dispatch_rank(e, at(e)))
        executed = latest(events, DispatchExecuted)
        if executed is not None:
            return Verdict(
                "dispatched",
                f"waiting for proof of delivery: booked {executed.booking_reference} with "
                f"{executed.carrier} at {stamp(at(executed))} "
                f"({minutes(now - at(executed))} ago)"
                + (
                    f", delivery expected {stamp(executed.estimated_delivery_at)}"
                    if executed.estimated_delivery_at
                    else ""
                )
                + refusal,
                False,
            )
        if isinstance(last, DispatchFailed):
            if last.failure_class is DispatchFailureClass.PERMANENT or last.retries_exhausted:
                why = (
                    "the carrier refused it"
                    if last.failure_class is DispatchFailureClass.PERMANENT
                    else f"retries exhausted after attempt {last.attempt}"
                )
                return Verdict(
                    "dispatch_failed",
                    f"dispatch failed for good ({why}): {last.reason}; on the operator's "
                    "exception path: settle it with the carrier, then re-drive its "
                    "dispatch.requested",
                    True,
                )
            then = (
                f", next attempt at {stamp(last.next_attempt_at)}" if last.next_attempt_at else ""
            )
            return Verdict(
                "dispatching",
                f"retrying the carrier booking: attempt {last.attempt} failed "
                f"({last.failure_class.value}: {last.reason}){then}",
                False,
            )
        assert isinstance(last, DispatchRequested)
        return Verdict(
            "dispatching",
            f"waiting for the carrier booking: attempt {last.attempt} with {last.carrier} "
            f"requested {minutes(now - at(last))} ago",
            False,
        )
    decided = latest(events, ReviewDecided)
    if decided is not None:
        if decided.decision is ReviewDecision.REJECTED:
            return Verdict(
                "rejected",
                f"rejected by {who(decided.actor)} at {stamp(at(decided))}: {decided.reason}",
                True,
            )
        return _waiting_for_dispatch(f"approved by {who(decided.actor)}", at(decided), now)
    requested = latest(events, ReviewRequested)
    if requested is not None:
        return _in_review(requested, events, now, at)
    check = latest(events, PolicyChecked)
    if check is not None:
        codes = ", ".join(check.reason_codes) or "no reason code"
        if check.outcome is PolicyOutcome.REJECTED:
            return Verdict("rejected", f"rejected by policy {check.rules_version}: {codes}", True)
        if check.outcome is PolicyOutcome.AUTO_APPROVED:
            return _waiting_for_dispatch(
                f"approved by policy {check.rules_version}", at(check), now
            )
        return Verdict(
            "awaiting_review",
            f"waiting for the review task to be opened (policy asked for review: {codes}, "
            f"{minutes(now - at(check))} ago)",
            False,
        )
    received = latest(events, OrderReceived)
    if received is not None:
        return Verdict(
            "received",
            f"waiting for the policy check (received {minutes(now - at(received))} ago)",
            False,
        )
    if refused is not None:
        return Verdict("unknown", "no order.received on the topics" + refusal, False)
    return Verdict("unknown", "no order.received on the topics", False)


def _dispatch_rank(
    event: DispatchRequested | DispatchExecuted | DispatchFailed, at: datetime
) -> tuple[int, int, datetime]:
    """The latest attempt decides; within one attempt, its outcome outranks its request."""
    outcome = 0 if isinstance(event, DispatchRequested) else 1
    return (event.attempt, outcome, at)


def _waiting_for_dispatch(approval: str, at: datetime, now: datetime) -> Verdict:
    return Verdict(
        "approved",
        f"waiting for dispatch ({approval} at {stamp(at)}, {minutes(now - at)} ago)",
        False,
    )


def _in_review(
    requested: ReviewRequested,
    events: Sequence[Event],
    now: datetime,
    at: Callable[[Event], datetime],
) -> Verdict:
    """An open review task: its tier and deadline as the latest escalation left them, and
    who holds it (claims and releases in time order, an escalation ending a claim)."""
    tier, due_at = requested.tier, requested.due_at
    holder: Actor | None = None
    breached: ReviewSlaBreached | None = None
    for event in events:
        if isinstance(event, ReviewEscalated):
            tier, due_at, holder = event.tier, event.due_at, None
        elif isinstance(event, ReviewClaimed):
            holder = event.actor
        elif isinstance(event, ReviewReleased):
            holder = None
        elif isinstance(event, ReviewSlaBreached):
            breached = event
    held = f"claimed by {who(holder)}" if holder else "not claimed"
    late = f"; the last tier's SLA was breached at {stamp(at(breached))}" if breached else ""
    return Verdict(
        "in_review",
        f"waiting for review, {_due(due_at, now)} (due {stamp(due_at)}), tier "
        f"{tier.value.lower()}, {held}{late}",
        False,
    )


def summary(event: Event) -> str:
    """The payload facts an operator looks for first, in one short phrase."""
    match event:
        case OrderReceived():
            amount = f"{event.amount_minor / 100:,.2f} {event.currency}"
            return (
                f"{event.customer_name} ({event.customer_risk_tier.value} risk), {amount} to "
                f"{event.destination.country}, {len(event.items)} item(s)"
            )
        case PolicyChecked():
            codes = ", ".join(event.reason_codes)
            return (
                f"{event.outcome.value}"
                + (f": {codes}" if codes else "")
                + (f" (rules {event.rules_version})")
            )
        case ReviewRequested():
            codes = ", ".join(event.reason_codes)
            return f"tier {event.tier.value.lower()}, due {stamp(event.due_at)}" + (
                f": {codes}" if codes else ""
            )
        case ReviewClaimed():
            return f"tier {event.tier.value.lower()}"
        case ReviewReleased():
            return f"tier {event.tier.value.lower()}" + (
                f": {event.reason}" if event.reason else ""
            )
        case ReviewDecided():
            return f"{event.decision.value}: {event.reason} (tier {event.tier.value.lower()})"
        case ReviewEscalated():
            return (
                f"{event.previous_tier.value.lower()} -> {event.tier.value.lower()}, missed "
                f"{stamp(event.breached_due_at)}, due {stamp(event.due_at)}"
            )
        case ReviewSlaBreached():
            return f"tier {event.tier.value.lower()} missed {stamp(event.due_at)}"
        case DispatchRequested():
            return f"{event.dispatch_id} attempt {event.attempt} with {event.carrier}"
        case DispatchExecuted():
            return (
                f"booked {event.booking_reference} with {event.carrier} (attempt {event.attempt})"
            )
        case DispatchFailed():
            final = (
                ", final"
                if (
                    event.failure_class is DispatchFailureClass.PERMANENT or event.retries_exhausted
                )
                else ""
            )
            return f"{event.failure_class.value}: {event.reason} (attempt {event.attempt}{final})"
        case PodCaptured():
            return f"{event.booking_reference} received by {event.received_by}"
        case PodRejected():
            return f"{event.reason_code.value}: {event.reason}"
    return ""
