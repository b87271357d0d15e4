"""What the webhook does with a proof of delivery, apart from HTTP.

A POD is captured when its booking reference names a dispatched order (the
read model ``pod_capture_dispatches``) for the same order id and carrier:
``pod.captured`` is written to the pod topic, and only once the broker
acknowledged it is the capture stored and answered (201). A repeat of a
captured booking gets the first answer (200) and writes nothing.

Every POD that is refused is recorded, never just answered: a
``pod.rejected`` with the reason and the raw body is written to the
pod-rejects topic before the 4xx goes out. If that write fails, the answer
is a 503, so the carrier tries again and the POD is not lost.

A POD can arrive before its dispatch record: the runtime service writes it a
moment after ``dispatch.executed``, so an unknown booking is looked up again
for up to ``match_wait_s`` before it is refused. And dispatch itself can emit
``dispatch.executed`` long after the carrier booked (it died in between and
was restarted): a POD refused as unknown is therefore kept
(``pod_capture_unmatched``), and ``sweep`` captures it once its booking is
recorded, exactly as if it had arrived then (same event id), for up to
``unmatched_keep_s``.

Event ids are derived from the facts, so retries are recognisable: a
capture's idempotency key is ``pod.captured/<carrier>/<booking reference>``,
a refusal's names its reason and a digest of the exact body.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import uuid
from typing import Annotated, Any, NoReturn

from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from opsflow.contracts.bounds import CONTROL, MAX_TEXT
from opsflow.contracts.record import TimestampMillis
from opsflow.errors import RetryableError
from opsflow.producer import Producer, body_model
from opsflow.web import FieldError, ProblemError, parse_json
from services.contracts import PodCaptured, PodRejected, PodRejectionCode
from services.pod_capture.store import (
    Capture,
    CaptureLog,
    Dispatch,
    Unmatched,
    find_dispatch,
    forget_unmatched,
    keep_unmatched,
    now_dispatched,
)

log = logging.getLogger("services.pod_capture")

UNKNOWN_BOOKING = "/problems/unknown-booking"
BOOKING_MISMATCH = "/problems/booking-mismatch"
NOT_RECORDED = "/problems/not-recorded"

# How often kept PODs are matched against new dispatch records, and how many at a time.
SWEEP_INTERVAL_S = 1.0
SWEEP_BATCH = 100

# A real POD is a few hundred bytes. The start of a larger body is enough to
# see what was sent, and keeps the rejects topic's records small.
RAW_PAYLOAD_MAX_BYTES = 16 * 1024


def _valid_unicode(value: str) -> bool:
    # ``json.loads`` (unlike pydantic) lets lone surrogates through.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Strings need no Unicode check of their own: pydantic's JSON parser refuses
# lone surrogates ("\ud800"), which no Avro string could hold, as invalid JSON.
Reference = Annotated[str, Field(min_length=1, max_length=200)]
Link = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class PodReport(BaseModel):
    """A proof of delivery as a carrier sends it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    carrier: Reference = Field(description="The carrier's name, as in the dispatch.")
    booking_reference: Reference = Field(description="The carrier's booking reference.")
    order_id: Reference = Field(description="The order the parcel belongs to.")
    delivered_at: TimestampMillis = Field(
        description="When it was delivered: ISO 8601 with a UTC offset."
    )
    received_by: Reference = Field(description="Who took the parcel.")
    signature_ref: Link | None = Field(default=None, description="Where the signature is kept.")
    photo_ref: Link | None = Field(default=None, description="Where the photo is kept.")


class Captured(BaseModel):
    """A POD matched to its order and written to the pod topic as ``pod.captured``."""

    event_id: uuid.UUID = Field(description="Derived from the carrier and booking reference.")
    event_type: str = PodCaptured.event_type
    order_id: str
    booking_reference: str
    carrier: str
    topic: str
    partition: int
    offset: int


def capture_key(carrier: str, booking_reference: str) -> str:
    """The idempotency key of a booking's ``pod.captured``: the same for every retry."""
    return f"{PodCaptured.event_type}/{carrier}/{booking_reference}"


def rejection_key(code: PodRejectionCode, body: bytes) -> str:
    """The idempotency key of a refusal: the same body refused for the same reason is the
    same fact, so a carrier's retry writes the same event id."""
    return f"{PodRejected.event_type}/{code}/{hashlib.sha256(body).hexdigest()[:32]}"


def raw_payload(body: bytes) -> str:
    """The body as text for ``pod.rejected``: undecodable bytes and control characters
    replaced (U+FFFD), and cut at ``RAW_PAYLOAD_MAX_BYTES`` with a note saying how long
    it was."""
    text = body[:RAW_PAYLOAD_MAX_BYTES].decode("utf-8", errors="replace")
    text = CONTROL.sub("\ufffd", text)
    if len(body) <= RAW_PAYLOAD_MAX_BYTES:
        return text
    return f"{text}... [truncated: {len(body)} bytes in all]"


