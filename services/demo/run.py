"""One demo run: make the orders, send them through the ingest API, follow them through
the topics, and sum up where they ended and how long each step took.

Where everything is comes from the environment (``KAFKA_BOOTSTRAP_SERVERS``,
``SCHEMA_REGISTRY_URL``, ``DATABASE_URL``, ``INGEST_URL``,
``OPSFLOW_TOPIC_PREFIX``, ``OPSFLOW_API_KEY``, and for ``--auto-review``
``REVIEW_URL`` and ``OPSFLOW_REVIEWER_TOKEN``), and whatever is unset from the
stack running on this data directory (what ``opsflow env`` prints).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsflow.errors import ConfigurationError
from opsflow.settings import DatabaseSettings, KafkaSettings, RegistrySettings, TopicSettings
from services.demo.orders import DemoOrder, demo_orders, new_run_id, order_id_prefix
from services.demo.reviewer import (
    AUTO_REVIEWER_DISPLAY_NAME,
    AutoReviewer,
    ReviewClient,
    Verdict,
    review_plan,
)
from services.demo.sender import IngestClient, Sender
from services.demo.states import WAITING_FOR_REVIEW, OrderState, Until
from services.demo.tracker import TIMING_SOURCE, StepTiming, Tracker, step_timings

DEMO_PRODUCER = "demo"
"""The producer name of a key the demo makes for itself."""

DEMO_REVIEWER_PREFIX = "demo-reviewer-"
"""The name of a reviewer the demo makes for itself: this and the run id."""

# The tracker starts this long before the run, so records stamped by a producer
# whose clock is behind this machine's are not missed; it only re-reads (and
# skips by key) what other producers wrote in that minute.
CLOCK_MARGIN_MS = 60_000

# What usually holds orders in a state when a run times out.
_STUCK_HINTS = {
    OrderState.SENT: "accepted by the ingest API but not seen on the orders topic: does "
    "OPSFLOW_TOPIC_PREFIX match the ingest service's?",
    OrderState.RECEIVED: "not policy-checked: is policy-check running?",
    OrderState.APPROVED: "approved but not dispatched: is dispatch running?",
    OrderState.DISPATCH_REQUESTED: "waiting for the carrier: are dispatch and the carrier "
    "stand-in running?",
    OrderState.DISPATCH_RETRYING: "dispatch is retrying: is the carrier stand-in up?",
    OrderState.DISPATCHED: "booked but no proof of delivery: are the carrier stand-in "
    "and pod-capture running?",
}


class DemoSettings(BaseSettings):
    """The demo's own variables: ``INGEST_URL``, ``OPSFLOW_API_KEY``, and for
    ``--auto-review`` ``REVIEW_URL`` and ``OPSFLOW_REVIEWER_TOKEN``."""

    model_config = SettingsConfigDict(extra="ignore")

    ingest_url: str | None = None
    opsflow_api_key: SecretStr | None = None
    review_url: str | None = None
    opsflow_reviewer_token: SecretStr | None = None


@dataclass(frozen=True)
class Endpoints:
    """Where the demo sends orders and reads them back."""

    kafka: dict[str, Any]
    registry_url: str
    database_url: str | None
    ingest_url: str
    topic_prefix: str
    review_url: str | None = None
    """Only looked up for ``--auto-review``."""


def endpoints(
    ingest_url: str | None = None, *, review_url: str | None = None, auto_review: bool = False
) -> Endpoints:
    """The variables, and what the running stack says for the unset ones.

    ``REVIEW_URL`` is needed (and looked up) only with ``auto_review``.

    Raises:
        ConfigurationError: naming the first variable that is unset with no stack to fill it.
    """
    from opsflow import stack  # the stack machinery is only needed when a variable is unset

    kafka = KafkaSettings()
    settings = DemoSettings()
    found: dict[str, str | None] = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": RegistrySettings().schema_registry_url,
        "DATABASE_URL": DatabaseSettings().database_url,
        "INGEST_URL": ingest_url or settings.ingest_url,
    }
    required = ["KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL", "INGEST_URL"]
    if auto_review:
        found["REVIEW_URL"] = review_url or settings.review_url
        required.append("REVIEW_URL")
    if not all(found.values()):
        plan = stack.running_plan()
        for variable, value in found.items():
            if not value and plan is not None:
                found[variable] = plan.env.get(variable)
        for variable in required:
            if found[variable]:
                continue
            if plan is None:
                raise ConfigurationError(
                    variable,
                    f"is not set and no stack is running from {stack.data_dir()}",
                    "Start the stack with `opsflow up --detach`, or point the shell at a "
                    "running one with `eval $(opsflow env)`",
                )
            raise ConfigurationError(
                variable,
                "is not set and the running stack does not provide it",
                "Set it (for the ingest service: --ingest-url http://HOST:PORT; for the "
                "review service: --review-url), "
                "or restart the stack with a version of opsflow that runs every service",
            )
    return Endpoints(
        kafka={**kafka.client_config(), "bootstrap.servers": found["KAFKA_BOOTSTRAP_SERVERS"]},
        registry_url=str(found["SCHEMA_REGISTRY_URL"]),
        database_url=found["DATABASE_URL"],
        ingest_url=str(found["INGEST_URL"]),
        topic_prefix=TopicSettings().prefix,
        review_url=found.get("REVIEW_URL"),
    )


@dataclass(frozen=True)
class DemoOptions:
    """What to run (the options of ``opsflow demo``)."""

    orders: int
    seed: int = 1
    rate: float | None = None
    """Orders per second; None sends them as fast as the ingest service takes them."""
    until: Until = Until.DELIVERED
    timeout_s: float = 120.0
    """How long to keep following after the last order was sent."""
    auto_review: bool = False
    """Decide the run's review tasks through the review service (``services.demo.reviewer``)."""
    ingest_url: str | None = None
    api_key: str | None = None
    review_url: str | None = None
    reviewer_token: str | None = None


