"""Where a demo order can stand, and how far the demo follows orders before it reports.

Pure data, so the command line can offer ``--until`` without loading the Kafka client.
"""

from __future__ import annotations

from enum import StrEnum


class OrderState(StrEnum):
    """Where an order stands, as far as the topics tell."""

    SENT = "sent"
    RECEIVED = "received"
    APPROVED = "approved"
    NEEDS_REVIEW = "needs_review"
    IN_REVIEW = "in_review"
    REJECTED = "rejected"
    REVIEW_REJECTED = "review_rejected"
    DISPATCH_REQUESTED = "dispatch_requested"
    DISPATCH_RETRYING = "dispatch_retrying"
    DISPATCHED = "dispatched"
    DISPATCH_FAILED = "dispatch_failed"
    DELIVERED = "delivered"
    POD_REJECTED = "pod_rejected"

    @property
    def label(self) -> str:
        """What the state means, for people."""
        return _LABELS[self]


_LABELS = {
    OrderState.SENT: "sent, not yet on the orders topic",
    OrderState.RECEIVED: "received, awaiting policy check",
    OrderState.APPROVED: "approved (by policy or reviewer), awaiting dispatch",
    OrderState.NEEDS_REVIEW: "needs review, no review task yet",
    OrderState.IN_REVIEW: "waiting for review (task open)",
    OrderState.REJECTED: "rejected by policy check",
    OrderState.REVIEW_REJECTED: "rejected by reviewer",
    OrderState.DISPATCH_REQUESTED: "dispatch requested, awaiting the carrier",
    OrderState.DISPATCH_RETRYING: "dispatch failed, will be retried",
    OrderState.DISPATCHED: "dispatched, awaiting proof of delivery",
    OrderState.DISPATCH_FAILED: "dispatch failed",
    OrderState.DELIVERED: "delivered",
    OrderState.POD_REJECTED: "proof of delivery rejected",
}

TERMINAL: frozenset[OrderState] = frozenset(
    {
        OrderState.REJECTED,
        OrderState.REVIEW_REJECTED,
        OrderState.DISPATCH_FAILED,
        OrderState.DELIVERED,
        # The workflow has nothing more to do with such an order unless the
        # carrier sends another proof, which would make it delivered.
        OrderState.POD_REJECTED,
    }
)
"""States after which the workflow does nothing more with an order by itself."""

WAITING_FOR_REVIEW: frozenset[OrderState] = frozenset(
    {OrderState.NEEDS_REVIEW, OrderState.IN_REVIEW}
)
"""States in which an order waits for a person."""


class Until(StrEnum):
    """How far the demo follows the orders before it stops and reports.

    With ``--auto-review``, an order the demo's reviewer is to decide does not count
    as far enough while it waits for review, whatever the stop (see
    ``services.demo.reviewer``).
    """

    APPROVED = "approved"
    """Every order decided by the policy check (approved, rejected or waiting for review)."""
    DISPATCHED = "dispatched"
    """Every order booked with the carrier, or stopped before (rejected, failed, in review)."""
    DELIVERED = "delivered"
    """Every order at the end of the workflow: terminal, or waiting for review."""

    def reached(self, state: OrderState) -> bool:
        """Whether an order in ``state`` has gone as far as this stop asks."""
        if self is Until.APPROVED:
            return state not in (OrderState.SENT, OrderState.RECEIVED)
        if self is Until.DISPATCHED and state is OrderState.DISPATCHED:
            return True
        return state in TERMINAL or state in WAITING_FOR_REVIEW
