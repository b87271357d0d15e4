"""What the ingest service does with a request, apart from HTTP: check the body
against its contract, then write it once through the producer SDK.

Bodies are parsed and validated in one step by pydantic in strict JSON mode,
so what is accepted is exactly what the OpenAPI schema describes (no "12" for
12, no number for a time) and a batch is checked whole before any event of it
is written.
"""

from __future__ import annotations

import functools
import uuid
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from opsflow.apikeys import ApiKey
from opsflow.producer import (
    DeliveryError,
    DeliveryReport,
    EventBody,
    EventRejected,
    Producer,
    event_bodies,
)
from opsflow.web.body import parse_json
from services.contracts import EVENTS
from services.ingest.idempotency import Answer, IdempotencyStore, KeyReused, fingerprint
from services.ingest.problems import (
    IDEMPOTENCY_KEY_REUSED,
    INVALID_BODY,
    NOT_WRITTEN,
    EventOutcome,
    FieldError,
    ProblemError,
)

BATCH_ROUTE = "events:batch"
# What each event type's body looks like without its envelope, which ingest adds.
EVENT_BODIES = event_bodies(EVENTS)
# The event types some external producer may send (``Event.emitted_by``).
EXTERNAL_BODIES = {t: b for t, b in EVENT_BODIES.items() if b.event_model.emitted_by.external}


class Accepted(BaseModel):
    """An event the broker acknowledged."""

    event_id: uuid.UUID = Field(description="Derived from the producer and idempotency key.")
    event_type: str
    idempotency_key: str = Field(
        description="The event's key: the Idempotency-Key header (generated when absent), "
        "with #<index> appended for an event of a batch."
    )
    topic: str
    partition: int
    offset: int


class BatchAccepted(BaseModel):
    """Every event of a batch, acknowledged."""

    idempotency_key: str = Field(description="The batch's key (generated when absent).")
    count: int
    results: list[Accepted] = Field(description="One per event, in the order sent.")


def _accepted(report: DeliveryReport) -> dict[str, Any]:
    return {
        "event_id": str(report.event_id),
        "event_type": report.event_type,
        "idempotency_key": report.idempotency_key,
        "topic": report.topic,
        "partition": report.partition,
        "offset": report.offset,
    }


def batch_model(max_events: int) -> type[BaseModel]:
    """The batch request body: ``{"events": [{"event_type": ..., "event": {...}}, ...]}``."""
    config = ConfigDict(frozen=True, extra="forbid")
    items = [
        pydantic.create_model(
            f"{body.event_model.__name__}Item",
            __config__=config,
            __doc__=f"One {name} event of a batch.",
            event_type=(Literal[name], ...),  # type: ignore[arg-type]
            event=(body, ...),
        )
        for name, body in EVENT_BODIES.items()
    ]
    item = Annotated[Union[tuple(items)], Field(discriminator="event_type")]  # type: ignore[valid-type]  # noqa: UP007
    events = Annotated[list[item], Field(min_length=1, max_length=max_events)]  # type: ignore[valid-type]
    return pydantic.create_model(
        "EventBatch",
        __config__=config,
        __doc__=f"Up to {max_events} events, all checked before any is written.",
        events=(events, ...),
    )


