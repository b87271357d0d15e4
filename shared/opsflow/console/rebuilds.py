"""Projection rebuilds the console runs: one background thread per rebuild, its progress kept
in memory for the projections page.

A rebuild replays a read model's topics from the beginning (``opsflow.projections.rebuild``):
minutes for a large log, longer than a request may wait. So the console starts it in a
thread of its own process and answers at once; the page shows how far it got on each
refresh. The progress lives in this process only (the console runs one instance): what
lasts is the operator action, recorded with its actor before the rebuild starts and with
its outcome after, as operator action events (``opsflow.operator_actions``). One rebuild
per projection at a time: a second request while one runs starts nothing and says who
started the running one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from opsflow.operator_actions import Begun
from opsflow.projections.rebuild import Progress, RebuildResult


@dataclass
class RebuildRun:
    """One rebuild the console started: who, when, how far, and how it ended."""

    projection: str
    action: Begun
    actor: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    done: int = 0
    total: int = 0
    ended_at: datetime | None = None
    outcome: str | None = None

    @property
    def running(self) -> bool:
        return self.ended_at is None

    @property
    def percent(self) -> int | None:
        """How far the replay is, once the records to read are known."""
        return min(100, self.done * 100 // self.total) if self.total else None


class Rebuilds:
    """The rebuilds started by this console process, by projection (the latest of each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, RebuildRun] = {}

    def latest(self) -> dict[str, RebuildRun]:
        with self._lock:
            return dict(self._runs)

    def running(self, projection: str) -> RebuildRun | None:
        with self._lock:
            run = self._runs.get(projection)
            return run if run is not None and run.running else None

    def start(
        self,
        run: RebuildRun,
        work: Callable[[Progress], RebuildResult],
        finished: Callable[[RebuildRun, RebuildResult | None, Exception | None], None],
    ) -> RebuildRun:
        """Run ``work`` in a thread, unless a rebuild of the projection runs already (then
        that one is returned and nothing starts). ``finished`` records the outcome."""
        with self._lock:
            current = self._runs.get(run.projection)
            if current is not None and current.running:
                return current
            self._runs[run.projection] = run

        def progress(done: int, total: int) -> None:
            run.done, run.total = done, total

        def target() -> None:
            result: RebuildResult | None = None
            error: Exception | None = None
            try:
                result = work(progress)
                run.outcome = result.outcome()
            except Exception as err:  # the page and the audit say why; the console goes on
                error = err
                run.outcome = f"failed: {err}"
            try:
                finished(run, result, error)
            finally:
                run.ended_at = datetime.now(UTC)

        threading.Thread(target=target, name=f"rebuild-{run.projection}", daemon=True).start()
        return run
