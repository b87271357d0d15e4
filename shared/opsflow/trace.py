"""The causal history of one order, read from the topics of record (``opsflow trace``).

The log is the truth: this reads the topics, never the read models, so it
answers even when a projection is behind, broken or not deployed. It has
three parts, kept apart so the middle one can be tested without a broker:

- ``scan``: every record of every topic of record whose key is the order id
  (every partition, from the beginning to its end, ``read_committed``, no
  consumer group), plus the keys seen on the way (for "did you mean");
- ``build`` and ``verdict``: pure functions making the tree (``causation_id``
  -> ``event_id``) and saying where the order is waiting now;
- ``tree`` and ``as_json``: the two outputs.

An event written more than once (a replay, a redrive, a broker that lets
aborted transactional records through) has one event id: it is one step,
shown once, with the number of times it was written.
"""

from __future__ import annotations

import difflib
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from rich.markup import escape
from rich.tree import Tree

from opsflow.contracts import (
    Actor,
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    Event,
    OrderReceived,
    PodCaptured,
    PodRejected,
    PolicyChecked,
    PolicyOutcome,
    ReviewClaimed,
    ReviewDecided,
    ReviewDecision,
    ReviewEscalated,
    ReviewReleased,
    ReviewRequested,
    ReviewSlaBreached,
    Topic,
)
from opsflow.errors import BadInputError, ConfigurationError, OpsflowError, RetryableError

TRACEPARENT = "traceparent"
FULL_SCAN = "full-scan"
_TOPIC_RANK = {topic.value: rank for rank, topic in enumerate(Topic)}
_ON_THE_STACK = "or point the shell at the running stack with `eval $(opsflow env)`"
E = TypeVar("E", bound=Event)


# --- what was read ----------------------------------------------------------------------


@dataclass(frozen=True)
class RawRecord:
    """A record of the order as it is on a topic of record, not yet decoded.

    ``topic`` is the contract name (``review``), without the environment's prefix.
    """

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()


@dataclass(frozen=True)
class Record:
    """A decoded record of the order: the event and where it was written."""

    topic: str
    partition: int
    offset: int
    event: Event
    trace_id: str | None = None


@dataclass(frozen=True)
class Unreadable:
    """A record keyed by the order that could not be decoded: shown, never dropped silently."""

    topic: str
    partition: int
    offset: int
    problem: str


@dataclass
class Scan:
    """What reading the topics found for one order."""

    records: list[RawRecord]
    keys: set[str]
    records_read: int
    path: str = FULL_SCAN


def trace_id_of(headers: Sequence[tuple[str, bytes | None]]) -> str | None:
    """The W3C trace id of the first ``traceparent`` header (``00-<trace>-<span>-<flags>``).

    The first, because a dead-lettered record carries the original's first and
    the failed processing's after it; None for records written through the
    producer SDK, which carry no headers.
    """
    for name, value in headers:
        if name != TRACEPARENT or not value:
            continue
        parts = value.decode("utf-8", "replace").strip().split("-")
        if len(parts) >= 4 and len(parts[1]) == 32 and parts[1].strip("0"):
            return parts[1].lower()
    return None


# --- the tree ---------------------------------------------------------------------------


@dataclass(eq=False)
class Step:
    """One event of the order, once, with where it sits in the causal tree.

    Attributes:
        copies: how many records carry this event id (more than one: written again).
        elapsed_ms: time since its cause, or since the previous step when it has none here.
        elapsed_since: ``cause``, ``previous`` or None (the first step).
        note: why a step hangs under the root though it names a cause.
    """

    event: Event
    topic: str
    partition: int
    offset: int
    trace_id: str | None
    copies: int = 1
    children: list[Step] = field(default_factory=list)
    elapsed_ms: int | None = None
    elapsed_since: str | None = None
    note: str | None = None

    @property
    def event_id(self) -> str:
        return str(self.event.envelope.event_id)

    @property
    def causation_id(self) -> str | None:
        return self.event.envelope.causation_id

    @property
    def at(self) -> datetime:
        return self.event.envelope.occurred_at

    def sort_key(self) -> tuple[datetime, int, int, int]:
        """Time first; the workflow's topic order and the offset break ties, so steps
        written in the same millisecond still come in the order they were caused."""
        return (self.at, _TOPIC_RANK.get(self.topic, 99), self.partition, self.offset)


def _ms(delta: timedelta) -> int:
    return round(delta.total_seconds() * 1000)


