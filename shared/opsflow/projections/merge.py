"""Merged tables: rows folded from partial rows, written with one COPY and one merge.

A read model row gathers facts from events of several topics, and on a replay
those topics are read side by side, so a later step's event can arrive before
an earlier one's. A ``MergeTable`` makes the row independent of arrival order:
every event contributes a *partial row* (only the columns it knows), and each
column says how two values combine:

- ``first``: the value once known (facts set by one event; a repeat writes the same);
- ``greatest`` / ``least``: the larger / smaller of the two;
- ``latest``: a group of columns taken together from the partial with the larger
  *causal key* (a number the projection derives from the event: its step in the
  workflow, an attempt number, an escalation tier), never from the one that
  merely arrived later.

The same rules fold a batch's partials in Python (one row per key) and merge
that row into the table in SQL, so the result is the same whatever the batch
boundaries. Writing is set-based: the batch's rows are COPYed into a
temporary staging table and merged with one ``INSERT ... ON CONFLICT DO
UPDATE``; a per-event round trip would cap a rebuild at a few thousand events/s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from opsflow.projections.projection import Apply, Tables
from opsflow.projections.records import EventRecord

Row = dict[str, Any]

# Column types staged in their binary form, from the Python values partial rows hold
# (timestamptz as bigint epoch milliseconds); any other type is staged as its text
# form and cast in the merge, as a text COPY would parse it (a uuid arrives as a str).
_BINARY = frozenset({"text", "text[]", "integer", "bigint", "smallint", "boolean", "timestamptz"})
# How PostgreSQL's format_type names the declared types that differ (``load``).
_PG_TYPE_NAMES = {"timestamptz": "timestamp with time zone"}
# 2000-01-01 UTC, PostgreSQL's timestamp epoch, in Unix epoch milliseconds.
_PG_EPOCH_MS = 946_684_800_000


def _staged_type(kind: str) -> str:
    if kind == "timestamptz":
        return "bigint"
    return kind if kind in _BINARY else "text"


@dataclass(frozen=True)
class Latest:
    """Columns taken together from the partial row with the larger ``key``."""

    key: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class MergeTable:
    """A table whose rows are merged from partial rows.

    Args:
        name: the table's logical name (a rebuild writes to a shadow table of it).
        key: the primary key columns.
        columns: every column with its SQL type, in table order; ``timestamptz``
            columns take epoch milliseconds in partial rows.
        first, greatest, least, latest: how each non-key column combines.
    """

    name: str
    key: tuple[str, ...]
    columns: Mapping[str, str]
    first: tuple[str, ...] = ()
    greatest: tuple[str, ...] = ()
    least: tuple[str, ...] = ()
    latest: tuple[Latest, ...] = ()
    _names: tuple[str, ...] = field(init=False, repr=False)
    _rules: dict[str, Any] = field(init=False, repr=False)
    _staged_types: tuple[str, ...] = field(init=False, repr=False)
    _as_text: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(self.columns)
        ruled = [*self.key, *self.first, *self.greatest, *self.least]
        for group in self.latest:
            ruled += [group.key, *group.columns]
        if sorted(ruled) != sorted(names):
            missing = set(names) - set(ruled)
            extra = [c for c in ruled if c not in names or ruled.count(c) > 1]
            raise ValueError(
                f"{self.name}: every column needs exactly one rule "
                f"(without a rule: {sorted(missing)}; unknown or twice: {sorted(set(extra))})"
            )
        # Per column of a partial, what combining does with it: "first", "greatest",
        # "least", a Latest group (its key), or nothing (keys, and the columns of a
        # group, which go with its key).
        rules: dict[str, Any] = dict.fromkeys(self.first, "first")
        rules |= dict.fromkeys(self.greatest, "greatest")
        rules |= dict.fromkeys(self.least, "least")
        rules |= {group.key: group for group in self.latest}
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_rules", rules)
        object.__setattr__(
            self,
            "_staged_types",
            tuple(_staged_type(kind) for kind in self.columns.values()),
        )
        object.__setattr__(
            self,
            "_as_text",
            tuple(i for i, kind in enumerate(self.columns.values()) if kind not in _BINARY),
        )

    # --- folding in Python ---------------------------------------------------------------

    def fold(self, partials: Iterable[Row]) -> list[Row]:
        """One row per key, combining the partials by the column rules."""
        rows: dict[Any, Row] = {}
        add = self.add
        for partial in partials:
            add(rows, partial)
        return list(rows.values())

    def add(self, rows: dict[Any, Row], partial: Row) -> None:
        """Fold one partial row into ``rows`` (folded rows by key), in place."""
        keys = partial[self.key[0]] if len(self.key) == 1 else tuple(partial[k] for k in self.key)
        row = rows.get(keys)
        if row is None:
            rows[keys] = dict(partial)
        else:
            self._combine(row, partial)

    def _combine(self, row: Row, new: Row) -> None:
        """Combine ``new`` into ``row``; only the columns ``new`` has can change anything
        (a column it lacks counts as null)."""
        rules = self._rules
        for col, value in new.items():
            rule = rules.get(col)
            if rule is None or value is None:
                continue
            if rule == "first":
                if row.get(col) is None:
                    row[col] = value
            elif rule == "greatest":
                old = row.get(col)
                if old is None or value > old:
                    row[col] = value
            elif rule == "least":
                old = row.get(col)
                if old is None or value < old:
                    row[col] = value
            else:  # a Latest group, by its key
                old = row.get(col)
                if old is None or value > old:
                    row[col] = value
                    for member in rule.columns:
                        row[member] = new.get(member)

    # --- writing in SQL ----------------------------------------------------------------

    def _stage(self) -> sql.Identifier:
        return sql.Identifier(f"_stage_{self.name}")

    def write(self, conn: psycopg.Connection[Any], table: str, rows: Sequence[Row]) -> None:
        """Merge ``rows`` (folded, one per key) into ``table`` inside the caller's transaction."""
        if not rows:
            return
        stage = self._stage()
        staged_types = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(col), sql.SQL(kind))
            for col, kind in zip(self._names, self._staged_types, strict=True)
        )
        conn.execute(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
                stage, staged_types
            )
        )
        # Emptied at commit, but not when a savepoint is released: a transaction that
        # writes record by record (``ProjectionRunner._one_by_one``) would otherwise
        # merge the previous records' rows again, and one order's two records would
        # make the merge touch its row twice (CardinalityViolation). Nearly free
        # otherwise: the table is empty.
        conn.execute(sql.SQL("DELETE FROM {}").format(stage))
        names = self._names
        cols = sql.SQL(", ").join(map(sql.Identifier, names))
        with conn.cursor() as cur:
            # Binary, with the types given: psycopg then converts in C without
            # looking at each value's Python type.
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(stage, cols)
            with cur.copy(copy_sql) as copy:
                copy.set_types(self._staged_types)
                write_row, as_text = copy.write_row, self._as_text
                for row in rows:
                    values = [row.get(col) for col in names]
                    for i in as_text:
                        if values[i] is not None:
                            values[i] = str(values[i])
                    write_row(values)
            cur.execute(self._merge_sql(table))

    def load(self, conn: psycopg.Connection[Any], table: str, rows: Sequence[Row]) -> None:
        """Write folded ``rows`` into ``table`` inside the caller's transaction: one binary
        COPY straight into the table when none of their keys is there yet (a rebuild's
        shadow table), else the staging merge of ``write``.

        The COPY writes each row once, where the merge COPYs it into the staging
        table and then inserts it again with ``ON CONFLICT`` (the merge was 22% of
        a rebuild's worker time, writing each order's row 3.9 times; folded and
        loaded, writing is about 5%: py-spy on ``tests/bench/rebuild.py``). A key
        already in the table (rows from an earlier load) fails the COPY,
        which is rolled back to a savepoint and merged instead; so does a table
        whose columns are not exactly the declared types (the binary format
        would not match).
        """
        if not rows:
            return
        if not self._loadable(conn, table):
            self.write(conn, table, rows)
            return
        names = self._names
        stamps = tuple(i for i, kind in enumerate(self.columns.values()) if kind == "timestamptz")
        cols = sql.SQL(", ").join(map(sql.Identifier, names))
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(table), cols
        )
        try:
            with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as copy:
                # A timestamptz travels in binary as int8 microseconds since 2000-01-01
                # UTC, so epoch milliseconds are sent as that bigint, with no datetime
                # built per value (about ten per orders_current row).
                copy.set_types(self._staged_types)
                write_row = copy.write_row
                for row in rows:
                    values = [row.get(col) for col in names]
                    for i in stamps:
                        stamp = values[i]
                        if stamp is not None:
                            values[i] = (stamp - _PG_EPOCH_MS) * 1000
                    write_row(values)
        except psycopg.errors.UniqueViolation:
            self.write(conn, table, rows)

    def _loadable(self, conn: psycopg.Connection[Any], table: str) -> bool:
        """Whether ``table``'s columns are the declared types, all sent in binary as is."""
        found = dict(
            conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (sql.Identifier(table).as_string(conn),),
            ).fetchall()
        )
        return all(
            kind in _BINARY and found.get(col) == _PG_TYPE_NAMES.get(kind, kind)
            for col, kind in self.columns.items()
        )

    def _merge_sql(self, table: str) -> sql.Composed:
        def staged(col: str) -> sql.Composable:
            ident = sql.Identifier(col)
            kind = self.columns[col]
            if kind == "timestamptz":
                return sql.SQL("to_timestamp({} / 1000.0)").format(ident)
            if kind not in _BINARY:
                return sql.SQL("CAST({} AS {})").format(ident, sql.SQL(kind))
            return ident

        t = sql.Identifier(table)

        def old(col: str) -> sql.Composable:
            return sql.SQL("t.{}").format(sql.Identifier(col))

        def new(col: str) -> sql.Composable:
            return sql.SQL("EXCLUDED.{}").format(sql.Identifier(col))

        sets: list[sql.Composable] = []
        for col in self.first:
            sets.append(
                sql.SQL("{} = COALESCE({}, {})").format(sql.Identifier(col), old(col), new(col))
            )
        for col in self.greatest:
            sets.append(
                sql.SQL("{} = GREATEST({}, {})").format(sql.Identifier(col), old(col), new(col))
            )
        for col in self.least:
            sets.append(
                sql.SQL("{} = LEAST({}, {})").format(sql.Identifier(col), old(col), new(col))
            )
        for group in self.latest:
            wins = sql.SQL("{n} IS NOT NULL AND ({o} IS NULL OR {n} > {o})").format(
                n=new(group.key), o=old(group.key)
            )
            for col in (group.key, *group.columns):
                sets.append(
                    sql.SQL("{} = CASE WHEN {} THEN {} ELSE {} END").format(
                        sql.Identifier(col), wins, new(col), old(col)
                    )
                )
        conflict = (
            sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(sets))
            if sets
            else sql.SQL("DO NOTHING")
        )
        return sql.SQL(
            "INSERT INTO {t} AS t ({cols}) SELECT {values} FROM {stage}"
            " ON CONFLICT ({key}) {conflict}"
        ).format(
            t=t,
            cols=sql.SQL(", ").join(map(sql.Identifier, self._names)),
            values=sql.SQL(", ").join(staged(col) for col in self._names),
            stage=self._stage(),
            key=sql.SQL(", ").join(map(sql.Identifier, self.key)),
            conflict=conflict,
        )


