"""What a reviewer sees of an order on its review task's page (``HumanTask.facts``).

All of it is read from the read models the projector keeps from the log:
``orders_current`` (the order as placed: customer, amount, items, destination,
notes, channel; the policy's verdict; the customer's other orders with their
review decisions and who took them) and ``audit_log`` (every event of the order,
with the service or person that caused it). Nothing comes from the request but
the order id, which the review step's own task table gives.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from opsflow.nodes.human.facts import Fact, Section

# How many of the customer's earlier orders, and of the order's own events, a page shows.
OTHER_ORDERS = 10
HISTORY_EVENTS = 50

_ORDER = """
SELECT customer_id, customer_name, risk_tier, amount_minor, currency, destination,
       destination_country, items, notes, sales_channel, placed_at, received_at,
       policy_outcome, policy_reason_codes, rules_version, state
FROM orders_current WHERE order_id = %s
"""
_OTHERS = """
SELECT order_id, placed_at, received_at, amount_minor, currency, state, review_decision,
       reviewed_by_name, reviewed_by, review_reason, reviewed_at
FROM orders_current
WHERE customer_id = %s AND order_id <> %s
ORDER BY received_at DESC NULLS LAST, order_id
LIMIT %s
"""
_HISTORY = """
SELECT a.occurred_at, a.event_type, a.producer, a.actor, u.display_name
FROM audit_log a LEFT JOIN opsflow_users u ON u.user_id = a.actor
WHERE a.instance_key = %s
ORDER BY a.occurred_at, a.seq
LIMIT %s
"""


def money(minor: int | None, currency: str | None) -> str:
    """An amount in minor units as people write it ("1,250.00 EUR")."""
    if minor is None:
        return "—"
    return f"{minor / 100:,.2f} {currency or ''}".strip()


def when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at else "—"


def _address(destination: dict[str, Any] | None, country: str | None) -> str:
    if not destination:
        return country or "—"
    parts = ("name", "street", "postal_code", "city")
    line = ", ".join(str(destination[p]) for p in parts if destination.get(p))
    return f"{line} ({destination.get('country') or country})"


def _items(items: Iterable[dict[str, Any]] | None, currency: str | None) -> Section:
    rows = tuple(
        (
            str(item["sku"]),
            str(item["description"]),
            str(item["quantity"]),
            money(item["unit_price_minor"], currency),
            money(item["quantity"] * item["unit_price_minor"], currency),
        )
        for item in items or ()
    )
    return Section(
        "Items",
        columns=("SKU", "Description", "Quantity", "Unit price", "Line total"),
        rows=rows,
        empty="The order lists no items.",
    )


def order_facts(conn: psycopg.Connection[Any], order_id: str) -> list[Section]:
    """The order under review, its history, and its customer's earlier orders and decisions;
    nothing while the projector has not read the order yet."""
    with conn.cursor(row_factory=dict_row) as cur:
        order = cur.execute(_ORDER, (order_id,)).fetchone()
        if order is None or order["customer_id"] is None:
            return []
        others = cur.execute(_OTHERS, (order["customer_id"], order_id, OTHER_ORDERS)).fetchall()
        events = cur.execute(_HISTORY, (order_id, HISTORY_EVENTS)).fetchall()
    currency = order["currency"]
    summary = Section(
        "Order",
        facts=(
            Fact("Customer", f"{order['customer_name']} ({order['customer_id']})"),
            Fact("Customer risk tier", str(order["risk_tier"]).lower()),
            Fact("Amount", money(order["amount_minor"], currency)),
            Fact("Destination", _address(order["destination"], order["destination_country"])),
            Fact("Sales channel", order["sales_channel"] or "—"),
            Fact("Placed", when(order["placed_at"])),
            Fact("Received", when(order["received_at"])),
            Fact("Notes", order["notes"] or "—"),
            Fact(
                "Policy check",
                f"{(order['policy_outcome'] or 'not yet').lower().replace('_', ' ')}"
                + (f" (rules {order['rules_version']})" if order["rules_version"] else ""),
            ),
        ),
    )
    history = Section(
        "History of the order",
        columns=("When", "Event", "By"),
        rows=tuple(
            (
                when(event["occurred_at"]),
                event["event_type"],
                f"{event['display_name'] or event['actor']} (person)"
                if event["actor"]
                else event["producer"],
            )
            for event in events
        ),
        empty="No event of this order is in the audit log yet.",
    )
    customer = Section(
        f"Other orders of {order['customer_name']}, latest first",
        columns=("Order", "Placed", "Amount", "State", "Review", "By", "Reason"),
        rows=tuple(
            (
                row["order_id"],
                when(row["placed_at"] or row["received_at"]),
                money(row["amount_minor"], row["currency"]),
                row["state"].replace("_", " "),
                (row["review_decision"] or "not reviewed").lower(),
                row["reviewed_by_name"] or row["reviewed_by"] or "—",
                row["review_reason"] or "—",
            )
            for row in others
        ),
        empty="No other order of this customer.",
    )
    return [summary, _items(order["items"], currency), customer, history]
