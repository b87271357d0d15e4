"""The Confluent Schema Registry REST API, over ``SchemaStore``.

Clients (confluent-kafka's ``SchemaRegistryClient``, serializers, tools) are
written against Confluent's server, so every response here keeps its paths,
JSON shapes, media type and ``{"error_code", "message"}`` errors; the rules
themselves live in ``store``. Only AVRO is served: other schema types and
schema references are refused with 42201 rather than half supported.

What a client sends is bounded before it is believed: with credentials
configured, every request but the root's needs them as HTTP basic
authentication (401 with a ``Basic`` challenge, like Confluent's server with
``authentication.method=BASIC``), checked before the body is read; a body
larger than the limit is refused while it arrives (413); a body that is not
JSON, not a JSON object, or nested too deeply to parse (JSON's parser recurses,
so ten thousand ``[`` would otherwise end in a ``RecursionError``) is a 400 or
422, in Confluent's ``{"error_code", "message"}`` shape like every error here.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic
from psycopg_pool import ConnectionPool
from starlette.exceptions import HTTPException

from opsflow.db import migrate
from opsflow.registry.store import (
    Pool,
    Registered,
    RegistryError,
    SchemaStore,
    invalid_schema,
    parse_level,
    parse_version,
)
from opsflow.web.body import read_limited
from opsflow.web.problems import ProblemError

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"

T = TypeVar("T")


class RegistryResponse(JSONResponse):
    """JSON under the registry's own media type, which Confluent clients ask for first."""

    media_type = MEDIA_TYPE


def _error(status: int, error_code: int, message: str) -> Response:
    return RegistryResponse({"error_code": error_code, "message": message}, status_code=status)


