"""The task table of a human step: every task's state, as the step's topic says it is.

``TaskTable.apply`` folds the step's events into tasks; it is the only way state
changes, whether the event was just read from the topic or just acknowledged
by the broker after the API wrote it, so the table the API answers from is the
table a replay rebuilds. ``apply`` is idempotent (events are recognised by
their id), because the API applies its own events at once and then reads them
back from the topic.

The other methods decide: given a task, an actor and the time, they return the
event to write, or raise why not (``TaskConflict``, ``NotAllowed``,
``TaskNotFound``). They read no clock and make no random ids (the time is an
argument, event ids are derived from the task and its version), and they
change nothing: the caller writes the event, then applies it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from opsflow.contracts import Envelope, Event
from opsflow.errors import PermanentError
from opsflow.nodes.human.spec import HumanTask
from opsflow.producer import event_id_for

log = logging.getLogger("opsflow.nodes.human")

# The application's Avro records of a person and of a reason (duck-typed here:
# ``user_id``, ``display_name``, ``role``; ``code``, ``message``).
Actor = Any
Reason = Any


class TaskNotFound(PermanentError):
    """No task has this id."""


class TaskConflict(PermanentError):
    """The task's state forbids the action (decided, or held by someone else)."""


class NotAllowed(PermanentError):
    """The actor's role may not act on this task."""


@dataclass(frozen=True)
class TaskEntry:
    """One thing that happened to a task, as its event says: what (the event kind:
    ``requested``, ``claimed``, ``released``, ``decided``, ``escalated``, ``breached``),
    when, by whom (None for the step's own timers and opener), and the event's words
    (a decision's or a release's reason, the decision itself, the tier it moved to)."""

    at: datetime
    kind: str
    actor: Actor | None = None
    decision: StrEnum | None = None
    tier: StrEnum | None = None
    reason: str | None = None


@dataclass
class Task:
    """One task: what it is about (``key``, the instance's id), who holds it, what became
    of it, and ``history``: every event applied to it, oldest first (a claim that was
    released is gone from ``claimed_by`` but stays there)."""

    task_id: str
    key: str
    tier: StrEnum
    due_at: datetime
    reason_codes: list[str]
    reasons: list[Reason]
    requested_at: datetime
    last_event_id: str
    version: int = 1
    claimed_by: Actor | None = None
    claimed_at: datetime | None = None
    decision: StrEnum | None = None
    decided_by: Actor | None = None
    decided_at: datetime | None = None
    decision_reason: str | None = None
    escalated_at: datetime | None = None
    breached_at: datetime | None = None
    history: list[TaskEntry] = field(default_factory=list)

    @property
    def open(self) -> bool:
        """Undecided."""
        return self.decision is None

    @property
    def timer(self) -> datetime | None:
        """When this task's next timer fires: escalation in the first tier, the breach
        in the supervisor tier; none once decided or breached."""
        if not self.open or self.breached_at is not None:
            return None
        return self.due_at


def _who(actor: Actor) -> str:
    return f"{actor.display_name} ({actor.user_id}, {actor.role.value.lower()})"


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at else "an unknown time"


@dataclass(frozen=True)
class QueueFilter:
    """Which tasks a queue listing shows.

    Attributes:
        status: ``open`` (undecided), ``decided`` or ``all``.
        tier: only this tier.
        reason: only tasks with this reason code.
        claimed: only claimed (True) or unclaimed (False) open tasks.
        due_before: only tasks due before this time.
        search: only tasks whose key (the instance's id) contains this, in any case.
    """

    status: str = "open"
    tier: StrEnum | None = None
    reason: str | None = None
    claimed: bool | None = None
    due_before: datetime | None = None
    search: str | None = None

    def matches(self, task: Task) -> bool:
        """Whether ``task`` belongs in the listing."""
        if self.status == "open" and not task.open:
            return False
        if self.status == "decided" and task.open:
            return False
        if self.tier is not None and task.tier is not self.tier:
            return False
        if self.reason is not None and self.reason not in task.reason_codes:
            return False
        if self.claimed is not None and (task.claimed_by is not None) is not self.claimed:
            return False
        if self.search and self.search.casefold() not in task.key.casefold():
            return False
        return self.due_before is None or task.due_at < self.due_before


