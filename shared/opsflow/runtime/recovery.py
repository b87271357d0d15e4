"""Recovery after an unclean stop: which outputs of uncommitted inputs are already written.

Kafka transactions make outputs and input offsets commit together, and on
Apache Kafka the outputs of a transaction that never committed are aborted
and hidden from ``read_committed`` readers. Not every Kafka-protocol broker
does that: the embedded broker (Tansu) keeps no list of aborted transactions,
so ``read_committed`` readers see every record once its producer's next
transaction commits, and an open transaction of a dead producer is never timed
out. Measured on it: a producer killed mid-transaction, restarted under the
same ``transactional.id``, commits the dead process's records with its own.

So, when a worker takes partitions (or aborts a transaction on one), it:

1. resolves the previous owner's transaction by committing one under the
   same per-partition ``transactional.id`` (on Apache Kafka the re-init has
   already aborted it, and this commit only re-commits the same offsets);
2. reads the tails of its output topics, once for all the partitions it took,
   and collects the ``opsflow-source`` header of every output written for
   their uncommitted inputs;
3. skips producing those outputs again when it re-processes the inputs.

Every output names its source (``<topic>/<partition>/<offset>#<n>``), and a
source's outputs are deterministic, so skipping by source is exact.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from opsflow.errors import RetryableError
from opsflow.topics import end_offsets, offsets_at

SOURCE_HEADER = "opsflow-source"
# Record timestamps come from producers' clocks; scan this much earlier than
# the first uncommitted input's timestamp to allow for skew between machines.
CLOCK_SKEW_MS = 60_000


def source_of(topic: str, partition: int, offset: int, index: int | str) -> str:
    """The ``opsflow-source`` header value naming which input an output came from."""
    return f"{topic}/{partition}/{offset}#{index}"


Partition = tuple[str, int]


def _scanner(config: dict[str, Any]) -> Consumer:
    return Consumer(
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


def _read_to_end(
    consumer: Consumer, starts: list[TopicPartition], timeout_s: float
) -> Iterator[Message]:
    """Every record from ``starts`` to the end of each partition, as it is now."""
    consumer.assign(starts)
    remaining = {(tp.topic, tp.partition) for tp in starts}
    deadline = time.monotonic() + timeout_s
    while remaining:
        if time.monotonic() > deadline:
            raise RetryableError(f"reading partitions to their end timed out ({sorted(remaining)})")
        for msg in consumer.consume(1000, 0.5):
            error = msg.error()
            if error is None:
                yield msg
            elif error.code() == KafkaError._PARTITION_EOF:
                remaining.discard((msg.topic() or "", msg.partition() or 0))


def first_uncommitted(
    config: dict[str, Any], committed: Mapping[Partition, int], *, timeout_s: float = 60.0
) -> dict[Partition, int]:
    """The timestamp of the record at each partition's committed offset, for the partitions
    that have one (a partition read to its end has nothing uncommitted).

    Raises:
        RetryableError: the partitions could not be read in time.
    """
    consumer = _scanner(config)
    found: dict[Partition, int] = {}
    try:
        consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in committed.items()])
        remaining = set(committed)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise RetryableError(f"reading uncommitted inputs timed out ({sorted(remaining)})")
            for msg in consumer.consume(len(remaining), 0.5):
                where = (msg.topic() or "", msg.partition() or 0)
                if where not in remaining:
                    continue
                error = msg.error()
                if error is None:
                    found[where] = msg.timestamp()[1]
                elif error.code() != KafkaError._PARTITION_EOF:
                    continue
                remaining.discard(where)
                consumer.pause([TopicPartition(*where)])
        return found
    finally:
        consumer.close()


def written_sources(
    config: dict[str, Any],
    topics: Iterable[str],
    *,
    uncommitted: Mapping[Partition, int],
    since_ms: int,
    timeout_s: float = 60.0,
) -> dict[Partition, set[str]]:
    """For each source partition, the sources of outputs already on ``topics`` that came
    from its inputs at or after ``uncommitted[partition]`` (its first uncommitted
    offset), looking at records written since ``since_ms``.

    One pass over the output tails serves every partition a worker takes over.

    Raises:
        RetryableError: the tails could not be read in time.
    """
    found: dict[Partition, set[str]] = {where: set() for where in uncommitted}
    consumer = _scanner(config)
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
        parts = [(t, p) for t in topics for p in metadata.topics[t].partitions]
        ends = end_offsets(config, parts, timeout=timeout_s)
        # Not the broker's time lookup alone: one answers 0 for a time after its
        # newest record, and a take-over then re-read whole output topics.
        since = offsets_at(consumer, max(since_ms - CLOCK_SKEW_MS, 0), ends, timeout=timeout_s)
        starts = [
            TopicPartition(t, p, offset)
            for (t, p), offset in since.items()
            if offset < ends[(t, p)]
        ]
        for msg in _read_to_end(consumer, starts, timeout_s):
            for key, value in header_pairs(msg):
                if key == SOURCE_HEADER:
                    source = value.decode()
                    topic, partition, offset = _parse(source)
                    first = uncommitted.get((topic, partition))
                    if first is not None and offset >= first:
                        found[(topic, partition)].add(source)
        return found
    finally:
        consumer.close()


def header_pairs(msg: Message) -> list[tuple[str, bytes]]:
    """A record's headers as (name, bytes) pairs, leaving out headers without a value."""
    raw: Any = msg.headers() or []
    return [(key, value) for key, value in raw if isinstance(value, bytes)]


def _parse(source: str) -> tuple[str, int, int]:
    """``<topic>/<partition>/<offset>#<n>`` -> (topic, partition, offset)."""
    topic, partition, rest = source.split("/")
    return topic, int(partition), int(rest.split("#")[0])
