"""Topics of record: created idempotently, with explicit partitions, kept forever.

The topics are the replay source of every read model, so they keep every
record (``retention.ms=-1``); partitions are explicit because keying by order
id only keeps an order in order while the partition count does not change.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from opsflow.errors import RetryableError
from opsflow.settings import TopicSettings

RECORD_TOPIC_CONFIG = {"retention.ms": "-1", "cleanup.policy": "delete"}
DEAD_LETTER_SUFFIX = ".dlq"


def topic_name(topic: str, *, prefix: str | None = None) -> str:
    """The Kafka name of a contract topic in this environment (``OPSFLOW_TOPIC_PREFIX``)."""
    return f"{TopicSettings().prefix if prefix is None else prefix}{topic}"


def dead_letter_topic(source: str) -> str:
    """Where records of ``source`` that cannot be processed are kept: ``<source>.dlq``."""
    return f"{source}{DEAD_LETTER_SUFFIX}"


def ensure_topics(
    admin: AdminClient,
    names: Iterable[str],
    *,
    partitions: int,
    config: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; existing topics are left as they are.

    Returns:
        The names of the topics this call created.

    Raises:
        RetryableError: the cluster did not answer in time or refused for a transient reason.
    """
    wanted = sorted(set(names))
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=-1,
            config=config or RECORD_TOPIC_CONFIG,
        )
        for name in wanted
        if name not in existing
    ]
    if not new:
        return []
    created = []
    for name, future in admin.create_topics(new, request_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RetryableError(f"could not create topic {name}: {err}") from err
    return created