@dataclass
class TaskTable:
    """Tasks by id, folded from the step's events (see the module docstring)."""

    spec: HumanTask
    tasks: dict[str, Task] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)

    # --- folding events ----------------------------------------------------------------

    def apply(self, event: Event) -> bool:
        """Fold one of the step's events in; False when it changed nothing (a repeat, an event of a
        task never requested, a second decision)."""
        event_id = str(event.envelope.event_id)
        if event_id in self._seen:
            return False
        self._seen.add(event_id)
        kinds = self.spec.events
        data: Any = event
        if isinstance(event, kinds.requested):
            if data.task_id in self.tasks:
                return False  # the same task requested twice (a redo): the first stands
            self.tasks[data.task_id] = Task(
                task_id=data.task_id,
                key=event.key,
                tier=data.tier,
                due_at=data.due_at,
                reason_codes=list(data.reason_codes),
                reasons=list(data.reasons),
                requested_at=event.envelope.occurred_at,
                last_event_id=event_id,
                history=[TaskEntry(event.envelope.occurred_at, "requested", tier=data.tier)],
            )
            return True
        task_id = getattr(event, "task_id", None)
        task = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None:
            log.warning(
                "task event for an unknown task ignored",
                extra={"event_id": event_id, "task_id": task_id, "event_type": event.event_type},
            )
            return False
        if not task.open:
            log.warning(
                "task event for a decided task ignored",
                extra={"event_id": event_id, "task_id": task_id, "event_type": event.event_type},
            )
            return False
        at = event.envelope.occurred_at
        if isinstance(event, kinds.claimed):
            task.claimed_by, task.claimed_at = data.actor, at
            entry = TaskEntry(at, "claimed", data.actor, tier=data.tier)
        elif isinstance(event, kinds.released):
            task.claimed_by, task.claimed_at = None, None
            entry = TaskEntry(at, "released", data.actor, tier=data.tier, reason=data.reason)
        elif isinstance(event, kinds.decided):
            task.decision, task.decided_by = data.decision, data.actor
            task.decided_at, task.decision_reason = at, data.reason
            entry = TaskEntry(
                at, "decided", data.actor, data.decision, tier=data.tier, reason=data.reason
            )
        elif isinstance(event, kinds.escalated):
            # The task goes to the supervisors' queue: a reviewer's claim ends with it.
            task.tier, task.due_at, task.escalated_at = data.tier, data.due_at, at
            task.claimed_by, task.claimed_at = None, None
            entry = TaskEntry(at, "escalated", tier=data.tier)
        elif isinstance(event, kinds.breached):
            task.breached_at = at
            entry = TaskEntry(at, "breached", tier=data.tier)
        else:
            return False
        task.history.append(entry)
        task.version += 1
        task.last_event_id = event_id
        return True

    # --- reading -----------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        """The task with this id.

        Raises:
            TaskNotFound: none has it.
        """
        task = self.tasks.get(task_id)
        if task is None:
            raise TaskNotFound(f"no {self.spec.name} task has the id {task_id!r}")
        return task

    def queue(self, where: QueueFilter) -> list[Task]:
        """The tasks ``where`` selects, soonest due first."""
        found = [task for task in self.tasks.values() if where.matches(task)]
        return sorted(found, key=lambda task: (task.due_at, task.task_id))

    def next_due(self, now: datetime) -> Task | None:
        """The task whose timer is the earliest of those due at ``now``, if any."""
        due = [t for t in self.tasks.values() if t.timer is not None and t.timer <= now]
        return min(due, key=lambda t: (t.timer, t.task_id), default=None)

    # --- deciding ----------------------------------------------------------------------

    def claim(self, task_id: str, actor: Actor, *, now: datetime) -> Event | None:
        """The claim of ``task_id`` by ``actor``; None when they hold it already.

        Raises:
            TaskNotFound, TaskConflict (decided, or held by another), NotAllowed (tier).
        """
        task = self._actionable(task_id, actor)
        if task.claimed_by is not None:
            if task.claimed_by.user_id == actor.user_id:
                return None
            raise self._held(task)
        return self._event(
            self.spec.events.claimed,
            task,
            now,
            f"claimed:{actor.user_id}",
            actor=actor,
            tier=task.tier,
        )

    def release(
        self, task_id: str, actor: Actor, *, now: datetime, reason: str | None = None
    ) -> Event:
        """The release of ``task_id``: by whoever holds it, or by a supervisor.

        Raises:
            TaskNotFound, TaskConflict (decided, not claimed, or held by another
            and the actor is no supervisor), NotAllowed (tier).
        """
        task = self._actionable(task_id, actor)
        if task.claimed_by is None:
            raise TaskConflict(
                f"task {task_id} is not claimed by anyone; there is nothing to release"
            )
        if task.claimed_by.user_id != actor.user_id and actor.role != self.spec.supervisor:
            raise TaskConflict(
                f"task {task_id} is claimed by {_who(task.claimed_by)} since "
                f"{_when(task.claimed_at)}; only they or a supervisor may release it"
            )
        return self._event(
            self.spec.events.released,
            task,
            now,
            f"released:{actor.user_id}",
            actor=actor,
            tier=task.tier,
            reason=reason,
        )

    def decide(
        self, task_id: str, actor: Actor, decision: StrEnum, reason: str, *, now: datetime
    ) -> Event:
        """The decision on ``task_id``. A task nobody holds may be decided straight away;
        one held by someone else may not.

        Raises:
            TaskNotFound, TaskConflict (decided, or held by another), NotAllowed (tier).
        """
        task = self._actionable(task_id, actor)
        if task.claimed_by is not None and task.claimed_by.user_id != actor.user_id:
            raise self._held(task)
        return self._event(
            self.spec.events.decided,
            task,
            now,
            f"decided:{actor.user_id}",
            actor=actor,
            tier=task.tier,
            decision=decision,
            reason=reason,
        )

    def timer_event(self, task: Task, *, now: datetime, supervisor_sla: timedelta) -> Event:
        """What the task's due timer writes: the escalation to supervisors, or the breach.

        The supervisors' deadline counts from the missed one, not from when the
        timer fired, so it is the same however late the service ran the timer
        (after a restart, say). A timer's event id depends only on the task and
        the tier, so a timer can never fire twice under different ids.
        """
        first, second = self.spec.first_tier, self.spec.second_tier
        if task.tier == first:
            return self._event(
                self.spec.events.escalated,
                task,
                now,
                f"escalated:{first.value}",
                keyed_by_version=False,
                previous_tier=first,
                tier=second,
                breached_due_at=task.due_at,
                due_at=task.due_at + supervisor_sla,
            )
        return self._event(
            self.spec.events.breached,
            task,
            now,
            f"sla_breached:{second.value}",
            keyed_by_version=False,
            tier=task.tier,
            due_at=task.due_at,
        )

    def _actionable(self, task_id: str, actor: Actor) -> Task:
        task = self.get(task_id)
        if not task.open:
            verb = "approved" if task.decision == self.spec.approved else "rejected"
            by = _who(task.decided_by) if task.decided_by else "someone"
            raise TaskConflict(
                f"task {task_id} was already {verb} by {by} at {_when(task.decided_at)}"
            )
        if task.tier == self.spec.second_tier and actor.role != self.spec.supervisor:
            raise NotAllowed(
                f"task {task_id} was escalated to supervisors at {_when(task.escalated_at)}; "
                "only a supervisor may act on it now"
            )
        return task

    def _held(self, task: Task) -> TaskConflict:
        assert task.claimed_by is not None
        return TaskConflict(
            f"task {task.task_id} is claimed by {_who(task.claimed_by)} since "
            f"{_when(task.claimed_at)}; ask them or a supervisor to release it"
        )

    def _event(
        self,
        model: type[Event],
        task: Task,
        now: datetime,
        fact: str,
        *,
        keyed_by_version: bool = True,
        **fields: object,
    ) -> Event:
        """An event about ``task`` with a derived envelope.

        The idempotency key names the task, the fact and (for people's actions)
        the task's version: actions on one task are serialized, so a version
        sees one action, and a retried write after an unclear broker answer
        carries the same id and is recognised as a repeat.
        """
        name = self.spec.name
        key = f"{name}:{task.task_id}:" + (f"{task.version}:{fact}" if keyed_by_version else fact)
        envelope = Envelope(
            event_id=event_id_for(name, key),
            idempotency_key=key,
            occurred_at=now,
            correlation_id=task.key,
            causation_id=task.last_event_id,
            producer=name,
            contract_version=model.contract_version,
        )
        return model.model_validate(
            {
                "envelope": envelope,
                self.spec.key_field: task.key,
                "task_id": task.task_id,
                **fields,
            }
        )