def build(records: Iterable[Record]) -> list[Step]:
    """The order's events as a forest: roots are events without a cause among them.

    Each event appears once however many records carry it (the first record read
    gives its position). Children are sorted by time. An event naming a cause
    that is not among the order's events (or a cycle of causes, which only a bad
    producer can write) hangs under the root with a note instead of vanishing.
    """
    steps: dict[str, Step] = {}
    for record in records:
        key = str(record.event.envelope.event_id)
        seen = steps.get(key)
        if seen is None:
            steps[key] = Step(
                record.event, record.topic, record.partition, record.offset, record.trace_id
            )
        else:
            seen.copies += 1
            seen.trace_id = seen.trace_id or record.trace_id
    ordered = sorted(steps.values(), key=Step.sort_key)
    roots: list[Step] = []
    for step in ordered:
        cause = steps.get(step.causation_id) if step.causation_id else None
        if cause is step:
            cause = None
        if cause is None:
            if step.causation_id:
                step.note = f"its cause {step.causation_id} is not among this order's events"
            roots.append(step)
        else:
            cause.children.append(step)
            step.elapsed_ms, step.elapsed_since = _ms(step.at - cause.at), "cause"
    reached = {id(step) for _, step in walk(roots)}
    for step in ordered:
        if id(step) not in reached:  # a cycle of causes: no root leads to it; cut it here
            steps[str(step.causation_id)].children.remove(step)
            step.note = "its causes form a cycle"
            step.elapsed_ms = step.elapsed_since = None
            roots.append(step)
            reached |= {id(s) for _, s in walk([step])}
    roots.sort(key=Step.sort_key)
    previous: Step | None = None
    for step in ordered:
        if step.elapsed_since is None and previous is not None:
            step.elapsed_ms, step.elapsed_since = _ms(step.at - previous.at), "previous"
        previous = step
    return roots


def walk(roots: Sequence[Step], depth: int = 0) -> Iterator[tuple[int, Step]]:
    """Every step in causal order (a cause before its effects), with its depth."""
    for step in roots:
        yield depth, step
        yield from walk(step.children, depth + 1)


