"""Topics of record under a fresh prefix on the session's broker, and reading them back.

Used by the producer, ingest and proof-of-delivery capture tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from opsflow.topics import ensure_topics
from services.contracts import TOPICS

PARTITIONS = 3


def fresh_topics(bootstrap: str, kind: str) -> str:
    """A new topic prefix with every topic of record created under it."""
    prefix = f"{kind}{uuid.uuid4().hex[:8]}."
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}),
        [f"{prefix}{topic}" for topic in TOPICS],
        partitions=PARTITIONS,
    )
    return prefix


def records_on(bootstrap: str, topic: str, *, keys: Iterable[str] | None = None) -> list[Message]:
    """Every committed record on ``topic`` (optionally only those with one of ``keys``),
    read from the start of each partition to its end.

    The partitions are assigned, not subscribed to: a consumer group's join costs
    half its session timeout on the embedded broker (3 s at 6 s, 23 s at the
    client's default 45 s; measured), and a check needs no group.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            # The end of a partition is seen when a fetch comes back empty: ask
            # the broker not to hold empty fetches for long.
            "fetch.wait.max.ms": 50,
        }
    )
    partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    wanted = {key.encode() for key in keys} if keys is not None else None
    found: list[Message] = []
    at_end: set[int] = set()
    try:
        for _ in range(120):
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    at_end.add(message.partition() or 0)
                elif wanted is None or message.key() in wanted:
                    found.append(message)
            if len(at_end) == len(partitions):
                return found
    finally:
        consumer.close()
    raise AssertionError(f"did not reach the end of {topic}")
