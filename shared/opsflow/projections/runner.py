"""Running a projection: read its topics from its stored position, write batches exactly once.

Each batch is one PostgreSQL transaction that first moves the projection's
position (fenced: see ``opsflow.projections.positions``) and then writes the
rows, so rows and offsets commit together and a restart resumes exactly where
the last commit ended. Kafka consumer groups are not used: partitions are
assigned by hand from the stored offsets, and nothing is committed to Kafka.

What goes wrong, and what happens:

- a record that cannot be decoded: dead-lettered to ``<topic>.dlq`` (headers
  name the projection and the error), the position moves past it;
- a batch the projection cannot write (a bug, or data it cannot take): the
  batch is applied again one record per transaction, and the records that
  still fail are dead-lettered the same way, so one bad event never stalls
  the read model;
- PostgreSQL unreachable (a restart): the runner waits with backoff, reconnects,
  re-reads its position and goes on; nothing is lost or applied twice;
- another writer moved the position (a second instance, or a rebuild swapping
  its tables in): the batch rolls back and the runner resumes from the stored
  position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import psycopg
from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db
from opsflow.deadletters import dead_letter_headers
from opsflow.errors import BadInputError, ConfigurationError, RetryableError
from opsflow.projections import positions
from opsflow.projections.decoder import RecordDecoder
from opsflow.projections.merge import Merging, Row
from opsflow.projections.positions import Fenced, Move, TopicPartition
from opsflow.projections.projection import Projection, Tables
from opsflow.projections.records import EventRecord
from opsflow.topics import consumer_config, dead_letter_topic, partitions_of, topic_name

log = logging.getLogger("opsflow.projections")

_RECONNECT_MAX_S = 5.0
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 30.0
# The most folded rows a folding runner holds before writing them: an orders_current
# row takes about 830 bytes in memory (tracemalloc, the bench's orders), so this is
# about 0.8 GB.
FOLD_ROWS = 1_000_000


class _Systemic(Exception):
    """Every record of a batch failed alike: the projection or its tables are at fault."""

    def __init__(self, err: Exception) -> None:
        super().__init__(str(err))
        self.__cause__ = err


class Unfoldable(Exception):
    """The rows a folding runner held could not be written (see ``ProjectionRunner.flush``)."""


class ProjectionRunner:
    """Keeps one projection's tables current, from its stored position onwards.

    Args:
        projection: what to run.
        kafka: librdkafka settings (bootstrap servers, security).
        registry: the schema registry client.
        database_url: the PostgreSQL database holding the tables and positions.
        tables: where to write (default: the live tables).
        position_key: under which name the position is stored (default: the projection's).
        max_events: the most records one batch takes.
        max_wait_s: how long a batch waits to fill.
        bulk: a rebuild's replay (see ``Projection``).
        partitions: run only these partitions of the topics (default: all); runners
            of disjoint partitions can share a position key (a parallel replay).
        fold: a rebuild's replay into empty tables, for a projection whose ``apply`` is a
            ``Merging``: batches are folded into rows in memory and nothing is written
            until ``flush`` (or ``fold_rows`` rows are held), which writes the rows once,
            with the positions they reached, in one transaction. Each row is then
            written once instead of once per batch that touched it (about 3.9 times
            per order in ``tests/bench/rebuild.py``'s data, its topics not being read
            in step).
        fold_rows: the most folded rows held in memory before a ``flush``.
    """

    def __init__(
        self,
        projection: Projection,
        *,
        kafka: Mapping[str, Any],
        registry: SchemaRegistryClient,
        database_url: str,
        tables: Tables | None = None,
        position_key: str | None = None,
        max_events: int = 5000,
        max_wait_s: float = 0.1,
        bulk: bool = False,
        partitions: Collection[TopicPartition] | None = None,
        fold: bool = False,
        fold_rows: int = FOLD_ROWS,
    ) -> None:
        if fold and not isinstance(projection.apply, Merging):
            raise ValueError(f"{projection.name}: only a Merging apply can be folded")
        self.bulk = bulk
        self.folding: Merging | None = projection.apply if fold else None  # type: ignore[assignment]
        self.fold_rows = fold_rows
        self._folded: dict[Any, Row] = {}
        self._stored: dict[TopicPartition, int] = {}  # the positions written, while folding
        self._last_ms: dict[TopicPartition, int | None] = {}
        self.only = None if partitions is None else frozenset(partitions)
        self.projection = projection
        self.kafka = dict(kafka)
        self.database_url = database_url
        self.tables = tables or projection.live_tables()
        self.key = position_key or projection.name
        self.max_events = max_events
        self.max_wait_s = max_wait_s
        self.registry = registry
        self.decoder = RecordDecoder(registry, event_types=projection.event_types)
        self.topics = [topic_name(t) for t in projection.topics]
        self.consumer = Consumer(consumer_config(kafka, f"opsflow-projection-{self.key}"))
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self.conn: psycopg.Connection[Any] | None = None
        self.positions: dict[TopicPartition, int] = {}
        self.applied = 0
        self.dead_lettered = 0
        self._all_failed = 0  # batches in a row in which every record failed
        self._pause = _RETRY_FIRST_S

    # --- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        """Connect, read the stored position and start fetching from it."""
        self.conn = db.connect(self.database_url)
        parts = [
            tp
            for tp in partitions_of(self.consumer, self.topics)
            if self.only is None or tp in self.only
        ]
        with self.conn.transaction():
            self.positions = self._own(positions.ensure(self.conn, self.key, parts))
        self._stored = dict(self.positions)
        self._assign()

    def close(self) -> None:
        self.consumer.close()
        if self._producer is not None:
            self._producer.flush(10)
        if self.conn is not None:
            self.conn.close()

    def run(self, stop: threading.Event) -> None:
        """Apply batches until ``stop`` is set."""
        self.open()
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> int:
        """Fetch and apply one batch; returns how many records it consumed."""
        messages = [
            m
            for m in self.consumer.consume(self.max_events, self.max_wait_s)
            if not self._is_error(m)
        ]
        moved = self._fetch_positions()
        if messages or moved:
            self.apply(messages, moved)
        return len(messages)

    def _fetch_positions(self) -> dict[TopicPartition, int]:
        """Partitions the consumer has read past their stored position.

        The consumer's position also moves past records it never hands out
        (transaction markers, aborted records), so the stored position reaches
        the partition's end even when the last records are not events.
        """
        fetched = self.consumer.position([KafkaPartition(t, p) for t, p in self.positions])
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in fetched
            if tp.offset > self.positions[(tp.topic, tp.partition)]
        }

    def caught_up(self, targets: Mapping[TopicPartition, int]) -> bool:
        """Whether every partition is at or past its target offset."""
        return all(self.positions.get(tp, 0) >= off for tp, off in targets.items())

    def high_watermarks(self) -> dict[TopicPartition, int]:
        """Where every partition ends now, asked in one ListOffsets request on a client of
        its own: on the consumer's connection the question would wait behind its pending
        fetch (up to ``fetch.wait.max.ms``) once per partition, which took most of a
        rebuild's time. The embedded broker answers short of the end when a partition's
        last batch holds several records (``opsflow.topics.end_offsets`` reads the exact
        end, at the cost of a fetch round); a rebuild's catch-up can stop short by that
        much, and the swap applies the rest.
        """
        if self._admin is None:
            self._admin = AdminClient({**self.kafka, "log_level": 0})
        futures = self._admin.list_offsets(
            {KafkaPartition(t, p): OffsetSpec.latest() for t, p in self.positions},  # type: ignore[no-untyped-call]
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=10,
        )
        try:
            return {
                (tp.topic, tp.partition): future.result().offset for tp, future in futures.items()
            }
        except KafkaException as err:
            raise RetryableError(f"could not read the ends of {self.topics}: {err}") from err

    # --- batches -------------------------------------------------------------------------

    def apply(self, messages: Sequence[Message], moved: Mapping[TopicPartition, int]) -> None:
        """Apply consumed records in one transaction with the positions they move to."""
        try:
            records, moves, passed = self._decode(messages, moved)
            try:
                self._commit(records, moves, passed)
            except Exception as err:
                if not _about_a_record(err):
                    raise
                self._note_error(f"{type(err).__name__}: {err}", "applying its records one by one")
                self._one_by_one(records, moves, passed)
        except Fenced:
            log.warning(
                "position moved by another writer: resuming from the stored one",
                extra={"projection": self.key},
            )
            self._reposition()
        except psycopg.OperationalError as err:
            self._reconnect(err)
        except (RetryableError, psycopg.Error, _Systemic) as err:
            # Not about one record (a registry outage, a missing table or grant, a
            # bug every record trips): nothing is skipped; the batch is read again
            # after a pause.
            cause = err.__cause__ if isinstance(err, _Systemic) else err
            self._note_error(f"{type(cause).__name__}: {cause}", "retrying the batch")
            time.sleep(self._pause)
            self._pause = min(self._pause * 2, _RETRY_MAX_S)
            self._reposition()
        else:
            self._pause = _RETRY_FIRST_S

    def _decode(
        self, messages: Sequence[Message], moved: Mapping[TopicPartition, int]
    ) -> tuple[list[EventRecord], dict[TopicPartition, Move], int]:
        """The records to apply, the positions they move to, and how many records of
        event types the projection does not use were passed over."""
        records: list[EventRecord] = []
        last: dict[TopicPartition, tuple[int, int]] = {}
        bad: list[tuple[Message, Exception]] = []
        select = self.decoder.select
        passed = 0
        for msg in messages:
            try:
                record = select(msg)
                if record is not None:
                    records.append(record)
                else:
                    passed += 1
            except BadInputError as err:
                bad.append((msg, err))
            last[(msg.topic(), msg.partition())] = (msg.offset() + 1, msg.timestamp()[1])  # type: ignore[index, operator]
        self._dead_letter(bad)
        moves = {}
        for tp in last.keys() | moved.keys():
            after, timestamp_ms = last.get(tp, (0, None))
            moves[tp] = Move(self.positions[tp], max(after, moved.get(tp, 0)), timestamp_ms)
        return records, moves, passed

    def _commit(
        self, records: Sequence[EventRecord], moves: Mapping[TopicPartition, Move], passed: int = 0
    ) -> None:
        if self.folding is not None:
            self._fold(self.folding, records, moves, passed)
            return
        conn = self._connection()
        with conn.transaction():
            positions.advance(conn, self.key, moves)
            self.projection.apply(conn, records, self.tables, self.bulk)
        self._moved(moves, len(records) + passed)

    def _fold(
        self,
        folding: Merging,
        records: Sequence[EventRecord],
        moves: Mapping[TopicPartition, Move],
        passed: int,
    ) -> None:
        """Fold a batch into the rows held in memory; its records that fail are
        dead-lettered, as ``_one_by_one`` would (and a batch that fails whole is
        the projection's fault, ``_Systemic``)."""
        failed = folding.fold(records, self._folded)
        if failed and len(failed) == len(records) and len(records) > 1:
            raise _Systemic(failed[0][1])
        for record, error in failed:
            self._send_dead_letter(
                record.topic, record.partition, record.offset, record.key.encode(),
                record.value, [], error,
            )  # fmt: skip
        if failed:
            self._flush_dead_letters()
        for tp, move in moves.items():
            if move.last_event_ms is not None or tp not in self._last_ms:
                self._last_ms[tp] = move.last_event_ms
        self._moved(moves, len(records) - len(failed) + passed)
        if len(self._folded) >= self.fold_rows:
            self.flush()

    def flush(self) -> None:
        """Write the rows folded so far and the positions they reached, in one transaction
        (nothing to do unless ``fold``).

        Raises:
            Unfoldable: the tables refused the rows (data the projection cannot take);
                nothing was written, and a runner without ``fold`` can apply the same
                records one batch, then one record, at a time.
        """
        if self.folding is None:
            return
        moves = {
            tp: Move(self._stored[tp], offset, self._last_ms.get(tp))
            for tp, offset in self.positions.items()
            if offset != self._stored[tp]
        }
        if not moves and not self._folded:
            return
        conn = self._connection()
        try:
            with conn.transaction():
                positions.advance(conn, self.key, moves)
                self.folding.load(conn, list(self._folded.values()), self.tables)
        except Exception as err:
            if not _about_a_record(err):
                raise
            raise Unfoldable(f"{type(err).__name__}: {err}") from err
        self._stored = dict(self.positions)
        self._folded = {}
        self._last_ms = {}

    def _moved(self, moves: Mapping[TopicPartition, Move], applied: int) -> None:
        for tp, move in moves.items():
            self.positions[tp] = move.new
        self.applied += applied

    def _one_by_one(
        self, records: Sequence[EventRecord], moves: Mapping[TopicPartition, Move], passed: int = 0
    ) -> None:
        """Apply each record alone (a savepoint each) in one transaction; the ones that
        still fail are dead-lettered before it commits.

        When every record fails (two or more, or one batch after another), the
        fault is the projection's, not the records': nothing is dead-lettered,
        and the batch is tried again after a pause (``_Systemic``).
        """
        conn = self._connection()
        failed: list[tuple[EventRecord, Exception]] = []
        with conn.transaction():
            positions.advance(conn, self.key, moves)
            for record in records:
                try:
                    with conn.transaction():
                        self.projection.apply(conn, [record], self.tables, self.bulk)
                except Exception as err:
                    if not _about_a_record(err):
                        raise
                    failed.append((record, err))
            if failed and len(failed) == len(records):
                self._all_failed += 1
                if len(records) > 1 or self._all_failed >= 3:
                    raise _Systemic(failed[0][1])
            else:
                self._all_failed = 0
            for record, error in failed:
                self._send_dead_letter(
                    record.topic, record.partition, record.offset, record.key.encode(),
                    record.value, [], error,
                )  # fmt: skip
            if failed:
                self._flush_dead_letters()
        self._moved(moves, len(records) - len(failed) + passed)

    # --- dead letters --------------------------------------------------------------------

    def _dead_letter(self, bad: Sequence[tuple[Message, Exception]]) -> None:
        for msg, err in bad:
            self._send_dead_letter(
                msg.topic(),  # type: ignore[arg-type]
                msg.partition(),  # type: ignore[arg-type]
                msg.offset(),  # type: ignore[arg-type]
                msg.key(),
                msg.value(),
                list(msg.headers() or []),  # type: ignore[arg-type]
                err,
            )
        if bad:
            self._flush_dead_letters()

    def _send_dead_letter(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        err: Exception,
    ) -> None:
        if self._producer is None:
            # Without the reader's settings, which a producer warns about.
            producing = {
                k: v for k, v in self.kafka.items() if not k.startswith(("fetch.", "queued."))
            }
            self._producer = Producer({**producing, "linger.ms": 5})
        extra = dead_letter_headers(
            err,
            topic=topic,
            partition=partition,
            offset=offset,
            consumer=f"projection:{self.projection.name}",
            attempts=1,
        )
        self._producer.produce(
            dead_letter_topic(topic),
            key=key,
            value=value,
            headers=headers + extra,  # type: ignore[arg-type]
        )
        self.dead_lettered += 1
        log.error(
            "dead-lettered",
            extra={
                "projection": self.key,
                "source": f"{topic}[{partition}]@{offset}",
                "error_class": type(err).__name__,
                "error": str(err)[:500],
            },
        )

    def _flush_dead_letters(self) -> None:
        assert self._producer is not None
        if self._producer.flush(30) > 0:
            raise RetryableError("dead-letter records were not acknowledged by the broker")

    # --- recovery ------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = db.connect(self.database_url)
        return self.conn

    def _reconnect(self, err: Exception) -> None:
        """Wait for PostgreSQL to come back, then resume from the stored position."""
        delay = 0.2
        log.warning(
            "PostgreSQL unavailable: reconnecting",
            extra={"projection": self.key, "error": str(err)[:300]},
        )
        while True:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            try:
                self._reposition()
                break
            except (psycopg.OperationalError, ConfigurationError):
                time.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)
        log.info("PostgreSQL back: resuming", extra={"projection": self.key})

    def _reposition(self) -> None:
        conn = self._connection()
        with conn.transaction():
            self.positions = self._own(positions.load(conn, self.key))
        # What was folded and not flushed is read again from the stored position.
        self._stored, self._folded, self._last_ms = dict(self.positions), {}, {}
        self._assign()

    def _own(self, found: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The positions of this runner's partitions among ``found``."""
        return {tp: off for tp, off in found.items() if self.only is None or tp in self.only}

    def _assign(self) -> None:
        self.consumer.assign([KafkaPartition(t, p, off) for (t, p), off in self.positions.items()])

    def _note_error(self, error: str, action: str) -> None:
        log.error(f"batch failed: {action}", extra={"projection": self.key, "error": error[:500]})
        try:
            with db.connect(self.database_url, autocommit=True) as conn:
                positions.record_error(conn, self.projection.name, error)
        except Exception:  # the error is logged; keeping its record is best effort
            log.warning("could not record the error", extra={"projection": self.key})

    @staticmethod
    def _is_error(msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return False
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error", extra={"error": str(err)})
        return True


def _about_a_record(err: Exception) -> bool:
    """Whether a failed batch may be the fault of one of its records (a bug in the
    projection or data it cannot take) rather than of the system around it."""
    if isinstance(
        err, psycopg.DataError | psycopg.IntegrityError | psycopg.errors.ProgramLimitExceeded
    ):
        return True  # a value the tables cannot take (too long for an index, say)
    return not isinstance(err, psycopg.Error | RetryableError | Fenced | Unfoldable)
