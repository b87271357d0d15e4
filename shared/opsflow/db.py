"""PostgreSQL access: connections and versioned schema migrations.

Migrations are the ``NNNN_name.sql`` files in ``opsflow/migrations`` (opsflow's
own tables), then those of the application's package (``Application.migrations``,
its services' tables and read models), each applied in order and recorded in
``opsflow_migrations`` under its owner. They run under a transaction-scoped
advisory lock, so two processes starting at once apply each file exactly once:
the second waits, then finds nothing left to do.

A file whose first line is ``-- formerly opsflow NNNN`` holds tables that
opsflow's own migration NNNN used to create: on a database that has it, the
file is recorded as applied without running (its tables are there already).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from opsflow.application import Application, load_application
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


OPSFLOW = "opsflow"
_FORMERLY = re.compile(r"-- formerly opsflow (\d{4})\b")


@dataclass(frozen=True)
class Migration:
    owner: str  # "opsflow", or the application's name
    version: int
    name: str
    sql: str

    @property
    def formerly(self) -> int | None:
        """The version of opsflow's own migration that used to create these tables."""
        found = _FORMERLY.match(self.sql)
        return int(found[1]) if found else None


def migration_files(application: Application | None = None) -> list[Migration]:
    """opsflow's migrations, then ``application``'s (default: the one in use, if any; each
    part's, in turn, for a combination)."""
    if application is None:
        try:
            application = load_application()
        except ConfigurationError:  # no application: opsflow's own tables only
            application = None
    found = _files(OPSFLOW, "opsflow.migrations")
    for part in application.members if application is not None else ():
        if part.migrations:
            found += _files(part.name, part.migrations)
    return found


def _files(owner: str, package: str) -> list[Migration]:
    found = []
    for entry in resources.files(package).iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(owner, int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def migrate(url: str, application: Application | None = None) -> list[tuple[str, int]]:
    """Apply every migration not yet applied; safe to call from many processes at once.

    Returns:
        The ``(owner, version)`` of each migration applied by this call (empty when
        the schema was current), adopted ones included.
    """
    applied: list[tuple[str, int]] = []
    with connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS opsflow_migrations ("
            " owner text NOT NULL DEFAULT 'opsflow', version integer NOT NULL,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (owner, version))"
        )
        _own_migrations_table(conn)
        done = set(conn.execute("SELECT owner, version FROM opsflow_migrations").fetchall())
        for migration in migration_files(application):
            if (migration.owner, migration.version) in done:
                continue
            if (OPSFLOW, migration.formerly) not in done:
                conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO opsflow_migrations (owner, version, name) VALUES (%s, %s, %s)",
                (migration.owner, migration.version, migration.name),
            )
            applied.append((migration.owner, migration.version))
    return applied


def _own_migrations_table(conn: psycopg.Connection[Any]) -> None:
    """Give a migrations table from before owners (version alone as its key) its owners."""
    has_owner = conn.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_name = 'opsflow_migrations'"
        " AND column_name = 'owner' AND table_schema = current_schema()"
    ).fetchone()
    if has_owner is None:
        conn.execute(
            "ALTER TABLE opsflow_migrations ADD COLUMN owner text NOT NULL DEFAULT 'opsflow'"
        )
        conn.execute("ALTER TABLE opsflow_migrations DROP CONSTRAINT opsflow_migrations_pkey")
        conn.execute("ALTER TABLE opsflow_migrations ADD PRIMARY KEY (owner, version)")


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
