"""The pod-capture webhook's settings, from ``POD_*`` environment variables.

- ``POD_HOST``, ``POD_PORT`` (``127.0.0.1``, ``8800``): where the webhook listens.
- ``POD_MATCH_WAIT_S`` (``3``): how long a POD whose booking is not known yet
  waits for its dispatch record before it is rejected as unknown.
- ``POD_UNMATCHED_KEEP_S`` (``86400``): how long a POD refused for an unknown booking
  is kept, to be captured if its dispatch is recorded late.
- ``POD_MAX_BODY_BYTES`` (``65536``, at most ``262144``): the largest POD body taken
  (413 above it).
- ``POD_DATABASE_POOL_SIZE`` (``8``): connections to PostgreSQL.

Kafka, the registry and PostgreSQL come from the settings every opsflow
component reads (``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL``,
``DATABASE_URL``, ``OPSFLOW_TOPIC_PREFIX``).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PodSettings(BaseSettings):
    """How the webhook listens, what it takes and how long it waits for a dispatch."""

    model_config = SettingsConfigDict(env_prefix="POD_", extra="ignore")

    # Loopback by default, like every embedded component; set 0.0.0.0 in a container.
    host: str = "127.0.0.1"
    port: int = Field(default=8800, ge=1, le=65535)
    # dispatch.executed reaches the read model through the runtime service,
    # typically well under a second after it is written; a carrier can be
    # faster than that. A carrier whose attempt times out before the answer
    # (the stand-in's default timeout is also 5 s) just sends the POD again.
    match_wait_s: float = Field(default=3.0, ge=0.0, le=60.0)
    # A dispatch can be recorded long after its booking (dispatch down between
    # booking and recording it); past this, the refusal on pod-rejects stands.
    unmatched_keep_s: float = Field(default=86400.0, ge=0.0)
    # A real POD is a few hundred bytes; anything near this is not one. The cap
    # keeps every POD taken well under Kafka's 1 MB record limit.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=256 * 1024)
    # Each request holds a connection while its pod.captured is written, so
    # this bounds the captures in flight.
    database_pool_size: int = Field(default=8, ge=1)
