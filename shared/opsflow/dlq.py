"""The dead-letter queues as the on-call operator works them: list, show and redrive.

Every topic of record ``T`` has ``T.dlq`` (``opsflow.topics.dead_letter_topic``);
services and projections write there what they could not process, with headers
saying why (``opsflow.deadletters``). A dead letter is named by where it sits,
``<topic>.dlq/<partition>/<offset>`` (the topic without ``OPSFLOW_TOPIC_PREFIX``).

The same source record can be dead-lettered more than once: by two consumers
(two projections, a service and a projection), or twice by one after a retried
batch. Dead letters are therefore grouped into *cases*, one per source record
and consumer; listing counts cases, and a redrive writes each source record
back once, however many dead letters and consumers it has, because every
consumer of the topic reads the one copy.

Redrive writes the original key, value and headers back to the source
topic, in the source partition and with the original record's timestamp (read
from the source topic, which keeps every record), plus
``opsflow-redriven-from``, and waits for the broker to confirm each write.
Every consumer of the topic reads the copy, not only the one that failed,
which is harmless by construction:

- services derive each output's idempotency key and event id from the input's
  envelope and its ``occurred_at`` from the input's log timestamp
  (``opsflow.contracts.lineage``); with the timestamp kept, a service that had
  processed the record already emits the very same events again;
- read models take a repeat as a no-op: merged rows combine by rules a repeat
  cannot change, the audit log and the review desk keep the first of an event id;
- an effect step claims its effect under the request's idempotency key and
  sends the key to the partner, so a repeat gets what the partner already did
  (a request whose effect had failed for good on transient errors is tried
  again: that is a new attempt, and can succeed where it was reported failed).

A redrive is recorded in ``dlq_redrives`` (one row per dead letter) after the
broker confirmed the write, in one transaction per chunk, so a second redrive
skips it. A crash between the write and the commit leaves the dead letter
unmarked: the next redrive writes it again, a duplicate the above makes
harmless; a redrive is never marked without having been written. A redriven
record that fails again is dead-lettered anew with the new error, as a new
dead letter (whose ``opsflow-redriven-from`` names the earlier one).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)

from opsflow import db
from opsflow.application import load_application
from opsflow.deadletters import DeadLetter
from opsflow.errors import ConfigurationError, OpsflowError
from opsflow.topics import (
    DEAD_LETTER_SUFFIX,
    ReadToEnd,
    dead_letter_topic,
    reader_config,
    topic_name,
)

# Serialises redrives on one database, so two operators redriving at once never
# write the same dead letter twice (the second finds the first's marks).
_REDRIVE_LOCK_KEY = 0x0F5F1D
# Dead letters written back per transaction: bounds what a crash can duplicate.
_CHUNK = 1000
# Reading the source for timestamps: read on across gaps up to this, seek past larger ones.
_SEEK_GAP = 500
_ID = re.compile(r"(?P<topic>[^/\s]+)/(?P<partition>\d+)/(?P<offset>\d+)")


class UnknownDeadLetterError(OpsflowError):
    """No dead letter has the id the operator gave; the message names the nearest ones."""


@dataclass(frozen=True)
class Redrive:
    """When a dead letter was written back, and where the copy went."""

    redriven_at: datetime
    partition: int
    offset: int


@dataclass
class Entry:
    """A dead letter with its id and, once redriven, its redrive."""

    letter: DeadLetter
    id: str
    topic: str
    """The source topic's contract name (no prefix)."""
    redrive: Redrive | None = None

    @property
    def key(self) -> str | None:
        """The record key (a workflow instance's id), as text."""
        raw = self.letter.key
        return None if raw is None else raw.decode("utf-8", errors="backslashreplace")

    @property
    def source(self) -> tuple[str, int | None, int | None]:
        return self.letter.source_topic, self.letter.source_partition, self.letter.source_offset

    @property
    def source_name(self) -> str:
        topic, partition, offset = self.source
        return (
            f"{topic}/{'?' if partition is None else partition}/{'?' if offset is None else offset}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "source": self.source_name,
            "key": self.key,
            "consumer": self.letter.consumer,
            "error_class": self.letter.error_class,
            "error_message": self.letter.error_message,
            "attempts": self.letter.attempts,
            "failed_at": self.letter.failed_at,
            "redriven_from": self.letter.redriven_from,
            "redriven": None
            if self.redrive is None
            else {
                "at": self.redrive.redriven_at.isoformat(),
                "to": f"{self.letter.source_topic}/{self.redrive.partition}/{self.redrive.offset}",
            },
        }


