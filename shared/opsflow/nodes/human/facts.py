"""What a person deciding a task sees of its workflow instance: facts the application declares.

A task's own state says why it needs a person, not what is being decided: for
that the application declares ``HumanTask.facts``, a function given a
read-only PostgreSQL connection and the instance's key that returns titled
sections of labelled values or tables, read from its read models (the order,
its items, the customer's earlier orders and decisions) and the audit log
(the instance's history). The library knows no workflow: it runs the function
when a task's page is drawn and renders whatever it returns, escaped like
every value on the page. Nothing the browser sends reaches the function but
the task id, which the step's own table turns into the key.

The read models follow the log through the projector: a task opened a moment
ago may find its instance not projected yet, which is why a section says so
(``empty``) rather than the page failing, and why the page refreshes itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

log = logging.getLogger("opsflow.nodes.human")


@dataclass(frozen=True)
class Fact:
    """One labelled value ("Amount": "1,250.00 EUR")."""

    label: str
    value: str


@dataclass(frozen=True)
class Section:
    """A titled group of facts: labelled values, a table (``columns`` and ``rows``), or both.

    Attributes:
        title: the section's heading ("Order", "Customer's earlier orders").
        facts: labelled values, in order.
        columns / rows: a table, each row as many cells as there are columns.
        empty: what the page says when the section has nothing (no facts, no rows).
    """

    title: str
    facts: tuple[Fact, ...] = ()
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    empty: str = "Nothing recorded."

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(
                    f"section {self.title!r} has a row of {len(row)} cells for "
                    f"{len(self.columns)} columns"
                )


FactsReader = Callable[[psycopg.Connection[Any], str], Sequence[Section]]
"""``HumanTask.facts``: the sections about the instance with this key, read through the
connection (a read-only transaction)."""


def read_facts(pool: ConnectionPool[Any], reader: FactsReader, key: str) -> list[Section]:
    """``reader``'s sections about ``key``, read in a read-only transaction, so a declared
    query cannot change what it reads.

    Raises:
        psycopg.Error: the database refused or is unreachable (the page shows why).
    """
    with pool.connection() as conn, conn.transaction(force_rollback=True):
        conn.execute("SET TRANSACTION READ ONLY")
        return list(reader(conn, key))
