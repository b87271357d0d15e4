"""Merged tables: rows folded from partial rows, written with one COPY and one merge.

A read model row gathers facts from events of several topics, and on a replay
those topics are read side by side, so an order's dispatch can arrive before
its policy check. A ``MergeTable`` makes the row independent of arrival order:
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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

Row = dict[str, Any]


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
        object.__setattr__(self, "_names", names)

    # --- folding in Python ---------------------------------------------------------------

    def fold(self, partials: Iterable[Row]) -> list[Row]:
        """One row per key, combining the partials by the column rules."""
        rows: dict[tuple[Any, ...], Row] = {}
        for partial in partials:
            key = tuple(partial[k] for k in self.key)
            row = rows.get(key)
            if row is None:
                rows[key] = dict(partial)
            else:
                self._combine(row, partial)
        return list(rows.values())

    def _combine(self, row: Row, new: Row) -> None:
        for col in self.first:
            if row.get(col) is None:
                row[col] = new.get(col)
        for col in self.greatest:
            value = new.get(col)
            if value is not None and (row.get(col) is None or value > row[col]):
                row[col] = value
        for col in self.least:
            value = new.get(col)
            if value is not None and (row.get(col) is None or value < row[col]):
                row[col] = value
        for group in self.latest:
            rank = new.get(group.key)
            if rank is not None and (row.get(group.key) is None or rank > row[group.key]):
                row[group.key] = rank
                for col in group.columns:
                    row[col] = new.get(col)

    # --- writing in SQL ----------------------------------------------------------------

    def _stage(self) -> sql.Identifier:
        return sql.Identifier(f"_stage_{self.name}")

    def write(self, conn: psycopg.Connection[Any], table: str, rows: Sequence[Row]) -> None:
        """Merge ``rows`` (folded, one per key) into ``table`` inside the caller's transaction."""
        if not rows:
            return
        stage = self._stage()
        staged_types = sql.SQL(", ").join(
            sql.SQL("{} {}").format(
                sql.Identifier(col), sql.SQL("bigint" if kind == "timestamptz" else kind)
            )
            for col, kind in self.columns.items()
        )
        conn.execute(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
                stage, staged_types
            )
        )
        names = self._names
        cols = sql.SQL(", ").join(map(sql.Identifier, names))
        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(stage, cols)) as copy:
                for row in rows:
                    copy.write_row([row.get(col) for col in names])
            cur.execute(self._merge_sql(table))

    def _merge_sql(self, table: str) -> sql.Composed:
        def staged(col: str) -> sql.Composable:
            ident = sql.Identifier(col)
            if self.columns[col] == "timestamptz":
                return sql.SQL("to_timestamp({} / 1000.0)").format(ident)
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
