"""The causal history of one instance, read from the topics of record (``opsflow trace``).

The log is the truth: the events shown are always read from the topics, so
it answers even when a projection is behind, broken or not deployed. It has
three parts, kept apart so the middle one can be tested without a broker:

- ``scan``: every record of every topic of record whose key is the instance id
  (``read_committed``, no consumer group), plus the keys seen on the way (for
  "did you mean"). Reading every partition from the beginning took 9 to 11 s
  with 1,000,000 records of history on ``make run``'s stack; so where the
  ``audit_log`` projection is in PostgreSQL, its rows serve as an index
  (``load_index``): the instance's records below the projection's position are
  read at their offsets, and everything from the position to the end is read
  as before, so a projection that is behind costs time, never events (the
  output says how many records past the index were read). Without a
  database, or for topics the projection does not cover, every partition is
  read in full;
- ``build`` and ``verdict``: pure functions making the tree (``causation_id``
  -> ``event_id``) and saying where the instance is waiting now;
- ``tree`` and ``as_json``: the two outputs.

An event written more than once (a replay, a redrive, a broker that lets
aborted transactional records through) has one event id: it is one step,
shown once, with the number of times it was written, at the time its first
record was written (``Step.at``).

What the index path cannot see that a full scan shows: a record keyed by the
instance that no projection could decode (the projector dead-lettered it, so
the audit log has no row for it) below the position; ``opsflow dlq list
--key`` lists those.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, TypeVar

from pydantic import BaseModel
from rich.markup import escape
from rich.tree import Tree

from opsflow.application import Application, Verdict, load_application
from opsflow.contracts import Event, Topic
from opsflow.errors import BadInputError, ConfigurationError, OpsflowError, RetryableError

TRACEPARENT = "traceparent"
FULL_SCAN = "full-scan"
AUDIT_INDEX = "audit-index"
# The projection whose tables serve as the index of an instance's records.
INDEX_PROJECTION = "audit_log"
# Reading on through this many records of other instances costs less than a seek (one more
# fetch round trip); a record is about 300 bytes, a fetch returns up to 1 MiB.
_SEEK_GAP = 500
E = TypeVar("E", bound=Event)
_ON_THE_STACK = "or point the shell at the running stack with `eval $(opsflow env)`"


@cache
def _topic_rank() -> dict[str, int]:
    """The application's topics in declared order: the workflow's steps in turn."""
    return {topic.value: rank for rank, topic in enumerate(load_application().topics)}


# --- what was read ----------------------------------------------------------------------


@dataclass(frozen=True)
class RawRecord:
    """A record of the instance as it is on a topic of record, not yet decoded.

    ``topic`` is the contract name, without the environment's prefix.
    """

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()
    timestamp_ms: int | None = None
    """The record's log timestamp (None: the broker gave none)."""


@dataclass(frozen=True)
class Record:
    """A decoded record of the instance: the event, where and when it was written."""

    topic: str
    partition: int
    offset: int
    event: Event
    trace_id: str | None = None
    written_at: datetime | None = None
    """The record's log timestamp: when this record was written (see ``Step.at``)."""


@dataclass(frozen=True)
class Unreadable:
    """A record keyed by the instance that could not be decoded: shown, never dropped silently."""

    topic: str
    partition: int
    offset: int
    problem: str


