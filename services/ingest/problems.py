"""Errors at the HTTP edge as RFC 9457 problem details (``application/problem+json``).

Every error the service answers with has this one shape, so a producer's
client handles failures in one place: ``status`` and ``type`` say what kind of
failure (``type`` is a relative URI naming an opsflow problem, or
``about:blank`` for a plain HTTP status), ``detail`` says what to do, and
``errors`` names each wrong field of a refused body.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydantic_core import ErrorDetails

PROBLEM_MEDIA_TYPE = "application/problem+json"

# Problem types of this service (relative URIs, resolved against the service's own).
INVALID_BODY = "/problems/invalid-body"
MALFORMED_JSON = "/problems/malformed-json"
IDEMPOTENCY_KEY_REUSED = "/problems/idempotency-key-reused"
IDEMPOTENCY_KEY_IN_USE = "/problems/idempotency-key-in-use"
NOT_WRITTEN = "/problems/not-written"

# A batch of 1,000 wrong events could name tens of thousands of fields; the
# first ones are enough to fix the producer, and the response stays small.
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
    """What happened to one event of a batch whose write failed part way."""

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
    be large, and echoing them back adds nothing the producer does not have)."""
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


def problem_responses(*statuses: int, descriptions: Mapping[int, str]) -> dict[int | str, Any]:
    """OpenAPI ``responses`` entries for problem answers, for route declarations."""
    return {
        status: {
            "description": descriptions.get(status, HTTPStatus(status).phrase),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }
