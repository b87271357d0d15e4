"""Idempotency records: a request repeated with the same ``Idempotency-Key`` is answered
from the first one and writes nothing (table ``opsflow_ingest_requests``, migration 0002).

Records are scoped by producer, so two producers never collide on a key.
``once`` serialises requests with the same producer and key on a
transaction-scoped advisory lock and keeps that transaction open while the
events are written: a concurrent identical request waits, then replays the
stored answer; a write that fails rolls back and leaves no record, so the
client's retry writes again (with the same event ids, see ``opsflow.producer``).
If the process dies between the broker's acknowledgement and the commit, the
retry writes the events a second time with the same ids: at least once, with
duplicates a consumer recognises by ``event_id``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from opsflow.errors import BadInputError, RetryableError


class KeyReused(BadInputError):
    """The key was used before with another request (another route or body)."""


class KeyInUse(RetryableError):
    """A request with the same key is still being handled; try again shortly."""


@dataclass(frozen=True)
class Answer:
    """An HTTP answer to give (a JSON body), and whether it is the stored answer of an
    earlier request."""

    status: int
    body: bytes
    replayed: bool = False

    @classmethod
    def json(cls, status: int, body: Any) -> Answer:
        """An answer with ``body`` rendered as compact JSON."""
        return cls(status, json.dumps(body, separators=(",", ":")).encode())


def fingerprint(route: str, body: bytes) -> bytes:
    """What makes two requests "the same": the route and the exact body bytes."""
    return hashlib.sha256(route.encode() + b"\n" + body).digest()


class IdempotencyStore:
    """Runs a write at most once per (producer, key) and remembers its answer.

    Args:
        pool: connections to the database holding ``opsflow_ingest_requests``.
        lock_timeout_s: how long a request waits for a concurrent one with the
            same key before giving up with ``KeyInUse``.
    """

    def __init__(self, pool: ConnectionPool[Any], *, lock_timeout_s: float = 10.0) -> None:
        self._pool = pool
        self._lock_timeout = f"{int(lock_timeout_s * 1000)}ms"

    def once(self, producer: str, key: str, request: bytes, write: Callable[[], Answer]) -> Answer:
        """The answer of the first request with ``key``; ``write`` runs only if there was none.

        Args:
            request: the request's ``fingerprint``.
            write: does the work and returns the answer to store; if it raises,
                nothing is stored.

        Raises:
            KeyReused: the key was used with another request.
            KeyInUse: a request with the key did not finish within the lock timeout.
        """
        with self._pool.connection() as conn:
            try:
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (self._lock_timeout,))
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (f"ingest\x1f{producer}\x1f{key}",),
                )
            except psycopg.errors.LockNotAvailable as err:
                raise KeyInUse(
                    "a request with this Idempotency-Key is still being processed"
                ) from err
            row = conn.execute(
                "SELECT request_hash, status_code, response FROM opsflow_ingest_requests"
                " WHERE producer = %s AND idempotency_key = %s",
                (producer, key),
            ).fetchone()
            if row is not None:
                stored_hash, status, body = row
                if bytes(stored_hash) != request:
                    raise KeyReused(
                        "this Idempotency-Key was already used with a different request"
                    )
                return Answer(status, body.encode(), replayed=True)
            answer = write()
            conn.execute(
                "INSERT INTO opsflow_ingest_requests"
                " (producer, idempotency_key, request_hash, status_code, response)"
                " VALUES (%s, %s, %s, %s, %s)",
                (producer, key, request, answer.status, answer.body.decode()),
            )
            return answer