@dataclass(frozen=True)
class AutoReview:
    """What the demo's reviewer planned for the run's review orders and what it did."""

    reviewer: str
    """Who decided: the user made for the run, or the holder of the given token."""
    planned: dict[str, int]
    """Review orders by verdict (approve, reject, leave) as ``review_plan`` chose them."""
    approved: int
    rejected: int
    skipped: int
    """Tasks someone else held or decided first, or that were escalated to supervisors."""
    left_open: int
    """Orders it left alone that still wait for review at the end."""

    def as_json(self) -> dict[str, Any]:
        return {
            "reviewer": self.reviewer,
            "planned": self.planned,
            "approved": self.approved,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "left_open": self.left_open,
        }


@dataclass(frozen=True)
class Summary:
    """Where a run's orders ended and how long each step took."""

    run_id: str
    seed: int
    orders: int
    sent: int
    until: Until
    stopped: str
    """``reached``: every order got as far as ``until``; ``timeout``: the time ran out."""
    elapsed_s: float
    states: dict[OrderState, int]
    policy_outcomes: dict[str, int]
    scenarios: dict[str, int]
    steps: list[StepTiming]
    review_service_answered: bool
    review_decisions: dict[str, int] = field(default_factory=dict)
    """The run's orders decided by a reviewer, by decision, as the review topic says."""
    auto_review: AutoReview | None = None
    """What ``--auto-review`` did; None without it."""
    notes: list[str] = field(default_factory=list)

    @property
    def order_id_prefix(self) -> str:
        return order_id_prefix(self.run_id)

    def as_json(self) -> dict[str, Any]:
        """The summary for machines (``opsflow demo --json``); every state is listed."""
        return {
            "run_id": self.run_id,
            "order_id_prefix": self.order_id_prefix,
            "seed": self.seed,
            "orders": self.orders,
            "sent": self.sent,
            "until": self.until.value,
            "stopped": self.stopped,
            "elapsed_s": round(self.elapsed_s, 3),
            "states": {state.value: self.states.get(state, 0) for state in OrderState},
            "policy_outcomes": self.policy_outcomes,
            "scenarios": self.scenarios,
            "timing_source": TIMING_SOURCE,
            "steps": [
                {
                    "step": s.step,
                    "orders": s.orders,
                    "p50_ms": s.p50_ms,
                    "p95_ms": s.p95_ms,
                    "p99_ms": s.p99_ms,
                }
                for s in self.steps
            ],
            "review_service_answered": self.review_service_answered,
            "review_decisions": self.review_decisions,
            "auto_review": self.auto_review.as_json() if self.auto_review else None,
            "notes": self.notes,
        }


