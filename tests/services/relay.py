"""A one-hop service for runtime tests: every order becomes an auto-approved policy check.

Orders whose notes ask for it misbehave, so tests can drive each failure path:
``reject`` raises bad input, ``crash`` raises a bug, ``flaky:N`` fails N times
transiently before it works, ``nodb:N`` fails N times to reach a database (a
real connection refused by the closed port ``RELAY_NO_DATABASE`` names, as when
PostgreSQL restarts), and ``bug:A,B`` hits bug ``A`` (a ``PermanentError``
naming it), or ``B`` once ``A`` is fixed: ``RELAY_FIXED=A`` (comma separated) is the
release that fixes ``A``, so a test can dead-letter a storm, "deploy the fix" and
redrive it. ``slow:S`` takes S seconds before answering (a worker busy in its
handler, for tests that stop a process in the middle of a batch).
"""

from __future__ import annotations

import os
import time
from collections import Counter

from opsflow.errors import BadInputError, PermanentError, RetryableError
from opsflow.runtime import Service
from services.contracts import ORDERS, POLICY_CHECK, OrderReceived, PolicyChecked, PolicyOutcome

service = Service("relay", consumes=[ORDERS], produces=[POLICY_CHECK])
_failures: Counter[str] = Counter()


@service.handler
def relay(order: OrderReceived) -> PolicyChecked:
    note = order.notes or ""
    if note == "reject":
        raise BadInputError(f"order {order.order_id} asked to be rejected")
    if note == "crash":
        raise KeyError("a bug in the handler")
    if note.startswith("flaky:") and _failures[order.order_id] < int(note.split(":")[1]):
        _failures[order.order_id] += 1
        raise RetryableError(f"transient trouble #{_failures[order.order_id]}")
    if note.startswith("nodb:") and _failures[order.order_id] < int(note.split(":")[1]):
        _failures[order.order_id] += 1
        # Imported here: the driver (about 10 MB resident) is for this test path only,
        # and the one-hop bench runs this service, against loops that load none.
        import psycopg

        with psycopg.connect(os.environ["RELAY_NO_DATABASE"], connect_timeout=2):
            pass
    if note.startswith("slow:"):
        time.sleep(float(note.removeprefix("slow:")))
    if note.startswith("bug:"):
        fixed = set(os.environ.get("RELAY_FIXED", "").split(","))
        for bug in note.removeprefix("bug:").split(","):
            if bug not in fixed:
                raise PermanentError(f"relay bug {bug} hit by order {order.order_id}")
    return PolicyChecked(
        order_id=order.order_id,
        outcome=PolicyOutcome.AUTO_APPROVED,
        reason_codes=[],
        reasons=[],
        rules_version="relay-1",
        # As policy-check does: dispatch books an approval from itself.
        destination=order.destination,
    )
