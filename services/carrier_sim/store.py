"""The carrier's own record of bookings, in SQLite, keyed by idempotency key.

Every method is synchronous and short (tens of microseconds) and is called from
the event loop thread only. That is what makes idempotency hold under
concurrent identical requests: between looking a key up and inserting its
booking there is no ``await``, so no other request can interleave. The
primary key on ``idempotency_key`` backs it up.

Writes are cheap on purpose: WAL with ``synchronous=NORMAL`` commits without
an fsync, so a booking survives a crash or kill of the carrier process (the
operating system has the page) but not a power cut, which is plenty for a
stand-in.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bookings (
    idempotency_key TEXT PRIMARY KEY,
    booking_reference TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    order_id TEXT NOT NULL,
    dispatch_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    estimated_delivery_at TEXT NOT NULL,
    response TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 1,
    pod_status TEXT
);
CREATE INDEX IF NOT EXISTS bookings_by_order ON bookings (order_id);
"""

_COLUMNS = (
    "booking_reference, idempotency_key, order_id, dispatch_id, created_at,"
    " estimated_delivery_at, requests, pod_status"
)


class PodStatus(enum.StrEnum):
    """Where a booking's proof of delivery stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    REJECTED = "rejected"  # the receiver answered 4xx; not retried


@dataclass(frozen=True, slots=True)
class Booking:
    """One booking as the carrier lists it."""

    booking_reference: str
    idempotency_key: str
    order_id: str
    dispatch_id: str
    created_at: str
    estimated_delivery_at: str
    requests: int
    pod_status: str | None


@dataclass(frozen=True, slots=True)
class Replay:
    """What the carrier already answered for an idempotency key."""

    fingerprint: str
    response: str


class BookingStore:
    """Bookings in one SQLite database (a file, or memory for throwaway runs).

    Args:
        path: a file path, or ``:memory:``.
    """

    def __init__(self, path: str) -> None:
        # isolation_level=None: every statement commits on its own, one write each.
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database (a WAL checkpoint folds the log into the file)."""
        self._db.close()

    def replay(self, key: str) -> Replay | None:
        """Count one more request for ``key`` and return its first answer, if it has one."""
        rows = self._db.execute(
            "UPDATE bookings SET requests = requests + 1 WHERE idempotency_key = ?"
            " RETURNING fingerprint, response",
            (key,),
        ).fetchall()  # fetchall: the statement (and its implicit transaction) ends here
        return Replay(fingerprint=rows[0][0], response=rows[0][1]) if rows else None

    def add(
        self,
        booking: Booking,
        *,
        fingerprint: str,
        response: str,
    ) -> None:
        """Record a new booking with the answer that every repeat will get."""
        self._db.execute(
            "INSERT INTO bookings (booking_reference, idempotency_key, order_id, dispatch_id,"
            " created_at, estimated_delivery_at, requests, pod_status, fingerprint, response)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                booking.booking_reference,
                booking.idempotency_key,
                booking.order_id,
                booking.dispatch_id,
                booking.created_at,
                booking.estimated_delivery_at,
                booking.requests,
                booking.pod_status,
                fingerprint,
                response,
            ),
        )

    def get(self, booking_reference: str) -> Booking | None:
        """The booking with this reference, if there is one."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM bookings WHERE booking_reference = ?", (booking_reference,)
        ).fetchone()
        return None if row is None else Booking(*row)

    def bookings(self, *, order_id: str | None = None) -> list[Booking]:
        """Every booking (or every booking of one order), oldest first."""
        if order_id is None:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM bookings ORDER BY rowid")
        else:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM bookings WHERE order_id = ? ORDER BY rowid", (order_id,)
            )
        return [Booking(*row) for row in rows]

    def duplicates(self) -> dict[str, list[str]]:
        """Orders booked more than once: order id to its booking references, oldest first."""
        rows = self._db.execute(
            "SELECT order_id, booking_reference FROM bookings WHERE order_id IN"
            " (SELECT order_id FROM bookings GROUP BY order_id HAVING count(*) > 1)"
            " ORDER BY rowid"
        )
        found: dict[str, list[str]] = {}
        for order_id, reference in rows:
            found.setdefault(order_id, []).append(reference)
        return found

    def set_pod_status(self, booking_reference: str, status: PodStatus) -> None:
        """Record how the proof of delivery of a booking ended."""
        self._db.execute(
            "UPDATE bookings SET pod_status = ? WHERE booking_reference = ?",
            (status.value, booking_reference),
        )

    def pending_pods(self) -> list[Booking]:
        """Bookings whose proof of delivery has not been accepted or rejected yet."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM bookings WHERE pod_status = ? ORDER BY rowid",
            (PodStatus.PENDING.value,),
        )
        return [Booking(*row) for row in rows]

    def pod_counts(self) -> dict[str, int]:
        """How many bookings are in each proof-of-delivery state."""
        rows = self._db.execute(
            "SELECT pod_status, count(*) FROM bookings WHERE pod_status IS NOT NULL"
            " GROUP BY pod_status"
        )
        counts = {status.value: 0 for status in PodStatus}
        counts.update({status: count for status, count in rows})
        return counts
