"""``python -m opsflow.registry``: serve the schema registry.

Settings come from the environment, as for every supervised opsflow process:
``DATABASE_URL`` (required) and ``OPSFLOW_REGISTRY_*`` (``RegistryServerSettings``:
``HOST`` 127.0.0.1 and ``PORT`` 8081, Confluent's, by default;
``BASIC_AUTH_USER_INFO`` to require HTTP basic credentials; ``MAX_BODY_BYTES``).
The settings and the database are checked before the server starts, so a bad
value or URL ends the process at once with one line on stderr and exit status 2
instead of a traceback from a worker.
"""

from __future__ import annotations

import os
import sys

import uvicorn

from opsflow.db import migrate
from opsflow.errors import ConfigurationError
from opsflow.registry.app import create_app
from opsflow.settings import RegistryServerSettings
from opsflow.web.server import load_settings


def main() -> int:
    """Check the settings and the database, then serve until stopped."""
    url = os.environ.get("DATABASE_URL", "")
    try:
        settings = load_settings(RegistryServerSettings)
        credentials = settings.credentials()
        if not url:
            raise ConfigurationError(
                "DATABASE_URL",
                "not set; the registry keeps its schemas in PostgreSQL",
                "Set it to a server's URL (postgresql://user@host:port/db) "
                "or start the whole stack with `opsflow up`",
            )
        migrate(url)
    except ConfigurationError as err:
        print(f"opsflow.registry: {err}", file=sys.stderr)
        return 2
    app = create_app(
        url,
        credentials=credentials,
        max_body_bytes=settings.max_body_bytes,
    )
    uvicorn.run(app, host=settings.host, port=settings.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
