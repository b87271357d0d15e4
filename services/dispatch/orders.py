"""What dispatch remembers in PostgreSQL: each order's destination and its one dispatch.

``policy.checked`` carries the destination (since its v2); a reviewer's
approval (``review.decided``) does not, so dispatch keeps it from the order's
``policy.checked`` until the decision comes. The column ``received_event_id``
names the event the destination came from: ``order.received`` in rows written
before policy.checked v2, ``policy.checked`` since. Writes are idempotent
(``ON CONFLICT``), so retries and replays change nothing.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from opsflow.errors import AwaitingError, ConfigurationError
from opsflow.settings import DatabaseSettings
from services.contracts import Address


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

    async def remember(self, order_id: str, destination: Address, event_id: UUID) -> None:
        """Keep the order's destination for a later approval (the first record wins)."""
        pool = await self._ready()
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO dispatch_orders (order_id, destination, received_event_id)"
                " VALUES (%s, %s, %s) ON CONFLICT (order_id) DO NOTHING",
                (order_id, json.dumps(destination.to_avro()), event_id),
            )

    async def claim(
        self, order_id: str, dispatch_key: str, known: tuple[Address, UUID] | None = None
    ) -> Address | None:
        """Claim the order's one dispatch for ``dispatch_key``; its destination if granted.

        Granted when no dispatch was claimed yet, or when this very key claimed
        it (a retry or replay). None: another approval already dispatched it.
        ``known``: the destination and the id of the event that carried it, when
        the approval carries it (one statement then remembers and claims).

        Raises:
            AwaitingError: the destination is not known yet (a reviewer's
                approval read before its order's ``policy.checked``, or an
                approval of an order never seen): tried again shortly, and
                dead-lettered with this reason if it never comes.
        """
        pool = await self._ready()
        params: dict[str, object] = {"key": dispatch_key, "order": order_id}
        if known is None:
            claim = (
                "UPDATE dispatch_orders SET dispatch_key = %(key)s, claimed_at = now()"
                " WHERE order_id = %(order)s AND dispatch_key IS NULL"
                " RETURNING dispatch_key, destination"
            )
        else:
            claim = (
                "INSERT INTO dispatch_orders"
                " (order_id, destination, received_event_id, dispatch_key, claimed_at)"
                " VALUES (%(order)s, %(destination)s, %(event)s, %(key)s, now())"
                " ON CONFLICT (order_id) DO UPDATE"
                " SET dispatch_key = EXCLUDED.dispatch_key, claimed_at = EXCLUDED.claimed_at"
                " WHERE dispatch_orders.dispatch_key IS NULL"
                " RETURNING dispatch_key, destination"
            )
            params["destination"] = json.dumps(known[0].to_avro())
            params["event"] = known[1]
        async with pool.connection() as conn:
            row: Any = await (await conn.execute(claim, params)).fetchone()
            if row is None:
                row = await (
                    await conn.execute(
                        "SELECT dispatch_key, destination FROM dispatch_orders WHERE order_id = %s",
                        (order_id,),
                    )
                ).fetchone()
        if row is None:
            raise AwaitingError(
                f"order {order_id} approved, but dispatch has not seen its destination"
                " (no policy.checked carrying it)"
            )
        key, destination = row
        return Address.model_validate(destination) if key == dispatch_key else None
