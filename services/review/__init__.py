"""review: the human step between the policy check and dispatch, an opsflow human task.

A ``policy.checked`` that needs a person opens a review task
(``review.requested``, with the policy's reasons and an SLA due time); people
claim, release, approve or reject it over HTTP (``review.claimed``,
``review.released``, ``review.decided``: approvals go on to dispatch,
rejections end the order); a task past its SLA moves to supervisors
(``review.escalated``), and past theirs is recorded as breached
(``review.sla_breached``).

The step itself (task table, desk, timers, HTTP API, inbox) is opsflow's
``opsflow.nodes.human``; this package declares it (``human_task``: the review
events, tiers, roles, ``REVIEW_*`` settings, ``sla.yaml``) and opens its tasks
(``service``: ``policy.checked`` -> ``review.requested``).
"""

from services.review.service import service

__all__ = ["service"]