@dataclass
class Case:
    """The dead letters of one source record by one consumer (usually exactly one)."""

    entries: list[Entry]

    @property
    def latest(self) -> Entry:
        return self.entries[-1]

    @property
    def pending(self) -> bool:
        """Some dead letter of it was never redriven."""
        return any(entry.redrive is None for entry in self.entries)

    def as_json(self) -> dict[str, Any]:
        shown = next((e for e in reversed(self.entries) if e.redrive is None), self.latest)
        return {**shown.as_json(), "duplicates": [e.id for e in self.entries if e is not shown]}


def cases(entries: Iterable[Entry]) -> list[Case]:
    """Group dead letters by source record and consumer, in the order of their latest letter."""
    grouped: dict[tuple[object, ...], list[Entry]] = defaultdict(list)
    for entry in entries:
        topic, partition, offset = entry.source
        if partition is None or offset is None:
            grouped[(entry.id,)].append(entry)  # no source named: nothing to group by
        else:
            grouped[(topic, partition, offset, entry.letter.consumer)].append(entry)
    found = [Case(sorted(group, key=_order)) for group in grouped.values()]
    return sorted(found, key=lambda case: _order(case.latest))


def _order(entry: Entry) -> tuple[str, int, int]:
    return entry.letter.topic, entry.letter.partition, entry.letter.offset


@dataclass(frozen=True)
class Filters:
    """Which dead letters an operator means; unset fields match everything."""

    topic: str | None = None
    error_class: str | None = None
    service: str | None = None
    key: str | None = None

    def matches(self, entry: Entry) -> bool:
        return (
            (self.topic is None or entry.topic == self.topic)
            and (self.error_class is None or entry.letter.error_class == self.error_class)
            and (self.service is None or entry.letter.consumer == self.service)
            and (self.key is None or entry.key == self.key)
        )

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.topic, self.error_class, self.service, self.key))


@dataclass(frozen=True)
class Group:
    """A line of the summary: one source topic, error class and consumer."""

    topic: str
    error_class: str
    consumer: str
    pending: int
    redriven: int

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "error_class": self.error_class,
            "consumer": self.consumer,
            "pending": self.pending,
            "redriven": self.redriven,
        }


def summary(found: Iterable[Case]) -> list[Group]:
    """Cases counted by source topic, error class and consumer, most pending first."""
    pending: Counter[tuple[str, str, str]] = Counter()
    redriven: Counter[tuple[str, str, str]] = Counter()
    for case in found:
        entry = case.latest
        key = (entry.topic, entry.letter.error_class, entry.letter.consumer)
        (pending if case.pending else redriven)[key] += 1
    keys = sorted(set(pending) | set(redriven), key=lambda k: (-pending[k], k))
    return [Group(*key, pending=pending[key], redriven=redriven[key]) for key in keys]