@dataclass
class Scan:
    """What reading the topics found for one instance."""

    records: list[RawRecord]
    keys: set[str]
    records_read: int
    path: str = FULL_SCAN
    behind: int = 0
    """Records past the index's position, read from the log (the index lagged)."""


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
    """One event of the instance, once, with where it sits in the causal tree.

    Attributes:
        copies: how many records carry this event id (more than one: written again).
        written_at: when its first record was written (the log timestamp), if known.
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
    written_at: datetime | None = None
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
        """When the event was written: its record's time, else its ``occurred_at``.

        Not ``occurred_at`` first: a service's output carries its *input's* record
        time as ``occurred_at`` (``opsflow.contracts.lineage``), so an output made
        again later (a replay that calls a partner a day after the first attempt
        failed) would show at the original time. The record time is when it
        happened, and times each step from its cause.
        """
        return self.written_at or self.event.envelope.occurred_at

    def sort_key(self) -> tuple[datetime, int, int, int]:
        """Time first; the workflow's topic order and the offset break ties, so steps
        written in the same millisecond still come in the order they were caused."""
        return (self.at, _topic_rank().get(self.topic, 99), self.partition, self.offset)


def _ms(delta: timedelta) -> int:
    return round(delta.total_seconds() * 1000)


def build(records: Iterable[Record]) -> list[Step]:
    """The instance's events as a forest: roots are events without a cause among them.

    Each event appears once however many records carry it (the first record read
    gives its position, the earliest record time its time). Children are sorted by
    time. An event naming a cause that is not among the instance's events (or a cycle
    of causes, which only a bad producer can write) hangs under the root with a
    note instead of vanishing.
    """
    steps: dict[str, Step] = {}
    for record in records:
        key = str(record.event.envelope.event_id)
        seen = steps.get(key)
        if seen is None:
            steps[key] = Step(
                record.event,
                record.topic,
                record.partition,
                record.offset,
                record.trace_id,
                written_at=record.written_at,
            )
        else:
            seen.copies += 1
            seen.trace_id = seen.trace_id or record.trace_id
            if record.written_at and (not seen.written_at or record.written_at < seen.written_at):
                seen.written_at = record.written_at  # the first time it was written
    ordered = sorted(steps.values(), key=Step.sort_key)
    roots: list[Step] = []
    for step in ordered:
        cause = steps.get(step.causation_id) if step.causation_id else None
        if cause is step:
            cause = None
        if cause is None:
            if step.causation_id:
                step.note = f"its cause {step.causation_id} is not among this instance's events"
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


def minutes(delta: timedelta) -> str:
    minutes = round(abs(delta.total_seconds()) / 60)
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S") + f".{at.microsecond // 1000:03d}Z"


def who(actor: Mapping[str, str]) -> str:
    name = actor.get("display_name") or actor["user_id"]
    return f"{name} ({actor['role'].lower()})" if actor.get("role") else name


# --- facts worth a line -----------------------------------------------------------------


def actor_of(event: Event) -> dict[str, str] | None:
    """The person who acted, for the event types that name one: an ``actor`` record
    with a ``user_id`` (and, where it has them, ``display_name`` and ``role``)."""
    actor = getattr(event, "actor", None)
    if not isinstance(actor, BaseModel) or not isinstance(getattr(actor, "user_id", None), str):
        return None
    return {name: str(getattr(value, "value", value)) for name, value in actor if value is not None}


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
    """One instance's causal history and where it stands."""

    key: str
    roots: list[Step]
    verdict: Verdict
    path: str = FULL_SCAN
    unreadable: list[Unreadable] = field(default_factory=list)
    records_read: int = 0
    index_behind: int = 0
    # Event id -> the facts worth a line (the application's summary of the event).
    summaries: dict[str, str] = field(default_factory=dict)
    # What the application calls an instance.
    instance: str = "instance"

    @property
    def steps(self) -> list[Step]:
        return [step for _, step in walk(self.roots)]

    def trace_ids(self) -> list[str]:
        """The distinct trace ids of the instance's records, first seen first."""
        return list(dict.fromkeys(s.trace_id for s in self.steps if s.trace_id))


def assemble(
    key: str,
    records: Sequence[Record],
    now: datetime,
    *,
    path: str = FULL_SCAN,
    unreadable: Sequence[Unreadable] = (),
    records_read: int = 0,
    index_behind: int = 0,
    application: Application | None = None,
) -> Trace:
    """The trace of decoded records: the tree, where it stands and each event's facts,
    by the rules of ``application`` (default: the one in use, ``opsflow.application``)."""
    app = application or load_application()
    if records:  # a combination's instance is read by the rules of the part it belongs to
        app = app.part_for(records[0].topic)
    roots = build(records)
    in_time = sorted((step for _, step in walk(roots)), key=Step.sort_key)
    written = {step.event_id: step.written_at for step in in_time if step.written_at}
    events = [step.event for step in in_time]
    describe = app.summary or (lambda event: "")
    return Trace(
        key,
        roots,
        (app.standing or last_event)(events, now, written),
        path=path,
        unreadable=list(unreadable),
        records_read=records_read,
        index_behind=index_behind,
        summaries={step.event_id: describe(step.event) for step in in_time},
        instance=app.instance,
    )


