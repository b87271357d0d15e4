"""The ingest service's HTTP face: routes, API key check, body limit, OpenAPI, problems.

The request body is read by the route itself rather than by FastAPI
(``opsflow.web.body``: bounded while it streams in, then parsed in one strict
pass by ``handler``). The OpenAPI document still names each body's schema:
routes declare them through ``openapi_extra`` and ``install_openapi`` adds the
models. Authentication, problem details and health checks are ``opsflow.web``'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import Response
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

from opsflow.apikeys import ApiKey
from opsflow.producer import Producer
from opsflow.web import (
    ApiKeyAuth,
    ProblemError,
    add_health_routes,
    install_openapi,
    install_problem_handlers,
    problem_responses,
    read_body,
    request_body,
)
from services.contracts import MODELS
from services.ingest.config import IngestSettings
from services.ingest.handler import EVENT_BODIES, EXTERNAL_BODIES, Accepted, BatchAccepted, Ingest
from services.ingest.idempotency import Answer, IdempotencyStore, KeyInUse
from services.ingest.problems import IDEMPOTENCY_KEY_IN_USE

DESCRIPTION = """\
Publish events into opsflow. Send the event **without its envelope**: the
service adds it (producer = your API key's producer, correlation id = order id,
event id derived from your `Idempotency-Key`). A 202 means the broker has
acknowledged the event.

Authenticate with `Authorization: Bearer <key>` (`opsflow keys create --producer NAME`).
A key sends only the event types its producer is declared for, narrowed by the
key's scope (`--events`); anything else is a 403 naming the event type.
Send `Idempotency-Key` to make retries safe: the same key and body answer with
the first response and write nothing; the same key with another body is a 422.
Errors are RFC 9457 problem details (`application/problem+json`).
"""

_RESPONSE_TEXT = {
    400: "The body is not valid JSON.",
    401: "No API key, or an unknown or revoked one.",
    403: "The key may not send this event type: its producer is not declared for it "
    "(the type's `emitted_by`), or the key's scope leaves it out; nothing was written.",
    409: "A request with the same Idempotency-Key is still in progress; retry shortly.",
    413: "The body is larger than the service takes.",
    415: "The body is not declared as JSON.",
    422: "The body does not match the contract (`errors` names each field), the "
    "Idempotency-Key header is malformed, or it was used with another request.",
    503: "The broker, registry or database is unavailable; nothing or (for a batch, see "
    "`results`) part was written. Retry with the same Idempotency-Key.",
}
_TOO_LARGE_HINT = "send fewer events per request"
_PROBLEMS = problem_responses(400, 401, 403, 409, 413, 415, 422, 503, descriptions=_RESPONSE_TEXT)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[!-~]+$",
        description="Makes a retry safe: a repeat with the same key and body gets the first "
        "answer and writes nothing. Printable ASCII, at most 255 characters.",
    ),
]


Caller = Annotated[ApiKey, Depends(ApiKeyAuth("opsflow ingest"))]


def _answer(answer: Answer) -> Response:
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return Response(
        answer.body, status_code=answer.status, headers=headers, media_type="application/json"
    )


def create_app(
    settings: IngestSettings, *, pool: ConnectionPool[Any], producer: Producer
) -> FastAPI:
    """The ingest service over an open connection pool and a producer (owned by the caller)."""
    ingest = Ingest(producer, IdempotencyStore(pool), max_batch_events=settings.max_batch_events)
    app = FastAPI(title="opsflow ingest", version="1", description=DESCRIPTION)
    app.state.pool = pool

    def event_route(event_type: str) -> Callable[..., Awaitable[Response]]:
        async def publish(
            request: Request, key: Caller, idempotency_key: IdempotencyKey = None
        ) -> Response:
            body = await read_body(request, settings.max_body_bytes, hint=_TOO_LARGE_HINT)
            answer = await run_in_threadpool(
                ingest.publish,
                key=key,
                event_type=event_type,
                body=body,
                idempotency_key=idempotency_key,
            )
            return _answer(answer)

        return publish

    # Only what some external producer may send has a route (and an OpenAPI entry).
    for event_type, body_model in EXTERNAL_BODIES.items():
        app.post(
            f"/events/{event_type}",
            status_code=202,
            response_model=Accepted,
            responses=_PROBLEMS,
            summary=f"Publish one {event_type} event",
            description=MODELS[event_type].__doc__ or "",
            operation_id=f"publish_{event_type.replace('.', '_')}",
            tags=["events"],
            openapi_extra=request_body(body_model.__name__),
        )(event_route(event_type))

    app.post(
        "/orders",
        status_code=202,
        response_model=Accepted,
        responses=_PROBLEMS,
        summary="Publish an order (same as /events/order.received)",
        operation_id="publish_order",
        tags=["orders"],
        openapi_extra=request_body(EVENT_BODIES["order.received"].__name__),
    )(event_route("order.received"))

    @app.post(
        "/events:batch",
        status_code=202,
        response_model=BatchAccepted,
        responses=_PROBLEMS,
        summary=f"Publish up to {settings.max_batch_events} events of any types",
        description="Every event is checked before any is written: one wrong event "
        "refuses the whole batch. Event i of a batch sent with Idempotency-Key K gets "
        "the idempotency key K#i.",
        operation_id="publish_batch",
        tags=["events"],
        openapi_extra=request_body("EventBatch"),
    )
    async def publish_batch(
        request: Request, key: Caller, idempotency_key: IdempotencyKey = None
    ) -> Response:
        body = await read_body(request, settings.max_body_bytes, hint=_TOO_LARGE_HINT)
        answer = await run_in_threadpool(
            ingest.publish_batch,
            key=key,
            body=body,
            idempotency_key=idempotency_key,
        )
        return _answer(answer)

    @app.post("/events/{event_type}", include_in_schema=False)
    async def not_sent_from_outside(event_type: str, key: Caller) -> Response:
        if event_type in EVENT_BODIES:
            emitters = EVENT_BODIES[event_type].event_model.emitted_by
            raise ProblemError(
                403,
                f"{event_type} is written by {emitters.describe()} only; no API key may send it",
                title="Event type not allowed for this key",
            )
        raise ProblemError(
            404,
            f"no event type {event_type!r}; types sent here: {', '.join(EXTERNAL_BODIES)}",
        )

    add_health_routes(app, pool=pool, producer=producer)
    install_problem_handlers(app)

    @app.exception_handler(KeyInUse)
    async def key_in_use(request: Request, exc: KeyInUse) -> Response:
        error = ProblemError(
            409,
            f"{exc}; retry shortly with the same key",
            type=IDEMPOTENCY_KEY_IN_USE,
            title="Idempotency-Key in use",
            headers={"Retry-After": "1"},
        )
        return error.response(request.url.path)

    install_openapi(app, bodies=[*EVENT_BODIES.values(), ingest.batch_model])
    return app