After = Callable[[psycopg.Connection[Any], Sequence[Row], Tables], None]
"""Work after a batch's rows are merged (a roll-up of the rows it touched), given those
rows; skipped in a rebuild's bulk replay (``Projection.finish`` does it once)."""


@dataclass(frozen=True)
class Merging:
    """A projection's ``apply`` that merges each record's partial row (None: the record
    says nothing about this table) into ``table``, then runs ``after`` unless ``bulk``.
    A class, not a closure: a rebuild's worker processes receive the projection pickled.

    A rebuild folds a whole replay with ``fold`` instead, in memory, and writes the
    rows once with ``load`` (``ProjectionRunner``'s ``fold``).
    """

    table: MergeTable
    partial: Callable[[EventRecord], Row | None]
    after: After | None = None

    def __call__(
        self,
        conn: psycopg.Connection[Any],
        records: Sequence[EventRecord],
        tables: Tables,
        bulk: bool,
    ) -> None:
        rows = self.table.fold(p for p in map(self.partial, records) if p is not None)
        self.table.write(conn, tables[self.table.name], rows)
        if rows and self.after is not None and not bulk:
            self.after(conn, rows, tables)

    def fold(
        self, records: Iterable[EventRecord], rows: dict[Any, Row]
    ) -> list[tuple[EventRecord, Exception]]:
        """Fold ``records`` into ``rows`` in place; the records whose partial row could
        not be made, with the error (the others are folded all the same)."""
        failed: list[tuple[EventRecord, Exception]] = []
        partial, add = self.partial, self.table.add
        for record in records:
            try:
                row = partial(record)
            except Exception as err:  # a bug or data the projection cannot take: that record's
                failed.append((record, err))
                continue
            if row is not None:
                add(rows, row)
        return failed

    def load(self, conn: psycopg.Connection[Any], rows: Sequence[Row], tables: Tables) -> None:
        """Write rows folded by ``fold`` (``MergeTable.load``)."""
        self.table.load(conn, tables[self.table.name], rows)


def merging(
    table: MergeTable, partial: Callable[[EventRecord], Row | None], after: After | None = None
) -> Apply:
    """The ``apply`` of a projection whose rows are merged from partial rows (``Merging``)."""
    return Merging(table, partial, after)
