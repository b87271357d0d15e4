"""Rebuilding a read model from the topics while the live one keeps serving.

1. Shadow tables (``<table>__rebuild``, same definition) are filled by replaying
   the projection's topics from the beginning, under a position of their own.
   Readers go on reading the live tables.
2. The replay catches up with live traffic: it reads to the partitions' ends,
   then again to the new ends, until little is left.
3. The swap, in one PostgreSQL transaction: the live projection's position is
   locked (its runner waits, see ``positions.advance``); each side is brought to
   the same offsets (the live tables up to where the shadow got, the shadow up
   to where the live ones got), so both reflect exactly the same records;
   ``--verify`` compares their checksums; the shadow tables are renamed into
   place and the live position becomes theirs. Readers see the old tables until
   the commit and the new ones after it, never an empty or half-built one. The
   live runner then finds its position moved and resumes from the new one.

Nothing is lost or applied twice across the swap: the swapped tables and the
position they carry were written in the same transaction.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from psycopg import sql

from opsflow import db
from opsflow.errors import BadInputError
from opsflow.projections import positions
from opsflow.projections.decoder import RecordDecoder
from opsflow.projections.merge import Merging
from opsflow.projections.positions import TopicPartition
from opsflow.projections.projection import Projection, Tables
from opsflow.projections.records import EventRecord
from opsflow.projections.runner import ProjectionRunner, Unfoldable
from opsflow.topics import ReadToEnd, consumer_config

log = logging.getLogger("opsflow.projections")

Progress = Callable[[int, int], None]
"""Called with (records read, records to read) as the replay goes."""

REBUILD_BATCH = 20_000
# Processes replaying the bulk of the topics (see ``rebuild``).
REBUILD_WORKERS = 2
# Fewer records than this are replayed in this process alone: each worker process is
# a new interpreter importing opsflow (about a second, measured), more than a
# process replays this many in.
PARALLEL_FROM = 50_000
# When this few records are left to replay, the rest is done inside the swap.
SWAP_LAG = 5_000


@dataclass(frozen=True)
class Checksum:
    """An order-independent checksum of a table: its row count and a sum of row hashes."""

    rows: int
    digest: str


@dataclass
class RebuildResult:
    """What a rebuild did; ``verified`` is None when no verification was asked for."""

    projection: str
    records: int
    seconds: float
    positions: dict[TopicPartition, int]
    verified: bool | None = None
    live: dict[str, Checksum] = field(default_factory=dict)
    rebuilt: dict[str, Checksum] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0

    def outcome(self) -> str:
        """The rebuild in a sentence: an operator action's recorded outcome."""
        return (
            f"rebuilt: {self.records:,} records in {self.seconds:.1f} s, "
            f"swapped in at offsets {sum(self.positions.values()):,}"
        )

    def detail(self) -> dict[str, Any]:
        """The rebuild as data, for the operator action's record."""
        return {
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "position": sum(self.positions.values()),
            "verified": self.verified,
        }


def checksum(
    conn: psycopg.Connection[Any], projection: Projection, tables: Tables
) -> dict[str, Checksum]:
    """Per table: rows, and the sum of each row's md5 over its non-volatile columns,
    so two tables with the same rows in any physical order have the same checksum."""
    sums = {}
    for logical, physical in tables.items():
        skip = set(projection.volatile_columns.get(logical, ()))
        columns = [
            name
            for (name,) in conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = %s ORDER BY column_name",
                (logical,),
            ).fetchall()
            if name not in skip
        ]
        row = sql.SQL("ROW({})::text").format(sql.SQL(", ").join(map(sql.Identifier, columns)))
        rows, digest = conn.execute(
            sql.SQL(
                "SELECT count(*), COALESCE(sum(('x' || left(md5({}), 16))::bit(64)::bigint), 0)"
                " FROM {}"
            ).format(row, sql.Identifier(physical))
        ).fetchone()  # type: ignore[misc]
        sums[logical] = Checksum(rows, str(digest))
    return sums