def latest(events: Sequence[Event], kind: type[E]) -> E | None:
    """The last of ``events`` (in time order) of type ``kind``: what an application's
    ``standing`` asks of an instance's history, step by step."""
    found = [event for event in events if isinstance(event, kind)]
    return found[-1] if found else None


def last_event(
    events: Sequence[Event], now: datetime, written_at: Mapping[str, datetime]
) -> Verdict:
    """Where an instance stands for an application that does not say: at its last event."""
    if not events:
        return Verdict("unknown", "no events", False)
    last = events[-1]
    at = written_at.get(str(last.envelope.event_id), last.envelope.occurred_at)
    return Verdict(last.event_type, f"last: {last.event_type} at {stamp(at)}", False)


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
                "occurred_at": step.event.envelope.occurred_at.isoformat(timespec="milliseconds"),
                "written_at": (
                    step.written_at.isoformat(timespec="milliseconds") if step.written_at else None
                ),
                "producer": step.event.envelope.producer,
                "actor": actor,
                "elapsed_ms": step.elapsed_ms,
                "elapsed_since": step.elapsed_since,
                "trace_id": step.trace_id,
                "topic": step.topic,
                "partition": step.partition,
                "offset": step.offset,
                "copies": step.copies,
                "depth": depth,
                "note": step.note,
                "summary": trace.summaries.get(step.event_id, ""),
            }
        )
    return {
        "key": trace.key,
        "instance": trace.instance,
        "state": trace.verdict.state,
        "waiting": None if trace.verdict.terminal else trace.verdict.now,
        "now": trace.verdict.now,
        "terminal": trace.verdict.terminal,
        "trace_ids": trace.trace_ids(),
        "path": trace.path,
        "records_read": trace.records_read,
        "index_behind": trace.index_behind,
        "events": events,
        "unreadable": [
            {"topic": u.topic, "partition": u.partition, "offset": u.offset, "problem": u.problem}
            for u in trace.unreadable
        ],
    }


def tree(trace: Trace) -> Tree:
    """The trace for people: one line per step, effects under their causes."""
    root = Tree(f"[bold]{trace.instance} {escape(trace.key)}[/]", guide_style="dim")

    def grow(branch: Tree, steps: Sequence[Step]) -> None:
        for step in steps:
            grow(branch.add(_line(step, trace.summaries.get(step.event_id, ""))), step.children)

    grow(root, trace.roots)
    return root


def _line(step: Step, summary: str) -> str:
    event = step.event
    actor = actor_of(event)
    parts = [
        f"[dim]{stamp(step.at)}[/]",
        f"[bold]{event.event_type}[/]",
        f"[cyan]{escape(elapsed(step.elapsed_ms))}[/]" if step.elapsed_ms is not None else "",
        f"by {escape(event.envelope.producer)}",
        f"[magenta]{escape(who(actor))}[/]" if actor else "",
        escape(summary),
        f"[dim]trace {step.trace_id[:8]}[/]" if step.trace_id else "",
        f"[yellow]written {step.copies}x[/]" if step.copies > 1 else "",
        f"[yellow]({escape(step.note)})[/]" if step.note else "",
    ]
    return "  ".join(part for part in parts if part)


def nearest(key: str, keys: Iterable[str], n: int = 3) -> list[str]:
    """The keys most like ``key`` (a typo, a truncated copy-and-paste)."""
    candidates = [key for key in set(keys) if key]
    close = difflib.get_close_matches(key, candidates, n=n, cutoff=0.6)
    if close:
        return close
    # A prefix or a fragment of a longer id: difflib's ratio punishes the length gap.
    return sorted(key for key in candidates if key and key in key)[:n]


