"""refund-approval: refunds the rules would not pay on their own wait for a person
(a human task, ``opsflow.nodes.human``).

Agents decide within the SLAs of ``approval_sla.yaml``; past them the task goes
to the finance lead (opsflow's supervisors), past theirs the breach is
recorded. ``python -m services.refunds.approval`` serves the API and the inbox
(``REFUND_APPROVAL_*`` settings) and runs the opener below in a thread.
"""

from __future__ import annotations

import sys
import uuid
from functools import cache
from pathlib import Path

from pydantic_settings import SettingsConfigDict

from opsflow.contracts.lineage import current
from opsflow.nodes.human import HumanTask, HumanTaskSettings, TaskEvents, serve
from opsflow.nodes.human.sla import SlaPolicy, load_sla
from opsflow.runtime import Service
from services.refunds.contracts import (
    APPROVALS,
    CHECKS,
    Actor,
    ActorRole,
    ApprovalClaimed,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalReleased,
    ApprovalRequested,
    ApprovalSlaBreached,
    ApprovalTier,
    CheckOutcome,
    Decision,
    RefundChecked,
)

# Fixed namespace of task ids (never change it: ids must survive replays).
TASK_NAMESPACE = uuid.UUID("0c7d3b1e-5d52-4f0a-9f4e-726566756e64")


class ApprovalSettings(HumanTaskSettings):
    """``REFUND_APPROVAL_*`` variables (see ``HumanTaskSettings``)."""

    model_config = SettingsConfigDict(env_prefix="REFUND_APPROVAL_", extra="ignore")

    port: int = 8910
    sla_file: Path = Path(__file__).with_name("approval_sla.yaml")


APPROVAL = HumanTask(
    name="refund-approval",
    subject="refund",
    events=TaskEvents(
        requested=ApprovalRequested,
        claimed=ApprovalClaimed,
        released=ApprovalReleased,
        decided=ApprovalDecided,
        escalated=ApprovalEscalated,
        breached=ApprovalSlaBreached,
    ),
    actor=Actor,
    tiers=ApprovalTier,
    roles=ActorRole,
    decisions=Decision,
    opener="services.refunds.approval:service",
    settings=ApprovalSettings,
)

service = Service(APPROVAL.name, consumes=[CHECKS], produces=[APPROVALS])


@cache
def _sla() -> SlaPolicy:
    return load_sla(ApprovalSettings().sla_file, "REFUND_APPROVAL_SLA_FILE")


@service.handler
def open_task(check: RefundChecked) -> ApprovalRequested | None:
    """An approval task for a refund the rules sent to a person; nothing for the others.
    Its id and due time derive from the check, so a replay opens the very same task."""
    if check.outcome is not CheckOutcome.NEEDS_APPROVAL:
        return None
    lineage = current()
    assert lineage is not None, "handlers run inside the runtime's lineage"
    return ApprovalRequested(  # type: ignore[call-arg]
        refund_id=check.refund_id,
        task_id=str(uuid.uuid5(TASK_NAMESPACE, check.envelope.idempotency_key)),
        tier=ApprovalTier.AGENT,
        due_at=lineage.occurred_at + _sla().reviewer_sla(check.reason_codes),
        reason_codes=list(check.reason_codes),
        reasons=list(check.reasons),
    )


if __name__ == "__main__":
    sys.exit(serve(APPROVAL))
