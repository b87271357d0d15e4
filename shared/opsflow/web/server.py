"""Running an HTTP service that writes through PostgreSQL and Kafka: ``python -m services.X``.

Everything is checked before the server starts: the service's settings, the
database (migrated under the migrations' advisory lock) and the broker (asked
for its metadata). A bad setting therefore ends the process at once with one
line on stderr naming the variable and exit status 2, not with a traceback
from a worker, and a running server always has its pool and producer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import pydantic
import uvicorn
from fastapi import FastAPI
from psycopg_pool import ConnectionPool
from pydantic_settings import BaseSettings

from opsflow import logs
from opsflow.db import migrate, redact
from opsflow.errors import ConfigurationError, OpsflowError
from opsflow.producer import Producer
from opsflow.settings import DatabaseSettings


class ServerSettings(Protocol):
    """What ``serve`` reads from a service's settings."""

    host: str
    port: int
    database_pool_size: int


Settings = TypeVar("Settings", bound=BaseSettings)


def load_settings(settings_type: type[Settings]) -> Settings:
    """The service's settings from the environment.

    Raises:
        ConfigurationError: naming the first variable that is wrong (with its prefix).
    """
    try:
        return settings_type()
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        prefix = str(settings_type.model_config.get("env_prefix") or "")
        variable = prefix + str(first["loc"][0]).upper() if first["loc"] else f"{prefix}*"
        raise ConfigurationError(
            variable, f"{first['msg']} (got {first.get('input')!r})", "Fix it or unset it"
        ) from err


def serve(
    name: str,
    settings: ServerSettings,
    create_app: Callable[[ConnectionPool[Any], Producer], FastAPI],
) -> int:
    """Check the database and the broker, then serve ``create_app``'s app until stopped.

    Args:
        name: the service's name: its producer's name and its pool's.
        settings: where to listen and how many database connections to keep.
        create_app: the app over the open pool and producer (both closed here after).

    Returns:
        The exit status: 0 after a clean stop, 2 when a dependency is unusable.
    """
    try:
        url = DatabaseSettings().database_url
        if not url:
            raise ConfigurationError(
                "DATABASE_URL",
                f"not set; {name} keeps API keys and its records in PostgreSQL",
                "Set it to a server's URL (postgresql://user@host:port/db) "
                "or run under `opsflow up` (`eval $(opsflow env)`)",
            )
        migrate(url)
        producer = Producer(name)
    except OpsflowError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    pool: ConnectionPool[Any] = ConnectionPool(
        url,
        open=False,
        min_size=1,
        max_size=settings.database_pool_size,
        kwargs={"connect_timeout": 5},
        name=f"{name} {redact(url)}",
        # Checked when taken: a connection broken by a PostgreSQL restart is replaced.
        check=ConnectionPool.check_connection,
    )
    try:
        pool.open(wait=True, timeout=30)
        app = create_app(pool, producer)
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None)
    finally:
        producer.close(timeout=10)
        pool.close()
    return 0


def main(
    name: str,
    settings_type: type[Settings],
    create_app: Callable[..., FastAPI],
    *,
    check: Callable[[Settings], object] | None = None,
) -> int:
    """A service's ``python -m`` entry point: settings (and ``check``), then ``serve``.

    Args:
        name: the service's name (logs, producer, pool).
        settings_type: its settings class, read from the environment.
        create_app: ``create_app(settings, pool=..., producer=...)``.
        check: more start-up checks on the settings (e.g. a rules file), raising
            ``ConfigurationError``.

    Returns:
        The exit status: 0 after a clean stop, 2 when something is unusable.
    """
    logs.configure(name)
    try:
        settings = load_settings(settings_type)
        if check is not None:
            check(settings)
    except ConfigurationError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    return serve(
        name,
        settings,  # type: ignore[arg-type]
        lambda pool, producer: create_app(settings, pool=pool, producer=producer),
    )