@dataclass
class RedriveResult:
    """What a redrive did, or with ``dry_run`` would do."""

    dry_run: bool
    redriven: list[tuple[list[Entry], Redrive | None]] = field(default_factory=list)
    """Per source record written back: its dead letters, and where the copy went
    (None on a dry run)."""
    skipped: list[Entry] = field(default_factory=list)
    """Dead letters asked for that had been redriven already."""
    failed: list[tuple[list[Entry], str]] = field(default_factory=list)
    """Source records the broker did not take, with its error: not marked, so run again."""

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "redriven": [
                {
                    "ids": [e.id for e in entries],
                    "source": entries[0].source_name,
                    "key": entries[0].key,
                    "to": None
                    if to is None
                    else f"{entries[0].letter.source_topic}/{to.partition}/{to.offset}",
                }
                for entries, to in self.redriven
            ],
            "skipped": [e.id for e in self.skipped],
            "failed": [
                {"ids": [e.id for e in entries], "error": error} for entries, error in self.failed
            ],
        }

    def outcome(self) -> str:
        """What the redrive did, in a sentence: an operator action's recorded outcome."""
        if self.failed:
            errors = "; ".join(error for _, error in self.failed)
            return f"not written ({errors}); it stays pending: try again"
        if self.redriven:
            where = ", ".join(
                f"{entries[0].letter.source_topic}/{to.partition}/{to.offset}" if to else "?"
                for entries, to in self.redriven
            )
            letters = sum(len(entries) for entries, _ in self.redriven)
            return f"redriven: written back once as {where} ({letters} dead letter(s))"
        marks = [e.redrive.redriven_at for e in self.skipped if e.redrive is not None]
        if not marks:
            return "nothing written: no pending dead letter matched"
        return f"nothing written: it was redriven already at {min(marks):%Y-%m-%d %H:%M:%S} UTC"


