"""What dispatch remembers in PostgreSQL: each order's destination and its one dispatch.

Approvals (``policy.checked``, ``review.decided``) do not carry the
destination, so dispatch keeps it from ``order.received``. Writes are
idempotent (``ON CONFLICT``), so retries and replays change nothing.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg_pool import AsyncConnectionPool

from opsflow.errors import ConfigurationError, RetryableError
from opsflow.settings import DatabaseSettings
from services.contracts import Address, OrderReceived


class Orders:
    """The ``dispatch_orders`` table, over a pool opened on the loop that uses it."""

    def __init__(self, url: str | None = None, *, size: int = 8) -> None:
        url = url or DatabaseSettings().database_url
        if not url:
            raise ConfigurationError(
                "DATABASE_URL", "is not set", "Set it, or run dispatch under `opsflow up`."
            )
        # Autocommit: every write is one statement that stands on its own, so an
        # explicit COMMIT would only add a round trip per order.
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=size, open=False, kwargs={"autocommit": True}
        )
        self._opened = False

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False

    async def _ready(self) -> AsyncConnectionPool:
        if not self._opened:
            await self._pool.open()
            self._opened = True
        return self._pool

    async def remember(self, order: OrderReceived) -> None:
        """Keep the order's destination (the first record of an order id wins)."""
        pool = await self._ready()
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO dispatch_orders (order_id, destination, received_event_id)"
                " VALUES (%s, %s, %s) ON CONFLICT (order_id) DO NOTHING",
                (order.order_id, json.dumps(order.destination.to_avro()), order.envelope.event_id),
            )

    async def claim(self, order_id: str, dispatch_key: str) -> Address | None:
        """Claim the order's one dispatch for ``dispatch_key``; its destination if granted.

        Granted when no dispatch was claimed yet, or when this very key claimed
        it (a retry or replay). None: another approval already dispatched it.

        Raises:
            RetryableError: the order itself has not been seen yet (it is on
                another topic, read concurrently): try again shortly.
        """
        pool = await self._ready()
        async with pool.connection() as conn:
            row: Any = await (
                await conn.execute(
                    "UPDATE dispatch_orders SET dispatch_key = %(key)s, claimed_at = now()"
                    " WHERE order_id = %(order)s AND dispatch_key IS NULL"
                    " RETURNING dispatch_key, destination",
                    {"key": dispatch_key, "order": order_id},
                )
            ).fetchone()
            if row is None:
                row = await (
                    await conn.execute(
                        "SELECT dispatch_key, destination FROM dispatch_orders WHERE order_id = %s",
                        (order_id,),
                    )
                ).fetchone()
        if row is None:
            raise RetryableError(f"order {order_id} approved before dispatch saw it; retrying")
        key, destination = row
        return Address.model_validate(destination) if key == dispatch_key else None
