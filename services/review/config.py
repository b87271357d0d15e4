"""The review service's settings, from ``REVIEW_*`` environment variables.

Kafka, the registry and PostgreSQL come from the settings every opsflow
component reads (``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL``,
``DATABASE_URL``, ``OPSFLOW_TOPIC_PREFIX``, ``OPSFLOW_DELIVERY``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SLA_FILE = Path(__file__).with_name("sla.yaml")


class ReviewSettings(BaseSettings):
    """How the review service listens, where its SLAs are and what time it is.

    Attributes:
        host / port: where the HTTP API listens (loopback by default, like every
            embedded component; set 0.0.0.0 in a container).
        database_pool_size: connections for token checks.
        sla_file: the SLA table (``sla.yaml`` next to this module by default).
        due_soon_s: what ``GET /tasks?due_soon=true`` calls soon.
        clock_offset_s: added to the wall clock for every timer and every
            event the service writes (a deployment never sets it; tests and
            demos move time forward with it).
        test_clock: serve ``PUT /testing/clock`` to set the time while running;
            for tests only, never in production.
    """

    model_config = SettingsConfigDict(env_prefix="REVIEW_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8900, ge=1, le=65535)
    database_pool_size: int = Field(default=4, ge=1)
    sla_file: Path = DEFAULT_SLA_FILE
    due_soon_s: float = Field(default=900.0, gt=0)
    clock_offset_s: float = 0.0
    test_clock: bool = False
