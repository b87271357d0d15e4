"""The order workflow's topics of record, each keyed by the order id.

One topic per workflow step, so each service reads only the steps it follows;
an order's events on a topic share a partition and stay in order.
"""

from __future__ import annotations

from opsflow.contracts import Topic

ORDERS = Topic("orders", key="order_id")
POLICY_CHECK = Topic("policy-check", key="order_id")
REVIEW = Topic("review", key="order_id")
DISPATCH = Topic("dispatch", key="order_id")
POD = Topic("pod", key="order_id")
POD_REJECTS = Topic("pod-rejects", key="order_id")

TOPICS = (ORDERS, POLICY_CHECK, REVIEW, DISPATCH, POD, POD_REJECTS)