class Ingest:
    """Checks and writes events for authenticated producers.

    Args:
        producer: the SDK producer every event goes through.
        store: idempotency records.
        max_batch_events: the most events one batch may hold.
    """

    def __init__(
        self, producer: Producer, store: IdempotencyStore, *, max_batch_events: int
    ) -> None:
        self.producer = producer
        self.store = store
        self.max_batch_events = max_batch_events
        self.batch_model = batch_model(max_batch_events)

    def publish(
        self, *, key: ApiKey, event_type: str, body: bytes, idempotency_key: str | None
    ) -> Answer:
        """Write one event (a JSON body of ``event_type``), once per idempotency key.

        Raises:
            ProblemError: the key may not send the event type (403), the body is
                not the event's JSON, the key was used with another request, or
                the broker did not acknowledge the event.
        """
        _authorise(key, event_type)
        producer = key.producer
        event = parse_json(EVENT_BODIES[event_type], body)

        def write(key: str) -> Answer:
            try:
                report = self.producer.send(event, idempotency_key=key, on_behalf_of=producer)
            except EventRejected as err:
                raise _rejected(err.field.split(".") if err.field else [], err.reason) from err
            except DeliveryError as err:
                raise _not_written(err) from err
            return Answer.json(202, _accepted(report))

        return self._once(producer, event_type, body, idempotency_key, write)

    def publish_batch(self, *, key: ApiKey, body: bytes, idempotency_key: str | None) -> Answer:
        """Write a batch: every event is checked first, then all are written and awaited.

        Raises:
            ProblemError: as for ``publish``; a refused batch writes nothing.
        """
        producer = key.producer
        # The batch model is made at start-up (its length limit is a setting),
        # so its fields are not known to the type checker.
        batch: Any = parse_json(
            self.batch_model,
            body,
            readable=functools.partial(_batch_errors, max_events=self.max_batch_events),
        )
        events: list[EventBody] = [item.event for item in batch.events]
        for index, event in enumerate(events):
            _authorise(key, event.event_model.event_type, f"events.{index}.event_type")

        def write(key: str) -> Answer:
            try:
                reports = self.producer.send_many(
                    events, idempotency_key=key, on_behalf_of=producer
                )
            except EventRejected as err:
                field = err.field.split(".") if err.field else []
                path = ["events", str(err.index), "event", *field]
                raise _rejected(path, err.reason) from err
            except DeliveryError as err:
                raise _not_written(err) from err
            results = [_accepted(report) for report in reports]
            return Answer.json(
                202, {"idempotency_key": key, "count": len(results), "results": results}
            )

        return self._once(producer, BATCH_ROUTE, body, idempotency_key, write)

    def _once(
        self,
        producer: str,
        route: str,
        body: bytes,
        idempotency_key: str | None,
        write: Any,
    ) -> Answer:
        if idempotency_key is None:
            # Nobody can repeat a key they were never told before the answer:
            # no record to keep.
            answer: Answer = write(uuid.uuid4().hex)
            return answer
        try:
            return self.store.once(
                producer, idempotency_key, fingerprint(route, body), lambda: write(idempotency_key)
            )
        except KeyReused as err:
            raise ProblemError(
                422,
                f"{err}; use a new key for a new request",
                type=IDEMPOTENCY_KEY_REUSED,
                title="Idempotency-Key reused with another request",
                errors=[FieldError(field="Idempotency-Key", message=str(err))],
            ) from err


def _authorise(key: ApiKey, event_type: str, field: str = "") -> None:
    """Refuse, with 403 naming the event type, what the key may not send.

    Raises:
        ProblemError: 403, the key's producer is not declared for the event type
            or the key's scope leaves it out.
    """
    model = EVENT_BODIES[event_type].event_model
    if not key.may_send(model):
        reason = key.refusal(model)
        raise ProblemError(
            403,
            f"{reason}; nothing was written",
            title="Event type not allowed for this key",
            errors=[FieldError(field=field, message=reason)] if field else None,
        )


def _batch_errors(errors: list[Any], max_events: int) -> list[Any]:
    """Batch errors made readable: the union tag dropped from paths, and a batch that
    is too long reported as that alone (its events' errors would only bury it)."""
    for error in errors:
        if error["type"] == "too_long" and tuple(error["loc"]) == ("events",):
            count = error.get("ctx", {}).get("actual_length", "more")
            return [
                {
                    **error,
                    "msg": f"a batch holds at most {max_events} events, this one has {count}: "
                    "split it into several calls",
                }
            ]
    cleaned = []
    for error in errors:
        loc = tuple(error["loc"])
        if len(loc) > 2 and loc[0] == "events" and loc[2] in EVENT_BODIES:
            loc = loc[:2] + loc[3:]
        cleaned.append({**error, "loc": loc})
    return cleaned


def _rejected(path: list[str], reason: str) -> ProblemError:
    return ProblemError(
        422,
        f"{reason}; nothing was written",
        type=INVALID_BODY,
        title="Request body does not match its contract",
        errors=[
            FieldError(
                field=".".join(path),
                pointer="#" + "".join(f"/{part}" for part in path),
                message=reason,
            )
        ],
    )


def _not_written(err: DeliveryError) -> ProblemError:
    outcomes = [
        EventOutcome(
            index=index,
            written=report is not None,
            event_id=str(event_id),
            topic=report.topic if report else None,
            partition=report.partition if report else None,
            offset=report.offset if report else None,
            error=None if report else err.failures.get(index, "not acknowledged"),
        )
        for index, (event_id, report) in enumerate(zip(err.event_ids, err.reports, strict=True))
    ]
    return ProblemError(
        503,
        f"{err}. Retry with the same Idempotency-Key: events are written with the same ids",
        type=NOT_WRITTEN,
        title="The broker did not acknowledge every event",
        headers={"Retry-After": "1"},
        results=outcomes,
    )
