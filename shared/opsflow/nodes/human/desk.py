"""The desk of a human step: the task table, with every change written to the log first.

People's actions (claim, release, decide) and timers (escalate, breach) go
the same way: under the task's lock, the table decides the event (or refuses),
the producer SDK writes it and waits for the broker's acknowledgement, and
only then is the event applied to the table. So a change the API answers with
is in the log, and the next request sees it (read after write) without waiting
for the topic to be read back. Per-task locks make the decide-write-apply
steps of one task strictly one after another: two concurrent decisions cannot
both pass, nor a decision and an escalation. Events read back from the topic
(``apply``) are recognised by id and change nothing a second time.

The locks live in this process, so one instance per deployment: two would
each take a decision on the same task.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from opsflow.contracts import Event
from opsflow.nodes.human.clock import Clock
from opsflow.nodes.human.spec import HumanTask
from opsflow.nodes.human.tasks import Actor, QueueFilter, Task, TaskTable
from opsflow.producer import Producer

log = logging.getLogger("opsflow.nodes.human")

T = TypeVar("T")


class Desk:
    """The step's task table and the one way to change it.

    Args:
        spec: the step.
        producer: writes the events (and waits for the acknowledgement).
        clock: the time of actions and timers.
        supervisor_sla: how long an escalated task may wait.
    """

    def __init__(
        self, spec: HumanTask, producer: Producer, clock: Clock, *, supervisor_sla: timedelta
    ) -> None:
        self.spec = spec
        self.producer = producer
        self.clock = clock
        self.supervisor_sla = supervisor_sla
        self._table = TaskTable(spec)
        # Guards the table's data (short holds); task locks serialize one task's
        # decide-write-apply steps. Always the task lock first, then the table's.
        self._table_lock = threading.Lock()
        self._task_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    # --- the log's side ----------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Fold an event read from the step's topic into the table."""
        with self._table_lock:
            self._table.apply(event)

    # --- reading -----------------------------------------------------------------------

    def read(self, reader: Callable[[TaskTable], T]) -> T:
        """``reader``'s answer from the table as it is now (build views inside it: the
        tasks change once the lock is released)."""
        with self._table_lock:
            return reader(self._table)

    def queue(self, where: QueueFilter, view: Callable[[Task], T]) -> list[T]:
        """The selected tasks, soonest due first, each passed through ``view``."""
        return self.read(lambda table: [view(task) for task in table.queue(where)])

    # --- people's actions --------------------------------------------------------------

    def claim(self, task_id: str, actor: Actor, view: Callable[[Task], T]) -> T:
        """Claim the task for ``actor`` (nothing is written if they hold it already)."""
        return self._act(task_id, view, lambda table, now: table.claim(task_id, actor, now=now))

    def release(
        self, task_id: str, actor: Actor, reason: str | None, view: Callable[[Task], T]
    ) -> T:
        """Put the task back in the queue."""
        return self._act(
            task_id, view, lambda table, now: table.release(task_id, actor, now=now, reason=reason)
        )

    def decide(
        self,
        task_id: str,
        actor: Actor,
        decision: StrEnum,
        reason: str,
        view: Callable[[Task], T],
    ) -> T:
        """Approve or reject what the task is about."""
        return self._act(
            task_id,
            view,
            lambda table, now: table.decide(task_id, actor, decision, reason, now=now),
        )

    def _act(
        self,
        task_id: str,
        view: Callable[[Task], T],
        decide: Callable[[TaskTable, datetime], Event | None],
    ) -> T:
        with self._task_locks[task_id]:
            # A deadline that passed counts before the person's action does, even
            # if the timer loop has not come round to it yet.
            self._fire_if_due(task_id)
            now = self.clock.now()
            with self._table_lock:
                event = decide(self._table, now)
            if event is not None:
                self._write(event)
            return self.read(lambda table: view(table.get(task_id)))

    # --- timers ------------------------------------------------------------------------

    def fire_due(self) -> int:
        """Fire every due timer, earliest deadline first; how many fired.

        Raises:
            RetryableError: the broker did not take an event (the rest wait for
                the next round; nothing fired twice).
        """
        fired = 0
        while True:
            now = self.clock.now()
            with self._table_lock:
                task = self._table.next_due(now)
            if task is None:
                return fired
            with self._task_locks[task.task_id]:
                fired += self._fire_if_due(task.task_id)

    def _fire_if_due(self, task_id: str) -> int:
        """Under the task's lock: write its timer's event if it is due now."""
        now = self.clock.now()
        with self._table_lock:
            task = self._table.tasks.get(task_id)
            if task is None or task.timer is None or task.timer > now:
                return 0
            event = self._table.timer_event(task, now=now, supervisor_sla=self.supervisor_sla)
        self._write(event)
        log.info(
            "timer fired",
            extra={
                "event_type": event.event_type,
                "task_id": task_id,
                "correlation_id": event.key,
            },
        )
        return 1

    def _write(self, event: Event) -> None:
        """Write the event, wait for the broker, then apply it (see the module docstring)."""
        self.producer.send(event)
        with self._table_lock:
            self._table.apply(event)
