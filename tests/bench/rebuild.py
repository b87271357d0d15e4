"""``rebuild``: how fast ``orders_current`` comes back from the topics, against a raw COPY.

The question a rebuild answers is "how long is a read model behind the log
after a schema change or a bug fix"; the floor for that is writing the same
final rows with nothing in between (PostgreSQL's own bulk load) plus reading
the topics once. So, in one repetition, on the same data:

- **read once**: a raw confluent-kafka consumer with the projection's consumer
  settings (``read_committed``) reads every partition of the projection's
  topics from the start to its end, decoding nothing;
- **rebuild**: ``opsflow.projections.rebuild.rebuild`` of ``orders_current``
  (and its ``daily_summary``), from the shadow tables' creation to the swap's
  commit, as ``opsflow projections rebuild orders_current`` runs it (its
  default worker processes), and again with ``workers=1``, to show what the
  second process buys on this machine;
- **COPY**: the final rows of ``orders_current`` (taken once, with ``COPY TO``,
  into memory) written with ``COPY ... FROM STDIN`` into a fresh table of the
  same definition, indexes included, and committed.

Target (from the issue): at least 50,000 events/s, and a rebuild wall time of
at most twice the COPY's plus one read of the topics, i.e.
``rebuild / (2 * copy + read once) <= 1``.

Inputs: causally consistent histories of ~180,000 orders (``tests/support/histories.py``;
every event type of the workflow, with reviews, escalations, retries, permanent
failures and deliveries in realistic shares), about 1,000,000 events, written to
topics of their own (a prefix) before anything is timed. The live projection is
brought to the end of the topics first, with the live runner, so the swap has
nothing left to replay into the live tables, as in a real rebuild of a current
read model; its checksum must equal the rebuilt tables' (a fast but wrong
rebuild cannot pass).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import psycopg
from confluent_kafka import Consumer, KafkaError
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.projections.positions import TopicPartition
from opsflow.projections.rebuild import REBUILD_WORKERS, checksum, rebuild
from opsflow.projections.runner import ProjectionRunner
from opsflow.readmodels import projections
from opsflow.settings import TopicSettings
from opsflow.topics import consumer_config, ensure_topics, partitions_of, topic_name
from tests.bench.harness import BenchError, Case, Metric, Ratio, StackInfo
from tests.support.histories import histories, publish
from tests.support.stack import create_schema, drop_schema

EVENTS = 1_000_000
PROJECTION = "orders_current"
COPY_TABLE = "orders_current_copy"
PREFIX_VARIABLE = "OPSFLOW_TOPIC_PREFIX"
LIVE_BATCH = 20_000  # the live runner's batch while it catches up in ``prepare`` (untimed)


def _events(count: int) -> Iterator[Event]:
    """Whole order histories until at least ``count`` events were yielded."""
    sent = 0
    for history in histories(count):  # an order has 5 to 6 events: never runs short
        yield from history
        sent += len(history)
        if sent >= count:
            return


class RebuildCase(Case):
    """Rebuild of ``orders_current`` from ~1M events against a raw COPY of its final rows."""

    name: ClassVar[str] = "rebuild"
    summary: ClassVar[str] = (
        f"rebuild orders_current from {EVENTS:,} events (unless --events) vs raw COPY "
        "of its rows + one read of the topics"
    )
    default_repeat: ClassVar[int] = 1
    stack_overrides: ClassVar[dict[str, str]] = {"OPSFLOW_BROKER_STORAGE": "memory"}
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("rebuild_rate", "rebuild orders_current", "events/s", target=50_000),
        Metric("serial_rate", "rebuild with workers=1 (one process)", "events/s"),
        Metric("read_rate", "read the topics once (raw consumer, no decoding)", "events/s"),
        Metric("copy_rate", "raw COPY FROM STDIN of the final rows", "rows/s"),
        Metric("rebuild_s", "rebuild wall time", "s", lower_is_better=True),
        Metric("read_s", "read-once wall time", "s", lower_is_better=True),
        Metric("copy_s", "COPY wall time (indexes included, committed)", "s", lower_is_better=True),
        Metric("budget_s", "2 x COPY + read once", "s", lower_is_better=True),
    )
    ratios: ClassVar[tuple[Ratio, ...]] = (
        Ratio("parallel_gain", "rebuild default / workers=1", "rebuild_rate", "serial_rate"),
        Ratio(
            "vs_copy",
            "rebuild / (2 x COPY + read once)",
            "rebuild_s",
            "budget_s",
            target=1.0,
            lower_is_better=True,
        ),
    )

    def __init__(self, stack: StackInfo, *, events: int | None = None) -> None:
        super().__init__(stack, events=events)
        self.count = events or EVENTS
        self.projection = projections()[PROJECTION]
        self.prefix = f"bench{uuid.uuid4().hex[:8]}."
        self.kafka = {"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP_SERVERS"]}
        self.base_url = stack.env["DATABASE_URL"]
        self.schema: str | None = None
        self.published = 0
        self.orders = 0
        self.partitions = 0
        self.timings: dict[str, float] = {}
        self._previous_prefix: str | None = None
        self._notes: list[str] = []

    def params(self) -> dict[str, Any]:
        return {
            "events": self.published,
            "orders": self.orders,
            "topics": [str(t) for t in self.projection.topics],
            "partitions": self.partitions,
            "copy_bytes": sum(map(len, getattr(self, "rows", []))),
            **{f"prepare_{k}_s": round(v, 1) for k, v in self.timings.items()},
        }

    def notes(self) -> list[str]:
        return [
            "target: rebuild >= 50,000 events/s and rebuild wall <= 2 x COPY wall + read once",
            f"rebuild = rebuild() with its default {REBUILD_WORKERS} worker processes, from "
            "shadow-table creation to the swap's commit (daily_summary "
            "included); COPY = the final orders_current rows into an empty table of the same "
            "definition with its indexes",
            *self._notes,
        ]

    # --- setup ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Publish the histories, bring the live projection to the end, keep its final rows."""
        self._previous_prefix = os.environ.get(PREFIX_VARIABLE)
        os.environ[PREFIX_VARIABLE] = self.prefix  # the runner names its topics from it
        self.schema, self.url = create_schema(self.base_url)
        db.migrate(self.url)
        topics = [topic_name(t) for t in self.projection.topics]
        ensure_topics(
            AdminClient({**self.kafka, "log_level": 4}),
            topics,
            partitions=TopicSettings().partitions,
        )
        self.registry = SchemaRegistryClient({"url": self.stack.env["SCHEMA_REGISTRY_URL"]})

        began = time.monotonic()
        self.published = publish(
            self.kafka["bootstrap.servers"],
            WireCodec(self.registry),
            _events(self.count),
            prefix=self.prefix,
        )
        self.timings["publish"] = time.monotonic() - began
        print(
            f"  published {self.published:,} events in {self.timings['publish']:.0f}s", flush=True
        )
        self.ends = ends = self._ends(topics)
        self.partitions = len(ends)
        if sum(ends.values()) != self.published:
            raise BenchError(
                f"rebuild: the topics hold {sum(ends.values()):,} records, "
                f"{self.published:,} were published"
            )

        began = time.monotonic()
        runner = ProjectionRunner(
            self.projection,
            kafka=self.kafka,
            registry=self.registry,
            database_url=self.url,
            max_events=LIVE_BATCH,
        )
        runner.open()
        try:
            while not runner.caught_up(ends):
                runner.step()
            if runner.dead_lettered:
                raise BenchError(f"rebuild: the live runner dead-lettered {runner.dead_lettered}")
        finally:
            runner.close()
        self.timings["live"] = time.monotonic() - began
        print(f"  live projection caught up in {self.timings['live']:.0f}s", flush=True)

        with db.connect(self.url) as conn:
            self.orders = conn.execute("SELECT count(*) FROM orders_current").fetchone()[0]  # type: ignore[index]
            self.live_sums = checksum(conn, self.projection, self.projection.live_tables())
            with conn.cursor() as cur, cur.copy("COPY orders_current TO STDOUT") as copy:
                self.rows = [bytes(block) for block in copy]
        if self.orders == 0:
            raise BenchError("rebuild: the live projection wrote no rows")

    def _ends(self, topics: list[str]) -> dict[TopicPartition, int]:
        """The offset after the last record of every partition, found by reading to its end.

        Not from the high watermarks: the embedded broker answers a partition's
        latest offset with the first offset of its last batch, short of the end.
        """
        config = consumer_config(self.kafka, "opsflow-bench-rebuild-ends")
        consumer = Consumer({**config, "enable.partition.eof": True})
        try:
            parts = partitions_of(consumer, topics)
            consumer.assign([KafkaPartition(t, p, 0) for t, p in parts])
            ends = dict.fromkeys(parts, 0)
            waiting = set(parts)
            deadline = time.monotonic() + 300
            while waiting and time.monotonic() < deadline:
                for msg in consumer.consume(20_000, 0.5):
                    tp = (msg.topic(), msg.partition())
                    error = msg.error()
                    if error is None:
                        ends[tp] = msg.offset() + 1  # type: ignore[index, operator]
                    elif error.code() == KafkaError._PARTITION_EOF:
                        waiting.discard(tp)  # type: ignore[arg-type]
            if waiting:
                raise BenchError(f"rebuild: could not read {sorted(waiting)} to their end")
            return ends  # type: ignore[return-value]
        finally:
            consumer.close()

    # --- the three timings ---------------------------------------------------------------

    def _read_once(self) -> tuple[float, int]:
        """Seconds to read every record of the topics with a raw consumer, and how many."""
        began = time.monotonic()
        consumer = Consumer(consumer_config(self.kafka, "opsflow-bench-rebuild-read"))
        try:
            consumer.assign([KafkaPartition(t, p, 0) for t, p in self.ends])
            read = 0
            waiting = {tp for tp, end in self.ends.items() if end > 0}
            while waiting:
                read += sum(1 for m in consumer.consume(20_000, 0.5) if m.error() is None)
                for kp in consumer.position([KafkaPartition(t, p) for t, p in waiting]):
                    if kp.offset >= self.ends[(kp.topic, kp.partition)]:
                        waiting.discard((kp.topic, kp.partition))
        finally:
            consumer.close()
        return time.monotonic() - began, read

    def _copy(self) -> float:
        """Seconds to COPY the final rows into a fresh table like ``orders_current``."""
        with db.connect(self.url) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {COPY_TABLE}")
            conn.execute(f"CREATE TABLE {COPY_TABLE} (LIKE orders_current INCLUDING ALL)")
            conn.commit()
            began = time.monotonic()
            with conn.cursor() as cur, cur.copy(f"COPY {COPY_TABLE} FROM STDIN") as copy:
                for block in self.rows:
                    copy.write(block)
            conn.commit()
            took = time.monotonic() - began
            copied = conn.execute(f"SELECT count(*) FROM {COPY_TABLE}").fetchone()[0]  # type: ignore[index]
            conn.execute(f"DROP TABLE {COPY_TABLE}")
            conn.commit()
        if copied != self.orders:
            raise BenchError(f"rebuild: COPY wrote {copied:,} rows, not {self.orders:,}")
        return took

    def _rebuild(self, workers: int) -> float:
        """Seconds of one rebuild, checked against the live tables' checksum."""
        began = time.monotonic()
        result = rebuild(
            self.projection,
            kafka=self.kafka,
            registry=self.registry,
            database_url=self.url,
            workers=workers,
        )
        took = time.monotonic() - began
        if result.records != self.published:
            raise BenchError(
                f"rebuild: replayed to {result.records:,} records, {self.published:,} published"
            )
        with db.connect(self.url) as conn:
            rebuilt = checksum(conn, self.projection, self.projection.live_tables())
        if rebuilt != self.live_sums:
            raise BenchError(
                f"rebuild (workers={workers}): the rebuilt tables differ from the live ones: "
                f"{rebuilt} != {self.live_sums}"
            )
        return took

    def measure(self, repetition: int) -> dict[str, float]:
        read_s, read = self._read_once()
        if read != self.published:
            raise BenchError(f"rebuild: read {read:,} records once, {self.published:,} published")
        rebuild_s = self._rebuild(REBUILD_WORKERS)
        serial_s = self._rebuild(1)
        copy_s = self._copy()
        return {
            "rebuild_rate": self.published / rebuild_s,
            "serial_rate": self.published / serial_s,
            "read_rate": read / read_s,
            "copy_rate": self.orders / copy_s,
            "rebuild_s": rebuild_s,
            "read_s": read_s,
            "copy_s": copy_s,
            "budget_s": 2 * copy_s + read_s,
        }

    def close(self) -> None:
        """Drop the schema and the topics; put the topic prefix back as it was."""
        if self._previous_prefix is None:
            os.environ.pop(PREFIX_VARIABLE, None)
        else:
            os.environ[PREFIX_VARIABLE] = self._previous_prefix
        if self.schema is not None:
            with contextlib.suppress(psycopg.Error):
                drop_schema(self.base_url, self.schema)
        topics = [topic_name(t, prefix=self.prefix) for t in self.projection.topics]
        admin = AdminClient({**self.kafka, "log_level": 4})
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            with contextlib.suppress(Exception):  # a broker that cannot delete keeps them
                future.result()
