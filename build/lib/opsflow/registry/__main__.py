"""``python -m opsflow.registry``: serve the schema registry.

Settings come from the environment, as for every supervised opsflow process:
``DATABASE_URL`` (required), ``OPSFLOW_REGISTRY_HOST`` (default 127.0.0.1) and
``OPSFLOW_REGISTRY_PORT`` (default 8081, Confluent's port). The database is
migrated before the server starts, so a bad URL ends the process at once with
one line on stderr and exit status 2 instead of a traceback from a worker.
"""

from __future__ import annotations

import os
import sys

import uvicorn

from opsflow.db import migrate
from opsflow.errors import ConfigurationError
from opsflow.registry.app import create_app


def _port() -> int:
    text = os.environ.get("OPSFLOW_REGISTRY_PORT", "8081")
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(
            "OPSFLOW_REGISTRY_PORT", f"{text!r} is not a TCP port", "Set it to 1-65535 or unset it"
        )
    return int(text)


def main() -> int:
    """Check the settings and the database, then serve until stopped."""
    url = os.environ.get("DATABASE_URL", "")
    host = os.environ.get("OPSFLOW_REGISTRY_HOST", "127.0.0.1")
    try:
        if not url:
            raise ConfigurationError(
                "DATABASE_URL",
                "not set; the registry keeps its schemas in PostgreSQL",
                "Set it to a server's URL (postgresql://user@host:port/db) "
                "or start the whole stack with `opsflow up`",
            )
        port = _port()
        migrate(url)
    except ConfigurationError as err:
        print(f"opsflow.registry: {err}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(url), host=host, port=port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
