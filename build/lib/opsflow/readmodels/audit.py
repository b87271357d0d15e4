"""``audit_log``: every event of every topic, append only, in a hash chain.

Each row keeps what happened (event type, workflow instance, time), who did it (the
producing service and, for a person's decision, the person), what caused it
(causation and correlation ids), where it sits in the log, and the SHA-256 of
the record's bytes as written. Rows are chained: ``row_hash = sha256(prev_hash
|| content)``, with ``prev_hash`` the previous row's ``row_hash`` (32 zero
bytes for the first), so changing, removing or reordering a row breaks the
chain from that row on. ``verify`` recomputes it and names the first row
that does not match. The chain's order is the order this database appended
the rows in: a rebuild keeps every row's content but may chain them in
another order, so the rebuild checksum leaves ``seq`` and the hashes out.
Removing rows at the very end cannot be seen from the chain alone: keep the
head hash ``verify`` prints somewhere else to check it later.

``audit_copies``: where the other records of an event are, when it was
written more than once (a replay, a redrive, an aborted transaction a broker
let through). The audit log keeps an event's first record; with the copies,
the two tables name every record of an instance up to the projection's
position, which is what lets ``opsflow trace`` read just those records
instead of every topic from the beginning (``opsflow.trace``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from opsflow.contracts import Topic
from opsflow.projections import EventRecord, Projection, Tables

GENESIS = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COLUMNS = (
    "seq", "event_id", "event_type", "instance_key", "occurred_at", "producer", "actor",
    "correlation_id", "causation_id", "idempotency_key", "topic", "partition", "offset",
    "value_sha256", "prev_hash", "row_hash",
)  # fmt: skip


def content(
    event_id: str, event_type: str, instance_key: str, occurred_at_ms: int, producer: str,
    actor: str | None, correlation_id: str, causation_id: str | None, idempotency_key: str,
    topic: str, partition: int, offset: int, value_sha256: bytes,
) -> bytes:  # fmt: skip
    """The bytes a row's hash covers: its columns, unambiguously serialised."""
    return json.dumps(
        [event_id, event_type, instance_key, occurred_at_ms, producer, actor, correlation_id,
         causation_id, idempotency_key, topic, partition, offset, value_sha256.hex()],
        separators=(",", ":"),
    ).encode()  # fmt: skip


def chain(prev_hash: bytes, row_content: bytes) -> bytes:
    return hashlib.sha256(prev_hash + row_content).digest()


def _actor(data: dict[str, Any]) -> str | None:
    actor = data.get("actor")
    return actor["user_id"] if isinstance(actor, dict) else None


def apply(
    conn: psycopg.Connection[Any], records: Sequence[EventRecord], tables: Tables, bulk: bool
) -> None:
    table = sql.Identifier(tables["audit_log"])
    fresh: dict[str, EventRecord] = {}
    for record in records:
        fresh.setdefault(str(record.event_id), record)
    if not fresh:
        return
    first = {event_id: _where(record) for event_id, record in fresh.items()}
    # One writer at a time appends to the chain (readers are not blocked): two
    # projector instances on different partitions would otherwise both take the
    # same head.
    conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
    seen = conn.execute(
        sql.SQL(
            'SELECT event_id::text, topic, partition, "offset" FROM {}'
            " WHERE event_id = ANY(%s::uuid[])"
        ).format(table),
        (list(fresh),),
    ).fetchall()
    for event_id, topic, partition, offset in seen:
        del fresh[event_id]
        first[event_id] = (topic, partition, offset)
    _copies(conn, records, first, tables["audit_copies"])
    head = conn.execute(
        sql.SQL("SELECT seq, row_hash FROM {} ORDER BY seq DESC LIMIT 1").format(table)
    ).fetchone()
    seq, prev = (head[0], bytes(head[1])) if head else (0, GENESIS)
    with conn.cursor() as cur:
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
            table, sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        )
        with cur.copy(copy_sql) as copy:
            for record in fresh.values():
                env, data = record.envelope, record.data
                digest = record.value_sha256()
                fields = (
                    record.event_id, record.event_type, record.key, record.occurred_at_ms,
                    env["producer"], _actor(data), env["correlation_id"], env["causation_id"],
                    env["idempotency_key"], record.topic, record.partition, record.offset, digest,
                )  # fmt: skip
                row_hash = chain(prev, content(*fields))
                seq += 1
                copy.write_row(
                    (seq, *fields[:3], _timestamp(fields[3]), *fields[4:], prev, row_hash)
                )
                prev = row_hash


def _where(record: EventRecord) -> tuple[str, int, int]:
    return record.topic, record.partition, record.offset


def _copies(
    conn: psycopg.Connection[Any],
    records: Sequence[EventRecord],
    first: dict[str, tuple[str, int, int]],
    table: str,
) -> None:
    """Keep where the records are that repeat an event of ``first`` (event id -> where its
    audit row's record is). A record read again (the same position) is not a copy."""
    copies = {
        _where(record): record
        for record in records
        if _where(record) != first[str(record.event_id)]
    }
    if not copies:
        return
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                'INSERT INTO {} (topic, partition, "offset", event_id, instance_key)'
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
            ).format(sql.Identifier(table)),
            [(*where, r.event_id, r.key) for where, r in copies.items()],
        )


def _timestamp(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


@dataclass(frozen=True)
class Verdict:
    """What ``verify`` found: how many rows it checked, the head hash, the first bad row."""

    rows: int
    head_hash: bytes
    first_bad_seq: int | None = None
    first_bad_event_id: str | None = None
    problem: str | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None


def _rows(conn: psycopg.Connection[Any], table: str) -> Iterator[tuple[Any, ...]]:
    query = sql.SQL(
        "SELECT seq, event_id::text, event_type, instance_key,"
        " (extract(epoch FROM occurred_at) * 1000)::bigint, producer, actor, correlation_id,"
        ' causation_id, idempotency_key, topic, partition, "offset", value_sha256,'
        " prev_hash, row_hash FROM {} ORDER BY seq"
    ).format(sql.Identifier(table))
    with conn.cursor(name="audit_verify") as cur:
        cur.itersize = 10_000
        cur.execute(query)
        yield from cur


def verify(conn: psycopg.Connection[Any], table: str = "audit_log") -> Verdict:
    """Recompute the chain; the first row that does not match is named."""
    expected_seq, prev, count = 1, GENESIS, 0
    with conn.transaction():
        for row in _rows(conn, table):
            seq, event_id = row[0], row[1]
            stored_prev, stored_hash = bytes(row[14]), bytes(row[15])
            problem = None
            if seq != expected_seq:
                problem = f"row {expected_seq} is missing (the chain jumps to {seq})"
            elif stored_prev != prev:
                problem = (
                    "its prev_hash is not the previous row's hash (a row before it was changed)"
                )
            elif chain(prev, content(*row[1:13], bytes(row[13]))) != stored_hash:  # type: ignore[call-arg]
                problem = "its content does not match its row_hash (the row was changed)"
            if problem:
                return Verdict(count, prev, seq, event_id, problem)
            prev, expected_seq, count = stored_hash, seq + 1, count + 1
    return Verdict(count, prev)


def projection(topics: tuple[Topic, ...]) -> Projection:
    """The audit log of an application's topics (every one of them)."""
    return Projection(
        name="audit_log",
        topics=topics,
        tables=("audit_log", "audit_copies"),
        apply=apply,
        description="every event, append only, tamper-evident hash chain (and its copies)",
        volatile_columns={"audit_log": ("seq", "prev_hash", "row_hash")},
    )
