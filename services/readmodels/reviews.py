"""``review_queue``: every review task with its SLA and tier; ``sla_breaches``: every SLA
that passed.

A task's ``status`` is ``open``, ``claimed`` or ``decided``; open work is
``WHERE status <> 'decided'``. Decided tasks stay in the table so a replayed
``review.requested`` read after its decision cannot reopen them. Claims and
releases of one task are ordered by their time (they come from the one review
service, on one partition); a decision outranks them all.
"""

from __future__ import annotations

from typing import Any

from opsflow.projections import EventRecord, Latest, MergeTable, Projection
from opsflow.projections.merge import merging
from services.contracts import REVIEW

_TIER_RANK = {"REVIEWER": 1, "SUPERVISOR": 2}
_DECIDED_RANK = 2**62  # above any claim or release time in milliseconds

QUEUE = MergeTable(
    name="review_queue",
    key=("task_id",),
    columns={
        "task_id": "text",
        "order_id": "text",
        "status": "text",
        "status_rank": "bigint",
        "claimed_by": "text",
        "claimed_by_name": "text",
        "claimed_at": "timestamptz",
        "tier": "text",
        "due_at": "timestamptz",
        "tier_rank": "integer",
        "reason_codes": "text[]",
        "requested_at": "timestamptz",
        "escalated_at": "timestamptz",
        "sla_breached_at": "timestamptz",
        "decision": "text",
        "decided_by": "text",
        "decided_at": "timestamptz",
    },
    first=(
        "order_id",
        "reason_codes",
        "requested_at",
        "sla_breached_at",
        "decision",
        "decided_by",
        "decided_at",
    ),
    greatest=("escalated_at",),
    latest=(
        Latest("status_rank", ("status", "claimed_by", "claimed_by_name", "claimed_at")),
        Latest("tier_rank", ("tier", "due_at")),
    ),
)


def _task(record: EventRecord) -> dict[str, Any] | None:
    d, at = record.data, record.occurred_at_ms
    row: dict[str, Any] = {"task_id": d.get("task_id"), "order_id": d["order_id"]}
    match record.event_type:
        case "review.requested":
            row |= {
                "status": "open", "status_rank": 0, "tier": d["tier"], "due_at": d["due_at"],
                "tier_rank": _TIER_RANK[d["tier"]], "reason_codes": d["reason_codes"],
                "requested_at": at,
            }  # fmt: skip
        case "review.claimed":
            row |= {
                "status": "claimed", "status_rank": at, "claimed_by": d["actor"]["user_id"],
                "claimed_by_name": d["actor"]["display_name"], "claimed_at": at,
            }  # fmt: skip
        case "review.released":
            row |= {"status": "open", "status_rank": at}
        case "review.escalated":
            row |= {
                "tier": d["tier"], "due_at": d["due_at"], "tier_rank": _TIER_RANK[d["tier"]],
                "escalated_at": at,
            }  # fmt: skip
        case "review.sla_breached":
            row |= {"sla_breached_at": at}
        case "review.decided":
            row |= {
                "status": "decided", "status_rank": _DECIDED_RANK, "decision": d["decision"],
                "decided_by": d["actor"]["user_id"], "decided_at": at,
            }  # fmt: skip
        case _:
            return None
    return row


review_queue = Projection(
    name="review_queue",
    topics=(REVIEW,),
    tables=("review_queue",),
    apply=merging(QUEUE, _task),
    description="review tasks with SLA due time, tier, holder and decision",
)


BREACHES = MergeTable(
    name="sla_breaches",
    key=("event_id",),
    columns={
        "event_id": "uuid",
        "task_id": "text",
        "order_id": "text",
        "kind": "text",
        "tier": "text",
        "next_tier": "text",
        "due_at": "timestamptz",
        "breached_at": "timestamptz",
    },
    first=("task_id", "order_id", "kind", "tier", "next_tier", "due_at", "breached_at"),
)


def _breach(record: EventRecord) -> dict[str, Any] | None:
    d = record.data
    row = {"event_id": record.event_id, "task_id": d.get("task_id"), "order_id": d["order_id"],
           "breached_at": record.occurred_at_ms}  # fmt: skip
    if record.event_type == "review.escalated":
        return row | {"kind": "escalated", "tier": d["previous_tier"], "next_tier": d["tier"],
                      "due_at": d["breached_due_at"]}  # fmt: skip
    if record.event_type == "review.sla_breached":
        return row | {
            "kind": "breached",
            "tier": d["tier"],
            "next_tier": None,
            "due_at": d["due_at"],
        }
    return None


sla_breaches = Projection(
    name="sla_breaches",
    topics=(REVIEW,),
    tables=("sla_breaches",),
    apply=merging(BREACHES, _breach),
    description="every review SLA that passed: escalations and final breaches",
)
