"""``python -m opsflow.projector``: keep every read model current until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import logs
from opsflow.errors import ConfigurationError
from opsflow.projector.service import Projector, selected
from opsflow.runtime import observability
from opsflow.settings import DatabaseSettings, KafkaSettings, RegistrySettings, RuntimeSettings


def main() -> None:
    logs.configure("projector")
    kafka, registry = KafkaSettings(), RegistrySettings()
    database_url = DatabaseSettings().database_url
    for variable, value in (
        ("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers),
        ("SCHEMA_REGISTRY_URL", registry.schema_registry_url),
        ("DATABASE_URL", database_url),
    ):
        if not value:
            raise ConfigurationError(variable, "is not set", "Set it, or run under `opsflow up`.")
    projector = Projector(
        selected(os.environ.get("OPSFLOW_PROJECTIONS")),
        kafka=kafka.client_config(),
        registry=SchemaRegistryClient(registry.client_config()),
        database_url=database_url,  # type: ignore[arg-type]
    )
    settings = RuntimeSettings()
    server = observability.serve(
        projector.metrics, projector.health, host=settings.metrics_host, port=settings.metrics_port
    )
    logging.getLogger("opsflow.projector").info(
        "serving metrics", extra={"metrics_port": server.server_address[1]}
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        projector.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    projector.run()


if __name__ == "__main__":
    try:
        main()
    except ConfigurationError as err:
        sys.exit(f"error: {err}")
