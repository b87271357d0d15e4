"""The carrier's booking API, as dispatch uses it: one idempotent call, retried.

The booking request carries the ``dispatch.requested`` event's idempotency
key as ``Idempotency-Key``, so every retry, every re-run after a crash and
every replay asks for the same booking, and the carrier answers with the one
it already made. That is what makes "exactly one accepted booking per order"
hold even when dispatch dies between the carrier's answer and its own commit.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from services.dispatch.config import DispatchSettings


@dataclass(frozen=True)
class Booking:
    """An accepted booking."""

    reference: str
    tracking_url: str | None
    estimated_delivery_at: datetime | None
    attempts: int


@dataclass(frozen=True)
class Refusal:
    """The carrier will not book this shipment: a permanent failure, or retries ran out."""

    reason: str
    permanent: bool
    attempts: int


# Statuses worth asking again: the carrier may answer differently next time.
_TRANSIENT_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}


class Carrier:
    """An HTTP client of the carrier's booking API, created on the loop that uses it."""

    def __init__(self, settings: DispatchSettings) -> None:
        self.settings = settings
        self._client = httpx.AsyncClient(
            base_url=settings.carrier_url,
            timeout=settings.timeout_s,
            limits=httpx.Limits(
                max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
            ),
        )

    async def book(self, idempotency_key: str, shipment: dict[str, Any]) -> Booking | Refusal:
        """Book ``shipment``; transient failures are retried with capped, jittered backoff."""
        reason = "no attempt made"
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                response = await self._client.post(
                    "/bookings", json=shipment, headers={"Idempotency-Key": idempotency_key}
                )
            except httpx.TransportError as err:  # connection refused or reset, timeouts
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if response.status_code in (200, 201):
                    body = response.json()
                    due = body.get("estimated_delivery_at")
                    return Booking(
                        reference=body["booking_reference"],
                        tracking_url=body.get("tracking_url"),
                        estimated_delivery_at=datetime.fromisoformat(due) if due else None,
                        attempts=attempt,
                    )
                reason = f"carrier answered {response.status_code}: {_detail(response)}"
                if response.status_code not in _TRANSIENT_STATUSES:
                    return Refusal(reason, permanent=True, attempts=attempt)
            if attempt < self.settings.max_attempts:
                await asyncio.sleep(self._delay(attempt))
        return Refusal(reason, permanent=False, attempts=self.settings.max_attempts)

    def _delay(self, attempt: int) -> float:
        base = min(self.settings.backoff_max_s, self.settings.backoff_s * 2.0 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)  # jitter spreads a burst of retries


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:500]
    return str(body)[:500]
