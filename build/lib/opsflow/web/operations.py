"""``/healthz`` and ``/readyz`` for an HTTP service that writes through PostgreSQL and Kafka.

Liveness says only that the process serves; readiness that the database and
the Kafka cluster answer now, so a load balancer sends requests only to an
instance that can accept them.
"""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import FastAPI
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from opsflow.errors import ConfigurationError
from opsflow.producer import Producer
from opsflow.web.problems import ProblemError, problem_responses


class Health(BaseModel):
    """Liveness or readiness."""

    status: str


def check_ready(pool: ConnectionPool[Any], producer: Producer, *, timeout: float = 2.0) -> None:
    """Return if the database and the Kafka cluster answer within ``timeout`` seconds each.

    Raises:
        ProblemError: 503 naming the dependency that does not answer.
    """
    try:
        with pool.connection(timeout=timeout) as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, PoolTimeout) as err:
        raise ProblemError(503, f"the database does not answer: {err}") from err
    try:
        producer.check_connection(timeout=timeout)
    except ConfigurationError as err:
        raise ProblemError(503, f"{err.problem}") from err


def add_health_routes(app: FastAPI, *, pool: ConnectionPool[Any], producer: Producer) -> None:
    """Add ``GET /healthz`` (the process serves) and ``GET /readyz`` (``check_ready``)."""

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
        """The database and the Kafka cluster answer, so requests can be accepted."""
        await run_in_threadpool(check_ready, pool, producer)
        return {"status": "ready"}
