"""Request bodies at the HTTP edge: bounded while they stream in, then parsed strictly.

Routes read their body themselves rather than letting FastAPI do it, for two
reasons: its size is checked while it arrives (``Content-Length`` first, then
chunk by chunk, so chunked bodies are bounded too) before a byte is parsed,
and pydantic then parses and validates it in one strict pass, so what is
accepted is exactly what the OpenAPI schema describes (no ``"12"`` for 12).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pydantic
from fastapi import Request
from pydantic import BaseModel

from opsflow.web.problems import INVALID_BODY, MALFORMED_JSON, ProblemError, field_errors

Model = TypeVar("Model", bound=BaseModel)


def declared_json(request: Request) -> bool:
    """Whether the request says its body is JSON (``application/json`` or ``*+json``)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def not_json(request: Request) -> ProblemError:
    """The 415 for a body that is not declared as JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return ProblemError(
        415, f"send the body as JSON with Content-Type: application/json (got {media_type!r})"
    )


async def read_limited(request: Request, limit: int, *, hint: str = "send less") -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    Args:
        hint: what the client can do about it, for the 413's detail.

    Raises:
        ProblemError: 413.
    """
    too_large = ProblemError(413, f"the body exceeds {limit} bytes; {hint}")
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


async def read_body(request: Request, limit: int, *, hint: str = "send less") -> bytes:
    """The request body, refused with 415 unless it is declared as JSON and with 413 as
    soon as it is known to exceed ``limit`` bytes (see ``read_limited``).

    Raises:
        ProblemError: 415 or 413.
    """
    if not declared_json(request):
        raise not_json(request)
    return await read_limited(request, limit, hint=hint)


def parse_json(
    model: type[Model],
    body: bytes,
    *,
    readable: Callable[[list[Any]], list[Any]] | None = None,
) -> Model:
    """The body as ``model``, validated strictly, or a problem naming every wrong field.

    Args:
        readable: rewrites pydantic's errors before they are reported (e.g. a
            batch too long reported as that alone).

    Raises:
        ProblemError: 400 (``/problems/malformed-json``) when the body is not JSON,
            422 (``/problems/invalid-body``, ``errors`` naming each field) when it
            does not match ``model``.
    """
    try:
        return model.model_validate_json(body, strict=True)
    except pydantic.ValidationError as err:
        errors = err.errors(include_url=False, include_input=False)
        if errors[0]["type"] == "json_invalid":
            reason = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
            raise ProblemError(
                400,
                f"the body is not valid JSON ({reason})",
                type=MALFORMED_JSON,
                title="Malformed JSON",
            ) from None
        if readable is not None:
            errors = readable(errors)
        found = field_errors(errors)
        more = len(errors) - len(found)
        raise ProblemError(
            422,
            f"{len(errors)} field(s) do not match the contract"
            + (f" (the first {len(found)} are listed)" if more else "")
            + ": "
            + "; ".join(f"{e.field or 'body'}: {e.message}" for e in found[:5]),
            type=INVALID_BODY,
            title="Request body does not match its contract",
            errors=found,
        ) from None
