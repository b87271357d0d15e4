"""``orders_current``: one row per order, where it is now and when each step happened;
and ``daily_summary``, its per-day roll-up for analytics.

The row's ``state`` comes from the causally latest event of the order, not the
last one to arrive: each event has a rank (its step in the workflow, then the
dispatch attempt), so a dispatch read before its policy check on a replay
still ends in the dispatch's state. Every other column is set by one kind of
event (see ``opsflow.projections.merge`` for how values combine).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from opsflow.projections import EventRecord, Latest, MergeTable, Projection, Tables
from opsflow.projections.merge import Row, merging
from services.contracts import DISPATCH, ORDERS, POD, POLICY_CHECK, REVIEW

# Causal ranks of the states: a step's events outrank every earlier step's.
_RECEIVED, _CHECKED, _IN_REVIEW, _DECIDED, _DISPATCH, _DISPATCHED, _DELIVERED = (
    1000,
    2000,
    3000,
    4000,
    5000,
    8000,
    9000,
)
_TIER_RANK = {"REVIEWER": 1, "SUPERVISOR": 2}
_POLICY_STATE = {
    "AUTO_APPROVED": "approved",
    "NEEDS_REVIEW": "awaiting_review",
    "REJECTED": "rejected",
}
_MAX_ATTEMPT = 299  # keeps every dispatch failure below a booking's rank

STATES = (
    "received", "approved", "awaiting_review", "in_review", "rejected",
    "dispatching", "dispatched", "dispatch_failed", "delivered",
)  # fmt: skip
"""Every value of ``orders_current.state``."""

EVENT_TYPES = frozenset((
    "order.received", "policy.checked", "review.requested", "review.escalated",
    "review.sla_breached", "review.decided", "dispatch.requested", "dispatch.failed",
    "dispatch.executed", "pod.captured",
))  # fmt: skip
"""The event types ``partial`` reads (claims and releases of reviews change no column)."""

ORDERS_CURRENT = MergeTable(
    name="orders_current",
    key=("order_id",),
    columns={
        "order_id": "text",
        "state": "text",
        "state_rank": "integer",
        "customer_id": "text",
        "customer_name": "text",
        "risk_tier": "text",
        "amount_minor": "bigint",
        "currency": "text",
        "destination_country": "text",
        "sales_channel": "text",
        "received_at": "timestamptz",
        "placed_at": "timestamptz",
        "destination": "jsonb",
        "items": "jsonb",
        "notes": "text",
        "policy_outcome": "text",
        "policy_reason_codes": "text[]",
        "rules_version": "text",
        "policy_checked_at": "timestamptz",
        "review_task_id": "text",
        "review_requested_at": "timestamptz",
        "review_tier": "text",
        "review_due_at": "timestamptz",
        "review_tier_rank": "integer",
        "escalated_at": "timestamptz",
        "sla_breached_at": "timestamptz",
        "reviewed_by": "text",
        "reviewed_by_name": "text",
        "review_decision": "text",
        "review_reason": "text",
        "reviewed_at": "timestamptz",
        "dispatch_id": "text",
        "carrier": "text",
        "dispatch_requested_at": "timestamptz",
        "dispatch_attempts": "integer",
        "booking_reference": "text",
        "dispatched_at": "timestamptz",
        "dispatch_failure_class": "text",
        "dispatch_failure_reason": "text",
        "dispatch_failed_at": "timestamptz",
        "dispatch_failure_rank": "integer",
        "delivered_at": "timestamptz",
        "pod_received_by": "text",
        "pod_signature_ref": "text",
        "last_event_at": "timestamptz",
    },
    first=(
        "customer_id",
        "customer_name",
        "risk_tier",
        "amount_minor",
        "currency",
        "destination_country",
        "sales_channel",
        "received_at",
        "placed_at",
        "destination",
        "items",
        "notes",
        "policy_outcome",
        "policy_reason_codes",
        "rules_version",
        "policy_checked_at",
        "review_task_id",
        "review_requested_at",
        "sla_breached_at",
        "reviewed_by",
        "reviewed_by_name",
        "review_decision",
        "review_reason",
        "reviewed_at",
        "dispatch_id",
        "carrier",
        "booking_reference",
        "dispatched_at",
        "delivered_at",
        "pod_received_by",
        "pod_signature_ref",
    ),
    greatest=("dispatch_attempts", "escalated_at", "last_event_at"),
    least=("dispatch_requested_at",),
    latest=(
        Latest("state_rank", ("state",)),
        Latest("review_tier_rank", ("review_tier", "review_due_at")),
        Latest(
            "dispatch_failure_rank",
            ("dispatch_failure_class", "dispatch_failure_reason", "dispatch_failed_at"),
        ),
    ),
)


def _dispatch_rank(attempt: int, step: int) -> int:
    return _DISPATCH + 10 * min(attempt, _MAX_ATTEMPT) + step


def partial(record: EventRecord) -> dict[str, Any] | None:
    """What one event says about its order's row (None: nothing)."""
    d, at = record.data, record.occurred_at_ms
    row: dict[str, Any] = {"order_id": d["order_id"], "last_event_at": at}
    match record.event_type:
        case "order.received":
            row |= {
                "state": "received", "state_rank": _RECEIVED,
                "customer_id": d["customer_id"], "customer_name": d["customer_name"],
                "risk_tier": d["customer_risk_tier"], "amount_minor": d["amount_minor"],
                "currency": d["currency"], "destination_country": d["destination"]["country"],
                "sales_channel": d.get("sales_channel"), "received_at": at,
                "placed_at": d["placed_at"], "notes": d.get("notes"),
                # Staged as JSON text, cast to jsonb by the merge.
                "destination": json.dumps(d["destination"], sort_keys=True),
                "items": json.dumps(d["items"], sort_keys=True),
            }  # fmt: skip
        case "policy.checked":
            row |= {
                "state": _POLICY_STATE[d["outcome"]], "state_rank": _CHECKED,
                "policy_outcome": d["outcome"], "policy_reason_codes": d["reason_codes"],
                "rules_version": d["rules_version"], "policy_checked_at": at,
            }  # fmt: skip
        case "review.requested":
            row |= {
                "state": "in_review", "state_rank": _IN_REVIEW,
                "review_task_id": d["task_id"], "review_requested_at": at,
                "review_tier": d["tier"], "review_due_at": d["due_at"],
                "review_tier_rank": _TIER_RANK[d["tier"]],
            }  # fmt: skip
        case "review.escalated":
            rank = _TIER_RANK[d["tier"]]
            row |= {
                "state": "in_review", "state_rank": _IN_REVIEW + rank,
                "review_tier": d["tier"], "review_due_at": d["due_at"],
                "review_tier_rank": rank, "escalated_at": at,
            }  # fmt: skip
        case "review.sla_breached":
            row |= {"sla_breached_at": at}
        case "review.decided":
            approved = d["decision"] == "APPROVED"
            row |= {
                "state": "approved" if approved else "rejected", "state_rank": _DECIDED,
                "reviewed_by": d["actor"]["user_id"],
                "reviewed_by_name": d["actor"]["display_name"],
                "review_decision": d["decision"], "review_reason": d["reason"],
                "reviewed_at": at,
            }  # fmt: skip
        case "dispatch.requested":
            row |= {
                "state": "dispatching", "state_rank": _dispatch_rank(d["attempt"], 0),
                "dispatch_id": d["dispatch_id"], "carrier": d["carrier"],
                "dispatch_requested_at": at, "dispatch_attempts": d["attempt"],
            }  # fmt: skip
        case "dispatch.failed":
            row |= {
                # No further attempt: retries ran out, or the carrier refused for good.
                "state": "dispatch_failed"
                if d["retries_exhausted"] or d["failure_class"] == "PERMANENT"
                else "dispatching",
                "state_rank": _dispatch_rank(d["attempt"], 1),
                "dispatch_attempts": d["attempt"],
                "dispatch_failure_class": d["failure_class"],
                "dispatch_failure_reason": d["reason"],
                "dispatch_failed_at": at, "dispatch_failure_rank": d["attempt"],
            }  # fmt: skip
        case "dispatch.executed":
            row |= {
                # A booking ends the dispatch: it outranks every failure, also
                # one that ran out of retries before an operator re-drove it.
                "state": "dispatched", "state_rank": _DISPATCHED,
                "dispatch_attempts": d["attempt"], "carrier": d["carrier"],
                "booking_reference": d["booking_reference"], "dispatched_at": at,
            }  # fmt: skip
        case "pod.captured":
            row |= {
                "state": "delivered", "state_rank": _DELIVERED,
                "delivered_at": d["delivered_at"], "pod_received_by": d["received_by"],
                "pod_signature_ref": d.get("signature_ref"),
            }  # fmt: skip
        case _:
            return None
    return row