def rebuild(
    projection: Projection,
    *,
    kafka: Mapping[str, Any],
    registry: SchemaRegistryClient,
    database_url: str,
    verify: bool = False,
    progress: Progress | None = None,
    workers: int = REBUILD_WORKERS,
    parallel_from: int = PARALLEL_FROM,
) -> RebuildResult:
    """Rebuild ``projection`` from its topics and swap it in (see the module docstring).

    ``workers`` > 1 replays the bulk of the topics in that many processes when
    there are ``parallel_from`` records or more, each with the same partitions of
    every topic (an instance's events are in the same partition of each topic, so
    they never write the same rows); the catch-up and the swap are then done here.
    """
    started = time.monotonic()
    shadow = projection.shadow_tables()
    key = f"{projection.name}__rebuild"
    with db.connect(database_url) as conn, conn.transaction():
        for live, table in shadow.items():
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    sql.Identifier(table), sql.Identifier(live)
                )
            )
        positions.forget(conn, key)
    runner = _replayer(projection, kafka, registry, database_url, shadow, key, None, fold=True)
    runner.open()
    try:
        ends = runner.high_watermarks()
        total = sum(ends.values())
        if workers > 1 and total >= parallel_from:
            _replay_in_parallel(runner, ends, workers, registry, progress)
        while True:
            try:
                while not runner.caught_up(ends):
                    runner.step()
                    if progress:
                        progress(sum(runner.positions.values()), total)
                runner.flush()
            except Unfoldable as err:
                runner.close()
                runner = _unfolded(runner, err)
                continue
            ends = runner.high_watermarks()
            total = sum(ends.values())
            if sum(max(0, end - runner.positions[tp]) for tp, end in ends.items()) <= SWAP_LAG:
                break
        runner_positions = dict(runner.positions)
    finally:
        runner.close()
    result = _swap(projection, runner_positions, kafka, registry, database_url, verify)
    result.records = sum(result.positions.values())
    result.seconds = time.monotonic() - started
    if progress:
        progress(result.records, result.records)
    return result


def _replayer(
    projection: Projection,
    kafka: Mapping[str, Any],
    registry: SchemaRegistryClient,
    database_url: str,
    tables: Tables,
    key: str,
    partitions: Collection[TopicPartition] | None,
    *,
    fold: bool,
) -> ProjectionRunner:
    """A runner replaying into the shadow tables; folding when the projection's rows are
    merged (``ProjectionRunner``'s ``fold``: each row written once, not once per batch)."""
    return ProjectionRunner(
        projection,
        kafka=kafka,
        registry=registry,
        database_url=database_url,
        tables=tables,
        position_key=key,
        max_events=REBUILD_BATCH,
        max_wait_s=0.5,
        bulk=True,
        partitions=partitions,
        fold=fold and isinstance(projection.apply, Merging),
    )


def _unfolded(runner: ProjectionRunner, err: Unfoldable) -> ProjectionRunner:
    """A runner like ``runner`` that does not fold, opened at the stored position: the
    tables refused folded rows, and batch by batch the records at fault are found and
    dead-lettered, as the live runner would."""
    log.warning(
        "folded rows refused: replaying batch by batch",
        extra={"projection": runner.key, "error": str(err)[:500]},
    )
    replacement = _replayer(
        runner.projection, runner.kafka, runner.registry, runner.database_url,
        runner.tables, runner.key, runner.only, fold=False,
    )  # fmt: skip
    replacement.open()
    return replacement


def _replay_in_parallel(
    runner: ProjectionRunner,
    ends: Mapping[TopicPartition, int],
    workers: int,
    registry: SchemaRegistryClient,
    progress: Progress | None,
) -> None:
    """Replay up to ``ends`` in ``workers`` processes, then resume ``runner`` where they got.

    Each process runs a runner of its share of the partitions under the same
    position key, so what each one commits is exactly once like a single
    runner's; a failure in one is raised here after the others finished.
    """
    # Not fetching here meanwhile: the parent's consumer would read every partition
    # alongside the workers (measured: a parallel replay 2.6x slower than one process).
    runner.consumer.unassign()
    shares: list[list[TopicPartition]] = [[] for _ in range(workers)]
    for topic, partition in ends:
        shares[partition % workers].append((topic, partition))
    # Spawned, not forked: the parent may hold librdkafka threads and open connections.
    context = multiprocessing.get_context("spawn")
    registry_conf = dict(registry._conf)  # the client itself cannot be pickled
    total = sum(ends.values())
    with concurrent.futures.ProcessPoolExecutor(len(shares), mp_context=context) as pool:
        futures = [
            pool.submit(
                _replay_share,
                runner.projection,
                runner.kafka,
                registry_conf,
                runner.database_url,
                runner.tables,
                runner.key,
                {tp: ends[tp] for tp in share},
            )
            for share in shares
            if share
        ]
        pending: set[concurrent.futures.Future[int]] = set(futures)
        while pending:
            _, pending = concurrent.futures.wait(pending, timeout=0.5)
            if progress:
                with db.connect(runner.database_url) as conn:
                    progress(sum(positions.load(conn, runner.key).values()), total)
        for future in futures:
            future.result()
    runner._reposition()