# --- where it is now --------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Where the order is: ``state`` (the values of ``orders_current.state``), a sentence for
    people, and whether it is done (``terminal``) or waiting for someone or something."""

    state: str
    now: str
    terminal: bool


def _minutes(delta: timedelta) -> str:
    minutes = round(abs(delta.total_seconds()) / 60)
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S") + f".{at.microsecond // 1000:03d}Z"


def _who(actor: Actor) -> str:
    return f"{actor.display_name} ({actor.role.value.lower()})"


def _due(due_at: datetime, now: datetime) -> str:
    left = due_at - now
    if left.total_seconds() >= 0:
        return f"SLA due in {_minutes(left)}"
    return f"SLA overdue by {_minutes(left)}"


def _latest(events: Sequence[Event], kind: type[E]) -> E | None:
    found = [e for e in events if isinstance(e, kind)]
    return found[-1] if found else None


def verdict(events: Sequence[Event], now: datetime) -> Verdict:
    """Where the order is waiting now, from its events alone (``events`` in time order).

    The furthest step reached decides, not the last event by time: a late
    ``review.claimed`` does not undo a dispatch. The semantics are the services':
    dispatch writes ``dispatch.failed`` for good on a permanent refusal
    (``failure_class`` PERMANENT) or when its retries are exhausted, and a
    failure that is neither means another attempt follows.
    """
    pod = _latest(events, PodCaptured)
    if pod is not None:
        return Verdict(
            "delivered",
            f"delivered at {_stamp(pod.delivered_at)}, received by {pod.received_by} "
            f"(booking {pod.booking_reference})",
            True,
        )
    refused = _latest(events, PodRejected)
    refusal = (
        f"; a proof of delivery was refused at {_stamp(refused.envelope.occurred_at)} "
        f"({refused.reason_code.value}: {refused.reason})"
        if refused
        else ""
    )
    dispatch = [
        e for e in events if isinstance(e, DispatchRequested | DispatchExecuted | DispatchFailed)
    ]
    if dispatch:
        last = max(dispatch, key=_dispatch_rank)
        executed = _latest(events, DispatchExecuted)
        if executed is not None:
            return Verdict(
                "dispatched",
                f"waiting for proof of delivery: booked {executed.booking_reference} with "
                f"{executed.carrier} at {_stamp(executed.envelope.occurred_at)} "
                f"({_minutes(now - executed.envelope.occurred_at)} ago)"
                + (
                    f", delivery expected {_stamp(executed.estimated_delivery_at)}"
                    if executed.estimated_delivery_at
                    else ""
                )
                + refusal,
                False,
            )
        if isinstance(last, DispatchFailed):
            if last.failure_class is DispatchFailureClass.PERMANENT or last.retries_exhausted:
                why = (
                    "the carrier refused it"
                    if last.failure_class is DispatchFailureClass.PERMANENT
                    else f"retries exhausted after attempt {last.attempt}"
                )
                return Verdict(
                    "dispatch_failed",
                    f"dispatch failed for good ({why}): {last.reason}; on the operator's "
                    "exception path: settle it with the carrier, then re-drive its "
                    "dispatch.requested",
                    True,
                )
            then = (
                f", next attempt at {_stamp(last.next_attempt_at)}" if last.next_attempt_at else ""
            )
            return Verdict(
                "dispatching",
                f"retrying the carrier booking: attempt {last.attempt} failed "
                f"({last.failure_class.value}: {last.reason}){then}",
                False,
            )
        assert isinstance(last, DispatchRequested)
        return Verdict(
            "dispatching",
            f"waiting for the carrier booking: attempt {last.attempt} with {last.carrier} "
            f"requested {_minutes(now - last.envelope.occurred_at)} ago",
            False,
        )
    decided = _latest(events, ReviewDecided)
    if decided is not None:
        if decided.decision is ReviewDecision.REJECTED:
            return Verdict(
                "rejected",
                f"rejected by {_who(decided.actor)} at {_stamp(decided.envelope.occurred_at)}: "
                f"{decided.reason}",
                True,
            )
        return _waiting_for_dispatch(
            f"approved by {_who(decided.actor)}", decided.envelope.occurred_at, now
        )
    requested = _latest(events, ReviewRequested)
    if requested is not None:
        return _in_review(requested, events, now)
    check = _latest(events, PolicyChecked)
    if check is not None:
        codes = ", ".join(check.reason_codes) or "no reason code"
        if check.outcome is PolicyOutcome.REJECTED:
            return Verdict("rejected", f"rejected by policy {check.rules_version}: {codes}", True)
        if check.outcome is PolicyOutcome.AUTO_APPROVED:
            return _waiting_for_dispatch(
                f"approved by policy {check.rules_version}", check.envelope.occurred_at, now
            )
        return Verdict(
            "awaiting_review",
            f"waiting for the review task to be opened (policy asked for review: {codes}, "
            f"{_minutes(now - check.envelope.occurred_at)} ago)",
            False,
        )
    received = _latest(events, OrderReceived)
    if received is not None:
        return Verdict(
            "received",
            f"waiting for the policy check (received "
            f"{_minutes(now - received.envelope.occurred_at)} ago)",
            False,
        )
    if refused is not None:
        return Verdict("unknown", "no order.received on the topics" + refusal, False)
    return Verdict("unknown", "no order.received on the topics", False)


def _dispatch_rank(
    event: DispatchRequested | DispatchExecuted | DispatchFailed,
) -> tuple[int, int, datetime]:
    """The latest attempt decides; within one attempt, its outcome outranks its request."""
    outcome = 0 if isinstance(event, DispatchRequested) else 1
    return (event.attempt, outcome, event.envelope.occurred_at)


def _waiting_for_dispatch(approval: str, at: datetime, now: datetime) -> Verdict:
    return Verdict(
        "approved",
        f"waiting for dispatch ({approval} at {_stamp(at)}, {_minutes(now - at)} ago)",
        False,
    )


def _in_review(requested: ReviewRequested, events: Sequence[Event], now: datetime) -> Verdict:
    """An open review task: its tier and deadline as the latest escalation left them, and
    who holds it (claims and releases in time order, an escalation ending a claim)."""
    tier, due_at = requested.tier, requested.due_at
    holder: Actor | None = None
    breached: ReviewSlaBreached | None = None
    for event in events:
        if isinstance(event, ReviewEscalated):
            tier, due_at, holder = event.tier, event.due_at, None
        elif isinstance(event, ReviewClaimed):
            holder = event.actor
        elif isinstance(event, ReviewReleased):
            holder = None
        elif isinstance(event, ReviewSlaBreached):
            breached = event
    held = f"claimed by {_who(holder)}" if holder else "not claimed"
    late = (
        f"; the last tier's SLA was breached at {_stamp(breached.envelope.occurred_at)}"
        if breached
        else ""
    )
    return Verdict(
        "in_review",
        f"waiting for review, {_due(due_at, now)} (due {_stamp(due_at)}), tier "
        f"{tier.value.lower()}, {held}{late}",
        False,
    )


# --- facts worth a line -----------------------------------------------------------------


def actor_of(event: Event) -> Actor | None:
    """The person who acted, for the event types that name one."""
    actor = getattr(event, "actor", None)
    return actor if isinstance(actor, Actor) else None


def summary(event: Event) -> str:
    """The payload facts an operator looks for first, in one short phrase."""
    match event:
        case OrderReceived():
            amount = f"{event.amount_minor / 100:,.2f} {event.currency}"
            return (
                f"{event.customer_name} ({event.customer_risk_tier.value} risk), {amount} to "
                f"{event.destination.country}, {len(event.items)} item(s)"
            )
        case PolicyChecked():
            codes = ", ".join(event.reason_codes)
            return (
                f"{event.outcome.value}"
                + (f": {codes}" if codes else "")
                + (f" (rules {event.rules_version})")
            )
        case ReviewRequested():
            codes = ", ".join(event.reason_codes)
            return f"tier {event.tier.value.lower()}, due {_stamp(event.due_at)}" + (
                f": {codes}" if codes else ""
            )
        case ReviewClaimed():
            return f"tier {event.tier.value.lower()}"
        case ReviewReleased():
            return f"tier {event.tier.value.lower()}" + (
                f": {event.reason}" if event.reason else ""
            )
        case ReviewDecided():
            return f"{event.decision.value}: {event.reason} (tier {event.tier.value.lower()})"
        case ReviewEscalated():
            return (
                f"{event.previous_tier.value.lower()} -> {event.tier.value.lower()}, missed "
                f"{_stamp(event.breached_due_at)}, due {_stamp(event.due_at)}"
            )
        case ReviewSlaBreached():
            return f"tier {event.tier.value.lower()} missed {_stamp(event.due_at)}"
        case DispatchRequested():
            return f"{event.dispatch_id} attempt {event.attempt} with {event.carrier}"
        case DispatchExecuted():
            return (
                f"booked {event.booking_reference} with {event.carrier} (attempt {event.attempt})"
            )
        case DispatchFailed():
            final = (
                ", final"
                if (
                    event.failure_class is DispatchFailureClass.PERMANENT or event.retries_exhausted
                )
                else ""
            )
            return f"{event.failure_class.value}: {event.reason} (attempt {event.attempt}{final})"
        case PodCaptured():
            return f"{event.booking_reference} received by {event.received_by}"
        case PodRejected():
            return f"{event.reason_code.value}: {event.reason}"
    return ""


def elapsed(ms: int | None) -> str:
    """``+1.2 s``, ``+3 min 05 s``, ``+2 h 01 min``: short enough for a tree line."""
    if ms is None:
        return ""
    sign, ms = ("-", -ms) if ms < 0 else ("+", ms)
    if ms < 60_000:
        return f"{sign}{ms / 1000:.1f} s" if ms < 10_000 else f"{sign}{ms // 1000} s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{sign}{seconds // 60} min {seconds % 60:02d} s"
    minutes = seconds // 60
    if minutes < 48 * 60:
        return f"{sign}{minutes // 60} h {minutes % 60:02d} min"
    return f"{sign}{minutes // 1440} d {minutes % 1440 // 60} h"


# --- the whole trace --------------------------------------------------------------------


@dataclass
class Trace:
    """One order's causal history and where it stands."""

    order_id: str
    roots: list[Step]
    verdict: Verdict
    path: str = FULL_SCAN
    unreadable: list[Unreadable] = field(default_factory=list)
    records_read: int = 0

    @property
    def steps(self) -> list[Step]:
        return [step for _, step in walk(self.roots)]

    def trace_ids(self) -> list[str]:
        """The distinct trace ids of the order's records, first seen first."""
        return list(dict.fromkeys(s.trace_id for s in self.steps if s.trace_id))


