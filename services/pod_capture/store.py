"""What pod-capture keeps in PostgreSQL (migration 0003): the dispatched bookings it
matches PODs against, the PODs it captured, and the PODs still waiting for their
dispatch.

``pod_capture_dispatches`` is a projection of ``dispatch.executed``, written
idempotently (the first record of a booking wins), so replays and retries
change nothing. ``CaptureLog`` writes each booking's ``pod.captured`` at most
once per committed row, and remembers the answer given for it.
``pod_capture_unmatched`` keeps the PODs refused because their booking was
not known yet, so they can be captured when their dispatch arrives late.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from opsflow.errors import RetryableError
from services.contracts import DispatchExecuted


@dataclass(frozen=True)
class Dispatch:
    """A booking a carrier accepted for an order (from ``dispatch.executed``)."""

    booking_reference: str
    order_id: str
    carrier: str
    dispatch_id: str


def record_dispatch(conn: psycopg.Connection[Any], event: DispatchExecuted) -> bool:
    """Remember the booking of ``event``; False if it was already known (a replay)."""
    cursor = conn.execute(
        "INSERT INTO pod_capture_dispatches"
        " (booking_reference, order_id, carrier, dispatch_id, dispatched_event_id)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (booking_reference) DO NOTHING",
        (
            event.booking_reference,
            event.order_id,
            event.carrier,
            event.dispatch_id,
            event.envelope.event_id,
        ),
    )
    return cursor.rowcount == 1


def find_dispatch(conn: psycopg.Connection[Any], booking_reference: str) -> Dispatch | None:
    """The dispatch with this booking reference, if it was recorded."""
    row = conn.execute(
        "SELECT booking_reference, order_id, carrier, dispatch_id FROM pod_capture_dispatches"
        " WHERE booking_reference = %s",
        (booking_reference,),
    ).fetchone()
    return Dispatch(*row) if row else None


@dataclass(frozen=True)
class Unmatched:
    """A POD refused because its booking was unknown, kept for a late dispatch record."""

    booking_reference: str
    producer: str
    pod: str  # the POD as its JSON body


def keep_unmatched(conn: psycopg.Connection[Any], unmatched: Unmatched) -> None:
    """Keep a POD of an unknown booking (the first one kept for a booking stays)."""
    conn.execute(
        "INSERT INTO pod_capture_unmatched (booking_reference, producer, pod)"
        " VALUES (%s, %s, %s) ON CONFLICT (booking_reference) DO NOTHING",
        (unmatched.booking_reference, unmatched.producer, unmatched.pod),
    )


def now_dispatched(conn: psycopg.Connection[Any], *, limit: int) -> list[Unmatched]:
    """Kept PODs whose booking has been dispatched since, oldest first."""
    rows = conn.execute(
        "SELECT u.booking_reference, u.producer, u.pod FROM pod_capture_unmatched u"
        " JOIN pod_capture_dispatches d USING (booking_reference)"
        " ORDER BY u.received_at LIMIT %s",
        (limit,),
    ).fetchall()
    return [Unmatched(*row) for row in rows]


def forget_unmatched(
    conn: psycopg.Connection[Any], *, booking_reference: str | None = None, older_than_s: float = 0
) -> int:
    """Drop the kept POD of ``booking_reference``, or every one kept longer than
    ``older_than_s``; returns how many were dropped."""
    if booking_reference is not None:
        cursor = conn.execute(
            "DELETE FROM pod_capture_unmatched WHERE booking_reference = %s", (booking_reference,)
        )
    else:
        cursor = conn.execute(
            "DELETE FROM pod_capture_unmatched"
            " WHERE received_at < now() - make_interval(secs => %s)",
            (older_than_s,),
        )
    return cursor.rowcount


class CaptureInProgress(RetryableError):
    """Another request is capturing a POD for the same booking right now."""


@dataclass(frozen=True)
class Capture:
    """A captured POD: its event and the JSON answer given for it."""

    event_id: uuid.UUID
    response: str


class CaptureLog:
    """Captures each booking's POD once and remembers the answer (``pod_capture_pods``).

    Args:
        pool: connections to the database holding the table.
        lock_timeout_s: how long a request waits for a concurrent one for the same
            booking before giving up with ``CaptureInProgress``.
    """

    def __init__(self, pool: ConnectionPool[Any], *, lock_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._lock_timeout = f"{int(lock_timeout_s * 1000)}ms"

    def once(self, booking_reference: str, capture: Callable[[], Capture]) -> tuple[Capture, bool]:
        """The capture of ``booking_reference``: the stored one, or ``capture()``'s.

        ``capture`` runs only if no capture is stored, inside the transaction
        that then stores it, under a lock on the booking: a concurrent repeat
        waits and gets the stored capture; if ``capture`` raises, nothing is
        stored and the next attempt runs it again. A POD of the booking kept
        as unmatched is settled by either outcome and dropped in the same
        transaction.

        Returns:
            The capture, and whether it was stored before this call (a repeat).

        Raises:
            CaptureInProgress: a capture for the booking did not finish within the
                lock timeout.
        """
        with self._pool.connection() as conn:
            try:
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (self._lock_timeout,))
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (f"pod-capture\x1f{booking_reference}",),
                )
            except psycopg.errors.LockNotAvailable as err:
                raise CaptureInProgress(
                    f"a POD for booking {booking_reference} is being captured right now"
                ) from err
            row = conn.execute(
                "SELECT event_id, response FROM pod_capture_pods WHERE booking_reference = %s",
                (booking_reference,),
            ).fetchone()
            forget_unmatched(conn, booking_reference=booking_reference)
            if row is not None:
                return Capture(row[0], row[1]), True
            captured = capture()
            conn.execute(
                "INSERT INTO pod_capture_pods (booking_reference, event_id, response)"
                " VALUES (%s, %s, %s)",
                (booking_reference, captured.event_id, captured.response),
            )
            return captured, False
