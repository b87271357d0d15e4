"""``opsflow demo``: the order workflow's command, added to ``opsflow`` by the application."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from services.demo.states import Until


def demo(
    orders: Annotated[
        int, typer.Option("--orders", "-n", min=1, max=1_000_000, help="How many orders to send.")
    ] = 100,
    rate: Annotated[
        float | None,
        typer.Option("--rate", min=0.1, help="Orders per second (default: as fast as possible)."),
    ] = None,
    auto_review: Annotated[
        bool,
        typer.Option(
            "--auto-review",
            help="Decide the run's review tasks through the review service as a reviewer "
            "would: seeded, about 70/30 approve/reject, a tenth left open to escalate.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same orders.")] = 1,
    until: Annotated[
        Until,
        typer.Option(
            "--until",
            help="Stop once every order is policy-checked (approved), booked (dispatched), "
            "or at the end of the workflow (delivered, rejected, failed, or waiting for review). "
            "With --auto-review, orders it decides wait for its decision.",
        ),
    ] = Until.DELIVERED,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0, help="Seconds to keep following after the last send."),
    ] = 120.0,
    ingest_url: Annotated[
        str | None,
        typer.Option(
            "--ingest-url", help="The ingest service (default: INGEST_URL, or the stack's)."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            help="An ingest API key (default: OPSFLOW_API_KEY, or one made for the run "
            "in DATABASE_URL and revoked after).",
        ),
    ] = None,
    review_url: Annotated[
        str | None,
        typer.Option(
            "--review-url",
            help="The review service, for --auto-review (default: REVIEW_URL, or the stack's).",
        ),
    ] = None,
    reviewer_token: Annotated[
        str | None,
        typer.Option(
            "--reviewer-token",
            help="A reviewer's token for --auto-review (default: OPSFLOW_REVIEWER_TOKEN, or "
            "a reviewer made for the run in DATABASE_URL and revoked after).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
) -> None:
    """Send realistic orders through the ingest API and follow each through the workflow.

    Prints where every order ended and how long each step took. Exits 0 when every
    order got as far as --until, 3 when --timeout ran out first.
    """
    from opsflow.cli import console, errors
    from services.demo.report import DemoProgress, print_summary
    from services.demo.run import DemoOptions, run_demo

    options = DemoOptions(
        orders=orders,
        seed=seed,
        rate=rate,
        until=until,
        timeout_s=timeout,
        auto_review=auto_review,
        ingest_url=ingest_url,
        api_key=api_key,
        review_url=review_url,
        reviewer_token=reviewer_token,
    )
    # Bars only for a person watching: not for --json, nor in a log file.
    drawn = not as_json and errors.is_terminal
    with DemoProgress(errors, total=orders, until=options.until, enabled=drawn) as progress:
        summary = run_demo(options, on_progress=progress.update)
    if as_json:
        print(json.dumps(summary.as_json()))
    else:
        print_summary(console, summary)
    raise typer.Exit(0 if summary.stopped == "reached" else 3)
