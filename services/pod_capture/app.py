"""The pod-capture webhook's HTTP face: ``POST /pods``, health, OpenAPI, problems.

Authentication (producers' bearer API keys), body limits, problem details and
health checks are ``opsflow.web``'s, the same as the ingest API's. The body is
read by the route itself, so it is bounded while it streams in and kept as
sent: a refused POD is recorded with its raw bytes (``pods``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from psycopg_pool import ConnectionPool

from opsflow.apikeys import ApiKey
from opsflow.producer import Producer
from opsflow.web import (
    ApiKeyAuth,
    ProblemError,
    add_health_routes,
    declared_json,
    install_openapi,
    install_problem_handlers,
    not_json,
    problem_responses,
    read_limited,
    request_body,
)
from services.contracts import PodCaptured
from services.pod_capture.config import PodSettings
from services.pod_capture.pods import Captured, PodCapture, PodReport
from services.pod_capture.store import CaptureInProgress

DESCRIPTION = """\
Carriers deliver proofs of delivery (PODs) here. A POD is captured when its
booking reference names a dispatched order, for the same order id and carrier:
`pod.captured` is written to the pod topic, and a 201 means the broker has
acknowledged it. Sending the same booking's POD again answers 200 with the
first answer and writes nothing.

A refused POD (malformed, unknown booking, another order's booking) gets a 4xx
problem and is recorded as `pod.rejected` on the pod-rejects topic with the
raw body; a 503 means nothing could be recorded, so send it again. A POD that
arrives just before its dispatch is recorded waits a few seconds for it; one
refused for an unknown booking is kept, and captured if the booking's dispatch
is recorded later.

Authenticate with `Authorization: Bearer <key>` (`opsflow keys create --producer NAME`).
Errors are RFC 9457 problem details (`application/problem+json`).
"""

_RESPONSE_TEXT = {
    400: "The body is not valid JSON; recorded as pod.rejected.",
    401: "No API key, or an unknown or revoked one; nothing is recorded.",
    403: "The key is not the carrier's (not one that may send pod.captured); nothing is recorded.",
    404: "No dispatched order has this booking reference; recorded as pod.rejected, and "
    "kept: captured if the booking's dispatch is recorded later.",
    409: "The booking was dispatched for another order or carrier; recorded as pod.rejected.",
    413: "The body is larger than the webhook takes.",
    415: "The body is not declared as JSON; recorded as pod.rejected.",
    422: "The body does not match the POD's schema (`errors` names each field); "
    "recorded as pod.rejected.",
    503: "The broker, registry or database is unavailable and nothing was recorded, or "
    "another request is capturing the same booking: send the POD again.",
}
_PROBLEMS = problem_responses(
    400, 401, 403, 404, 409, 413, 415, 422, 503, descriptions=_RESPONSE_TEXT
)

Caller = Annotated[ApiKey, Depends(ApiKeyAuth("opsflow pod-capture"))]


def create_app(settings: PodSettings, *, pool: ConnectionPool[Any], producer: Producer) -> FastAPI:
    """The webhook over an open connection pool and a producer (owned by the caller)."""
    pods = PodCapture(
        producer,
        pool,
        match_wait_s=settings.match_wait_s,
        unmatched_keep_s=settings.unmatched_keep_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # PODs kept for a late dispatch are captured by this process, on its loop.
        sweeper = asyncio.create_task(pods.sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    app = FastAPI(
        title="opsflow pod-capture", version="1", description=DESCRIPTION, lifespan=lifespan
    )
    app.state.pool = pool

    @app.post(
        "/pods",
        status_code=201,
        response_model=Captured,
        responses={
            200: {
                "description": "A repeat of a captured booking: the first answer, nothing "
                "written (header `Idempotent-Replayed: true`).",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Captured"}}
                },
            },
            **_PROBLEMS,
        },
        summary="Deliver a proof of delivery",
        operation_id="capture_pod",
        tags=["pods"],
        openapi_extra=request_body(PodReport.__name__),
    )
    async def capture(request: Request, key: Caller) -> Response:
        # Only a key that may report deliveries (the carrier's) gets further, so
        # nobody else learns anything from the answers about bookings or orders.
        if not key.may_send(PodCaptured):
            raise ProblemError(
                403,
                f"{key.refusal(PodCaptured)}; only the carrier's key may deliver proofs",
                title="Not the carrier's key",
            )
        body = await read_limited(
            request, settings.max_body_bytes, hint="a POD is a few hundred bytes"
        )
        if not declared_json(request):
            await pods.refuse_malformed(key.producer, body, not_json(request))
        answer, replayed = await pods.receive(producer=key.producer, body=body)
        return Response(
            answer,
            status_code=200 if replayed else 201,
            headers={"Idempotent-Replayed": "true"} if replayed else None,
            media_type="application/json",
        )

    add_health_routes(app, pool=pool, producer=producer)
    install_problem_handlers(app)

    @app.exception_handler(CaptureInProgress)
    async def in_progress(request: Request, exc: CaptureInProgress) -> Response:
        # A 503, not a 409: carriers treat a 4xx as final, and this one is not.
        error = ProblemError(503, f"{exc}; send it again shortly", headers={"Retry-After": "1"})
        return error.response(request.url.path)

    install_openapi(app, bodies=[PodReport])
    return app
