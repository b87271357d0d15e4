"""Configuration: one pydantic-settings class per component, read from the environment.

Each component of the stack has a production counterpart chosen by one
variable: ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``, ``SCHEMA_REGISTRY_URL``.
When a variable is unset, ``opsflow up`` starts the embedded counterpart and
exports the variable to everything it supervises.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# librdkafka properties that opsflow sets itself; KAFKA_* variables may override them.
_KAFKA_PREFIX = "KAFKA_"


class KafkaSettings(BaseSettings):
    """Where the Kafka cluster is and how to talk to it.

    Every other ``KAFKA_<NAME>`` variable is passed to librdkafka as the
    property ``<name>`` with underscores turned into dots, e.g.
    ``KAFKA_SECURITY_PROTOCOL=SASL_SSL`` becomes ``security.protocol``.
    """

    model_config = SettingsConfigDict(env_prefix="KAFKA_", extra="ignore")

    bootstrap_servers: str | None = None

    def client_config(self) -> dict[str, str | int | float | bool]:
        """The librdkafka configuration shared by producers, consumers and admin clients."""
        config: dict[str, str | int | float | bool] = {
            key[len(_KAFKA_PREFIX) :].lower().replace("_", "."): value
            for key, value in os.environ.items()
            if key.startswith(_KAFKA_PREFIX) and key != "KAFKA_BOOTSTRAP_SERVERS"
        }
        if self.bootstrap_servers:
            config["bootstrap.servers"] = self.bootstrap_servers
        return config


# librdkafka properties only one kind of client takes (its CONFIGURATION.md, "C/P"
# column): given the other kind, librdkafka logs a CONFWARN line at every start.
# The KAFKA_* settings are shared by every client, so each takes its own (see
# ``for_consumer`` and ``for_producer``).
_CONSUMER_ONLY = frozenset(
    {
        "group.id", "group.instance.id", "group.protocol", "group.remote.assignor",
        "partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms",
        "coordinator.query.interval.ms", "max.poll.interval.ms", "enable.auto.commit",
        "auto.commit.interval.ms", "enable.auto.offset.store", "queued.min.messages",
        "queued.max.messages.kbytes", "fetch.wait.max.ms", "fetch.queue.backoff.ms",
        "fetch.message.max.bytes", "max.partition.fetch.bytes", "fetch.max.bytes",
        "fetch.min.bytes", "fetch.error.backoff.ms", "isolation.level",
        "enable.partition.eof", "check.crcs", "auto.offset.reset",
        "consume.callback.max.messages",
    }
)  # fmt: skip
_PRODUCER_ONLY = frozenset(
    {
        "transactional.id", "transaction.timeout.ms", "enable.idempotence",
        "enable.gapless.guarantee", "queue.buffering.max.messages",
        "queue.buffering.max.kbytes", "queue.buffering.max.ms", "linger.ms",
        "message.send.max.retries", "retries", "queue.buffering.backpressure.threshold",
        "compression.codec", "compression.type", "compression.level", "batch.num.messages",
        "batch.size", "delivery.report.only.error", "sticky.partitioning.linger.ms",
        "request.required.acks", "acks", "request.timeout.ms", "message.timeout.ms",
        "delivery.timeout.ms", "partitioner",
    }
)  # fmt: skip


def for_consumer(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the properties only producers take."""
    return {k: v for k, v in config.items() if k not in _PRODUCER_ONLY}


def for_producer(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the properties only consumers take."""
    return {k: v for k, v in config.items() if k not in _CONSUMER_ONLY}


class DatabaseSettings(BaseSettings):
    """The PostgreSQL server holding read models, the registry's schemas and API keys."""

    model_config = SettingsConfigDict(extra="ignore")

    database_url: str | None = None


class RegistrySettings(BaseSettings):
    """The Confluent-compatible schema registry."""

    model_config = SettingsConfigDict(extra="ignore")

    schema_registry_url: str | None = None


class StackSettings(BaseSettings):
    """The embedded local stack started by ``opsflow up``."""

    model_config = SettingsConfigDict(env_prefix="OPSFLOW_", extra="ignore")

    data_dir: Path = Path(".opsflow")
    # "durable" keeps topics across restarts (S3 storage on local files);
    # "memory" is faster and is meant for throwaway test clusters only.
    broker_storage: Literal["durable", "memory"] = "durable"
    broker_port: int | None = None
    registry_port: int | None = None
    postgres_port: int | None = None
    supervisor_port: int | None = None
    # Run the application's programs too (its services, APIs and stand-ins); false
    # for an infrastructure-only stack (tests, benchmarks).
    services: bool = True


class TopicSettings(BaseSettings):
    """How topics of record are created."""

    model_config = SettingsConfigDict(env_prefix="OPSFLOW_TOPIC_", extra="ignore")

    partitions: int = Field(default=6, ge=1)
    # Prepended to every topic name, so several environments (or test runs)
    # can share one cluster without seeing each other's records.
    prefix: str = ""


class RuntimeSettings(BaseSettings):
    """How a service process runs."""

    model_config = SettingsConfigDict(env_prefix="OPSFLOW_", extra="ignore")

    # /metrics, /healthz and /readyz; 0 takes a free port (logged at start). Loopback
    # unless configured (0.0.0.0 in a container, for a scraper outside it).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # "transactions" (Kafka transactions) or "log-scan" (see opsflow.runtime.Delivery);
    # `opsflow up` sets log-scan for its durable embedded broker.
    delivery: Literal["transactions", "log-scan"] = "transactions"