Progress = Callable[[int, int], None]
"""Called while following with (orders sent, orders that got as far as ``until``)."""


def run_demo(options: DemoOptions, *, on_progress: Progress | None = None) -> Summary:
    """Send ``options.orders`` demo orders and follow them until they got as far as
    ``options.until``, or ``options.timeout_s`` after the last one was sent.

    With ``options.auto_review`` the demo's reviewer decides the run's review tasks
    meanwhile (``services.demo.reviewer``), and the run waits for its decisions.

    Raises:
        ConfigurationError: the stack, the ingest or review service, the key or the
            reviewer token is not usable.
        OpsflowError: sending, reviewing or reading failed on the way.
    """
    where = endpoints(
        options.ingest_url, review_url=options.review_url, auto_review=options.auto_review
    )
    settings = DemoSettings()
    run_id = new_run_id()
    started = datetime.now(UTC)
    clock = time.monotonic()
    orders = demo_orders(options.orders, seed=options.seed, run_id=run_id, now=started)
    notes: list[str] = []
    reviewer: AutoReviewer | None = None
    reviewer_name = ""
    # Closed in reverse: the tracker, the clients, then the key and the reviewer made
    # for the run are revoked (their notes are added on the way out).
    with ExitStack() as cleanup:
        given_key = options.api_key or _secret(settings.opsflow_api_key)
        key = cleanup.enter_context(_api_key(given_key, where.database_url, notes))
        client = IngestClient(where.ingest_url, key)
        cleanup.callback(client.close)
        client.check()
        if options.auto_review:
            assert where.review_url is not None, "endpoints() looks it up for auto_review"
            given_token = options.reviewer_token or _secret(settings.opsflow_reviewer_token)
            token, reviewer_name = cleanup.enter_context(
                _reviewer_token(given_token, where.database_url, run_id, notes)
            )
            review_client = ReviewClient(where.review_url, token)
            cleanup.callback(review_client.close)
            review_client.check()
            reviewer = AutoReviewer(review_client, review_plan(orders, seed=options.seed))
        tracker = Tracker(
            (o.order_id for o in orders),
            kafka=where.kafka,
            registry_url=where.registry_url,
            prefix=where.topic_prefix,
        )
        cleanup.callback(tracker.close)
        tracker.start(int(started.timestamp() * 1000) - CLOCK_MARGIN_MS)
        sender = Sender(client, orders, run_id=run_id, rate=options.rate)
        stopped = _follow(tracker, sender, reviewer, options, on_progress or _ignore)
    notes[:0] = _notes(tracker, reviewer, options, stopped)
    return Summary(
        run_id=run_id,
        seed=options.seed,
        orders=len(orders),
        sent=sender.sent,
        until=options.until,
        stopped=stopped,
        elapsed_s=time.monotonic() - clock,
        states={state: n for state, n in tracker.counts.items() if n},
        policy_outcomes=_policy_outcomes(tracker),
        scenarios=_scenarios(orders),
        steps=step_timings(tracker.tracks.values()),
        review_service_answered=tracker.review_seen,
        review_decisions=tracker.review_decisions(),
        auto_review=_auto_review(tracker, reviewer, reviewer_name),
        notes=notes,
    )


def _ignore(sent: int, reached: int) -> None:
    return None


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


