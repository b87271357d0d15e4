"""The ingest service's HTTP face: routes, API key check, body limit, OpenAPI, problems.

The request body is read by the route itself rather than by FastAPI, for two
reasons: its size is checked while it streams in (``Content-Length`` first,
then chunk by chunk, so chunked bodies are bounded too) before a byte is
parsed, and pydantic then parses and validates it in one strict pass
(``handler``). The OpenAPI document still names each body's schema: routes
declare them through ``openapi_extra`` and ``openapi`` adds the models.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from opsflow.apikeys import ApiKey, verify_key
from opsflow.contracts import MODELS
from opsflow.errors import ConfigurationError, OpsflowError, RetryableError
from opsflow.producer import EVENT_BODIES, Producer
from services.ingest.config import IngestSettings
from services.ingest.handler import Accepted, BatchAccepted, Ingest
from services.ingest.idempotency import Answer, IdempotencyStore, KeyInUse
from services.ingest.problems import (
    IDEMPOTENCY_KEY_IN_USE,
    INVALID_BODY,
    Problem,
    ProblemError,
    field_errors,
    problem_responses,
)

log = logging.getLogger("services.ingest")

REALM = 'Bearer realm="opsflow ingest"'

DESCRIPTION = """\
Publish events into opsflow. Send the event **without its envelope**: the
service adds it (producer = your API key's producer, correlation id = order id,
event id derived from your `Idempotency-Key`). A 202 means the broker has
acknowledged the event.

Authenticate with `Authorization: Bearer <key>` (`opsflow keys create --producer NAME`).
Send `Idempotency-Key` to make retries safe: the same key and body answer with
the first response and write nothing; the same key with another body is a 422.
Errors are RFC 9457 problem details (`application/problem+json`).
"""

_RESPONSE_TEXT = {
    400: "The body is not valid JSON.",
    401: "No API key, or an unknown or revoked one.",
    409: "A request with the same Idempotency-Key is still in progress; retry shortly.",
    413: "The body is larger than the service takes.",
    415: "The body is not declared as JSON.",
    422: "The body does not match the contract (`errors` names each field), the "
    "Idempotency-Key header is malformed, or it was used with another request.",
    503: "The broker, registry or database is unavailable; nothing or (for a batch, see "
    "`results`) part was written. Retry with the same Idempotency-Key.",
}
_PROBLEMS = problem_responses(400, 401, 409, 413, 415, 422, 503, descriptions=_RESPONSE_TEXT)
_PROBLEMS[401]["headers"] = {
    "WWW-Authenticate": {
        "description": "The Bearer challenge (RFC 6750).",
        "required": True,
        "schema": {"type": "string"},
    }
}

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


_bearer = HTTPBearer(auto_error=False, description="An API key from `opsflow keys create`.")


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The caller's active API key, or a 401 problem with a Bearer challenge."""
    if credentials is None:
        raise ProblemError(
            401,
            "send an API key as `Authorization: Bearer <key>` "
            "(create one with `opsflow keys create --producer NAME`)",
            headers={"WWW-Authenticate": REALM},
        )
    pool: ConnectionPool[Any] = request.app.state.pool
    with pool.connection() as conn:
        key = verify_key(conn, credentials.credentials)
    if key is None:
        raise ProblemError(
            401,
            "the API key is unknown or revoked",
            headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
        )
    return key


Caller = Annotated[ApiKey, Depends(authenticate)]


class Health(BaseModel):
    """Liveness or readiness."""

    status: str


