"""PostgreSQL access: connections and versioned schema migrations.

Migrations are the ``NNNN_name.sql`` files in ``opsflow/migrations``, applied
in order and recorded in ``opsflow_migrations``. They run under a
transaction-scoped advisory lock, so two processes starting at once apply each
file exactly once: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import psycopg

from opsflow.errors import ConfigurationError

# An arbitrary constant shared by every opsflow process: the advisory lock key
# that serialises migrations on one database.
_MIGRATION_LOCK_KEY = 0x0F5F10


def connect(url: str, *, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection, turning an unusable URL into a ConfigurationError.

    Raises:
        ConfigurationError: the URL is malformed or the server cannot be reached.
    """
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=5, **kwargs)
    except (psycopg.OperationalError, psycopg.ProgrammingError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigurationError(
            "DATABASE_URL",
            f"cannot connect to PostgreSQL at {redact(url)} ({first_line})",
            "Point DATABASE_URL at a running server (postgresql://user@host:port/db) "
            "or unset it to use the embedded one.",
        ) from err


def redact(url: str) -> str:
    """Hide the password of a connection URL so it can be printed."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def migration_files() -> list[tuple[int, str, str]]:
    """Return ``(version, name, sql)`` for every shipped migration, in order."""
    found = []
    for entry in resources.files("opsflow.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(url: str) -> list[int]:
    """Apply every migration not yet applied; safe to call from many processes at once.

    Returns:
        The versions applied by this call (empty when the schema was current).
    """
    applied: list[int] = []
    with connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS opsflow_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM opsflow_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            conn.execute(sql.encode())
            conn.execute(
                "INSERT INTO opsflow_migrations (version, name) VALUES (%s, %s)",
                (version, name),
            )
            applied.append(version)
    return applied


@contextmanager
def requires_table(table: str) -> Iterator[None]:
    """Turn a missing ``table`` into a ConfigurationError that says to apply the migrations."""
    try:
        yield
    except psycopg.errors.UndefinedTable as err:
        raise ConfigurationError(
            "DATABASE_URL",
            f"the database has no {table} table (migrations not applied)",
            "Run `python -m opsflow.provision` against it, or start the stack with `opsflow up`",
        ) from err
