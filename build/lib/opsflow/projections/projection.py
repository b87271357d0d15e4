"""What a projection is: the topics it reads, the tables it owns, and how a batch is written.

    invoices_current = Projection(
        name="invoices_current",
        topics=(INVOICES, APPROVALS),
        tables=("invoices_current",),
        apply=write_invoices,        # (conn, records, tables, bulk) -> None
    )

``apply`` gets a batch of decoded records (``EventRecord``) and the physical
name of each of its tables (the live ones, or the shadow tables a rebuild
fills), and writes inside the transaction the runner opened, which also
stores the projection's position: the rows and the offsets they came from
commit together or not at all. ``apply`` must be idempotent per event (a
record can be read twice: a broker that lets aborted records through, a
replay), and independent of arrival order across topics (see
``opsflow.projections.merge``).

``bulk`` is true while a rebuild replays the topics into shadow tables: work
whose result only matters once the replay is over (a roll-up recomputed per
batch) may then be skipped, and is done once by ``finish`` before the swap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from opsflow.contracts import Topic
from opsflow.projections.records import EventRecord

Tables = Mapping[str, str]
"""A projection's table (logical name) -> the table to write (live or shadow)."""

Apply = Callable[[psycopg.Connection[Any], Sequence[EventRecord], Tables, bool], None]
Finish = Callable[[psycopg.Connection[Any], Tables], None]


@dataclass(frozen=True)
class Projection:
    """A read model kept from topics.

    Args:
        name: how operators name it (``opsflow projections rebuild NAME``); also
            the key of its stored position.
        topics: the contract topics it reads.
        tables: the tables it owns, all rebuilt and swapped together.
        apply: writes a batch (see the module docstring).
        description: one line for ``opsflow projections list``.
        finish: work skipped during a rebuild's bulk replay, done once before the swap.
        volatile_columns: per table, columns left out of the rebuild checksum
            because they record *this database's* history, not the log's (the
            audit log's chain position and hashes).
        event_types: the event types ``apply`` uses (None: every type on its
            topics); records of other types are passed over without being decoded,
            their offsets still moving the position.
    """

    name: str
    topics: tuple[Topic, ...]
    tables: tuple[str, ...]
    apply: Apply
    description: str = ""
    finish: Finish | None = None
    volatile_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    event_types: frozenset[str] | None = None

    def live_tables(self) -> Tables:
        return {table: table for table in self.tables}

    def shadow_tables(self) -> Tables:
        return {table: shadow_name(table) for table in self.tables}


def shadow_name(table: str) -> str:
    """The table a rebuild fills before it replaces ``table``."""
    return f"{table}__rebuild"
