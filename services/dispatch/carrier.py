"""The carrier's booking API, as dispatch uses it: one idempotent call, retried.

The booking request carries the ``dispatch.requested`` event's idempotency
key as ``Idempotency-Key``, so every retry, every re-run after a crash and
every replay asks for the same booking, and the carrier answers with the one
it already made. That is what makes "exactly one accepted booking per order"
hold even when dispatch dies between the carrier's answer and its own commit.

The calls go out with aiohttp's client rather than httpx's: httpx's pool
checks every pooled connection on each request, which made booking the larger
part of dispatch's CPU on two cores (as for the carrier stand-in's callbacks,
``services.carrier_sim.pod``).
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp

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
        self._url = settings.carrier_url.rstrip("/") + "/bookings"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.concurrency),
            timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
        )

    async def book(self, idempotency_key: str, shipment: dict[str, Any]) -> Booking | Refusal:
        """Book ``shipment``; transient failures are retried with capped, jittered backoff."""
        reason = "no attempt made"
        body = json.dumps(shipment).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                async with self._session.post(self._url, data=body, headers=headers) as response:
                    status, phrase = response.status, response.reason or ""
                    answer = await response.read()  # read to the end: the connection is reused
            except (aiohttp.ClientError, TimeoutError) as err:  # refused, reset, timed out
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if status in (200, 201):
                    booked = json.loads(answer)
                    due = booked.get("estimated_delivery_at")
                    return Booking(
                        reference=booked["booking_reference"],
                        tracking_url=booked.get("tracking_url"),
                        estimated_delivery_at=datetime.fromisoformat(due) if due else None,
                        attempts=attempt,
                    )
                reason = f"carrier answered {status}: {_detail(answer, phrase)}"
                if status not in _TRANSIENT_STATUSES:
                    return Refusal(reason, permanent=True, attempts=attempt)
            if attempt < self.settings.max_attempts:
                await asyncio.sleep(self._delay(attempt))
        return Refusal(reason, permanent=False, attempts=self.settings.max_attempts)

    async def close(self) -> None:
        """Close the session: left open, aiohttp reports "Unclosed client session" on
        stderr when the process exits."""
        await self._session.close()

    def _delay(self, attempt: int) -> float:
        base = min(self.settings.backoff_max_s, self.settings.backoff_s * 2.0 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)  # jitter spreads a burst of retries


def _detail(answer: bytes, phrase: str) -> str:
    try:
        body = json.loads(answer)
    except ValueError:
        return answer[:200].decode(errors="replace") or phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:500]
    return str(body)[:500]
