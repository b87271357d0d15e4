"""``dispatch_log``: every dispatch step of every order: requests (one per attempt, so
retries show as attempts above 1), carrier bookings and failures."""

from __future__ import annotations

from typing import Any

from opsflow.projections import EventRecord, MergeTable, Projection
from opsflow.projections.merge import merging
from services.contracts import DISPATCH

_KINDS = {
    "dispatch.requested": "requested",
    "dispatch.executed": "booked",
    "dispatch.failed": "failed",
}

DISPATCH_LOG = MergeTable(
    name="dispatch_log",
    key=("event_id",),
    columns={
        "event_id": "uuid",
        "order_id": "text",
        "dispatch_id": "text",
        "kind": "text",
        "attempt": "integer",
        "carrier": "text",
        "booking_reference": "text",
        "failure_class": "text",
        "reason": "text",
        "retries_exhausted": "boolean",
        "occurred_at": "timestamptz",
    },
    first=(
        "order_id",
        "dispatch_id",
        "kind",
        "attempt",
        "carrier",
        "booking_reference",
        "failure_class",
        "reason",
        "retries_exhausted",
        "occurred_at",
    ),
)


def _step(record: EventRecord) -> dict[str, Any] | None:
    kind = _KINDS.get(record.event_type)
    if kind is None:
        return None
    d = record.data
    return {
        "event_id": record.event_id, "order_id": d["order_id"], "dispatch_id": d["dispatch_id"],
        "kind": kind, "attempt": d["attempt"], "carrier": d["carrier"],
        "booking_reference": d.get("booking_reference"), "failure_class": d.get("failure_class"),
        "reason": d.get("reason"), "retries_exhausted": d.get("retries_exhausted"),
        "occurred_at": record.occurred_at_ms,
    }  # fmt: skip


projection = Projection(
    name="dispatch_log",
    topics=(DISPATCH,),
    tables=("dispatch_log",),
    apply=merging(DISPATCH_LOG, _step),
    description="every dispatch request, booking and failure, attempt by attempt",
)
