"""Topics of record: created idempotently, with explicit partitions, kept forever.

The topics are the replay source of every read model, so they keep every
record (``retention.ms=-1``); partitions are explicit because keying by order
id only keeps an order in order while the partition count does not change.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition
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


def end_offsets(
    kafka: Mapping[str, Any], partitions: Iterable[tuple[str, int]], *, timeout: float = 10.0
) -> dict[tuple[str, int], int]:
    """The offset after the last record of each partition, as a ``read_committed`` reader
    sees it (the last stable offset).

    Read from fetch responses, not asked with ListOffsets: the embedded broker answers
    ListOffsets(latest) with a point inside the partition's last batch, short of the
    end whenever that batch holds several records (measured), while every fetch
    response carries the true high watermark.

    Raises:
        RetryableError: some partition's end was not learned within ``timeout``.
    """
    parts = sorted(set(partitions))
    if not parts:
        return {}
    consumer = Consumer(
        {
            **kafka,
            "group.id": "opsflow-end-offsets",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        # Leaders first: assigned before its metadata arrived, librdkafka waits for
        # its offset-query timer (~0.5 s measured) before it asks where the end is.
        consumer.list_topics(timeout=timeout)
        consumer.assign([TopicPartition(t, p, OFFSET_END) for t, p in parts])
        found: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(parts):
            if time.monotonic() > deadline:
                missing = [f"{t}[{p}]" for t, p in parts if (t, p) not in found]
                raise RetryableError(f"could not learn the end of {', '.join(missing)}")
            consumer.consume(1000, 0.05)
            for t, p in parts:
                if (t, p) not in found:
                    _, high = consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
                    if high >= 0:
                        found[(t, p)] = high
        return found
    finally:
        consumer.close()