_DAY = "(received_at AT TIME ZONE 'UTC')::date"

_SUMMARY = """
INSERT INTO {summary}
SELECT {day} AS day,
    count(*),
    count(*) FILTER (WHERE state = 'delivered'),
    count(*) FILTER (WHERE state = 'dispatched'),
    count(*) FILTER (WHERE state = 'dispatch_failed'),
    count(*) FILTER (WHERE state = 'rejected'),
    count(*) FILTER (WHERE state NOT IN ('delivered', 'dispatched', 'dispatch_failed', 'rejected')),
    count(reviewed_at),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM reviewed_at - review_requested_at) / 60),
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM reviewed_at - review_requested_at) / 60),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM dispatched_at - COALESCE(reviewed_at, policy_checked_at))),
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM dispatched_at - COALESCE(reviewed_at, policy_checked_at))),
    count(*) FILTER (WHERE escalated_at IS NOT NULL OR sla_breached_at IS NOT NULL),
    (count(*) FILTER (WHERE escalated_at IS NOT NULL OR sla_breached_at IS NOT NULL))::double precision
        / NULLIF(count(review_task_id), 0)
FROM {orders} WHERE received_at IS NOT NULL {where}
GROUP BY 1
"""  # noqa: E501


def _summarise(conn: psycopg.Connection[Any], tables: Tables, days: list[Any] | None) -> None:
    """Recompute ``daily_summary`` for ``days`` (None: every day) from the order rows."""
    summary, orders = (
        sql.Identifier(tables["daily_summary"]),
        sql.Identifier(tables["orders_current"]),
    )
    if days is None:
        conn.execute(sql.SQL("DELETE FROM {}").format(summary))
        where: sql.Composable = sql.SQL("")
        params: tuple[Any, ...] = ()
    else:
        conn.execute(sql.SQL("DELETE FROM {} WHERE day = ANY(%s)").format(summary), (days,))
        where, params = sql.SQL(f"AND {_DAY} = ANY(%s)"), (days,)
    conn.execute(
        sql.SQL(_SUMMARY).format(summary=summary, orders=orders, day=sql.SQL(_DAY), where=where),
        params,
    )


def _summarise_days(conn: psycopg.Connection[Any], rows: Sequence[Row], tables: Tables) -> None:
    """Recompute ``daily_summary`` for the days of the orders a batch touched."""
    days = conn.execute(
        sql.SQL(f"SELECT DISTINCT {_DAY} FROM {{}} WHERE order_id = ANY(%s)").format(
            sql.Identifier(tables["orders_current"])
        ),
        ([row["order_id"] for row in rows],),
    ).fetchall()
    _summarise(conn, tables, [day for (day,) in days if day is not None])


def finish(conn: psycopg.Connection[Any], tables: Tables) -> None:
    _summarise(conn, tables, None)


projection = Projection(
    name="orders_current",
    topics=(ORDERS, POLICY_CHECK, REVIEW, DISPATCH, POD),
    tables=("orders_current", "daily_summary"),
    apply=merging(ORDERS_CURRENT, partial, _summarise_days),
    finish=finish,
    description="one row per order: its state and the time of each step; daily roll-up",
    event_types=EVENT_TYPES,
)
