"""Bearer API keys at the HTTP edge: who is calling, as a FastAPI dependency.

Keys are the producers' keys of ``opsflow.apikeys`` (``opsflow keys create``),
checked against PostgreSQL on every request, so a revoked key is refused at
once. A request without a key, or with an unknown or revoked one, gets a 401
problem with an RFC 6750 Bearer challenge.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from opsflow.apikeys import ApiKey, verify_key
from opsflow.web.problems import ProblemError

_bearer = HTTPBearer(auto_error=False, description="An API key from `opsflow keys create`.")


class ApiKeyAuth:
    """A FastAPI dependency answering the caller's active API key.

    The keys are looked up through the connection pool the app keeps in
    ``app.state.pool`` (the dependency is declared at import time, before any
    pool exists). Use it as ``Annotated[ApiKey, Depends(ApiKeyAuth("opsflow ingest"))]``.

    Args:
        realm: the protection space named in the ``WWW-Authenticate`` challenge.
    """

    def __init__(self, realm: str) -> None:
        self.challenge = f'Bearer realm="{realm}"'

    def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> ApiKey:
        """The caller's active API key.

        Raises:
            ProblemError: 401 with a Bearer challenge: no key, or an unknown or revoked one.
        """
        if credentials is None:
            raise ProblemError(
                401,
                "send an API key as `Authorization: Bearer <key>` "
                "(create one with `opsflow keys create --producer NAME`)",
                headers={"WWW-Authenticate": self.challenge},
            )
        pool: ConnectionPool[Any] = request.app.state.pool
        with pool.connection() as conn:
            key = verify_key(conn, credentials.credentials)
        if key is None:
            raise ProblemError(
                401,
                "the API key is unknown or revoked",
                headers={"WWW-Authenticate": f'{self.challenge}, error="invalid_token"'},
            )
        return key
