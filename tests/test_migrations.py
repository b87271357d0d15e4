"""Schema migrations: versioned files, applied once, even when processes start together.

opsflow's own come first, then the application's (its services' and read models'
tables); a database migrated before those moved out of opsflow keeps its tables.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg

from opsflow import db


def _shipped() -> list[tuple[str, int]]:
    return [(m.owner, m.version) for m in db.migration_files()]


def test_migrations_apply_opsflows_then_the_applications_once_each_in_order(
    database_url: str,
) -> None:
    shipped = _shipped()
    owners = list(dict.fromkeys(owner for owner, _ in shipped))
    assert owners == [db.OPSFLOW, "orders"], "opsflow's first, then the application's"
    for owner in owners:
        versions = [v for o, v in shipped if o == owner]
        assert versions == sorted(versions)
    assert db.migrate(database_url) == shipped
    assert db.migrate(database_url) == [], "a second start finds nothing to do"
    with psycopg.connect(database_url) as conn:  # the application's tables are there
        conn.execute("SELECT o.order_id FROM orders_current o, pod_capture_dispatches d LIMIT 0")


def test_processes_starting_at_once_do_not_race_on_migrations(database_url: str) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: db.migrate(database_url), range(6)))
    shipped = _shipped()
    assert sorted(v for applied in results for v in applied) == sorted(shipped), (
        "each migration was applied by exactly one of the racing starters"
    )
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT owner, version FROM opsflow_migrations").fetchall()
    assert sorted(rows) == sorted(shipped)


def test_a_database_migrated_before_the_workflows_tables_moved_keeps_them_and_its_rows(
    database_url: str,
) -> None:
    """opsflow's migrations 3, 4 and 6 used to create dispatch's, pod-capture's and the
    read models' tables, recorded by version alone: those become the application's."""
    db.migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The schema and the bookkeeping as they were: opsflow's versions 1 to 8 (the
        # audit log's instance column still named order_id, no effect claims, no key
        # scopes, no sessions, no task transitions, no operator actions, dispatch's own
        # table), no owners.
        conn.execute(
            "CREATE TABLE dispatch_orders (order_id text PRIMARY KEY, destination jsonb NOT NULL,"
            " received_event_id uuid NOT NULL, dispatch_key text, claimed_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO dispatch_orders (order_id, destination, received_event_id)"
            """ VALUES ('o-1', '{"city": "Hamburg"}', gen_random_uuid())"""
        )
        for table, index in (("audit_log", "audit_log"), ("audit_copies", "audit_copies")):
            conn.execute(f"ALTER TABLE {table} RENAME COLUMN instance_key TO order_id")
            conn.execute(f"ALTER INDEX {index}_instance RENAME TO {index}_order")
        conn.execute("DROP TABLE effect_claims")
        conn.execute("DROP TABLE opsflow_sessions")
        conn.execute("DROP TABLE task_transitions")
        conn.execute("DROP TABLE operator_actions")
        conn.execute("ALTER TABLE opsflow_api_keys DROP COLUMN events")
        # ...and orders_current without the order's facts the review page shows.
        conn.execute(
            "ALTER TABLE orders_current DROP COLUMN placed_at, DROP COLUMN destination,"
            " DROP COLUMN items, DROP COLUMN notes"
        )
        conn.execute("DROP INDEX orders_current_customer")
        conn.execute("DROP TABLE opsflow_migrations")
        conn.execute(
            "CREATE TABLE opsflow_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO opsflow_migrations (version, name) SELECT v, 'before' "
            "FROM generate_series(1, 8) AS v"
        )
    adopted = db.migrate(database_url)
    new = [(db.OPSFLOW, v) for v in range(9, 16)]
    assert adopted == new + [(o, v) for o, v in _shipped() if o == "orders"], (
        "opsflow's new ones run; the application's from opsflow recorded, its new one run"
    )
    assert db.migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        kept = conn.execute(
            "SELECT instance_key, details FROM effect_claims WHERE step = 'dispatch'"
        ).fetchall()
        owners = conn.execute(
            "SELECT owner, count(*) FROM opsflow_migrations GROUP BY owner ORDER BY owner"
        ).fetchall()
    assert kept == [("o-1", {"destination": {"city": "Hamburg"}})], "dispatch's rows moved"
    assert owners == [(db.OPSFLOW, 15), ("orders", 5)]
