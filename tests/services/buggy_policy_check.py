"""A buggy release of policy-check, for the console's end-to-end test.

It is the real service's judgement (``services.policy_check``'s rules and handler)
except that an order whose notes name a bug (``bug:NAME``) hits it: a
``PermanentError`` naming the bug and the order, which the runtime dead-letters
with that reason. It is named ``policy-check`` and consumes and produces what
policy-check does, so what it writes is policy-check's (dispatch takes a
``policy.checked`` only from policy-check) and it commits its offsets in the
same consumer group: the real service started after it ("the fix deployed")
picks up where the buggy release stopped, and judges the redriven order.
"""

from __future__ import annotations

from opsflow.errors import PermanentError
from opsflow.runtime import Service
from services.contracts import ORDERS, POLICY_CHECK, OrderReceived, PolicyChecked
from services.policy_check import check as released_check

service = Service("policy-check", consumes=[ORDERS], produces=[POLICY_CHECK])


@service.handler
def check(order: OrderReceived) -> PolicyChecked:
    """The released rules, but for the orders that hit the release's bug."""
    note = order.notes or ""
    if note.startswith("bug:"):
        raise PermanentError(
            f"policy-check bug {note.removeprefix('bug:')} hit by order {order.order_id}"
        )
    return released_check(order)
