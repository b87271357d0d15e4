"""How a demo run looks to people: a progress bar while it runs, tables at the end."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.demo.run import Summary
from services.demo.states import TERMINAL, WAITING_FOR_REVIEW, OrderState, Until
from services.demo.tracker import TIMING_SOURCE

_GOALS = {
    Until.APPROVED: "policy-checked",
    Until.DISPATCHED: "dispatched or stopped",
    Until.DELIVERED: "finished or waiting for review",
}


class DemoProgress:
    """Two bars: orders the ingest API acknowledged, and orders that got as far as
    ``--until``. Drawn on ``console`` (stderr), so ``--json`` output stays clean, and
    only from the first update: a run that fails its checks shows just the error."""

    def __init__(self, console: Console, *, total: int, until: Until, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self._sent = self._progress.add_task("orders sent", total=total)
        self._reached = self._progress.add_task(f"orders {_GOALS[until]}", total=total)

    def update(self, sent: int, reached: int) -> None:
        if not self._progress.live.is_started:
            self._progress.start()
        self._progress.update(self._sent, completed=sent)
        self._progress.update(self._reached, completed=reached)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()


_STOPS = {
    Until.APPROVED: "was decided by the policy check",
    Until.DISPATCHED: "was booked with the carrier or stopped before",
    Until.DELIVERED: "reached the end of the workflow",
}


def headline(summary: Summary) -> str:
    """How the run ended, in words that match where the orders are: "delivered" as a
    stop means the end of the workflow, which a refused or failed order reaches too."""
    stop = _STOPS[summary.until]
    if summary.stopped != "reached":
        return f"timed out before every order {stop}"
    delivered = summary.states.get(OrderState.DELIVERED, 0)
    dispatched = summary.states.get(OrderState.DISPATCHED, 0)
    if summary.until is Until.DELIVERED:
        return f"every order {stop} ({delivered} delivered)"
    if summary.until is Until.DISPATCHED:
        return f"every order {stop} ({dispatched + delivered} booked)"
    return f"every order {stop}"


def print_summary(console: Console, summary: Summary) -> None:
    """Where every order ended, how long each step took, and any notes."""
    ended = headline(summary)
    console.print(
        f"Demo run {summary.run_id} (order ids {summary.order_id_prefix}*, seed {summary.seed}): "
        f"{summary.sent} of {summary.orders} orders sent; {ended} after "
        f"{summary.elapsed_s:.1f} s.",
        highlight=False,
    )
    states = Table(title="Where the orders ended")
    states.add_column("state")
    states.add_column("meaning")
    states.add_column("orders", justify="right")
    for state in OrderState:
        count = summary.states.get(state, 0)
        if count:
            states.add_row(state.value, _styled(state), str(count))
    states.add_section()
    states.add_row("total", "", str(sum(summary.states.values())))
    console.print(states)

    outcomes = ", ".join(f"{name} {n}" for name, n in summary.policy_outcomes.items())
    console.print(f"policy-check: {outcomes or 'no decisions seen'}", highlight=False)
    if summary.review_decisions or summary.auto_review:
        decided = ", ".join(f"{name} {n}" for name, n in summary.review_decisions.items())
        line = f"review: {decided or 'no decisions seen'}"
        if (auto := summary.auto_review) is not None:
            line += (
                f" (--auto-review as {auto.reviewer}: approved {auto.approved}, rejected "
                f"{auto.rejected}, left open {auto.left_open}, skipped {auto.skipped})"
            )
        console.print(line, highlight=False)

    steps = Table(title="How long each step took", caption=f"from {TIMING_SOURCE}")
    steps.add_column("step")
    steps.add_column("orders", justify="right")
    steps.add_column("p50", justify="right")
    steps.add_column("p95", justify="right")
    steps.add_column("p99", justify="right")
    for step in summary.steps:
        steps.add_row(
            step.step, str(step.orders), _ms(step.p50_ms), _ms(step.p95_ms), _ms(step.p99_ms)
        )
    console.print(steps)
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


def _styled(state: OrderState) -> str:
    if state in (OrderState.DELIVERED,):
        return f"[green]{state.label}[/]"
    if state in TERMINAL:
        return f"[red]{state.label}[/]"
    if state in WAITING_FOR_REVIEW:
        return f"[yellow]{state.label}[/]"
    return state.label


def _ms(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value} ms" if value < 10_000 else f"{value / 1000:.1f} s"
