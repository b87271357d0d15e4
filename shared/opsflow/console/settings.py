"""The operator console's settings, read from ``CONSOLE_*`` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConsoleSettings(BaseSettings):
    """Where the console listens and how long an operator's session lasts.

    Attributes:
        host / port: where it listens (loopback by default, like every embedded
            component; set 0.0.0.0 in a container).
        database_pool_size: connections for sessions, the audit of actions and reads.
        session_idle_s / session_max_s: a session ends after this long without a
            request, and this long after sign-in however busy. Shorter than an
            inbox's: an operator's session can rewrite topics.
    """

    model_config = SettingsConfigDict(env_prefix="CONSOLE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8990, ge=1, le=65535)
    database_pool_size: int = Field(default=4, ge=1)
    session_idle_s: float = Field(default=15 * 60, gt=0)
    session_max_s: float = Field(default=4 * 3600, gt=0)