class DeadLetterQueues:
    """The dead-letter topics of one environment and the redrive marks in its database.

    Args:
        kafka: librdkafka settings (``KafkaSettings.client_config()``).
        database_url: where ``dlq_redrives`` is.
        prefix: ``OPSFLOW_TOPIC_PREFIX``.
        timeout_s: how long to wait for the broker to answer at all.
        topics: the contract names of the source topics (default: the application's).
    """

    def __init__(
        self,
        kafka: Mapping[str, Any],
        database_url: str,
        *,
        prefix: str,
        timeout_s: float = 5.0,
        topics: Collection[str] | None = None,
    ) -> None:
        if topics is None:
            topics = load_application().topics
        self.topics = [str.__str__(t) for t in topics]
        # librdkafka logs every failed connection attempt to stderr; the operator
        # gets one line from us instead (see _metadata).
        self.kafka = {"log_level": 0, **kafka}
        self.database_url = database_url
        self.prefix = prefix
        self.timeout_s = timeout_s

    # --- reading -------------------------------------------------------------------------

    def entries(self, topics: Collection[str] | None = None) -> list[Entry]:
        """Every dead letter of ``topics`` (contract names; default all), with its redrive."""
        names = [self._dlq_name(t) for t in (topics or self.topics)]
        consumer = self._consumer("read_committed")
        try:
            metadata = self._metadata(consumer)
            starts = {
                (name, partition): OFFSET_BEGINNING
                for name in names
                if name in metadata.topics
                for partition in sorted(metadata.topics[name].partitions)
            }
            reading = ReadToEnd(consumer, starts, timeout_s=120)
            letters = [_letter(msg) for msg in reading]
        finally:
            consumer.close()
        return self._with_marks(letters)

    def canonical(self, dead_letter_id: str) -> str:
        """An id as ``list`` prints it: without the environment's prefix, if given with it."""
        wanted = dead_letter_id.strip()
        return wanted.removeprefix(self.prefix) if self.prefix else wanted

    def entry(self, dead_letter_id: str) -> Entry:
        """One dead letter by id (as ``list`` prints it).

        Raises:
            UnknownDeadLetterError: no such dead letter; the message names the nearest ids.
        """
        wanted = self.canonical(dead_letter_id)
        parsed = _ID.fullmatch(wanted)
        if parsed is not None:
            topic = parsed["topic"].removesuffix(DEAD_LETTER_SUFFIX)
            if topic in self.topics:
                for entry in self.entries([topic]):
                    if entry.id == wanted:
                        return entry
        ids = [entry.id for entry in self.entries()]
        near = difflib.get_close_matches(wanted, ids, n=3, cutoff=0.6)
        hint = (
            f"nearest: {', '.join(near)}"
            if near
            else ("the dead-letter topics are empty" if not ids else "none is close")
        )
        raise UnknownDeadLetterError(
            f"no dead letter {dead_letter_id!r} ({hint}).\n"
            "  Ids look like <topic>.dlq/2/15; `opsflow dlq list` prints them."
        )

    def by_ids(self, ids: Collection[str]) -> list[Entry]:
        """The dead letters named, with the other pending dead letters of the same case
        (so a duplicate is marked with it), for ``redrive``.

        Raises:
            UnknownDeadLetterError: an id names no dead letter (with the nearest ones).
        """
        found = cases(self.entries())
        known = {e.id for case in found for e in case.entries}
        named = {self.canonical(one) for one in ids}
        for one in sorted(named - known):
            self.entry(one)  # not there: fails with the nearest ids
        chosen = []
        for case in found:
            if any(e.id in named for e in case.entries):
                chosen += [e for e in case.entries if e.id in named or e.redrive is None]
        return chosen

    def _with_marks(self, letters: Sequence[DeadLetter]) -> list[Entry]:
        marks = self._marks({letter.topic for letter in letters})
        return [
            Entry(
                letter=letter,
                id=f"{letter.topic.removeprefix(self.prefix)}/{letter.partition}/{letter.offset}",
                topic=letter.topic.removeprefix(self.prefix).removesuffix(DEAD_LETTER_SUFFIX),
                redrive=marks.get((letter.topic, letter.partition, letter.offset)),
            )
            for letter in letters
        ]

    def _marks(self, topics: Collection[str]) -> dict[tuple[str, int, int], Redrive]:
        if not topics:
            return {}
        with db.connect(self.database_url) as conn:
            return _marks(conn, topics)

    # --- redriving -----------------------------------------------------------------------

    def redrive(self, chosen: Iterable[Entry], *, dry_run: bool = False) -> RedriveResult:
        """Write the source records of ``chosen`` dead letters back, each once; skip those
        redriven already. See the module docstring for what it guarantees."""
        chosen = list(chosen)
        result = RedriveResult(dry_run=dry_run, skipped=[e for e in chosen if e.redrive])
        records = _by_source_record(e for e in chosen if e.redrive is None)
        if dry_run:
            result.redriven = [(entries, None) for entries in records]
            return result
        if not records:
            return result
        stamps = self._original_timestamps(records)
        producer = Producer(
            {
                **{k: v for k, v in self.kafka.items() if not k.startswith("fetch.")},
                "acks": "all",
                "linger.ms": 5,
                # A write the broker cannot take fails within the flush below, not minutes on.
                "message.timeout.ms": 30_000,
            }
        )
        for start in range(0, len(records), _CHUNK):
            self._redrive_chunk(producer, records[start : start + _CHUNK], stamps, result)
        return result

    def _redrive_chunk(
        self,
        producer: Producer,
        records: Sequence[list[Entry]],
        stamps: Mapping[tuple[str, int, int], int],
        result: RedriveResult,
    ) -> None:
        """Write one chunk and mark what the broker confirmed, in one transaction that holds
        the redrive lock (so a concurrent redrive waits, then finds these marks)."""
        with db.connect(self.database_url) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REDRIVE_LOCK_KEY,))
            done = _marks(conn, {e.letter.topic for entries in records for e in entries})
            outcomes: dict[int, tuple[int, int] | str] = {}
            todo = []
            for index, entries in enumerate(records):
                taken = [e for e in entries if _where(e) in done]
                if taken:  # redriven by someone else since we read the queue
                    result.skipped.extend(entries)
                    continue
                todo.append(index)
                self._produce(producer, index, entries[-1], stamps, outcomes)
            unsent = producer.flush(60)
            marks: list[tuple[Any, ...]] = []
            for index in todo:
                entries = records[index]
                outcome = outcomes.get(index)
                if not isinstance(outcome, tuple):
                    error = outcome or f"not confirmed by the broker ({unsent} unsent)"
                    result.failed.append((entries, error))
                    continue
                marks += [(*_where(e), e.letter.consumer, *e.source, *outcome) for e in entries]
                result.redriven.append((entries, Redrive(datetime.now(UTC), *outcome)))
            if marks:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO dlq_redrives (dlq_topic, dlq_partition, dlq_offset,"
                        " consumer, source_topic, source_partition, source_offset,"
                        " new_partition, new_offset)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        marks,
                    )

    def _produce(
        self,
        producer: Producer,
        index: int,
        entry: Entry,
        stamps: Mapping[tuple[str, int, int], int],
        outcomes: dict[int, tuple[int, int] | str],
    ) -> None:
        letter = entry.letter
        topic, partition, offset = entry.source

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                outcomes[index] = str(err)
            else:
                outcomes[index] = (msg.partition() or 0, msg.offset() or 0)

        options: dict[str, Any] = {}
        if partition is not None:
            # The source partition: an instance's records stay in one partition, in order.
            options["partition"] = partition
            if offset is not None and (topic, partition, offset) in stamps:
                options["timestamp"] = stamps[(topic, partition, offset)]
        while True:
            try:
                producer.produce(
                    topic,
                    key=letter.key,
                    value=letter.value,
                    headers=letter.redrive_headers(),  # type: ignore[arg-type]
                    on_delivery=delivered,
                    **options,
                )
                return
            except BufferError:
                producer.poll(0.05)
            except KafkaException as err:
                outcomes[index] = str(err.args[0])
                return

    def _original_timestamps(
        self, records: Sequence[list[Entry]]
    ) -> dict[tuple[str, int, int], int]:
        """The log timestamps of the source records, read from the source topics.

        Services derive outputs' ``occurred_at`` from it: writing the copy with the
        original timestamp is what makes a consumer that had processed the record
        already emit byte-identical events. A record not found (never, with topics
        kept forever) is written with the current time.
        """
        wanted: dict[tuple[str, int], set[int]] = defaultdict(set)
        for entries in records:
            topic, partition, offset = entries[-1].source
            if partition is not None and offset is not None:
                wanted[(topic, partition)].add(offset)
        found: dict[tuple[str, int, int], int] = {}
        consumer = self._consumer("read_uncommitted")
        try:
            for (topic, partition), offsets in sorted(wanted.items()):
                for msg in _read_offsets(consumer, topic, partition, sorted(offsets)):
                    kind, stamp = msg.timestamp()
                    if kind != TIMESTAMP_NOT_AVAILABLE and stamp > 0:
                        found[(topic, partition, msg.offset() or 0)] = stamp
        finally:
            consumer.close()
        return found

    # --- helpers -------------------------------------------------------------------------

    def _dlq_name(self, topic: str) -> str:
        return topic_name(dead_letter_topic(topic), prefix=self.prefix)

    def _consumer(self, isolation: str) -> Consumer:
        return Consumer(
            {
                # Reading to the end waits this long per empty fetch: keep it short
                # (KAFKA_FETCH_WAIT_MAX_MS still wins).
                "fetch.wait.max.ms": 50,
                **reader_config(self.kafka, "dlq", isolation=isolation),
            }
        )

    def _metadata(self, consumer: Consumer) -> Any:
        """The cluster's topics; a broker that does not answer is one clear error."""
        try:
            return consumer.list_topics(timeout=self.timeout_s)
        except KafkaException as err:
            address = self.kafka.get("bootstrap.servers", "(none)")
            raise ConfigurationError(
                "KAFKA_BOOTSTRAP_SERVERS",
                f"no Kafka broker answered at {address} within {self.timeout_s:g} s "
                f"({err.args[0].str() if err.args else err})",
                "Start the broker or point the variable at a running one "
                "(`eval $(opsflow env)` for the local stack)",
            ) from err