def assemble(
    order_id: str,
    records: Sequence[Record],
    now: datetime,
    *,
    path: str = FULL_SCAN,
    unreadable: Sequence[Unreadable] = (),
    records_read: int = 0,
) -> Trace:
    """The trace of decoded records: the tree and the verdict on it."""
    roots = build(records)
    in_time = sorted((step for _, step in walk(roots)), key=Step.sort_key)
    return Trace(
        order_id,
        roots,
        verdict([step.event for step in in_time], now),
        path=path,
        unreadable=list(unreadable),
        records_read=records_read,
    )


def as_json(trace: Trace) -> dict[str, Any]:
    """The trace for machines: the events in causal order, with their edges and positions."""
    events = []
    for depth, step in walk(trace.roots):
        actor = actor_of(step.event)
        events.append(
            {
                "event_id": step.event_id,
                "causation_id": step.causation_id,
                "event_type": step.event.event_type,
                "occurred_at": step.at.isoformat(timespec="milliseconds"),
                "producer": step.event.envelope.producer,
                "actor": (
                    {
                        "user_id": actor.user_id,
                        "display_name": actor.display_name,
                        "role": actor.role.value,
                    }
                    if actor
                    else None
                ),
                "elapsed_ms": step.elapsed_ms,
                "elapsed_since": step.elapsed_since,
                "trace_id": step.trace_id,
                "topic": step.topic,
                "partition": step.partition,
                "offset": step.offset,
                "copies": step.copies,
                "depth": depth,
                "note": step.note,
                "summary": summary(step.event),
            }
        )
    return {
        "order_id": trace.order_id,
        "state": trace.verdict.state,
        "waiting": None if trace.verdict.terminal else trace.verdict.now,
        "now": trace.verdict.now,
        "terminal": trace.verdict.terminal,
        "trace_ids": trace.trace_ids(),
        "path": trace.path,
        "records_read": trace.records_read,
        "events": events,
        "unreadable": [
            {"topic": u.topic, "partition": u.partition, "offset": u.offset, "problem": u.problem}
            for u in trace.unreadable
        ],
    }


