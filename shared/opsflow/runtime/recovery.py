"""Recovery after an unclean stop: which outputs of uncommitted inputs are already written.

Kafka transactions make outputs and input offsets commit together, and on
Apache Kafka the outputs of a transaction that never committed are aborted
and hidden from ``read_committed`` readers. Not every Kafka-protocol broker
does that: the embedded broker (Tansu) keeps no list of aborted transactions,
so ``read_committed`` readers see every record once its producer's next
transaction commits, and an open transaction of a dead producer is never timed
out. Measured on it: a producer killed mid-transaction, restarted under the
same ``transactional.id``, commits the dead process's records with its own.

So, when a worker takes a partition (or aborts a transaction on it), it:

1. resolves the previous owner's transaction by committing one under the
   same per-partition ``transactional.id`` (on Apache Kafka the re-init has
   already aborted it, and this commit only re-commits the same offsets);
2. reads the tails of its output topics and collects the ``opsflow-source``
   header of every output written for this partition's uncommitted inputs;
3. skips producing those outputs again when it re-processes the inputs.

Every output names its source (``<topic>/<partition>/<offset>#<n>``), and a
source's outputs are deterministic, so skipping by source is exact.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from opsflow.errors import RetryableError

SOURCE_HEADER = "opsflow-source"
# Record timestamps come from producers' clocks; scan this much earlier than
# the first uncommitted input's timestamp to allow for skew between machines.
CLOCK_SKEW_MS = 60_000


def source_of(topic: str, partition: int, offset: int, index: int | str) -> str:
    """The ``opsflow-source`` header value naming which input an output came from."""
    return f"{topic}/{partition}/{offset}#{index}"


def written_sources(
    config: dict[str, Any],
    topics: Iterable[str],
    *,
    source_partition: tuple[str, int],
    from_offset: int,
    since_ms: int,
    timeout_s: float = 60.0,
) -> set[str]:
    """Sources of outputs already on ``topics`` that came from ``source_partition``
    at or after ``from_offset``, looking at records written since ``since_ms``.

    Raises:
        RetryableError: the tails could not be read in time.
    """
    consumer = Consumer(
        {
            **config,
            "group.id": f"opsflow-recovery-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            # End of partition is learnt from fetch responses, not ListOffsets,
            # which some brokers answer wrongly for "latest".
            "enable.partition.eof": True,
            "queued.max.messages.kbytes": 4096,
        }
    )
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
        wanted = [
            TopicPartition(topic, partition, max(since_ms - CLOCK_SKEW_MS, 0))
            for topic in topics
            for partition in metadata.topics[topic].partitions
        ]
        starts = [
            tp for tp in consumer.offsets_for_times(wanted, timeout=timeout_s) if tp.offset >= 0
        ]
        if not starts:
            return set()
        consumer.assign(starts)
        remaining = {(tp.topic, tp.partition) for tp in starts}
        prefix = f"{source_partition[0]}/{source_partition[1]}/"
        found: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise RetryableError(f"reading output tails timed out ({sorted(remaining)})")
            for msg in consumer.consume(1000, 0.5):
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard((msg.topic(), msg.partition()))
                    continue
                for key, value in header_pairs(msg):
                    if key == SOURCE_HEADER:
                        source = value.decode()
                        if source.startswith(prefix) and _offset(source) >= from_offset:
                            found.add(source)
        return found
    finally:
        consumer.close()


def header_pairs(msg: Message) -> list[tuple[str, bytes]]:
    """A record's headers as (name, bytes) pairs, leaving out headers without a value."""
    raw: Any = msg.headers() or []
    return [(key, value) for key, value in raw if isinstance(value, bytes)]


def _offset(source: str) -> int:
    return int(source.split("/")[2].split("#")[0])