def _store(request: Request) -> SchemaStore:
    store: SchemaStore = request.app.state.store
    return store


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object sent, whatever Content-Type was declared (Confluent accepts several).

    Raises:
        RegistryError: 413 above the body limit; 400 for what is not JSON or is nested
            too deeply to parse; 422 for JSON that is not an object.
    """
    limit: int = request.app.state.max_body_bytes
    try:
        raw = await read_limited(request, limit)
    except ProblemError as err:
        raise RegistryError(413, 413, f"The request body exceeds {limit} bytes") from err
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise RegistryError(400, 400, f"Unparseable JSON body: {err}") from err
    except RecursionError:
        raise RegistryError(400, 400, "Unparseable JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise RegistryError(422, 422, "The request body must be a JSON object")
    return body


_basic = HTTPBasic(realm="opsflow schema registry")


async def _authorized(request: Request) -> None:
    """Let the request through when no credentials are configured, or it carries them.

    The header is not even read without configured credentials. Both parts are
    compared in constant time, so the answer's timing does not tell how much of a
    guess was right.

    Raises:
        HTTPException: 401 with the ``Basic`` challenge: no credentials, malformed
            ones (FastAPI's ``HTTPBasic`` parses the header), or wrong ones.
    """
    expected: tuple[bytes, bytes] | None = request.app.state.credentials
    if expected is None:
        return
    credentials = await _basic(request)
    assert credentials is not None  # HTTPBasic raises rather than answer None
    user = secrets.compare_digest(credentials.username.encode(), expected[0])
    password = secrets.compare_digest(credentials.password.encode(), expected[1])
    if not (user and password):
        raise HTTPException(
            401, "Unauthorized", headers=_basic.make_not_authenticated_error().headers
        )


def _schema_text(body: Annotated[dict[str, Any], Depends(_body)]) -> str:
    """The Avro schema of a register, lookup or compatibility request."""
    schema_type = body.get("schemaType") or "AVRO"
    if str(schema_type).upper() != "AVRO":
        raise invalid_schema(
            f"schema type {schema_type} is not supported: this registry stores AVRO schemas only"
        )
    if body.get("references"):
        raise invalid_schema("schema references are not supported by this registry")
    text = body.get("schema")
    if not isinstance(text, str):
        raise invalid_schema("the request has no schema string")
    return text


Store = Annotated[SchemaStore, Depends(_store)]
SchemaText = Annotated[str, Depends(_schema_text)]
Body = Annotated[dict[str, Any], Depends(_body)]
Flag = Annotated[bool, Query()]
# Confluent's server reads deletedOnly; confluent-kafka-python sends deleted_only.
DeletedOnly = Annotated[bool, Query(alias="deletedOnly")]
DefaultToGlobal = Annotated[bool, Query(alias="defaultToGlobal")]


def _page(items: Sequence[T], offset: int, limit: int) -> list[T]:
    """Confluent's offset/limit paging, where a negative limit means no limit."""
    rest = list(items[max(offset, 0) :])
    return rest if limit < 0 else rest[:limit]


def _schema_id(text: str) -> int:
    """A path id; like Confluent (JAX-RS), a non-integer is a plain 404."""
    try:
        return int(text)
    except ValueError:
        raise HTTPException(404) from None


def _registered(found: Registered) -> dict[str, Any]:
    # schemaType is omitted for AVRO, as Confluent does.
    return {
        "subject": found.subject,
        "version": found.version,
        "id": found.id,
        "schema": found.schema,
    }


def _compatibility(messages: list[str], verbose: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"is_compatible": not messages}
    if verbose:
        result["messages"] = messages
    return result


# Everything but the root needs the credentials, when there are some.
router = APIRouter(dependencies=[Depends(_authorized)])
open_router = APIRouter()


@open_router.get("/")
def root() -> dict[str, str]:
    """Confluent's no-op root, used as a liveness probe: open, it tells nothing."""
    return {}


@router.get("/schemas/types")
def schema_types() -> list[str]:
    return ["AVRO"]


@router.get("/subjects")
def list_subjects(
    store: Store,
    deleted: Flag = False,
    deleted_only: Flag = False,
    deleted_only_alias: DeletedOnly = False,
    subject_prefix: Annotated[str, Query(alias="subjectPrefix")] = "",
    offset: int = 0,
    limit: int = -1,
) -> list[str]:
    subjects = store.subjects(deleted=deleted, deleted_only=deleted_only or deleted_only_alias)
    if subject_prefix and subject_prefix != ":*:":  # Confluent's "every context" default
        subjects = [s for s in subjects if s.startswith(subject_prefix)]
    return _page(subjects, offset, limit)


@router.post("/subjects/{subject}/versions")
def register(
    subject: str, schema: SchemaText, store: Store, normalize: Flag = False
) -> dict[str, int]:
    """Register a schema; ``normalize`` is accepted and moot: ids follow a normal form anyway."""
    return {"id": store.register(subject, schema)}


@router.post("/subjects/{subject}")
def lookup(
    subject: str, schema: SchemaText, store: Store, deleted: Flag = False, normalize: Flag = False
) -> dict[str, Any]:
    return _registered(store.lookup(subject, schema, deleted=deleted))


@router.get("/subjects/{subject}/versions")
def list_versions(
    subject: str,
    store: Store,
    deleted: Flag = False,
    deleted_only: Flag = False,
    deleted_only_alias: DeletedOnly = False,
    offset: int = 0,
    limit: int = -1,
) -> list[int]:
    only = deleted_only or deleted_only_alias
    return _page(store.versions(subject, deleted=deleted, deleted_only=only), offset, limit)


@router.get("/subjects/{subject}/versions/{version}")
def get_version(subject: str, version: str, store: Store, deleted: Flag = False) -> dict[str, Any]:
    return _registered(store.version(subject, parse_version(version), deleted=deleted))


@router.get("/subjects/{subject}/versions/{version}/schema")
def get_version_schema(subject: str, version: str, store: Store, deleted: Flag = False) -> Response:
    """The schema text alone, unescaped, as Confluent serves it."""
    found = store.version(subject, parse_version(version), deleted=deleted)
    return Response(found.schema, media_type=MEDIA_TYPE)


@router.delete("/subjects/{subject}")
def delete_subject(subject: str, store: Store, permanent: Flag = False) -> list[int]:
    return store.delete_subject(subject, permanent=permanent)


@router.delete("/subjects/{subject}/versions/{version}")
def delete_version(subject: str, version: str, store: Store, permanent: Flag = False) -> int:
    return store.delete_version(subject, parse_version(version), permanent=permanent)


@router.get("/schemas/ids/{schema_id}")
def get_schema(schema_id: str, store: Store) -> dict[str, str]:
    return {"schema": store.schema(_schema_id(schema_id))}


@router.get("/schemas/ids/{schema_id}/schema")
def get_schema_text(schema_id: str, store: Store) -> Response:
    return Response(store.schema(_schema_id(schema_id)), media_type=MEDIA_TYPE)


@router.get("/schemas/ids/{schema_id}/versions")
def get_schema_versions(
    schema_id: str, store: Store, deleted: Flag = False, offset: int = 0, limit: int = -1
) -> list[dict[str, Any]]:
    uses = store.uses(_schema_id(schema_id), deleted=deleted)
    return _page([{"subject": s, "version": v} for s, v in uses], offset, limit)


@router.get("/schemas/ids/{schema_id}/subjects")
def get_schema_subjects(
    schema_id: str, store: Store, deleted: Flag = False, offset: int = 0, limit: int = -1
) -> list[str]:
    uses = store.uses(_schema_id(schema_id), deleted=deleted)
    return _page(sorted({s for s, _ in uses}), offset, limit)


@router.post("/compatibility/subjects/{subject}/versions/{version}")
def check_version(
    subject: str,
    version: str,
    schema: SchemaText,
    store: Store,
    verbose: Flag = False,
    normalize: Flag = False,
) -> dict[str, Any]:
    """Test ``schema`` against one version; with ``verbose`` an invalid schema is a message."""
    wanted = parse_version(version)
    try:
        messages = store.check(subject, schema, wanted)
    except RegistryError as err:
        if not (verbose and err.error_code == 42201):
            raise
        messages = [err.message]
    return _compatibility(messages, verbose)


@router.post("/compatibility/subjects/{subject}/versions")
def check_all_versions(
    subject: str, schema: SchemaText, store: Store, verbose: Flag = False, normalize: Flag = False
) -> dict[str, Any]:
    """Test ``schema`` as registration would: against the versions its level names."""
    try:
        messages = store.check_all(subject, schema)
    except RegistryError as err:
        if not (verbose and err.error_code == 42201):
            raise
        messages = [err.message]
    return _compatibility(messages, verbose)


@router.get("/config")
def get_global_config(store: Store, default_to_global: DefaultToGlobal = False) -> dict[str, str]:
    return {"compatibilityLevel": store.level()}


@router.put("/config")
def put_global_config(body: Body, store: Store) -> dict[str, str]:
    level = parse_level(body.get("compatibility"))
    store.set_level(None, level)
    return {"compatibility": str(level)}


@router.delete("/config")
def delete_global_config(store: Store) -> dict[str, str]:
    """Reset the global level to BACKWARD, answering with the level it had."""
    return {"compatibilityLevel": store.delete_level(None)}


@router.get("/config/{subject}")
def get_subject_config(
    subject: str, store: Store, default_to_global: DefaultToGlobal = False
) -> dict[str, str]:
    return {"compatibilityLevel": store.level(subject, default_to_global=default_to_global)}


@router.put("/config/{subject}")
def put_subject_config(subject: str, body: Body, store: Store) -> dict[str, str]:
    level = parse_level(body.get("compatibility"))
    store.set_level(subject, level)
    return {"compatibility": str(level)}


@router.delete("/config/{subject}")
def delete_subject_config(subject: str, store: Store) -> dict[str, str]:
    """Drop the subject's own level so it inherits the global one again."""
    return {"compatibilityLevel": store.delete_level(subject)}


def create_app(
    database_url: str,
    *,
    credentials: tuple[str, str] | None = None,
    max_body_bytes: int = 1024 * 1024,
) -> FastAPI:
    """Build the registry on ``database_url``; it migrates and opens its pool at startup.

    Args:
        credentials: the user and password every request but the root's must carry
            as HTTP basic authentication; None for none.
        max_body_bytes: the largest request body accepted (413 above).
    """
    # Connections are checked when taken: one broken by a PostgreSQL restart is
    # replaced, not handed to a request that would then answer 500.
    pool: Pool = ConnectionPool(
        database_url,
        open=False,
        min_size=1,
        max_size=8,
        kwargs={"connect_timeout": 5},
        check=ConnectionPool.check_connection,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(database_url)
        pool.open(wait=True, timeout=30)
        app.state.store = SchemaStore(pool)
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(
        title="opsflow schema registry",
        lifespan=lifespan,
        default_response_class=RegistryResponse,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.max_body_bytes = max_body_bytes
    app.state.credentials = (
        (credentials[0].encode(), credentials[1].encode()) if credentials else None
    )
    app.include_router(open_router)
    app.include_router(router)

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> Response:
        return _error(exc.status, exc.error_code, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # Jersey's wording for unmatched paths and methods, e.g. "HTTP 404 Not Found".
        response = _error(exc.status_code, exc.status_code, f"HTTP {exc.status_code} {exc.detail}")
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error(422, 422, problems)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> Response:
        # A schema nested deeper than the parsers recurse; _body catches the body's own.
        return _error(422, 42201, "Invalid schema: nested too deeply")

    @app.exception_handler(psycopg.Error)  # PoolTimeout included
    async def store_error(request: Request, exc: Exception) -> Response:
        return _error(500, 50001, f"Error in the backend data store: {exc}")

    return app
