"""The ingest service's settings, from ``INGEST_*`` environment variables.

Kafka, the registry and PostgreSQL come from the settings every opsflow
component reads (``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL``,
``DATABASE_URL``, ``OPSFLOW_TOPIC_PREFIX``).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class IngestSettings(BaseSettings):
    """How the ingest HTTP service listens and what it accepts."""

    model_config = SettingsConfigDict(env_prefix="INGEST_", extra="ignore")

    # Loopback by default, like every embedded component; set 0.0.0.0 in a container.
    host: str = "127.0.0.1"
    port: int = Field(default=8600, ge=1, le=65535)
    # Largest request body, checked before any of it is parsed (a batch of
    # 1,000 typical orders is about 0.7 MB).
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_batch_events: int = Field(default=1000, ge=1, le=10_000)
    # Connections for API key checks and idempotency records; a request holds
    # one while its events are written, so this bounds concurrent keyed writes.
    database_pool_size: int = Field(default=8, ge=1)