def _request_body(schema_name: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
            },
        }
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes
    and with 415 unless it is declared as JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ProblemError(
            415,
            f"send the event as JSON with Content-Type: application/json (got {media_type!r})",
        )
    too_large = ProblemError(413, f"the body exceeds {limit} bytes; send fewer events per request")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


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
            body = await read_body(request, settings.max_body_bytes)
            answer = await run_in_threadpool(
                ingest.publish,
                producer=key.producer,
                event_type=event_type,
                body=body,
                idempotency_key=idempotency_key,
            )
            return _answer(answer)

        return publish

    for event_type, body_model in EVENT_BODIES.items():
        app.post(
            f"/events/{event_type}",
            status_code=202,
            response_model=Accepted,
            responses=_PROBLEMS,
            summary=f"Publish one {event_type} event",
            description=MODELS[event_type].__doc__ or "",
            operation_id=f"publish_{event_type.replace('.', '_')}",
            tags=["events"],
            openapi_extra=_request_body(body_model.__name__),
        )(event_route(event_type))

    app.post(
        "/orders",
        status_code=202,
        response_model=Accepted,
        responses=_PROBLEMS,
        summary="Publish an order (same as /events/order.received)",
        operation_id="publish_order",
        tags=["orders"],
        openapi_extra=_request_body(EVENT_BODIES["order.received"].__name__),
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
        openapi_extra=_request_body("EventBatch"),
    )
    async def publish_batch(
        request: Request, key: Caller, idempotency_key: IdempotencyKey = None
    ) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        answer = await run_in_threadpool(
            ingest.publish_batch,
            producer=key.producer,
            body=body,
            idempotency_key=idempotency_key,
        )
        return _answer(answer)

    @app.post("/events/{event_type}", include_in_schema=False)
    async def unknown_event_type(event_type: str) -> Response:
        raise ProblemError(
            404,
            f"no event type {event_type!r}; known types: {', '.join(EVENT_BODIES)}",
        )

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up and serving."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["operations"],
        responses=problem_responses(503, descriptions={503: "A dependency does not answer."}),
    )
    async def readyz() -> dict[str, str]:
        """The database and the Kafka cluster answer, so events can be accepted."""
        await run_in_threadpool(_check_ready, pool, producer)
        return {"status": "ready"}

    _install_error_handlers(app)
    _install_openapi(app, ingest)
    return app


def _check_ready(pool: ConnectionPool[Any], producer: Producer) -> None:
    try:
        with pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, PoolTimeout) as err:
        raise ProblemError(503, f"the database does not answer: {err}") from err
    try:
        producer.check_connection(timeout=2)
    except ConfigurationError as err:
        raise ProblemError(503, f"{err.problem}") from err


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def problem(request: Request, exc: ProblemError) -> Response:
        return exc.response(request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else None
        error = ProblemError(
            exc.status_code, detail or f"{request.method} {request.url.path}", headers=exc.headers
        )
        return error.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = field_errors(exc.errors())
        error = ProblemError(
            422,
            "; ".join(f"{e.field}: {e.message}" for e in errors),
            type=INVALID_BODY,
            title="Request does not match its contract",
            errors=errors,
        )
        return error.response(request.url.path)

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

    @app.exception_handler(RetryableError)
    async def unavailable(request: Request, exc: RetryableError) -> Response:
        error = ProblemError(503, f"{exc}; nothing was written", headers={"Retry-After": "1"})
        return error.response(request.url.path)

    @app.exception_handler(psycopg.Error)
    @app.exception_handler(PoolTimeout)
    async def database_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("database error", extra={"error": str(exc)})
        error = ProblemError(
            503, "the database is unavailable; nothing was written", headers={"Retry-After": "1"}
        )
        return error.response(request.url.path)

    @app.exception_handler(OpsflowError)
    async def misconfigured(request: Request, exc: OpsflowError) -> Response:
        log.error("request failed", extra={"error": str(exc)})
        return ProblemError(500, f"the service cannot do this: {exc}").response(request.url.path)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> Response:
        return ProblemError(400, "the body is nested too deeply").response(request.url.path)


def _install_openapi(app: FastAPI, ingest: Ingest) -> None:
    """Add the request body and problem schemas the routes refer to by name."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            models: list[tuple[type[BaseModel], Any]] = [
                (body, "validation") for body in EVENT_BODIES.values()
            ]
            models += [(ingest.batch_model, "validation"), (Problem, "serialization")]
            _, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