# --- the index: where an instance's records are -------------------------------------------


class RegistryUnavailable(RetryableError):
    """The schema registry could not be asked while decoding the instance's records."""


class IndexUnavailable(OpsflowError):
    """The audit projection cannot serve as an index here; the topics are read in full."""


@dataclass(frozen=True)
class Index:
    """Where one instance's records are, as far as the ``audit_log`` projection has applied them.

    The audit log keeps each event's first record and ``audit_copies`` the others,
    by instance key, with the projection's position stored in the same transactions:
    below the position of a partition, these are all of the instance's records
    there (records no projection could decode excepted: they are dead letters,
    ``opsflow dlq list --key``). Past it, the topics are the only source.

    Attributes:
        offsets: (Kafka topic, partition) -> the instance's offsets below the position.
        positions: (Kafka topic, partition) -> the projection's next offset to apply.
        nearby: keys like the one asked for, when the index has none of its records.
    """

    offsets: Mapping[tuple[str, int], Sequence[int]]
    positions: Mapping[tuple[str, int], int]
    nearby: Sequence[str] = ()


def load_index(database_url: str, key: str, *, timeout_s: float = 2.0) -> Index:
    """The instance's records as the audit projection has them, read in one snapshot so the
    rows and the position agree.

    Raises:
        IndexUnavailable: the database does not answer, or has no audit projection.
    """
    import psycopg

    try:
        with (
            psycopg.connect(database_url, connect_timeout=max(1, round(timeout_s))) as conn,
            conn.transaction(),
        ):
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            positions = {
                (topic, partition): offset
                for topic, partition, offset in conn.execute(
                    "SELECT topic, partition, next_offset FROM projection_positions"
                    " WHERE projection = %s",
                    (INDEX_PROJECTION,),
                )
            }
            rows = conn.execute(
                'SELECT topic, partition, "offset" FROM audit_log WHERE instance_key = %s'
                ' UNION ALL SELECT topic, partition, "offset" FROM audit_copies'
                " WHERE instance_key = %s",
                (key, key),
            ).fetchall()
            nearby = [] if rows else _nearby(conn, key)
    except psycopg.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IndexUnavailable(f"the audit_log projection could not be read ({first})") from err
    offsets: dict[tuple[str, int], list[int]] = {}
    for topic, partition, offset in rows:
        offsets.setdefault((topic, partition), []).append(offset)
    return Index({tp: sorted(found) for tp, found in offsets.items()}, positions, nearby)


def _nearby(conn: Any, key: str) -> list[str]:
    """Candidates for "did you mean", without listing every instance: the audit log's instance
    ids next to ``key`` in sort order (a typo at the end, a truncated copy), and
    those containing it or either half of it (a fragment; a typo in the other half)."""
    found: list[str] = []
    for query in (
        "SELECT instance_key FROM audit_log WHERE instance_key < %s"
        " ORDER BY instance_key DESC LIMIT 100",
        "SELECT instance_key FROM audit_log WHERE instance_key > %s"
        " ORDER BY instance_key LIMIT 100",
    ):
        found += [row[0] for row in conn.execute(query, (key,))]
    half = len(key) // 2
    for fragment in dict.fromkeys((key, key[:half], key[half:])):
        if len(fragment) >= 3:
            found += [
                row[0]
                for row in conn.execute(
                    "SELECT instance_key FROM audit_log"
                    " WHERE strpos(instance_key, %s) > 0 LIMIT 100",
                    (fragment,),
                )
            ]
    return list(dict.fromkeys(found))


# --- reading the topics -----------------------------------------------------------------


@dataclass
class _Plan:
    """What to read of one partition: the indexed offsets, then everything from ``tail``
    (the projection's position; 0 when the index does not cover the partition)."""

    wanted: list[int]
    tail: int
    indexed: bool
    expect: int = 0
    """Records below this offset are left over from before a seek: passed over."""

    @property
    def target(self) -> int:
        """The next offset to read."""
        return self.wanted[0] if self.wanted else self.tail