def tree(trace: Trace) -> Tree:
    """The trace for people: one line per step, effects under their causes."""
    root = Tree(f"[bold]order {escape(trace.order_id)}[/]", guide_style="dim")

    def grow(branch: Tree, steps: Sequence[Step]) -> None:
        for step in steps:
            grow(branch.add(_line(step)), step.children)

    grow(root, trace.roots)
    return root


def _line(step: Step) -> str:
    event = step.event
    actor = actor_of(event)
    parts = [
        f"[dim]{_stamp(step.at)}[/]",
        f"[bold]{event.event_type}[/]",
        f"[cyan]{escape(elapsed(step.elapsed_ms))}[/]" if step.elapsed_ms is not None else "",
        f"by {escape(event.envelope.producer)}",
        f"[magenta]{escape(_who(actor))}[/]" if actor else "",
        escape(summary(event)),
        f"[dim]trace {step.trace_id[:8]}[/]" if step.trace_id else "",
        f"[yellow]written {step.copies}x[/]" if step.copies > 1 else "",
        f"[yellow]({escape(step.note)})[/]" if step.note else "",
    ]
    return "  ".join(part for part in parts if part)


def nearest(order_id: str, keys: Iterable[str], n: int = 3) -> list[str]:
    """The order ids most like ``order_id`` (a typo, a truncated copy-and-paste)."""
    candidates = [key for key in set(keys) if key]
    close = difflib.get_close_matches(order_id, candidates, n=n, cutoff=0.6)
    if close:
        return close
    # A prefix or a fragment of a longer id: difflib's ratio punishes the length gap.
    return sorted(key for key in candidates if order_id and order_id in key)[:n]


# --- reading the topics -----------------------------------------------------------------


