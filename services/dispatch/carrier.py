"""The carrier's booking API, as dispatch uses it: an effect (``opsflow.nodes.effect``).

The booking request carries the ``dispatch.requested`` event's idempotency
key as ``Idempotency-Key``, so every retry, every re-run after a crash and
every replay asks for the same booking, and the carrier answers with the one
it already made. That is what makes "exactly one accepted booking per order"
hold even when dispatch dies between the carrier's answer and its own commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opsflow.nodes.effect import Partner, Refused, Retry
from services.dispatch.config import DispatchSettings


@dataclass(frozen=True)
class Booking:
    """An accepted booking."""

    reference: str
    tracking_url: str | None
    estimated_delivery_at: datetime | None
    attempts: int


class Carrier:
    """The carrier's ``/bookings``, created on the loop that uses it."""

    def __init__(self, settings: DispatchSettings) -> None:
        self._partner = Partner(
            settings.carrier_url.rstrip("/") + "/bookings",
            name="carrier",
            concurrency=settings.concurrency,
            timeout_s=settings.timeout_s,
            retry=Retry(settings.max_attempts, settings.backoff_s, settings.backoff_max_s),
        )

    async def book(self, idempotency_key: str, shipment: dict[str, Any]) -> Booking | Refused:
        """Book ``shipment``: the booking, or why the carrier would not (``Refused``)."""
        outcome = await self._partner.call(idempotency_key, shipment)
        if isinstance(outcome, Refused):
            return outcome
        booked = outcome.answer
        due = booked.get("estimated_delivery_at")
        return Booking(
            reference=booked["booking_reference"],
            tracking_url=booked.get("tracking_url"),
            estimated_delivery_at=datetime.fromisoformat(due) if due else None,
            attempts=outcome.attempts,
        )

    async def close(self) -> None:
        await self._partner.close()