def scan(
    kafka: dict[str, Any],
    key: str,
    *,
    prefix: str,
    index: Index | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 120.0,
) -> Scan:
    """Every record keyed by ``key`` on every topic of record.

    Without ``index``, every partition is read from the beginning to its end as it
    is when reached. With it, a partition the audit projection covers is read at
    the instance's indexed offsets only (seeking over the gaps), then from the
    projection's position to the end: records written since are found as a full
    scan would find them, and counted in ``Scan.behind``. A partition it does not
    cover (another prefix, a new partition) is read in full.

    ``read_committed`` so records of transactions still open (or aborted, on brokers
    that hide them) are not shown as facts. No group is joined and nothing is committed.

    Raises:
        ConfigurationError: no broker answered at ``bootstrap.servers``, or none of
            the topics of record exists (a wrong ``OPSFLOW_TOPIC_PREFIX``).
        RetryableError: the partitions could not be read to their end in time.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from opsflow.topics import ReadToEnd, reader_config, unreachable

    servers = str(kafka.get("bootstrap.servers", ""))
    consumer = Consumer(
        {
            # Reading to the end waits this long on the last, empty fetch; the default
            # 500 ms would be most of the command's time. Not shorter: the embedded
            # broker then answers with less data per fetch, and a full scan of 200,000
            # records took 4.3 to 7.8 s at 10 ms against 1.2 to 1.8 s at 50 to 200 ms
            # (measured). KAFKA_FETCH_WAIT_MAX_MS still wins.
            "fetch.wait.max.ms": 50,
            **reader_config(kafka, "trace"),
            # librdkafka's own connection complaints would bury the one line that matters.
            "log_level": 0,
        }
    )
    try:
        refused = unreachable(servers)
        if refused is not None:
            raise ConfigurationError(
                "KAFKA_BOOTSTRAP_SERVERS",
                f"no broker answered at {servers} ({refused})",
                f"Check that the broker is up and the variable names it, {_ON_THE_STACK}",
            )
        try:
            metadata = consumer.list_topics(timeout=connect_timeout_s)
        except KafkaException as err:
            raise ConfigurationError(
                "KAFKA_BOOTSTRAP_SERVERS",
                f"no broker answered at {servers} within {connect_timeout_s:g} s "
                f"({err.args[0].str() if err.args else err})",
                f"Check that the broker is up and the variable names it, {_ON_THE_STACK}",
            ) from err
        names = {topic_name_of(topic, prefix): topic.value for topic in load_application().topics}
        found = {name: metadata.topics[name] for name in names if name in metadata.topics}
        if not found:
            raise ConfigurationError(
                "OPSFLOW_TOPIC_PREFIX",
                f"none of the topics of record ({', '.join(sorted(names))}) exists at {servers}",
                f"Set the prefix this environment's topics were created with, {_ON_THE_STACK}",
            )
        plans: dict[tuple[str, int], _Plan] = {}
        for name, meta in sorted(found.items()):
            for partition in sorted(meta.partitions):
                tp = (name, partition)
                if index is not None and tp in index.positions:
                    offsets = list(index.offsets.get(tp, ()))
                    plans[tp] = _Plan(offsets, index.positions[tp], indexed=True)
                else:
                    plans[tp] = _Plan([], 0, indexed=False)
        wanted = key.encode()
        records: dict[tuple[str, int, int], RawRecord] = {}
        keys: set[str] = set()
        read = behind = 0
        for plan in plans.values():
            plan.expect = plan.target
        # A partition ends at its end (librdkafka drops what it fetched before a seek,
        # end events included): an indexed offset not read by then is not in the log.
        for msg in ReadToEnd(
            consumer,
            {where: plan.target for where, plan in plans.items()},
            timeout_s=read_timeout_s,
            batch=2000,
        ):
            tp = (msg.topic() or "", msg.partition() or 0)
            plan = plans[tp]
            offset = msg.offset() or 0
            if offset < plan.expect:
                continue
            read += 1
            in_tail = offset >= plan.tail
            indexed = bool(plan.wanted) and plan.wanted[0] == offset
            while plan.wanted and plan.wanted[0] <= offset:
                plan.wanted.pop(0)
            if in_tail:
                behind += plan.indexed
            elif plan.wanted or plan.tail > offset + 1:
                target = plan.target
                if target - offset > _SEEK_GAP:
                    consumer.seek(TopicPartition(tp[0], tp[1], target))
                    plan.expect = target
            record_key = msg.key()
            if record_key is None or not (in_tail or indexed):
                continue
            if record_key != wanted:
                keys.add(record_key.decode("utf-8", "replace"))
                continue
            _, stamp = msg.timestamp()
            records[(tp[0], tp[1], offset)] = RawRecord(
                names[tp[0]],
                tp[1],
                offset,
                msg.value(),
                _headers(msg.headers()),
                stamp if stamp > 0 else None,
            )
        used = any(plan.indexed for plan in plans.values())
        return Scan(
            [records[where] for where in sorted(records)],
            keys | set(index.nearby if index is not None else ()),
            read,
            AUDIT_INDEX if used else FULL_SCAN,
            behind=behind if used else 0,
        )
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


def decode(raw: Sequence[RawRecord], codec: Any, key: str) -> tuple[list[Record], list[Unreadable]]:
    """Decode the instance's records; one that cannot be read is reported, not fatal.

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
        if event.key != key:
            unreadable.append(
                Unreadable(
                    item.topic,
                    item.partition,
                    item.offset,
                    f"keyed by {key} but the event names {event.key}",
                )
            )
            continue
        written = None
        if item.timestamp_ms is not None:  # exact milliseconds, as the runtime reads them
            seconds, millis = divmod(item.timestamp_ms, 1000)
            written = datetime.fromtimestamp(seconds, UTC).replace(microsecond=millis * 1000)
        records.append(
            Record(
                item.topic,
                item.partition,
                item.offset,
                event,
                trace_id_of(item.headers),
                written_at=written,
            )
        )
    return records, unreadable


