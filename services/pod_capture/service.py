"""The pod-capture runtime service: keeps the dispatched bookings the webhook matches against.

``opsflow run services.pod_capture`` consumes the dispatch topic and records
every ``dispatch.executed`` in ``pod_capture_dispatches`` (``store``). The write
is idempotent, so the runtime's retries and a replay of the whole topic are
harmless, and it emits nothing: ``pod.captured`` is written by the webhook when
a carrier's POD matches a row. Other dispatch events are passed over.

The connection pool is made on the first event, from ``DATABASE_URL``, and the
migrations are applied then (under their advisory lock), so the service works
on a fresh database and importing this module costs nothing. A database that
is unset, unreachable or busy makes the handler raise ``RetryableError``: the
partition waits and retries with backoff (logged) rather than dead-lettering
dispatches whose PODs would then be refused as unknown.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from opsflow.db import migrate, redact
from opsflow.errors import ConfigurationError, RetryableError
from opsflow.runtime import Service
from opsflow.settings import DatabaseSettings
from services.contracts import DISPATCH, DispatchExecuted
from services.pod_capture.store import record_dispatch

log = logging.getLogger("services.pod_capture")

# It emits nothing: pod.captured is the webhook's, written through the producer
# SDK. Declaring no output keeps the runtime from scanning the pod topic for
# outputs of its own after every rebalance (it scans its dead letters only).
service = Service("pod-capture", consumes=[DISPATCH], produces=[])


class _Database:
    """The service's connection pool, opened on first use."""

    _pool: ConnectionPool[Any] | None = None
    _opening = threading.Lock()

    @classmethod
    def pool(cls) -> ConnectionPool[Any]:
        with cls._opening:
            if cls._pool is None:
                url = DatabaseSettings().database_url
                if not url:
                    raise ConfigurationError(
                        "DATABASE_URL",
                        "is not set; pod-capture keeps the dispatched bookings in PostgreSQL",
                        "Set it, or run the service under `opsflow up`",
                    )
                migrate(url)
                # One handler runs at a time (plain function): two connections
                # leave one spare for a reconnect. Autocommit: the one write
                # per event stands on its own, so a COMMIT would only add a
                # round trip.
                pool: ConnectionPool[Any] = ConnectionPool(
                    url,
                    open=False,
                    min_size=1,
                    max_size=2,
                    kwargs={"connect_timeout": 5, "autocommit": True},
                    name=f"pod-capture {redact(url)}",
                )
                pool.open(wait=True, timeout=30)
                cls._pool = pool
            return cls._pool


@service.handler
def remember(dispatched: DispatchExecuted) -> None:
    """Record the booking so the webhook can match its POD; nothing is emitted.

    Raises:
        RetryableError: PostgreSQL is unset, unreachable or busy; the runtime retries.
    """
    try:
        with _Database.pool().connection() as conn:
            new = record_dispatch(conn, dispatched)
    except (psycopg.OperationalError, PoolTimeout, ConfigurationError) as err:
        raise RetryableError(f"PostgreSQL did not take the dispatch record: {err}") from err
    if new:
        log.info(
            "dispatch recorded",
            extra={
                "order_id": dispatched.order_id,
                "correlation_id": dispatched.order_id,
                "booking_reference": dispatched.booking_reference,
                "carrier": dispatched.carrier,
            },
        )