def rejection_reason(detail: str) -> str:
    """A refusal's explanation as ``pod.rejected`` keeps it: within a string's bounds."""
    return detail if len(detail) <= MAX_TEXT else f"{detail[: MAX_TEXT - 15]}... [truncated]"


def _salvage(body: bytes) -> dict[str, str]:
    """What can be read of a refused body's identifying fields, for the rejects topic."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        name: value
        for name in ("carrier", "booking_reference", "order_id")
        if isinstance(value := data.get(name), str) and _valid_unicode(value)
    }


class PodCapture:
    """Matches PODs to dispatched orders and writes what became of each.

    Args:
        producer: the SDK producer every event goes through.
        pool: connections to the database holding the read model and captures.
        match_wait_s: how long an unknown booking is looked up again before refusal.
        unmatched_keep_s: how long a POD refused for an unknown booking is kept,
            to be captured by ``sweep`` if its dispatch is recorded late.
    """

    def __init__(
        self,
        producer: Producer,
        pool: ConnectionPool[Any],
        *,
        match_wait_s: float,
        unmatched_keep_s: float,
    ) -> None:
        self.producer = producer
        self.pool = pool
        self.captures = CaptureLog(pool)
        self.match_wait_s = match_wait_s
        self.unmatched_keep_s = unmatched_keep_s

    async def receive(self, *, producer: str, body: bytes) -> tuple[str, bool]:
        """Capture the POD in ``body`` (JSON) sent by ``producer`` (an API key's producer).

        Returns:
            The JSON answer (a ``Captured``), and whether it is the stored answer
            of an earlier request for the same booking (nothing was written).

        Raises:
            ProblemError: the POD was refused (400, 422, 404, 409; recorded on the
                pod-rejects topic), or Kafka did not acknowledge the capture or the
                refusal (503: retry).
        """
        try:
            pod = parse_json(PodReport, body)
        except ProblemError as err:
            await self.refuse_malformed(producer, body, err)
        facts = {
            "carrier": pod.carrier,
            "booking_reference": pod.booking_reference,
            "order_id": pod.order_id,
        }
        dispatch = await self._dispatch_of(pod.booking_reference)
        if dispatch is None:
            await run_in_threadpool(self._keep, producer, pod)
            await self._refuse(
                producer, body, facts, PodRejectionCode.UNKNOWN_BOOKING, self._unknown(pod)
            )
        mismatch = _mismatch_of(pod, dispatch)
        if mismatch is not None:
            await self._refuse(producer, body, facts, *mismatch)
        capture, replayed = await run_in_threadpool(
            self.captures.once, pod.booking_reference, lambda: self._capture(producer, pod)
        )
        return capture.response, replayed

    # --- late dispatches ---------------------------------------------------------------

    def _keep(self, producer: str, pod: PodReport) -> None:
        with self.pool.connection() as conn:
            keep_unmatched(conn, Unmatched(pod.booking_reference, producer, pod.model_dump_json()))

    def sweep(self) -> int:
        """Capture the kept PODs whose booking has been dispatched since, and drop those
        kept longer than ``unmatched_keep_s``. Returns how many were captured.

        Raises:
            ProblemError: Kafka did not acknowledge a capture (503); the POD stays kept.
        """
        with self.pool.connection() as conn:
            forget_unmatched(conn, older_than_s=self.unmatched_keep_s)
            due = now_dispatched(conn, limit=SWEEP_BATCH)
        captured = 0
        for unmatched in due:
            pod = PodReport.model_validate_json(unmatched.pod)
            mismatch = _mismatch_of(pod, self._find(pod.booking_reference))
            if mismatch is not None:
                # Its booking is known now, for another order or carrier: the
                # refusal on pod-rejects stands.
                with self.pool.connection() as conn:
                    forget_unmatched(conn, booking_reference=pod.booking_reference)
                log.warning(
                    "a kept POD does not match its late dispatch; it stays refused",
                    extra={
                        "booking_reference": pod.booking_reference,
                        "reason": rejection_reason(mismatch[1].problem.detail),
                    },
                )
                continue
            _, replayed = self.captures.once(
                pod.booking_reference, functools.partial(self._capture, unmatched.producer, pod)
            )
            if not replayed:
                captured += 1
                log.info(
                    "POD captured after its late dispatch",
                    extra={
                        "booking_reference": pod.booking_reference,
                        "order_id": pod.order_id,
                        "correlation_id": pod.order_id,
                    },
                )
        return captured

    async def sweep_forever(self) -> None:
        """Run ``sweep`` every ``SWEEP_INTERVAL_S`` until cancelled; a failure is logged
        and the next turn tries again."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await run_in_threadpool(self.sweep)
            except Exception:  # the database or the broker is away for now
                log.exception("sweeping kept PODs failed; retrying")

    # --- matching --------------------------------------------------------------------

    async def _dispatch_of(self, booking_reference: str) -> Dispatch | None:
        """The booking's dispatch, looked up again with growing pauses until
        ``match_wait_s`` has passed (the read model may be a moment behind)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.match_wait_s
        pause = 0.05
        while True:
            found = await run_in_threadpool(self._find, booking_reference)
            left = deadline - loop.time()
            if found is not None or left <= 0:
                return found
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.5)

    def _find(self, booking_reference: str) -> Dispatch | None:
        with self.pool.connection() as conn:
            return find_dispatch(conn, booking_reference)

    def _unknown(self, pod: PodReport) -> ProblemError:
        # Nothing about the order's other bookings: the answer says only what the
        # caller sent was not found, so it cannot be used to probe other orders.
        return ProblemError(
            404,
            f"no dispatched order has booking reference {pod.booking_reference} "
            f"(waited {self.match_wait_s:g} s for its dispatch record). The POD is "
            f"kept: it is captured if the booking's dispatch is recorded within "
            f"{self.unmatched_keep_s:g} s",
            type=UNKNOWN_BOOKING,
            title="Unknown booking",
            errors=[
                FieldError(
                    field="booking_reference",
                    pointer="#/booking_reference",
                    message="not the reference of a dispatched order",
                )
            ],
        )

    # --- writing ---------------------------------------------------------------------

    def _capture(self, producer: str, pod: PodReport) -> Capture:
        """Write ``pod.captured`` and wait for the broker (runs inside the capture's
        transaction: nothing is stored unless this returns)."""
        event = body_model(PodCaptured).model_validate(pod.model_dump())
        try:
            report = self.producer.send(
                event,
                idempotency_key=capture_key(pod.carrier, pod.booking_reference),
                on_behalf_of=producer,
            )
        except RetryableError as err:
            raise _not_recorded("the capture", err) from err
        answer = Captured(
            event_id=report.event_id,
            order_id=pod.order_id,
            booking_reference=pod.booking_reference,
            carrier=pod.carrier,
            topic=report.topic,
            partition=report.partition,
            offset=report.offset,
        )
        return Capture(report.event_id, answer.model_dump_json())

    async def refuse_malformed(self, producer: str, body: bytes, problem: ProblemError) -> NoReturn:
        """Record ``body`` as a malformed POD, then raise ``problem`` saying so.

        Raises:
            ProblemError: ``problem`` once recorded; a 503 if Kafka did not take it.
        """
        await self._refuse(producer, body, _salvage(body), PodRejectionCode.MALFORMED, problem)

    async def _refuse(
        self,
        producer: str,
        body: bytes,
        facts: dict[str, str],
        code: PodRejectionCode,
        problem: ProblemError,
    ) -> NoReturn:
        """Record the refusal on the pod-rejects topic, then raise ``problem`` saying so.

        Raises:
            ProblemError: ``problem`` once recorded; a 503 if Kafka did not take it.
        """
        event = body_model(PodRejected).model_validate(
            {
                "order_id": facts.get("order_id", ""),
                "carrier": facts.get("carrier"),
                "booking_reference": facts.get("booking_reference"),
                "reason_code": code,
                "reason": rejection_reason(problem.problem.detail),
                "raw_payload": raw_payload(body),
            }
        )
        try:
            report = await run_in_threadpool(
                self.producer.send,
                event,
                idempotency_key=rejection_key(code, body),
                on_behalf_of=producer,
            )
        except RetryableError as err:
            raise _not_recorded("the refusal", err) from err
        raise problem.with_detail(
            f"{problem.problem.detail}. The POD is recorded as refused ({code}): "
            f"event {report.event_id} on {report.topic}"
        )


def _mismatch_of(
    pod: PodReport, dispatch: Dispatch | None
) -> tuple[PodRejectionCode, ProblemError] | None:
    """Why ``pod`` does not match ``dispatch`` (its booking's), or None if it does."""
    if dispatch is None:
        return None
    if dispatch.order_id != pod.order_id:
        return PodRejectionCode.NOT_DISPATCHED, _mismatch(
            "order_id",
            f"booking {pod.booking_reference} was not dispatched for order {pod.order_id}",
        )
    if dispatch.carrier != pod.carrier:
        return PodRejectionCode.OTHER, _mismatch(
            "carrier",
            f"booking {pod.booking_reference} was not made with carrier {pod.carrier}",
        )
    return None


def _mismatch(field: str, detail: str) -> ProblemError:
    return ProblemError(
        409,
        detail,
        type=BOOKING_MISMATCH,
        title="POD does not match its booking",
        errors=[FieldError(field=field, pointer=f"#/{field}", message=detail)],
    )


def _not_recorded(what: str, err: RetryableError) -> ProblemError:
    return ProblemError(
        503,
        f"{what} was not acknowledged by Kafka ({err}); send the POD again: a retry "
        "writes the same event id",
        type=NOT_RECORDED,
        title="POD not recorded",
        headers={"Retry-After": "1"},
    )
