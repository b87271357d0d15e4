"""``python -m services.ingest``: serve the ingest API until stopped.

Settings come from the environment (``services.ingest.config`` and the shared
``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL``, ``DATABASE_URL``,
``OPSFLOW_TOPIC_PREFIX``). The database is migrated and the broker asked for
its metadata before the server starts, so a bad setting ends the process at
once with one line on stderr and exit status 2, not a traceback from a worker.
"""

from __future__ import annotations

import sys
from typing import Any

import pydantic
import uvicorn
from psycopg_pool import ConnectionPool

from opsflow import logs
from opsflow.db import migrate, redact
from opsflow.errors import ConfigurationError, OpsflowError
from opsflow.producer import Producer
from opsflow.settings import DatabaseSettings
from services.ingest.app import create_app
from services.ingest.config import IngestSettings

SERVICE = "ingest"


def _settings() -> IngestSettings:
    try:
        return IngestSettings()
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        variable = "INGEST_" + str(first["loc"][0]).upper()
        raise ConfigurationError(
            variable, f"{first['msg']} (got {first.get('input')!r})", "Fix it or unset it"
        ) from err


def main() -> int:
    """Check the settings, the database and the broker, then serve until stopped."""
    logs.configure(SERVICE)
    try:
        settings = _settings()
        url = DatabaseSettings().database_url
        if not url:
            raise ConfigurationError(
                "DATABASE_URL",
                "not set; API keys and idempotency records are kept in PostgreSQL",
                "Set it to a server's URL (postgresql://user@host:port/db) "
                "or run under `opsflow up` (`eval $(opsflow env)`)",
            )
        migrate(url)
        producer = Producer(SERVICE)
    except OpsflowError as err:
        print(f"services.ingest: {err}", file=sys.stderr)
        return 2
    pool: ConnectionPool[Any] = ConnectionPool(
        url,
        open=False,
        min_size=1,
        max_size=settings.database_pool_size,
        kwargs={"connect_timeout": 5},
        name=f"ingest {redact(url)}",
    )
    try:
        pool.open(wait=True, timeout=30)
        app = create_app(settings, pool=pool, producer=producer)
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None)
    finally:
        producer.close(timeout=10)
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