def scan(
    kafka: dict[str, Any],
    order_id: str,
    *,
    prefix: str,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 120.0,
) -> Scan:
    """Every record keyed by ``order_id`` on every topic of record, from the beginning to
    the end of each partition as it is when reached.

    Correct before fast: the whole of every topic is read. ``read_committed``
    so records of transactions still open (or aborted, on brokers that hide them)
    are not shown as facts. No group is joined and nothing is committed.

    Raises:
        ConfigurationError: no broker answered at ``bootstrap.servers``, or none of
            the topics of record exists (a wrong ``OPSFLOW_TOPIC_PREFIX``).
        RetryableError: the partitions could not be read to their end in time.
    """
    from confluent_kafka import (
        OFFSET_BEGINNING,
        Consumer,
        KafkaError,
        KafkaException,
        TopicPartition,
    )

    servers = str(kafka.get("bootstrap.servers", ""))
    consumer = Consumer(
        {
            **kafka,
            "group.id": f"opsflow-trace-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            # The end is learnt from fetch responses (see opsflow.runtime.recovery).
            "enable.partition.eof": True,
            # librdkafka's own connection complaints would bury the one line that matters.
            "log_level": 0,
        }
    )
    try:
        try:
            metadata = consumer.list_topics(timeout=connect_timeout_s)
        except KafkaException as err:
            raise ConfigurationError(
                "KAFKA_BOOTSTRAP_SERVERS",
                f"no broker answered at {servers} within {connect_timeout_s:g} s "
                f"({err.args[0].str() if err.args else err})",
                f"Check that the broker is up and the variable names it, {_ON_THE_STACK}",
            ) from err
        names = {topic_name_of(topic, prefix): topic.value for topic in Topic}
        found = {name: metadata.topics[name] for name in names if name in metadata.topics}
        if not found:
            raise ConfigurationError(
                "OPSFLOW_TOPIC_PREFIX",
                f"none of the topics of record ({', '.join(sorted(names))}) exists at {servers}",
                f"Set the prefix this environment's topics were created with, {_ON_THE_STACK}",
            )
        assignment = [
            TopicPartition(name, partition, OFFSET_BEGINNING)
            for name, meta in sorted(found.items())
            for partition in sorted(meta.partitions)
        ]
        wanted = order_id.encode()
        records: list[RawRecord] = []
        keys: set[str] = set()
        read = 0
        consumer.assign(assignment)
        remaining = {(tp.topic, tp.partition) for tp in assignment}
        deadline = time.monotonic() + read_timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise RetryableError(
                    f"reading the topics of record to their end took over {read_timeout_s:g} s "
                    f"({len(remaining)} partitions unfinished, e.g. {sorted(remaining)[0]}); "
                    "try again, or check the broker's health"
                )
            for msg in consumer.consume(2000, 0.5):
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard((msg.topic() or "", msg.partition() or 0))
                    elif error.fatal():
                        raise RetryableError(f"reading {msg.topic()} failed: {error.str()}")
                    continue
                read += 1
                key = msg.key()
                if key is None:
                    continue
                if key != wanted:
                    keys.add(key.decode("utf-8", "replace"))
                    continue
                records.append(
                    RawRecord(
                        names[msg.topic() or ""],
                        msg.partition() or 0,
                        msg.offset() or 0,
                        msg.value(),
                        _headers(msg.headers()),
                    )
                )
        return Scan(records, keys, read)
    finally:
        consumer.close()


def _headers(headers: Any) -> list[tuple[str, bytes | None]]:
    """A record's headers as (name, value) pairs; values may be None on the wire."""
    return [
        (str(name), value if isinstance(value, bytes) else None) for name, value in headers or ()
    ]


def topic_name_of(topic: Topic, prefix: str) -> str:
    """The Kafka name of ``topic`` under ``prefix`` (``opsflow.topics.topic_name``'s rule)."""
    from opsflow.topics import topic_name

    return topic_name(topic.value, prefix=prefix)


def decode(
    raw: Sequence[RawRecord], codec: Any, order_id: str
) -> tuple[list[Record], list[Unreadable]]:
    """Decode the order's records; one that cannot be read is reported, not fatal.

    Raises:
        RetryableError: the schema registry could not be asked.
    """
    records: list[Record] = []
    unreadable: list[Unreadable] = []
    for item in raw:
        try:
            event: Event = codec.decode(item.value)
        except BadInputError as err:
            unreadable.append(Unreadable(item.topic, item.partition, item.offset, str(err)))
            continue
        if event.order_id != order_id:
            unreadable.append(
                Unreadable(
                    item.topic,
                    item.partition,
                    item.offset,
                    f"keyed by {order_id} but the event names order {event.order_id}",
                )
            )
            continue
        records.append(
            Record(item.topic, item.partition, item.offset, event, trace_id_of(item.headers))
        )
    return records, unreadable


def unknown_order(order_id: str, scan: Scan, prefix: str) -> OpsflowError:
    """The error for an order no record is keyed by, naming the nearest ids seen."""
    near = nearest(order_id, scan.keys)
    where = f"the topics of record (prefix {prefix!r})" if prefix else "the topics of record"
    hint = (
        f"did you mean {', '.join(near)}?"
        if near
        else "check the id (and OPSFLOW_TOPIC_PREFIX for the environment)"
    )
    return OpsflowError(
        f"no events for order {order_id} in {where}, {scan.records_read:,} records read.\n"
        f"  {hint[0].upper()}{hint[1:]}"
    )
