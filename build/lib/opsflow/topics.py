"""Topics of record: created idempotently, with explicit partitions, kept forever.

The topics are the replay source of every read model, so they keep every
record (``retention.ms=-1``); partitions are explicit because keying by an
instance's id only keeps its events in order while the partition count does not change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def consumer_config(kafka: Mapping[str, Any], group: str) -> dict[str, Any]:
    """A reader of committed records that never commits offsets (its positions live
    elsewhere, e.g. in PostgreSQL; the group id only names the client): what the
    projector, replay, status and rebuild read the topics with."""
    return {
        "fetch.wait.max.ms": 100,
        **kafka,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
    }


def partitions_of(consumer: Consumer, topics: Sequence[str]) -> list[tuple[str, int]]:
    """Every partition of ``topics``.

    Raises:
        RetryableError: a topic does not exist (yet): provisioning creates them.
    """
    metadata = consumer.list_topics(timeout=10)
    found: list[tuple[str, int]] = []
    for topic in topics:
        meta = metadata.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise RetryableError(f"topic {topic} does not exist (provision the cluster first)")
        found += [(topic, p) for p in sorted(meta.partitions)]
    return found


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


def offsets_at(
    consumer: Consumer,
    when_ms: int,
    ends: Mapping[tuple[str, int], int],
    *,
    timeout: float = 30.0,
) -> dict[tuple[str, int], int]:
    """For each partition of ``ends``, the first offset whose record was written at or
    after ``when_ms``; the partition's end when no record is that late.

    The broker's time lookup is only where to start looking: brokers answer with
    the start of a record batch, and the embedded broker answers 0, not "none",
    for a time after its newest record (a replay "up to now" replayed nothing,
    and the demo re-read whole topics). So the newest record is checked first,
    then the records from the broker's answer on are read to the first one that
    late. ``consumer`` is left unassigned.

    Raises:
        RetryableError: the partitions could not be read within ``timeout``.
    """
    found: dict[tuple[str, int], int] = {}
    looked_up = consumer.offsets_for_times(
        [TopicPartition(t, p, when_ms) for t, p in ends], timeout=timeout
    )
    starts = {}
    for tp in looked_up:
        where, end = (tp.topic, tp.partition), ends[(tp.topic, tp.partition)]
        if 0 <= tp.offset < end:
            starts[where] = tp.offset
        else:
            found[where] = end
    newest = _first_records(
        consumer, {tp: ends[tp] - 1 for tp in starts}, ends, lambda _ts: True, timeout
    )
    for where, (_offset, stamp) in newest.items():
        if stamp < when_ms:
            found[where] = ends[where]
            del starts[where]
    late = _first_records(consumer, starts, ends, lambda ts: ts >= when_ms, timeout)
    for where in starts:
        found[where] = late[where][0] if where in late else ends[where]
    return found


def _first_records(
    consumer: Consumer,
    starts: Mapping[tuple[str, int], int],
    ends: Mapping[tuple[str, int], int],
    wanted: Callable[[int], bool],
    timeout: float,
) -> dict[tuple[str, int], tuple[int, int]]:
    """Per partition, (offset, timestamp) of the first record from ``starts`` whose
    timestamp is ``wanted``; a partition read to its end without one is left out."""
    if not starts:
        return {}
    consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in starts.items()])
    found: dict[tuple[str, int], tuple[int, int]] = {}
    open_ = set(starts)
    deadline = time.monotonic() + timeout
    try:
        while open_:
            if time.monotonic() > deadline:
                raise RetryableError(f"could not read {sorted(open_)} in time")
            for msg in consumer.consume(1000, 0.2):
                where = (msg.topic() or "", msg.partition() or 0)
                if where not in open_:
                    continue
                error = msg.error()
                if error is not None:
                    # A read_committed reader's end is the last stable offset, short of
                    # ``ends`` while a transaction is open there: nothing more to read.
                    if error.code() == KafkaError._PARTITION_EOF:
                        open_.discard(where)
                    continue
                offset = msg.offset() or 0
                if offset >= ends[where]:
                    open_.discard(where)
                elif wanted(msg.timestamp()[1]):
                    found[where] = (offset, msg.timestamp()[1])
                    open_.discard(where)
            for tp in consumer.position([TopicPartition(t, p) for t, p in open_]):
                if tp.offset >= ends[(tp.topic, tp.partition)]:
                    open_.discard((tp.topic, tp.partition))
    finally:
        consumer.unassign()
    return found