def _replay_share(
    projection: Projection,
    kafka: Mapping[str, Any],
    registry_conf: dict[str, Any],
    database_url: str,
    tables: Tables,
    key: str,
    ends: Mapping[TopicPartition, int],
) -> int:
    """One process of a parallel replay: apply its partitions up to ``ends``."""
    registry = SchemaRegistryClient(registry_conf)
    runner = _replayer(
        projection, kafka, registry, database_url, tables, key, ends.keys(), fold=True
    )
    runner.open()
    try:
        while True:
            try:
                while not runner.caught_up(ends):
                    runner.step()
                runner.flush()
                return runner.applied
            except Unfoldable as err:
                runner.close()
                runner = _unfolded(runner, err)
    finally:
        runner.close()


def _swap(
    projection: Projection,
    shadow_at: Mapping[TopicPartition, int],
    kafka: Mapping[str, Any],
    registry: SchemaRegistryClient,
    database_url: str,
    verify: bool,
) -> RebuildResult:
    live, shadow = projection.live_tables(), projection.shadow_tables()
    decoder = RecordDecoder(registry, event_types=projection.event_types)
    with db.connect(database_url) as conn, conn.transaction():
        live_at = positions.ensure(conn, projection.name, shadow_at)
        live_at = positions.load(conn, projection.name, for_update=True)
        target = {tp: max(live_at.get(tp, 0), shadow_at.get(tp, 0)) for tp in shadow_at}
        if projection.finish is not None:
            projection.finish(conn, shadow)
        for tables, start in ((live, live_at), (shadow, shadow_at)):
            records = read_range(kafka, decoder, start, target, name=projection.name)
            projection.apply(conn, records, tables, False)
        result = RebuildResult(projection.name, 0, 0.0, target)
        if verify:
            result.live = checksum(conn, projection, live)
            result.rebuilt = checksum(conn, projection, shadow)
            result.verified = result.live == result.rebuilt
        for logical, table in shadow.items():
            _copy_grants(conn, logical, table)
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(logical)))
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    sql.Identifier(table), sql.Identifier(logical)
                )
            )
        positions.replace(conn, projection.name, target, taken_from=f"{projection.name}__rebuild")
        positions.forget(conn, f"{projection.name}__rebuild")
    return result


def _copy_grants(conn: psycopg.Connection[Any], source: str, target: str) -> None:
    """Give ``target`` the privileges others hold on ``source`` (readers keep their SELECT)."""
    grants = conn.execute(
        "SELECT grantee, privilege_type FROM information_schema.role_table_grants"
        " WHERE table_schema = current_schema() AND table_name = %s"
        " AND grantee <> (SELECT tableowner FROM pg_tables"
        "   WHERE schemaname = current_schema() AND tablename = %s)",
        (source, source),
    ).fetchall()
    for grantee, privilege in grants:
        conn.execute(
            sql.SQL("GRANT {} ON {} TO {}").format(
                sql.SQL(privilege), sql.Identifier(target),
                sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee),
            )
        )  # fmt: skip


def read_range(
    kafka: Mapping[str, Any],
    decoder: RecordDecoder,
    start: Mapping[TopicPartition, int],
    end: Mapping[TopicPartition, int],
    *,
    name: str,
) -> Sequence[EventRecord]:
    """The decodable records from ``start`` up to (not including) ``end`` per partition
    (of the decoder's event types).

    Undecodable ones were dead-lettered by whoever read them first, and are skipped.

    Raises:
        RetryableError: the partitions were not read to ``end`` within 60 s.
    """
    starts = {tp: start.get(tp, 0) for tp, off in end.items() if start.get(tp, 0) < off}
    if not starts:
        return []
    consumer = Consumer(consumer_config(kafka, f"opsflow-projection-{name}__swap"))
    records: list[EventRecord] = []
    try:
        for msg in ReadToEnd(consumer, starts, ends=end, timeout_s=60, batch=5000, wait_s=0.2):
            with contextlib.suppress(BadInputError):
                record = decoder.select(msg)
                if record is not None:
                    records.append(record)
    finally:
        consumer.close()
    return records
