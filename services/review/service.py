"""The runtime half of the review service: a policy decision needing a person opens a task.

``policy.checked`` with outcome ``NEEDS_REVIEW`` becomes ``review.requested``
through the opsflow runtime (exactly once, the envelope derived from the
policy decision's). Everything in it is derived from the input, so a redo or
a replay writes the very same event:

- the task id is a UUIDv5 of the policy decision's idempotency key;
- the due time is the policy decision's record time (the ``occurred_at`` the
  runtime gives the outputs) plus the reviewer SLA of its reason codes
  (``sla.yaml``); no clock is read.

``python -m services.review`` runs this in a thread next to the HTTP API;
``opsflow run services.review`` runs it alone (tasks are opened, but nobody
serves them and no timer fires).
"""

from __future__ import annotations

import uuid
from functools import cache

from opsflow.contracts.lineage import current
from opsflow.nodes.human.sla import SlaPolicy, load_sla
from opsflow.runtime import Service
from services.contracts import (
    POLICY_CHECK,
    PolicyChecked,
    PolicyOutcome,
    ReviewRequested,
    ReviewTier,
)
from services.review.human_task import REVIEW, ReviewSettings

# Fixed namespace of task ids (never change it: ids must survive replays).
TASK_NAMESPACE = uuid.UUID("7a5c0e3e-2b1d-5f4a-9c61-72657669657f")

service = Service(REVIEW.name, consumes=[POLICY_CHECK], produces=[REVIEW.topic])


@cache
def _sla() -> SlaPolicy:
    return load_sla(ReviewSettings().sla_file, "REVIEW_SLA_FILE")


def task_id_for(check: PolicyChecked) -> str:
    """The id of the task opened for ``check``: the same decision always gives the same id."""
    return str(uuid.uuid5(TASK_NAMESPACE, check.envelope.idempotency_key))


@service.handler
def open_task(check: PolicyChecked) -> ReviewRequested | None:
    """A review task for a decision that needs a person; nothing for the others."""
    if check.outcome is not PolicyOutcome.NEEDS_REVIEW:
        return None
    lineage = current()
    assert lineage is not None, "handlers run inside the runtime's lineage"
    # The envelope is derived from the input's (a model validator mypy cannot see).
    return ReviewRequested(  # type: ignore[call-arg]
        order_id=check.order_id,
        task_id=task_id_for(check),
        tier=ReviewTier.REVIEWER,
        due_at=lineage.occurred_at + _sla().reviewer_sla(check.reason_codes),
        reason_codes=list(check.reason_codes),
        reasons=list(check.reasons),
    )
