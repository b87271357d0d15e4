"""review: the human step between the policy check and dispatch.

A ``policy.checked`` that needs a person opens a review task
(``review.requested``, with the policy's reasons and an SLA due time); people
claim, release, approve or reject it over HTTP (``review.claimed``,
``review.released``, ``review.decided``: approvals go on to dispatch,
rejections end the order); a task past its SLA moves to supervisors
(``review.escalated``), and past theirs is recorded as breached
(``review.sla_breached``).

**State lives in the log.** Task state and due times are the ``review`` topic
itself: on start the service replays it (``read_committed``, from the
beginning, to its end) into an in-memory table, then keeps following it, and
every change it makes is an event on that topic first. Timers are durable for
the same reason: due times and fired timers are events, so after any stop the
rebuilt table fires each overdue timer once, in deadline order.

**Why not faust tables.** faust-streaming's changelog-backed tables would keep
the same state, but their consistency with the outputs needs its
``exactly_once`` guarantee, and that does not start on the embedded broker
(aiokafka ``UnknownError``, measured in ``make bench``); without it a crash
between a table update and its changelog write can lose or repeat a decision.
The same bench measured faust at 2.5x the opsflow runtime's CPU per event and
201 MB against 110 MB. So tasks are opened by the opsflow runtime (exactly
once, with the workarounds for this broker's transactions) and the table is
rebuilt from the review topic, which is the truth anyway: replaying 500 tasks
(about 1,500 events) took 0.5 s in ``test_review.py`` (logged as "review topic
replayed"), and there is no second copy of the state (a changelog topic) that
could drift from the log.

**One process, one instance.** ``python -m services.review`` serves the API
and runs the task opener, the topic reader and the timers in threads
(``feed``). Decisions are serialized per task with locks in that process
(``desk``), so run exactly one instance per deployment: two would each accept
a decision on the same task.

Modules: ``service`` (policy.checked -> review.requested, runtime handler),
``tasks`` (the state machine, deterministic), ``desk`` (locks, write then
apply), ``feed`` (threads), ``app`` (HTTP), ``sla`` and ``sla.yaml`` (SLAs),
``clock`` (the injectable clock), ``config`` (``REVIEW_*`` settings).
"""

from services.review.service import service

__all__ = ["service"]
