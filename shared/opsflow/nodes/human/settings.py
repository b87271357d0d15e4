"""A human step's settings, from its own environment variables (``REVIEW_*`` for a step
whose settings class says so).

Kafka, the registry and PostgreSQL come from the settings every opsflow
component reads (``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL``,
``DATABASE_URL``, ``OPSFLOW_TOPIC_PREFIX``, ``OPSFLOW_DELIVERY``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings


class HumanTaskSettings(BaseSettings):
    """How a human step listens, where its SLAs are and what time it is.

    An application subclasses it with its variable prefix and SLA file::

        class ReviewSettings(HumanTaskSettings):
            model_config = SettingsConfigDict(env_prefix="REVIEW_", extra="ignore")
            sla_file: Path = Path(__file__).with_name("sla.yaml")

    Attributes:
        host / port: where the HTTP API listens (loopback by default, like every
            embedded component; set 0.0.0.0 in a container).
        database_pool_size: connections for token checks and task turns (each action
            or timer holds one while it records and writes its event).
        sla_file: the SLA table (see ``opsflow.nodes.human.sla``).
        due_soon_s: what ``GET /tasks?due_soon=true`` calls soon.
        clock_offset_s: added to the wall clock for every timer and every
            event the step writes (a deployment never sets it; tests and
            demos move time forward with it).
        test_clock: serve ``PUT /testing/clock`` to set the time while running;
            for tests only, never in production.
        session_idle_s / session_max_s: an inbox session ends after this long
            without a request (30 min: a person reading a long case keeps it),
            or this long after sign-in however busy (8 h: a working day), as
            OWASP's session guidance suggests for an application of this risk.
            Wall-clock time: ``clock_offset_s`` and the test clock do not move it.
        refresh_s: how often an open inbox page brings its queue, claims and facts
            up to date by itself (its own script; 0: never, the person reloads). A
            refresh does not count as activity for ``session_idle_s``.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8900, ge=1, le=65535)
    database_pool_size: int = Field(default=4, ge=1)
    sla_file: Path = Path("sla.yaml")
    due_soon_s: float = Field(default=900.0, gt=0)
    clock_offset_s: float = 0.0
    test_clock: bool = False
    session_idle_s: float = Field(default=30 * 60, gt=0)
    session_max_s: float = Field(default=8 * 3600, gt=0)
    refresh_s: float = Field(default=5.0, ge=0)

    @classmethod
    def prefix(cls) -> str:
        """The variables' prefix (``REVIEW_``), as messages name them."""
        return str(cls.model_config.get("env_prefix", ""))
