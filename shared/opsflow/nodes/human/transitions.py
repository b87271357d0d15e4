"""Task transitions across a human step's instances: one lock per task, the last event recorded.

Every instance keeps its own table, read from the step's topic, so two of them
could each accept a decision on one task. What serializes them is PostgreSQL:
a change to a task is made under an advisory lock on the step's topic and the
task id (``turn``), held by one connection of one instance at a time and
released by PostgreSQL when that connection ends (a process killed with -9
included). Under it the row of ``task_transitions`` holds the last event the
step decided for the task, with the task's version once it is applied and
whether the broker acknowledged it.

The order inside a turn is what makes a kill harmless at any moment: the new
event is recorded (committed) before it is written to the topic, and marked
written once the broker acknowledged it. The next turn on the task, on any
instance, finds a recorded event not marked written and writes it again under
its own id (the table and every consumer recognise a repeat by id or
idempotency key), then decides on a table that has it. ``unwritten`` lists
those rows so the timers finish them even if nobody touches the task again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from opsflow.contracts import Event


@dataclass(frozen=True)
class Recorded:
    """A task's last recorded event, the task's version with it applied, and whether the
    broker acknowledged it."""

    event: Event
    version: int
    written: bool


def lock_key(topic: str, task_id: str) -> int:
    """The advisory lock of a task: 64 bits of a hash of the topic and the id (two tasks
    sharing one only wait for each other)."""
    digest = hashlib.blake2b(f"{topic}\x1f{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Turn:
    """One instance's exclusive hold on a task (see ``Transitions.turn``)."""

    def __init__(
        self, conn: psycopg.Connection[Any], transitions: Transitions, task_id: str
    ) -> None:
        self._conn = conn
        self._transitions = transitions
        self.task_id = task_id
        self.last = transitions._load(conn, task_id)

    def record(self, event: Event, version: int) -> None:
        """Record ``event`` as the task's last, not yet written (committed on return)."""
        self._conn.execute(
            "INSERT INTO task_transitions (topic, task_id, version, event_type, event, written)"
            " VALUES (%s, %s, %s, %s, %s, false)"
            " ON CONFLICT (topic, task_id) DO UPDATE SET version = excluded.version,"
            " event_type = excluded.event_type, event = excluded.event, written = false,"
            " recorded_at = now()",
            (
                self._transitions.topic,
                self.task_id,
                version,
                event.event_type,
                Jsonb(event.model_dump(mode="json")),
            ),
        )
        self._conn.commit()
        self.last = Recorded(event, version, written=False)

    def written(self) -> None:
        """The broker acknowledged the recorded event (committed on return)."""
        self._conn.execute(
            "UPDATE task_transitions SET written = true WHERE topic = %s AND task_id = %s",
            (self._transitions.topic, self.task_id),
        )
        self._conn.commit()
        if self.last is not None:
            self.last = Recorded(self.last.event, self.last.version, written=True)


class Transitions:
    """The ``task_transitions`` rows of one step's topic, and its tasks' locks.

    Args:
        pool: PostgreSQL connections (a turn holds one).
        topic: the step's topic, prefix included (the rows' and the locks' scope).
        events: the step's event classes, to read recorded events back.
    """

    def __init__(
        self, pool: ConnectionPool[Any], topic: str, events: Sequence[type[Event]]
    ) -> None:
        self.pool = pool
        self.topic = topic
        self._models = {model.event_type: model for model in events}

    @contextmanager
    def turn(self, task_id: str, *, wait: bool = True) -> Iterator[Turn | None]:
        """Hold the task's lock (waiting for another holder, or None at once when
        ``wait`` is false and someone holds it) and its recorded last event."""
        key = lock_key(self.topic, task_id)
        with self.pool.connection() as conn:
            if wait:
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            else:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                if not (row and row[0]):
                    conn.commit()
                    yield None
                    return
            # The lock is the session's: it outlives these commits, not the connection.
            conn.commit()
            try:
                turn = Turn(conn, self, task_id)
                conn.commit()
                yield turn
            finally:
                if not conn.broken:
                    conn.rollback()
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                    conn.commit()

    def unwritten(self) -> list[str]:
        """The tasks whose last recorded event the broker has not acknowledged yet."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT task_id FROM task_transitions WHERE topic = %s AND NOT written"
                " ORDER BY recorded_at",
                (self.topic,),
            ).fetchall()
        return [task_id for (task_id,) in rows]

    def _load(self, conn: psycopg.Connection[Any], task_id: str) -> Recorded | None:
        row = conn.execute(
            "SELECT event_type, event, version, written FROM task_transitions"
            " WHERE topic = %s AND task_id = %s",
            (self.topic, task_id),
        ).fetchone()
        if row is None:
            return None
        event_type, event, version, written = row
        return Recorded(self._models[event_type].model_validate(event), version, written)
