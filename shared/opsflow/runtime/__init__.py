"""The service runtime: declare a ``Service``, write typed handlers, ``run`` it.

See ``service`` for how a service is written and ``worker`` for what the
runtime guarantees (exactly-once processing, retries, dead letters).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import logs
from opsflow.errors import ConfigurationError
from opsflow.runtime import observability
from opsflow.runtime.service import BatchPolicy, Delivery, RetryPolicy, Service
from opsflow.runtime.worker import Worker
from opsflow.settings import KafkaSettings, RegistrySettings, RuntimeSettings
from opsflow.targets import load_target

__all__ = ["BatchPolicy", "Delivery", "RetryPolicy", "Service", "Worker", "load_service", "run"]


def load_service(target: str) -> Service:
    """The ``Service`` named by ``module[:attribute]`` (attribute defaults to ``service``)."""
    return load_target(
        target,
        Service,
        default="service",
        where=target,
        hint="Name a module that defines `service = Service(...)`.",
    )


def run(service: Service) -> None:
    """Run ``service`` until SIGTERM or SIGINT, then finish cleanly (exit status 0)."""
    logs.configure(service.name)
    kafka = KafkaSettings()
    registry = RegistrySettings()
    if not kafka.bootstrap_servers:
        raise ConfigurationError(
            "KAFKA_BOOTSTRAP_SERVERS",
            "is not set",
            "Set it, or run the service under `opsflow up`.",
        )
    if not registry.schema_registry_url:
        raise ConfigurationError(
            "SCHEMA_REGISTRY_URL", "is not set", "Set it, or run the service under `opsflow up`."
        )
    settings = RuntimeSettings()
    worker = Worker(
        service,
        kafka=kafka.client_config(),
        registry=SchemaRegistryClient(registry.client_config()),
        delivery=Delivery(settings.delivery),
    )

    server = observability.serve(
        worker.metrics, worker.health, host=settings.metrics_host, port=settings.metrics_port
    )
    logging.getLogger("opsflow.runtime").info(
        "serving metrics", extra={"metrics_port": server.server_address[1]}
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    finally:
        service.stopped()