@contextmanager
def _api_key(given: str | None, database_url: str | None, notes: list[str]) -> Iterator[str]:
    """The key to send with: the one given, or one made for this run in DATABASE_URL's
    database and revoked when the run ends (so demo runs leave no live keys behind)."""
    if given:
        yield given
        return
    from opsflow import apikeys, db

    hint = "Pass a key with --api-key or OPSFLOW_API_KEY (`opsflow keys create --producer demo`)"
    if not database_url:
        raise ConfigurationError(
            "OPSFLOW_API_KEY", "is not set, and without DATABASE_URL no key can be made", hint
        )
    try:
        with db.connect(database_url) as conn:
            created = apikeys.create_key(conn, DEMO_PRODUCER)
    except ConfigurationError as err:
        raise ConfigurationError(
            "OPSFLOW_API_KEY", f"is not set, and no key can be made ({err.problem})", hint
        ) from err
    try:
        yield created.secret
    finally:
        try:
            with db.connect(database_url) as conn:
                apikeys.revoke_key(conn, created.key.key_id)
            notes.append(
                f"Made API key {created.key.key_id} (producer {DEMO_PRODUCER!r}) for this run "
                "and revoked it afterwards."
            )
        except ConfigurationError as err:
            notes.append(
                f"Made API key {created.key.key_id} for this run but could not revoke it "
                f"({err.problem}): `opsflow keys revoke {created.key.key_id}`."
            )


@contextmanager
def _reviewer_token(
    given: str | None, database_url: str | None, run_id: str, notes: list[str]
) -> Iterator[tuple[str, str]]:
    """The reviewer token to decide with, and who it is: the one given, or a reviewer
    made for this run in DATABASE_URL's database (the review service's) and revoked
    when the run ends, like the API key."""
    if given:
        yield given, "the holder of the given token"
        return
    from opsflow import db, users

    hint = (
        "Pass a reviewer's token with --reviewer-token or OPSFLOW_REVIEWER_TOKEN "
        "(`opsflow users create NAME --role reviewer`)"
    )
    if not database_url:
        raise ConfigurationError(
            "OPSFLOW_REVIEWER_TOKEN",
            "is not set, and without DATABASE_URL no reviewer can be made",
            hint,
        )
    try:
        with db.connect(database_url) as conn:
            created = users.create_user(
                conn,
                f"{DEMO_REVIEWER_PREFIX}{run_id}",
                users.Role.REVIEWER,
                display_name=AUTO_REVIEWER_DISPLAY_NAME,
            )
    except ConfigurationError as err:
        raise ConfigurationError(
            "OPSFLOW_REVIEWER_TOKEN",
            f"is not set, and no reviewer can be made ({err.problem})",
            hint,
        ) from err
    user = created.user
    try:
        yield created.token, f"{user.name} ({user.user_id}), made for this run"
    finally:
        try:
            with db.connect(database_url) as conn:
                users.revoke_user(conn, user.user_id)
            notes.append(
                f"Made reviewer {user.name} ({user.user_id}) for --auto-review and revoked "
                "it afterwards."
            )
        except ConfigurationError as err:
            notes.append(
                f"Made reviewer {user.name} for --auto-review but could not revoke it "
                f"({err.problem}): `opsflow users revoke {user.user_id}`."
            )


def _follow(
    tracker: Tracker,
    sender: Sender,
    reviewer: AutoReviewer | None,
    options: DemoOptions,
    on_progress: Progress,
) -> str:
    """Send (and review) in the background and read until every order got as far as
    asked, or the timeout (counted from the last order sent) ran out."""
    total = len(sender.orders)
    deadline: float | None = None
    workers: list[Sender | AutoReviewer] = [sender] if reviewer is None else [sender, reviewer]
    for worker in workers:
        worker.start()
    try:
        while True:
            tracker.poll(0.2)
            reached = tracker.reached(options.until) - _to_review(tracker, reviewer)
            on_progress(sender.sent, reached)
            for worker in workers:
                if worker.error is not None:
                    raise worker.error
            if sender.is_alive():
                continue
            if reached == total:
                return "reached"
            if deadline is None:
                deadline = time.monotonic() + options.timeout_s
            elif time.monotonic() >= deadline:
                return "timeout"
    finally:
        for worker in workers:
            worker.stop()
        # Daemon threads: at worst one is left in an HTTP call when the process ends.
        for worker in workers:
            worker.join(timeout=5)