def unknown_instance(key: str, scan: Scan, prefix: str, instance: str = "instance") -> OpsflowError:
    """The error for an instance no record is keyed by, naming the nearest ids seen."""
    near = nearest(key, scan.keys)
    where = f"the topics of record (prefix {prefix!r})" if prefix else "the topics of record"
    hint = (
        f"did you mean {', '.join(near)}?"
        if near
        else "check the id (and OPSFLOW_TOPIC_PREFIX for the environment)"
    )
    return OpsflowError(
        f"no events for {instance} {key} in {where}, {scan.records_read:,} records read.\n"
        f"  {hint[0].upper()}{hint[1:]}"
    )


def read(
    kafka: Mapping[str, Any],
    codec: Callable[[], Any],
    key: str,
    *,
    prefix: str,
    database_url: str | None,
    now: datetime,
    on_full_scan: Callable[[str], None] | None = None,
) -> Trace:
    """One instance's trace, as ``opsflow trace`` and the operator console show it: the
    audit index where the database has one, the topics, decoded, assembled.

    Args:
        codec: gives the ``WireCodec`` to decode with, asked once the records are read
            (so making one, imports and all, can overlap the reading).
        on_full_scan: told why, when the index cannot be used and the topics are read in full.

    Raises:
        OpsflowError: no record is keyed by ``key`` (naming the nearest ids seen).
        RegistryUnavailable: the schema registry could not be asked.
    """
    index: Index | None = None
    if database_url:
        try:
            index = load_index(database_url, key)
        except IndexUnavailable as err:
            if on_full_scan is not None:
                on_full_scan(str(err))
    found = scan(dict(kafka), key, prefix=prefix, index=index)
    if not found.records:
        raise unknown_instance(key, found, prefix, load_application().instance)
    try:
        records, unreadable = decode(found.records, codec(), key)
    except RetryableError as err:
        raise RegistryUnavailable(str(err)) from err
    return assemble(
        key,
        records,
        now,
        path=found.path,
        unreadable=unreadable,
        records_read=found.records_read,
        index_behind=found.behind,
    )
