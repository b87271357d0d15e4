"""Errors at the HTTP edge as RFC 9457 problem details (``application/problem+json``).

Every error an opsflow HTTP service answers with has this one shape, so a
client handles failures in one place: ``status`` and ``type`` say what kind of
failure (``type`` is a relative URI naming an opsflow problem, or
``about:blank`` for a plain HTTP status), ``detail`` says what to do, and
``errors`` names each wrong field of a refused body.

``install_problem_handlers`` turns everything a request can raise into such an
answer: a ``ProblemError`` raised by the service, FastAPI's own refusals
(unknown route, wrong method, a header that fails validation) and the
failures of the parts behind the service (database, broker, registry), which
become a 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException

from opsflow.errors import OpsflowError, RetryableError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

# Problem types every service may answer with (relative URIs, resolved against
# the service's own). Services add their own next to their routes.
INVALID_BODY = "/problems/invalid-body"
MALFORMED_JSON = "/problems/malformed-json"

# A batch of 1,000 wrong events could name tens of thousands of fields; the
# first ones are enough to fix the client, and the response stays small.
MAX_FIELD_ERRORS = 100


class FieldError(BaseModel):
    """One wrong field of a refused request."""

    field: str = Field(
        description='Dotted path of a body field ("destination.postal_code", '
        '"events.3.event.amount_minor"; "" for the whole body), or a header name.'
    )
    pointer: str | None = Field(
        default=None, description="A body field as a JSON Pointer (RFC 6901) into the body."
    )
    message: str = Field(description="What is wrong with it.")


class EventOutcome(BaseModel):
    """What happened to one event of a batch whose write failed part way (see
    ``opsflow.producer.DeliveryError``)."""

    index: int
    written: bool
    event_id: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    error: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(
        default="about:blank",
        description="The kind of problem: a relative URI naming an opsflow problem, "
        "or about:blank when the HTTP status says it all.",
    )
    title: str
    status: int
    detail: str = Field(description="What went wrong in this request, and what to do next.")
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[FieldError] | None = Field(
        default=None, description="Every wrong field (the first 100), for refused input."
    )
    results: list[EventOutcome] | None = Field(
        default=None,
        description="For a batch whose write failed part way: each event's outcome. "
        "Retrying with the same Idempotency-Key writes the same event ids.",
    )


class ProblemResponse(JSONResponse):
    """A problem document under its own media type."""

    media_type = PROBLEM_MEDIA_TYPE


class ProblemError(Exception):
    """Raised anywhere in a request to answer with a problem.

    Args:
        status: the HTTP status.
        detail: what went wrong and what to do, for a person.
        type: the problem type URI; ``about:blank`` for a plain HTTP status.
        title: a summary of the problem type; the status phrase for ``about:blank``.
        errors: the wrong fields.
        headers: extra response headers (``WWW-Authenticate``, ``Retry-After``).
        results: per-event outcomes of a partly written batch.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type: str = "about:blank",
        title: str | None = None,
        errors: Sequence[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
        results: Sequence[EventOutcome] | None = None,
    ) -> None:
        super().__init__(detail)
        self.problem = Problem(
            type=type,
            title=title or HTTPStatus(status).phrase,
            status=status,
            detail=detail,
            errors=list(errors) if errors is not None else None,
            results=list(results) if results is not None else None,
        )
        self.headers = dict(headers or {})

    def with_detail(self, detail: str) -> ProblemError:
        """The same problem with another ``detail``: for a caller that caught it and has
        more to say (what it did about the refused input)."""
        copy = ProblemError(self.problem.status, detail)
        copy.problem = self.problem.model_copy(update={"detail": detail})
        copy.headers = dict(self.headers)
        return copy

    def response(self, instance: str) -> ProblemResponse:
        """The response for the request at path ``instance``."""
        body = self.problem.model_copy(update={"instance": instance})
        return ProblemResponse(
            body.model_dump(mode="json", exclude_none=True),
            status_code=body.status,
            headers=self.headers,
        )


def field_errors(
    errors: Iterable[ErrorDetails], *, prefix: Sequence[str | int] = ()
) -> list[FieldError]:
    """Pydantic's errors as ``FieldError``s (the input values are left out: they can
    be large, and echoing them back adds nothing the client does not have)."""
    found: list[FieldError] = []
    for error in errors:
        if len(found) == MAX_FIELD_ERRORS:
            break
        loc = [*prefix, *error["loc"]]
        if len(loc) == 2 and loc[0] == "header":  # a header parameter, not a body field
            found.append(FieldError(field=str(loc[1]), message=error["msg"]))
        else:
            found.append(FieldError(field=dotted(loc), pointer=pointer(loc), message=error["msg"]))
    return found


def dotted(loc: Sequence[str | int]) -> str:
    """``("items", 0, "sku")`` -> ``"items.0.sku"``."""
    return ".".join(str(part) for part in loc)


def pointer(loc: Sequence[str | int]) -> str:
    """``("items", 0, "sku")`` -> ``"#/items/0/sku"`` (RFC 6901 escapes)."""
    parts = (str(part).replace("~", "~0").replace("/", "~1") for part in loc)
    return "#" + "".join(f"/{part}" for part in parts)


_BEARER_CHALLENGE = {
    "WWW-Authenticate": {
        "description": "The Bearer challenge (RFC 6750).",
        "required": True,
        "schema": {"type": "string"},
    }
}


def problem_responses(*statuses: int, descriptions: Mapping[int, str]) -> dict[int | str, Any]:
    """OpenAPI ``responses`` entries for problem answers, for route declarations.

    A 401 also documents its ``WWW-Authenticate`` challenge (``opsflow.web.auth``
    always sends one). The entries refer to the ``Problem`` schema, which
    ``opsflow.web.install_openapi`` adds to the document.
    """
    responses: dict[int | str, Any] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": descriptions.get(status, HTTPStatus(status).phrase),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status == 401:
            entry["headers"] = dict(_BEARER_CHALLENGE)
        responses[status] = entry
    return responses


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error a request can end in with a problem document.

    - ``ProblemError``: as raised.
    - FastAPI's and Starlette's ``HTTPException`` (404 for an unknown path, 405, ...):
      its status, as a plain ``about:blank`` problem.
    - ``RequestValidationError`` (a header or path parameter out of its rules):
      422 naming each parameter.
    - ``RetryableError``, ``psycopg.Error``, ``PoolTimeout``: 503 with
      ``Retry-After: 1``; the dependency is down and nothing was written.
    - any other ``OpsflowError``: 500 saying what the service cannot do (a
      configuration problem, logged).
    - ``RecursionError`` (JSON nested thousands deep): 400.

    A service adds handlers for its own exception types next to these;
    Starlette picks the handler of the most specific class, whatever the order.
    """

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
