"""The OpenAPI document of a service whose routes read their own bodies.

Routes that parse their body themselves (``opsflow.web.body``) declare its
schema by name (``request_body``) and answer errors with ``Problem``
(``problem_responses``); ``install_openapi`` adds those named schemas to the
document, so ``/openapi.json`` still describes every body and every error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from opsflow.web.problems import Problem


def request_body(schema_name: str) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body is the component ``schema_name``."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
            },
        }
    }


def install_openapi(app: FastAPI, *, bodies: Sequence[type[BaseModel]] = ()) -> None:
    """Serve a document with the ``Problem`` schema and the named request ``bodies`` added
    to its components (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
                (body, "validation") for body in bodies
            ]
            models.append((Problem, "serialization"))
            _, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