def _to_review(tracker: Tracker, reviewer: AutoReviewer | None) -> int:
    """Orders that look as if they wait for review but whose decision by the demo's
    reviewer is due or not yet read back: they are not as far as asked yet, although
    waiting for review would otherwise count."""
    if reviewer is None:
        return 0
    return sum(
        tracker.state_of(order_id) in WAITING_FOR_REVIEW for order_id in reviewer.to_decide()
    )


def _left_open(tracker: Tracker, reviewer: AutoReviewer) -> int:
    return sum(
        verdict is Verdict.LEAVE and tracker.state_of(order_id) in WAITING_FOR_REVIEW
        for order_id, verdict in reviewer.plan.items()
    )


def _auto_review(tracker: Tracker, reviewer: AutoReviewer | None, name: str) -> AutoReview | None:
    if reviewer is None:
        return None
    planned = Counter(verdict.value for verdict in reviewer.plan.values())
    return AutoReview(
        reviewer=name,
        planned={verdict.value: planned[verdict.value] for verdict in Verdict},
        approved=reviewer.approved,
        rejected=reviewer.rejected,
        skipped=reviewer.skipped,
        left_open=_left_open(tracker, reviewer),
    )


def _notes(
    tracker: Tracker, reviewer: AutoReviewer | None, options: DemoOptions, stopped: str
) -> list[str]:
    notes = []
    waiting = tracker.counts[OrderState.NEEDS_REVIEW] + tracker.counts[OrderState.IN_REVIEW]
    if waiting and not tracker.review_seen:
        notes.append(
            f"{waiting} orders wait for review, and no review service answered "
            "(nothing for them on the review topic)."
            + (
                " The review API answered --auto-review but opened no task for them: does "
                "OPSFLOW_TOPIC_PREFIX match the review service's?"
                if reviewer is not None
                else ""
            )
        )
    elif reviewer is not None:
        left = _left_open(tracker, reviewer)
        if left:
            notes.append(
                f"--auto-review left {left} orders undecided on purpose: they wait for "
                "review, and move to supervisors when their review SLA runs out."
            )
        if reviewer.skipped:
            notes.append(
                f"--auto-review skipped {reviewer.skipped} tasks that someone else held or "
                "decided first, or that were escalated to supervisors."
            )
        if pending := _to_review(tracker, reviewer):
            notes.append(
                f"{pending} orders --auto-review was to decide show no decision on the "
                "review topic yet: is the review service opening tasks (`opsflow status`)?"
            )
    elif waiting:
        notes.append(
            f"{waiting} orders wait for review: decide them through the review service, "
            "or run the demo with --auto-review."
        )
    if stopped == "timeout":
        behind = {
            state: n
            for state, n in tracker.counts.items()
            if n and not options.until.reached(state)
        }
        notes.append(
            f"Stopped after --timeout {options.timeout_s:g} s with {sum(behind.values())} "
            f"orders short of {options.until.value!r}."
        )
        notes += [
            f"{n} orders {_STUCK_HINTS[state]}"
            for state, n in behind.items()
            if state in _STUCK_HINTS
        ]
    if tracker.undecodable:
        notes.append(
            f"{tracker.undecodable} records keyed by the run's orders could not be decoded."
        )
    return notes


def _policy_outcomes(tracker: Tracker) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for track in tracker.tracks.values():
        if track.policy is not None:
            outcomes[track.policy.value] = outcomes.get(track.policy.value, 0) + 1
    return dict(sorted(outcomes.items()))


def _scenarios(orders: list[DemoOrder]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for order in orders:
        counts[order.scenario.name] = counts.get(order.scenario.name, 0) + 1
    return counts
