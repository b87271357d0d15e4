"""The HTTP edge of opsflow services: what every service that takes requests shares.

- ``problems``: errors as RFC 9457 problem details, and the exception handlers
  that turn whatever a request raises into one (``install_problem_handlers``);
- ``auth``: producers' bearer API keys as a FastAPI dependency (``ApiKeyAuth``);
- ``body``: request bodies bounded while they stream in (413) and parsed
  strictly (400 for what is not JSON, 422 naming each wrong field);
- ``operations``: ``/healthz`` and ``/readyz``;
- ``openapi``: named body and ``Problem`` schemas in the OpenAPI document;
- ``headers``: the Content-Security-Policy and the other headers that keep
  other sites' scripts and frames away from a service's pages (``SecurityHeaders``);
- ``sessions``: people's server-side browser sessions and their CSRF defence.

The ingest API and the proof-of-delivery webhook are built from these, so
their clients see the same errors, the same authentication and the same limits.
"""

from opsflow.web.auth import ApiKeyAuth
from opsflow.web.body import declared_json, not_json, parse_json, read_body, read_limited
from opsflow.web.headers import SecurityHeaders
from opsflow.web.openapi import install_openapi, request_body
from opsflow.web.operations import Health, add_health_routes, check_ready
from opsflow.web.problems import (
    INVALID_BODY,
    MALFORMED_JSON,
    MAX_FIELD_ERRORS,
    PROBLEM_MEDIA_TYPE,
    EventOutcome,
    FieldError,
    Problem,
    ProblemError,
    ProblemResponse,
    dotted,
    field_errors,
    install_problem_handlers,
    pointer,
    problem_responses,
)

__all__ = [
    "INVALID_BODY",
    "MALFORMED_JSON",
    "MAX_FIELD_ERRORS",
    "PROBLEM_MEDIA_TYPE",
    "ApiKeyAuth",
    "EventOutcome",
    "FieldError",
    "Health",
    "Problem",
    "ProblemError",
    "ProblemResponse",
    "SecurityHeaders",
    "add_health_routes",
    "check_ready",
    "declared_json",
    "dotted",
    "field_errors",
    "install_openapi",
    "install_problem_handlers",
    "not_json",
    "parse_json",
    "pointer",
    "problem_responses",
    "read_body",
    "read_limited",
    "request_body",
]
