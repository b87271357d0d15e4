"""The ingest service's problem types; the problem details themselves are ``opsflow.web``'s.

Every error the service answers with is an RFC 9457 problem
(``application/problem+json``, see ``opsflow.web.problems``); the types below
are the ones only ingest answers with.
"""

from __future__ import annotations

from opsflow.web.problems import (
    INVALID_BODY,
    MALFORMED_JSON,
    EventOutcome,
    FieldError,
    Problem,
    ProblemError,
    field_errors,
    problem_responses,
)

__all__ = [
    "IDEMPOTENCY_KEY_IN_USE",
    "IDEMPOTENCY_KEY_REUSED",
    "INVALID_BODY",
    "MALFORMED_JSON",
    "NOT_WRITTEN",
    "EventOutcome",
    "FieldError",
    "Problem",
    "ProblemError",
    "field_errors",
    "problem_responses",
]

IDEMPOTENCY_KEY_REUSED = "/problems/idempotency-key-reused"
IDEMPOTENCY_KEY_IN_USE = "/problems/idempotency-key-in-use"
NOT_WRITTEN = "/problems/not-written"