def _marks(conn: Any, topics: Collection[str]) -> dict[tuple[str, int, int], Redrive]:
    """The redrives recorded for dead letters of ``topics`` (Kafka names)."""
    with db.requires_table("dlq_redrives"):
        rows = conn.execute(
            "SELECT dlq_topic, dlq_partition, dlq_offset, redriven_at, new_partition,"
            " new_offset FROM dlq_redrives WHERE dlq_topic = ANY(%s)",
            (sorted(topics),),
        ).fetchall()
    return {(t, p, o): Redrive(at, np, no) for t, p, o, at, np, no in rows}


def _where(entry: Entry) -> tuple[str, int, int]:
    return entry.letter.topic, entry.letter.partition, entry.letter.offset


def _by_source_record(entries: Iterable[Entry]) -> list[list[Entry]]:
    """Dead letters grouped by the source record they hold, in source order: one write each."""
    grouped: dict[tuple[object, ...], list[Entry]] = defaultdict(list)
    for entry in entries:
        topic, partition, offset = entry.source
        key = (entry.id,) if partition is None or offset is None else (topic, partition, offset)
        grouped[key].append(entry)
    ordered = sorted(grouped.values(), key=lambda group: _source_order(group[0]))
    return [sorted(group, key=_order) for group in ordered]


