"""``refunds_current``: one row per refund, where it stands (a projection of every topic
of the refund workflow, ``opsflow.projections``)."""

from __future__ import annotations

from typing import Any

from opsflow.projections import EventRecord, Latest, MergeTable, Projection
from opsflow.projections.merge import merging
from services.refunds.contracts import TOPICS

# Causal ranks of the states: a later step outranks every earlier one.
_RANK = {
    "refund.requested": (100, "requested"),
    "refund.checked": (200, None),
    "refund.approval_requested": (300, "awaiting_approval"),
    "refund.approval_escalated": (310, "awaiting_approval"),
    "refund.approval_decided": (400, None),
    "refund.payout_requested": (500, "paying"),
    "refund.paid": (600, "paid"),
    "refund.payout_failed": (600, "payout_failed"),
}

REFUNDS_CURRENT = MergeTable(
    name="refunds_current",
    key=("refund_id",),
    columns={
        "refund_id": "text",
        "order_id": "text",
        "customer_id": "text",
        "amount_minor": "bigint",
        "currency": "text",
        "refund_reason": "text",
        "requested_at": "timestamptz",
        "state_rank": "integer",
        "state": "text",
        "check_outcome": "text",
        "reason_codes": "text[]",
        "rules_version": "text",
        "decided_by": "text",
        "decision": "text",
        "decided_at": "timestamptz",
        "escalated_at": "timestamptz",
        "payout_reference": "text",
        "payout_failure": "text",
        "finished_at": "timestamptz",
    },
    first=(
        "order_id",
        "customer_id",
        "amount_minor",
        "currency",
        "refund_reason",
        "requested_at",
        "check_outcome",
        "reason_codes",
        "rules_version",
        "decided_by",
        "decision",
        "decided_at",
        "escalated_at",
        "payout_reference",
        "payout_failure",
        "finished_at",
    ),
    latest=(Latest("state_rank", ("state",)),),
)


def _partial(record: EventRecord) -> dict[str, Any] | None:
    ranked = _RANK.get(record.event_type)
    if ranked is None:
        return None  # claims and releases change no column
    rank, state = ranked
    d, at = record.data, record.occurred_at_ms
    row: dict[str, Any] = {"refund_id": record.key}
    kind = record.event_type
    if kind == "refund.requested":
        row |= {
            "order_id": d["order_id"], "customer_id": d["customer_id"],
            "amount_minor": d["amount_minor"], "currency": d["currency"],
            "refund_reason": d["reason"], "requested_at": at,
        }  # fmt: skip
    elif kind == "refund.checked":
        state = {"REJECTED": "rejected", "AUTO_APPROVED": "approved"}.get(d["outcome"], "checked")
        row |= {
            "check_outcome": d["outcome"], "reason_codes": d["reason_codes"],
            "rules_version": d["rules_version"], "amount_minor": d["amount_minor"],
            "currency": d["currency"],
        }  # fmt: skip
        if d["outcome"] == "REJECTED":
            row["finished_at"] = at
    elif kind == "refund.approval_escalated":
        row["escalated_at"] = at
    elif kind == "refund.approval_decided":
        state = "approved" if d["decision"] == "APPROVED" else "rejected"
        row |= {"decided_by": d["actor"]["user_id"], "decision": d["decision"], "decided_at": at}
        if d["decision"] == "REJECTED":
            row["finished_at"] = at
    elif kind == "refund.paid":
        row |= {"payout_reference": d["payout_reference"], "finished_at": at}
    elif kind == "refund.payout_failed":
        row |= {"payout_failure": d["reason"], "finished_at": at}
    row |= {"state_rank": rank, "state": state}
    return row


projection = Projection(
    name="refunds_current",
    topics=TOPICS,
    tables=("refunds_current",),
    apply=merging(REFUNDS_CURRENT, _partial),
    description="a refund: where it is now, what the rules and the people decided, the payout",
)
