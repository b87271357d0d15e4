"""A human step's clock: the wall clock, shifted by an offset tests can move.

Timers compare due times with ``now()`` and the events the step writes carry
it as ``occurred_at``; nothing in the step reads the wall clock otherwise.
Times are cut to milliseconds, what events carry, so a task read back from
the log equals the one the API answered with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from opsflow.contracts.record import utc_millis


def _wall() -> datetime:
    return datetime.now(UTC)


class Clock:
    """``wall() + offset``; ``set`` moves the offset so that now is the given time.

    Args:
        offset_s: seconds added to the wall clock (``<PREFIX>CLOCK_OFFSET_S``).
        wall: the underlying clock.
    """

    def __init__(self, offset_s: float = 0.0, *, wall: Callable[[], datetime] = _wall) -> None:
        self._wall = wall
        self._offset = timedelta(seconds=offset_s)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """The current time, in UTC, to the millisecond."""
        with self._lock:
            offset = self._offset
        return utc_millis(self._wall() + offset)

    def set(self, when: datetime) -> None:
        """Make ``now()`` answer ``when`` from this moment on (and keep ticking from there)."""
        with self._lock:
            self._offset = when - self._wall()