def _source_order(entry: Entry) -> tuple[str, int, int]:
    topic, partition, offset = entry.source
    return topic, -1 if partition is None else partition, -1 if offset is None else offset


def _letter(msg: Message) -> DeadLetter:
    raw: Any = msg.headers() or []
    return DeadLetter(
        topic=msg.topic() or "",
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
        timestamp_ms=msg.timestamp()[1],
        key=msg.key(),
        value=msg.value(),
        headers=tuple((k, v) for k, v in raw if isinstance(v, bytes)),
    )


def _read_offsets(
    consumer: Consumer, topic: str, partition: int, offsets: Sequence[int]
) -> Iterator[Message]:
    """The records at ``offsets`` (sorted) of one partition: read through small gaps,
    seek over large ones; offsets no longer there are passed over."""
    index = 0
    while index < len(offsets):
        start = offsets[index]
        upto = start
        while index + 1 < len(offsets) and offsets[index + 1] - upto <= _SEEK_GAP:
            index += 1
            upto = offsets[index]
        wanted = set(offsets[offsets.index(start) : index + 1])
        index += 1
        where = (topic, partition)
        for msg in ReadToEnd(consumer, {where: start}, ends={where: upto + 1}, timeout_s=60):
            if (msg.offset() or 0) in wanted:
                yield msg


PREVIEW_BYTES = 256


def decoded(value: bytes | None, codec: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The value as its event (JSON-ready), or None and why it could not be decoded.

    ``codec`` is a ``WireCodec``; a dead letter's bytes are often exactly what could
    not be decoded, so failing here is an answer, not an error.
    """
    if value is None:
        return None, "the record has no value"
    try:
        event = codec.decode(value)
    except OpsflowError as err:
        return None, str(err)
    return event.model_dump(mode="json"), None


def preview(value: bytes | None, limit: int = PREVIEW_BYTES) -> dict[str, Any]:
    """The first ``limit`` bytes as hex and as escaped text, for bytes that do not decode."""
    raw = value or b""
    head = raw[:limit]
    return {
        "length": len(raw),
        "hex": head.hex(" "),
        "text": head.decode("utf-8", errors="backslashreplace"),
        "truncated": len(raw) > limit,
    }
