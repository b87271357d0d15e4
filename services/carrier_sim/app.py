"""The carrier stand-in's HTTP API: bookings, fault injection, proofs of delivery.

Endpoints (JSON; every error is an RFC 9457 problem, ``application/problem+json``,
with ``type``, ``title``, ``status``, ``detail`` and ``retryable``):

- ``POST /bookings`` with an ``Idempotency-Key`` header: 201 and the booking;
  the same key and body again: 200 and the very same answer; the same key with
  another body: 422; a refused destination: 422 (permanent); no key: 400.
- ``GET /bookings[?order_id=]``: every booking, and ``duplicates``, the orders
  booked more than once. ``GET /bookings/duplicates``: only those.
  ``GET /bookings/{booking_reference}``: one booking.
- ``GET /faults``, ``PUT /faults`` (replace the plan, reseeding it),
  ``PATCH /faults`` (change some fields): the ``FaultPlan``.
- ``GET /pods``: how the proofs of delivery stand.
- ``GET /healthz``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, cast

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.carrier_sim.clock import iso_utc
from services.carrier_sim.config import CarrierSettings
from services.carrier_sim.faults import Fault, FaultInjector, FaultPlan
from services.carrier_sim.pod import PodCourier
from services.carrier_sim.store import Booking, BookingStore, PodStatus

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class Destination(BaseModel):
    """Where the parcel goes."""

    model_config = ConfigDict(extra="forbid")

    name: Text
    street: Text
    city: Text
    postal_code: Text
    country: Text


class BookingRequest(BaseModel):
    """The body of ``POST /bookings``; unknown fields are refused so client typos show."""

    model_config = ConfigDict(extra="forbid")

    order_id: Text
    dispatch_id: Text
    destination: Destination
    reference: str | None = None


def problem(
    status: int,
    kind: str,
    title: str,
    detail: str,
    *,
    retryable: bool,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> Response:
    """An RFC 9457 problem; ``retryable`` tells the client whether trying again can help."""
    body = {
        "type": kind if kind == "about:blank" else f"/problems/{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        "retryable": retryable,
        **extensions,
    }
    return Response(json.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _invalid(errors: Sequence[ErrorDetails], *, what: str, skip: int = 0) -> Response:
    fields = [
        {
            "field": ".".join(str(part) for part in error["loc"][skip:]) or "body",
            "message": error["msg"],
        }
        for error in errors
    ]
    detail = "; ".join(f"{field['field']}: {field['message']}" for field in fields)
    return problem(
        422,
        "invalid-request",
        f"Invalid {what}",
        f"invalid {what}: {detail}",
        retryable=False,
        errors=fields,
    )


def _unavailable() -> Response:
    return problem(
        503,
        "carrier-unavailable",
        "Carrier unavailable",
        "the carrier cannot take bookings right now; retry with the same Idempotency-Key",
        retryable=True,
        headers={"Retry-After": "1"},
    )


def _timed_out() -> Response:
    return problem(
        504,
        "carrier-timeout",
        "Carrier timed out",
        "the carrier did not finish in time; the booking may or may not exist,"
        " retry with the same Idempotency-Key to find out",
        retryable=True,
    )


class Carrier:
    """One running carrier: its bookings, its fault plan and its proof-of-delivery courier."""

    def __init__(
        self, settings: CarrierSettings, store: BookingStore, courier: PodCourier | None
    ) -> None:
        self.settings = settings
        self.store = store
        self.courier = courier
        self.faults = FaultInjector(settings.fault_plan())
        self._delivery = timedelta(days=settings.delivery_days)
        self._base_url = settings.base_url()

    def record(self, key: str, request: BookingRequest, fingerprint: str) -> tuple[Booking, str]:
        """Book ``request`` under ``key``; returns the booking and its answer (JSON)."""
        now = datetime.now(UTC)
        reference = f"BK-{secrets.token_hex(8).upper()}"
        booking = Booking(
            booking_reference=reference,
            idempotency_key=key,
            order_id=request.order_id,
            dispatch_id=request.dispatch_id,
            created_at=iso_utc(now),
            estimated_delivery_at=iso_utc(now + self._delivery),
            requests=1,
            pod_status=PodStatus.PENDING.value if self.courier else None,
        )
        answer = json.dumps(
            {
                "booking_reference": reference,
                "order_id": booking.order_id,
                "dispatch_id": booking.dispatch_id,
                "tracking_url": f"{self._base_url}/bookings/{reference}",
                "estimated_delivery_at": booking.estimated_delivery_at,
                "created_at": booking.created_at,
            }
        )
        self.store.add(booking, fingerprint=fingerprint, response=answer)
        if self.courier is not None:
            self.courier.schedule(booking)
        return booking, answer


def _carrier(request: Request) -> Carrier:
    return cast(Carrier, request.app.state.carrier)


def _fingerprint(request: BookingRequest) -> str:
    # Of the parsed body, so key order and whitespace do not make a repeat look different.
    return hashlib.blake2b(request.model_dump_json().encode(), digest_size=16).hexdigest()


def _listing(bookings: list[Booking], duplicates: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "count": len(bookings),
        "bookings": [asdict(booking) for booking in bookings],
        "duplicates": _duplicate_list(duplicates),
    }


def _duplicate_list(duplicates: dict[str, list[str]]) -> list[dict[str, Any]]:
    return [
        {"order_id": order_id, "booking_references": references}
        for order_id, references in duplicates.items()
    ]


async def book(request: Request) -> Response:
    """``POST /bookings``: book once per idempotency key, whatever the client retries."""
    carrier = _carrier(request)
    key = request.headers.get("idempotency-key", "").strip()
    if not key:
        return problem(
            400,
            "missing-idempotency-key",
            "Missing Idempotency-Key",
            "POST /bookings needs an Idempotency-Key header, the same on every retry",
            retryable=False,
        )
    plan = carrier.faults.plan
    fault = carrier.faults.before_booking()
    if fault is Fault.ERROR:
        return _unavailable()
    if fault is Fault.TIMEOUT:
        await asyncio.sleep(plan.timeout_s)
        return _timed_out()
    if fault is Fault.SLOW:
        await asyncio.sleep(plan.slow_s)
    try:
        booking_request = BookingRequest.model_validate_json(await request.body())
    except ValidationError as err:
        return _invalid(err.errors(), what="booking request")
    fingerprint = _fingerprint(booking_request)

    # No await from here until the booking is stored: see store.py on idempotency.
    replay = carrier.store.replay(key)
    if replay is not None:
        if replay.fingerprint != fingerprint:
            return problem(
                422,
                "idempotency-key-reused",
                "Idempotency-Key reused",
                f"Idempotency-Key {key!r} was first used with another request body;"
                " use a new key for a different booking",
                retryable=False,
            )
        return Response(
            replay.response,
            status_code=200,
            media_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )
    destination = booking_request.destination
    refusal = carrier.faults.refusal(country=destination.country, city=destination.city)
    if refusal is not None:
        return problem(
            422,
            "refused-destination",
            "Destination refused",
            f"{refusal}; this is permanent, retrying will not help",
            retryable=False,
        )
    booking, answer = carrier.record(key, booking_request, fingerprint)
    ghost = carrier.faults.ghost()
    log.info(
        "booking created",
        extra={
            "booking_reference": booking.booking_reference,
            "order_id": booking.order_id,
            "dispatch_id": booking.dispatch_id,
            "idempotency_key": key,
            "ghost": ghost,
        },
    )
    if ghost:
        if plan.ghost_mode == "timeout":
            await asyncio.sleep(plan.timeout_s)
            return _timed_out()
        return _unavailable()
    return Response(
        answer,
        status_code=201,
        media_type="application/json",
        headers={"Location": f"/bookings/{booking.booking_reference}"},
    )


def create_app(settings: CarrierSettings | None = None) -> FastAPI:
    """Build the carrier; its store and courier open when the app starts.

    Args:
        settings: the configuration; read from ``CARRIER_*`` variables when None.
    """
    settings = settings or CarrierSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Opened here, on the event loop thread, the only thread that touches it.
        store = BookingStore(settings.db)
        courier = None
        if settings.pod_webhook_url:
            courier = PodCourier(
                store,
                url=settings.pod_webhook_url,
                api_key=(settings.pod_api_key.get_secret_value() if settings.pod_api_key else None),
                carrier=settings.name,
                delay_s=settings.pod_delay_s,
                concurrency=settings.pod_concurrency,
                timeout_s=settings.pod_timeout_s,
                backoff_s=settings.pod_backoff_s,
                backoff_max_s=settings.pod_backoff_max_s,
            )
            await courier.start()
        app.state.carrier = Carrier(settings, store, courier)
        try:
            yield
        finally:
            if courier is not None:
                await courier.stop()
            store.close()

    app = FastAPI(title=f"{settings.name} (carrier stand-in)", lifespan=lifespan)
    # A plain Starlette route: book() parses its own body (to check the key and inject
    # faults first), and skipping FastAPI's parameter handling measured 150 -> 100 us
    # of CPU per booking. It is left out of /docs; app.py's docstring describes it.
    app.add_route("/bookings", book, methods=["POST"], include_in_schema=False)

    @app.get("/bookings")
    async def list_bookings(request: Request, order_id: str | None = None) -> dict[str, Any]:
        store = _carrier(request).store
        return _listing(store.bookings(order_id=order_id), store.duplicates())

    @app.get("/bookings/duplicates")
    async def duplicate_bookings(request: Request) -> dict[str, Any]:
        duplicates = _carrier(request).store.duplicates()
        return {"count": len(duplicates), "duplicates": _duplicate_list(duplicates)}

    @app.get("/bookings/{booking_reference}", response_model=None)
    async def get_booking(request: Request, booking_reference: str) -> dict[str, Any] | Response:
        booking = _carrier(request).store.get(booking_reference)
        if booking is None:
            return problem(
                404,
                "booking-not-found",
                "Booking not found",
                f"no booking has reference {booking_reference!r}",
                retryable=False,
            )
        return asdict(booking)

    @app.get("/faults")
    async def get_faults(request: Request) -> FaultPlan:
        return _carrier(request).faults.plan

    @app.put("/faults")
    async def replace_faults(request: Request, plan: FaultPlan) -> FaultPlan:
        _carrier(request).faults.replace(plan)
        log.info("fault plan replaced", extra={"faults": plan.model_dump()})
        return plan

    @app.patch("/faults", response_model=None)
    async def change_faults(request: Request, changes: dict[str, Any]) -> FaultPlan | Response:
        faults = _carrier(request).faults
        try:
            plan = FaultPlan.model_validate({**faults.plan.model_dump(), **changes})
        except ValidationError as err:
            return _invalid(err.errors(), what="fault plan")
        faults.replace(plan)
        log.info("fault plan changed", extra={"faults": plan.model_dump()})
        return plan

    @app.get("/pods")
    async def pods(request: Request) -> dict[str, Any]:
        carrier = _carrier(request)
        courier = carrier.courier
        return {
            "webhook_url": courier.url if courier else None,
            **carrier.store.pod_counts(),
            "queued": courier.queued if courier else 0,
            "attempts": courier.attempts if courier else 0,
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "carrier": settings.name}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's locations start with "body"/"query"; the field path is what helps.
        return _invalid(exc.errors(), what="request", skip=1)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return problem(
            exc.status_code,
            "about:blank",
            str(exc.detail),
            f"{request.method} {request.url.path}: {exc.detail}",
            retryable=False,
        )

    return app
