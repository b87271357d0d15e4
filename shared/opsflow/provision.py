"""Make a cluster, a database and a registry ready for opsflow; safe to run any number of times.

Run by ``opsflow up`` once the components answer, and in production as a
one-shot job (``python -m opsflow.provision``) against the real counterparts:

1. apply the database migrations (under an advisory lock);
2. create the topics of record (explicit partitions, infinite retention), and the
   platform's own: ``opsflow.operator-actions``, where operator actions are audited
   (``opsflow.operator_actions``);
3. register every published version of every contract under its subject, oldest
   first, so the registry holds the same history as ``schemas/`` and checks it;
   the platform's contract (``opsflow.operator.action``) too.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from opsflow import db, operator_actions
from opsflow.application import load_application
from opsflow.contracts.catalogue import catalogue
from opsflow.errors import ConfigurationError, OpsflowError
from opsflow.operator_actions import ACTIONS_TOPIC
from opsflow.settings import DatabaseSettings, KafkaSettings, RegistrySettings, TopicSettings
from opsflow.topics import dead_letter_topic, ensure_topics, topic_name

T = TypeVar("T")

# The configuration this process reads (checked against docker-compose.yml).
SETTINGS = (KafkaSettings, DatabaseSettings, RegistrySettings, TopicSettings)


def _retry(what: str, action: Callable[[], T], *, timeout: float = 90.0) -> T:
    """Retry ``action`` while its component is still starting up; a registry that refuses
    the credentials is not starting up, and fails at once.

    Raises:
        ConfigurationError: the registry answered 401 or 403.
        OpsflowError: ``action`` still failed after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except Exception as err:
            if isinstance(err, SchemaRegistryError) and err.http_status_code in (401, 403):
                raise ConfigurationError(
                    RegistrySettings().auth_variable(),
                    f"the schema registry refused the credentials ({err.http_status_code})",
                    "Set the credentials the registry expects",
                ) from err
            if time.monotonic() > deadline:
                raise OpsflowError(f"{what} failed: {err}") from err
            time.sleep(1.0)


def _required(value: str | None, variable: str) -> str:
    if not value:
        raise ConfigurationError(variable, "is not set", "Run `opsflow up` or set it.")
    return value


def record_topics() -> dict[str, int]:
    """Every topic of record of the application and its dead-letter topic, by name, with
    its partitions (the topic's own count, else ``OPSFLOW_TOPIC_PARTITIONS``), and the
    platform's operator-actions topic (no dead-letter topic: no service consumes it)."""
    default = TopicSettings().partitions
    found: dict[str, int] = {topic_name(ACTIONS_TOPIC): ACTIONS_TOPIC.partitions or 1}
    for topic in load_application().topics:
        name = topic_name(topic)
        found[name] = found[dead_letter_topic(name)] = topic.partitions or default
    return dict(sorted(found.items()))


def _create_topics(admin: AdminClient) -> list[str]:
    wanted = record_topics()
    created: list[str] = []
    for count in sorted(set(wanted.values())):
        names = [name for name, partitions in wanted.items() if partitions == count]
        created += ensure_topics(admin, names, partitions=count)
    return created


def provision() -> None:
    """Apply migrations, create topics and register contracts (see the module docstring)."""
    database_url = _required(DatabaseSettings().database_url, "DATABASE_URL")
    kafka = KafkaSettings()
    _required(kafka.bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    registry_url = _required(RegistrySettings().schema_registry_url, "SCHEMA_REGISTRY_URL")

    applied = _retry("database migration", lambda: db.migrate(database_url))
    print(f"migrations applied: {applied or 'none (schema current)'}")

    admin = AdminClient(dict(kafka.client_config()))
    created = _retry("topic creation", lambda: _create_topics(admin))
    print(f"topics created: {created or 'none (all exist)'}")

    client = SchemaRegistryClient(RegistrySettings().client_config(registry_url))
    contracts = [(event.subject, event.versions) for event in catalogue().values()]
    contracts.append((operator_actions.subject(), operator_actions.versions()))
    for subject, versions in contracts:
        for number, parsed in sorted(versions.items()):
            schema = Schema(json.dumps(parsed), "AVRO")
            schema_id = _retry(
                f"registering {subject} v{number}",
                functools.partial(client.register_schema, subject, schema),
            )
            print(f"{subject} v{number}: schema id {schema_id}")


def main() -> None:
    try:
        provision()
    except OpsflowError as err:
        sys.exit(f"provisioning failed: {err}")
    # Under `opsflow up`, tell the services waiting to start that they may.
    data_dir = os.environ.get("OPSFLOW_DATA_DIR")
    if data_dir:
        (Path(data_dir) / "run" / "provisioned").touch()


if __name__ == "__main__":
    main()
