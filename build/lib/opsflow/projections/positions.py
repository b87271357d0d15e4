"""Where each projection stands in its topics, stored beside its rows.

One row per (projection, topic, partition): the offset of the next record to
apply. It is written in the same transaction as the rows that record produced,
so after any crash the tables and the position agree, and a restart resumes
exactly there without consumer-group state.

Moving a position is *fenced*: the update names the offset the writer
believes is stored and changes nothing if another writer moved it first (a
second projector instance, or a rebuild that swapped its tables in). The
loser rolls back and re-reads where it stands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

TopicPartition = tuple[str, int]


class Fenced(Exception):
    """The stored position was not where this writer left it: someone else moved it."""


@dataclass(frozen=True)
class Move:
    """Advance one partition from ``expected`` to ``new``; ``last_event_ms`` is the
    timestamp of the last record applied (None: only markers were passed)."""

    expected: int
    new: int
    last_event_ms: int | None


def ensure(
    conn: psycopg.Connection[Any], key: str, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    """The stored positions of ``key``, starting new partitions at offset 0."""
    parts = sorted(partitions)
    conn.execute(
        "INSERT INTO projection_positions (projection, topic, partition, next_offset)"
        " SELECT %s, t, p, 0 FROM unnest(%s::text[], %s::int[]) AS u(t, p)"
        " ON CONFLICT DO NOTHING",
        (key, [t for t, _ in parts], [p for _, p in parts]),
    )
    return load(conn, key)


def load(
    conn: psycopg.Connection[Any], key: str, *, for_update: bool = False
) -> dict[TopicPartition, int]:
    """The stored positions of ``key``; ``for_update`` locks them until the transaction ends,
    which holds back every writer of ``key`` (their fenced move waits on the lock)."""
    lock = " FOR UPDATE" if for_update else ""
    rows = conn.execute(
        "SELECT topic, partition, next_offset FROM projection_positions"
        f" WHERE projection = %s ORDER BY topic, partition{lock}",
        (key,),
    ).fetchall()
    return {(topic, partition): offset for topic, partition, offset in rows}


def advance(conn: psycopg.Connection[Any], key: str, moves: Mapping[TopicPartition, Move]) -> None:
    """Move positions inside the caller's transaction.

    Call it first in the transaction: it takes the rows' locks before any table is
    touched, so a rebuild swapping tables never waits on a writer that waits on it.

    Raises:
        Fenced: a position was not at its expected offset; roll back and re-read.
    """
    if not moves:
        return
    items = sorted(moves.items())
    cur = conn.execute(
        "UPDATE projection_positions AS p"
        " SET next_offset = u.new,"
        "   last_event_at = COALESCE(to_timestamp(u.ts / 1000.0), p.last_event_at)"
        " FROM unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[], %s::bigint[])"
        "   AS u(topic, partition, expected, new, ts)"
        " WHERE p.projection = %s AND p.topic = u.topic AND p.partition = u.partition"
        "   AND p.next_offset = u.expected",
        (
            [t for (t, _), _ in items],
            [p for (_, p), _ in items],
            [m.expected for _, m in items],
            [m.new for _, m in items],
            [m.last_event_ms for _, m in items],
            key,
        ),
    )
    if cur.rowcount != len(items):
        raise Fenced(f"positions of {key} were moved by another writer")


def replace(
    conn: psycopg.Connection[Any],
    key: str,
    positions: Mapping[TopicPartition, int],
    *,
    taken_from: str,
) -> None:
    """Set ``key``'s positions outright (a rebuild carrying its position over), keeping
    the latest record time either ``key`` or ``taken_from`` had per partition."""
    items = sorted(positions.items())
    conn.execute(
        "CREATE TEMP TABLE _carried ON COMMIT DROP AS"
        " SELECT topic, partition, max(last_event_at) AS last_event_at FROM projection_positions"
        " WHERE projection IN (%s, %s) GROUP BY topic, partition",
        (key, taken_from),
    )
    conn.execute("DELETE FROM projection_positions WHERE projection = %s", (key,))
    conn.execute(
        "INSERT INTO projection_positions"
        " (projection, topic, partition, next_offset, last_event_at)"
        " SELECT %s, u.t, u.p, u.o, c.last_event_at"
        " FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS u(t, p, o)"
        " LEFT JOIN _carried AS c ON c.topic = u.t AND c.partition = u.p",
        (key, [t for (t, _), _ in items], [p for (_, p), _ in items], [o for _, o in items]),
    )


def forget(conn: psycopg.Connection[Any], key: str) -> None:
    conn.execute("DELETE FROM projection_positions WHERE projection = %s", (key,))


def record_error(conn: psycopg.Connection[Any], name: str, error: str) -> None:
    """Note a projection's latest error (shown by ``opsflow projections list``)."""
    conn.execute(
        "INSERT INTO projection_status (projection, last_error, last_error_at)"
        " VALUES (%s, %s, now()) ON CONFLICT (projection) DO UPDATE"
        " SET last_error = EXCLUDED.last_error, last_error_at = EXCLUDED.last_error_at",
        (name, error[:2000]),
    )
