"""The desk of a human step: the task table, with every change recorded, then written, then applied.

People's actions (claim, release, decide) and timers (escalate, breach) go
the same way, in a turn on the task (``transitions``): under a lock every
instance of the step takes, the table is brought up to the task's last
recorded event, then decides the next event (or refuses), which is recorded
in PostgreSQL, written by the producer SDK (waiting for the broker's
acknowledgement) and only then applied to the table. So a change the API
answers with is in the log, the next request on this instance sees it (read
after write), and two instances cannot both take a decision on one task, nor
both fire its timer: the second one's turn starts from the first one's event
and refuses as a second request on the same instance would. Events read back
from the topic (``apply``) are recognised by id and change nothing a second
time. Reads answer from this instance's table, which follows the log: another
instance's change shows once its reader has read it (milliseconds).

A turn's writer killed between recording and the broker's acknowledgement
leaves the event recorded and not written; the next turn on the task, or the
timers' round (``finish_unwritten``), writes it under its own id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from opsflow.contracts import Event
from opsflow.errors import RetryableError
from opsflow.nodes.human.clock import Clock
from opsflow.nodes.human.spec import HumanTask
from opsflow.nodes.human.tasks import Actor, QueueFilter, Task, TaskTable
from opsflow.nodes.human.transitions import Recorded, Transitions, Turn
from opsflow.producer import Producer

log = logging.getLogger("opsflow.nodes.human")

T = TypeVar("T")

# How long a turn waits for this instance's reader to bring the task's events another
# instance wrote (milliseconds, usually; seconds while a killed instance's open
# transaction holds read_committed readers back until its partitions are taken over).
CATCH_UP_S = 15.0
# How long a turn that finds the last event recorded and not marked written waits for
# the reader to bring it before writing it again: its writer was killed, perhaps just
# after the broker took it.
UNWRITTEN_GRACE_S = 2.0


class ActionPending(RetryableError):
    """The broker did not acknowledge an action that is recorded: it is written later
    (by the next turn on the task, or the timers' round), not lost and not redone."""


class Desk:
    """The step's task table and the one way to change it.

    Args:
        spec: the step.
        producer: writes the events (and waits for the acknowledgement).
        transitions: the tasks' locks and recorded events, shared by every instance.
        clock: the time of actions and timers.
        supervisor_sla: how long an escalated task may wait.
    """

    def __init__(
        self,
        spec: HumanTask,
        producer: Producer,
        transitions: Transitions,
        clock: Clock,
        *,
        supervisor_sla: timedelta,
    ) -> None:
        self.spec = spec
        self.producer = producer
        self.transitions = transitions
        self.clock = clock
        self.supervisor_sla = supervisor_sla
        self._table = TaskTable(spec)
        # Guards the table's data (short holds; notified on every change); task locks
        # keep this process's turns on one task from queueing for a database connection
        # each. Always the task lock first, then the turn, then the table's lock.
        self._table_lock = threading.Condition()
        self._task_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    # --- the log's side ----------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Fold an event read from the step's topic into the table."""
        with self._table_lock:
            if self._table.apply(event):
                self._table_lock.notify_all()

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
        with self._task_locks[task_id], self.transitions.turn(task_id) as turn:
            assert turn is not None  # a waiting turn always gets the lock
            self._catch_up(turn)
            # A deadline that passed counts before the person's action does, even
            # if the timer loop has not come round to it yet.
            self._fire_if_due(turn)
            now = self.clock.now()
            with self._table_lock:
                event = decide(self._table, now)
                version = self._table.get(task_id).version + 1
            if event is not None:
                self._write(turn, event, version)
            return self.read(lambda table: view(table.get(task_id)))

    # --- timers ------------------------------------------------------------------------

    def fire_due(self) -> int:
        """Fire every due timer, earliest deadline first; how many this instance fired
        (another instance's turn may have fired some first: those are not fired again).

        Raises:
            RetryableError: the broker did not take an event, or this instance's reader
                lags (the rest wait for the next round; nothing fired twice).
        """
        fired = 0
        while True:
            now = self.clock.now()
            with self._table_lock:
                task = self._table.next_due(now)
            if task is None:
                return fired
            # Another instance may have fired it: the turn's catch-up brings its event,
            # after which the task is no longer due here either.
            with self._task_locks[task.task_id], self.transitions.turn(task.task_id) as turn:
                assert turn is not None
                self._catch_up(turn)
                fired += self._fire_if_due(turn)

    def finish_unwritten(self) -> int:
        """Write the recorded events whose writer stopped before the broker acknowledged
        them (an instance killed mid-turn); how many. A task in someone's turn is left to
        that turn, which does the same.

        Raises:
            RetryableError: the broker did not take one, or this instance's reader lags.
        """
        finished = 0
        for task_id in self.transitions.unwritten():
            with self._task_locks[task_id], self.transitions.turn(task_id, wait=False) as turn:
                if turn is not None and turn.last is not None and not turn.last.written:
                    self._catch_up(turn)
                    finished += 1
        return finished

    def _fire_if_due(self, turn: Turn) -> int:
        """In the task's turn: write its timer's event if it is due now."""
        now = self.clock.now()
        with self._table_lock:
            task = self._table.tasks.get(turn.task_id)
            if task is None or task.timer is None or task.timer > now:
                return 0
            event = self._table.timer_event(task, now=now, supervisor_sla=self.supervisor_sla)
            version = task.version + 1
        self._write(turn, event, version)
        log.info(
            "timer fired",
            extra={
                "event_type": event.event_type,
                "task_id": turn.task_id,
                "correlation_id": event.key,
            },
        )
        return 1

    # --- turns -------------------------------------------------------------------------

    def _catch_up(self, turn: Turn) -> None:
        """Bring the table up to the task's recorded last event, if it has one.

        Every event before the recorded one is in the log (its turn saw it written), so
        the reader brings them: wait for it. The recorded one is too once it is marked
        written. If not, its writer stopped before marking it: if the reader does not
        bring it within ``UNWRITTEN_GRACE_S`` (the writer died after the broker's
        acknowledgement), it never reached the log, so it is written here (the same id)
        and applied.

        Raises:
            RetryableError: the reader did not bring the task's events in time, or the
                broker did not take the recorded one.
        """
        last = turn.last
        if last is None:
            return
        needed = last.version if last.written else last.version - 1
        if not self._await_version(turn.task_id, needed, CATCH_UP_S):
            raise RetryableError(
                f"this instance has not read task {turn.task_id}'s latest events yet"
            )
        if last.written:
            return
        if not self._await_version(turn.task_id, last.version, UNWRITTEN_GRACE_S):
            self._send(last)
            log.warning(
                "recorded task event written again",
                extra={"event_type": last.event.event_type, "task_id": turn.task_id},
            )
        turn.written()
        self.apply(last.event)

    def _await_version(self, task_id: str, version: int, timeout: float) -> bool:
        """Whether the table has (or gets within ``timeout``) ``version`` of the task."""
        deadline = time.monotonic() + timeout
        with self._table_lock:
            while (task := self._table.tasks.get(task_id)) is None or task.version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._table_lock.wait(left)
        return True

    def _write(self, turn: Turn, event: Event, version: int) -> None:
        """Record the event, write it and wait for the broker, then apply it (see the
        module docstring)."""
        turn.record(event, version)
        assert turn.last is not None
        self._send(turn.last)
        turn.written()
        self.apply(event)

    def _send(self, recorded: Recorded) -> None:
        try:
            self.producer.send(recorded.event)
        except RetryableError as err:
            raise ActionPending(
                f"the broker did not acknowledge the {recorded.event.event_type} event ({err});"
                " it is recorded and will be written once the broker answers"
            ) from err
