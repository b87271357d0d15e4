"""Schema migrations: versioned files, applied once, even when processes start together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg

from opsflow import db


def test_migrations_apply_every_file_once_in_order(database_url: str) -> None:
    shipped = [version for version, _, _ in db.migration_files()]
    assert shipped == sorted(shipped) and shipped, "versioned files ship with the package"
    assert db.migrate(database_url) == shipped
    assert db.migrate(database_url) == [], "a second start finds nothing to do"


def test_processes_starting_at_once_do_not_race_on_migrations(database_url: str) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: db.migrate(database_url), range(6)))
    shipped = [version for version, _, _ in db.migration_files()]
    assert sorted(v for applied in results for v in applied) == shipped, (
        "each migration was applied by exactly one of the racing starters"
    )
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT version FROM opsflow_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == shipped
