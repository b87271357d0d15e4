"""Topics of record: created idempotently, with explicit partitions, kept forever; and
how opsflow reads them.

The topics are the replay source of every read model, so they keep every
record (``retention.ms=-1``); partitions are explicit because keying by an
instance's id only keeps its events in order while the partition count does not change.

Reading them has one home here: the settings of a long-lived reader whose positions
live elsewhere (``consumer_config``) and of a throwaway one (``reader_config``), every
partition of some topics, their ends, the offsets at a time, and reading partitions
from given offsets until each has reported its end (``ReadToEnd``), which runtime
recovery, the dead-letter queues, trace, replay and rebuild all do.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ClusterMetadata,
    NewTopic,
)

from opsflow.errors import RetryableError
from opsflow.settings import TopicSettings, for_consumer

Partition = tuple[str, int]
"""A partition as (Kafka topic name, partition number)."""

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


def reader_config(
    kafka: Mapping[str, Any], label: str, *, isolation: str = "read_committed"
) -> dict[str, Any]:
    """A throwaway reader: it reads some partitions from offsets it is given to their end,
    then is closed. It joins no group and commits nothing, so its group id, unique to
    the reader (``opsflow-<label>-<random hex>``), only names the client.

    It gets an end-of-partition event whenever it reaches a partition's end
    (``ReadToEnd`` relies on them): the end learnt from fetch responses, not asked
    with ListOffsets, which the embedded broker answers short of the end for "latest"
    (see ``end_offsets``). ``read_committed`` keeps records of transactions still
    open (or aborted, on brokers that hide them) from being read as facts;
    ``read_uncommitted`` is for finding a record whatever became of its transaction.
    A start no longer in the log reads from the oldest record there.

    Everything else comes from ``kafka`` (servers, security, ``KAFKA_*`` settings).
    A caller's default that ``kafka`` may override goes before the result, a setting
    that must win goes after it: ``{"fetch.wait.max.ms": 50, **reader_config(...)}``.
    """
    return {
        **for_consumer(kafka),
        "group.id": f"opsflow-{label}-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": isolation,
        "enable.partition.eof": True,
    }


class ReadToEnd:
    """The records of some partitions, each from its start offset until it has reported
    its end, as an iterator of messages (``for msg in ReadToEnd(consumer, starts, ...)``).

    A partition ends where the reader finds its end (an end-of-partition event, which
    ``reader_config`` asks for), or, when ``ends`` gives it an end offset, at the first
    record at or past the one before that offset, or once the reader's position is
    there. The position is what ends a partition for a reader without end events:
    transaction markers and aborted records are never delivered, so the record just
    before an end may never come. A ``read_committed`` reader's end is the last stable
    offset, short of ``ends`` while a transaction is open there: nothing more to read.
    Records of a partition after its end are passed over, so a reading sees each
    partition as it was when the reader reached its end. Errors the client recovers
    from by itself are passed over too; a fatal one raises ``RetryableError``.

    ``timeout_s`` bounds the whole reading; ``stall_s`` bounds only the time without a
    record or an end, for readings that may be long but must keep moving. Either
    raises ``RetryableError`` naming the partitions that did not finish. ``check``
    runs before every fetch: raise from it to call the reading off. Between records
    the caller may ``seek`` the consumer (records fetched before the seek may still
    come: the caller passes over them) or ``finish`` a partition it has read enough
    of. ``remaining`` is what has not ended yet. The consumer is assigned the
    partitions to read (nothing is assigned when there is nothing to read) and left
    assigned.
    """

    def __init__(
        self,
        consumer: Consumer,
        starts: Mapping[Partition, int],
        *,
        ends: Mapping[Partition, int] | None = None,
        timeout_s: float | None = None,
        stall_s: float | None = None,
        check: Callable[[], None] | None = None,
        batch: int = 1000,
        wait_s: float = 0.1,
    ) -> None:
        self.consumer = consumer
        self.starts = dict(starts)
        self.ends = dict(ends or {})
        self.timeout_s, self.stall_s, self.check = timeout_s, stall_s, check
        # Up to ``batch`` records that are already there are taken at once; when none
        # are, the reader waits up to ``wait_s`` for the next one (or an end). Not a
        # blocking consume(batch, wait_s): that waits its whole ``wait_s`` unless a
        # full batch comes, so every reading of a few records paid it (replay
        # waited 1 s per reading, the recovery scan 0.5 s per take-over; measured).
        self.batch, self.wait_s = batch, wait_s
        self.remaining: set[Partition] = {
            where
            for where, start in self.starts.items()
            if where not in self.ends or start < self.ends[where]
        }

    def finish(self, where: Partition) -> None:
        """Read no more of ``where``: the caller has what it wanted from it."""
        self.remaining.discard(where)

    def __iter__(self) -> Iterator[Message]:
        if not self.remaining:
            return
        self.consumer.assign(
            [
                TopicPartition(t, p, at)
                for (t, p), at in self.starts.items()
                if (t, p) in self.remaining
            ]
        )
        started = progress = time.monotonic()
        while self.remaining:
            if self.check is not None:
                self.check()
            now = time.monotonic()
            if self.timeout_s is not None and now - started > self.timeout_s:
                raise RetryableError(
                    f"reading {self._unfinished()} to the end took over {self.timeout_s:g} s; "
                    "try again, or check the broker's health"
                )
            if self.stall_s is not None and now - progress > self.stall_s:
                raise RetryableError(
                    f"reading {self._unfinished()} made no progress for {self.stall_s:g} s"
                )
            for msg in self._next():
                where = (msg.topic() or "", msg.partition() or 0)
                error = msg.error()
                if error is not None:
                    if error.fatal():
                        raise RetryableError(f"reading {msg.topic()} failed: {error.str()}")
                    if error.code() == KafkaError._PARTITION_EOF and where in self.remaining:
                        self.remaining.discard(where)
                        progress = time.monotonic()
                    continue
                if where not in self.remaining:
                    continue
                progress = time.monotonic()
                offset = msg.offset() or 0
                end = self.ends.get(where)
                if end is None or offset < end:
                    yield msg
                if end is not None and offset + 1 >= end:
                    self.remaining.discard(where)
            bounded = [TopicPartition(t, p) for t, p in self.remaining if (t, p) in self.ends]
            if bounded:
                for tp in self.consumer.position(bounded):
                    if tp.offset >= self.ends[(tp.topic, tp.partition)]:
                        self.remaining.discard((tp.topic, tp.partition))

    def _next(self) -> list[Message]:
        """The records and events the client holds (up to a batch), else the next one."""
        found = self.consumer.consume(self.batch, 0)
        if found:
            return found
        one = self.consumer.poll(self.wait_s)
        return [] if one is None else [one]

    def _unfinished(self, shown: int = 5) -> str:
        names = [f"{t}[{p}]" for t, p in sorted(self.remaining)]
        more = f" and {len(names) - shown} more partitions" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more


def partitions_of(consumer: Consumer, topics: Sequence[str]) -> list[Partition]:
    """Every partition of ``topics``.

    Raises:
        RetryableError: a topic does not exist (yet): provisioning creates them.
    """
    return partitions_in(consumer.list_topics(timeout=10), topics)


def partitions_in(metadata: ClusterMetadata, topics: Sequence[str]) -> list[Partition]:
    """Every partition of ``topics`` in metadata already fetched (one request serves many
    lookups: ``opsflow status`` asked for it two dozen times, 5 ms each).

    Raises:
        RetryableError: a topic does not exist (yet): provisioning creates them.
    """
    found: list[Partition] = []
    for topic in topics:
        meta = metadata.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise RetryableError(f"topic {topic} does not exist (provision the cluster first)")
        found += [(topic, p) for p in sorted(meta.partitions)]
    return found


def end_offsets(
    kafka: Mapping[str, Any], partitions: Iterable[Partition], *, timeout: float = 10.0
) -> dict[Partition, int]:
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
    consumer = Consumer({**reader_config(kafka, "end-offsets"), "fetch.wait.max.ms": 10})
    try:
        # Leaders first: assigned before its metadata arrived, librdkafka waits for
        # its offset-query timer (~0.5 s measured) before it asks where the end is.
        consumer.list_topics(timeout=timeout)
        consumer.assign([TopicPartition(t, p, OFFSET_END) for t, p in parts])
        found: dict[Partition, int] = {}
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
    ends: Mapping[Partition, int],
    *,
    timeout: float = 30.0,
) -> dict[Partition, int]:
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
    found: dict[Partition, int] = {}
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
    starts: Mapping[Partition, int],
    ends: Mapping[Partition, int],
    wanted: Callable[[int], bool],
    timeout: float,
) -> dict[Partition, tuple[int, int]]:
    """Per partition, (offset, timestamp) of the first record from ``starts`` whose
    timestamp is ``wanted``; a partition read to its end without one is left out."""
    if not starts:
        return {}
    found: dict[Partition, tuple[int, int]] = {}
    reading = ReadToEnd(consumer, starts, ends=ends, timeout_s=timeout, wait_s=0.2)
    try:
        for msg in reading:
            _, stamp = msg.timestamp()
            if wanted(stamp):
                where = (msg.topic() or "", msg.partition() or 0)
                found[where] = (msg.offset() or 0, stamp)
                reading.finish(where)
    finally:
        consumer.unassign()
    return found


def unreachable(servers: str) -> str | None:
    """Why no address of ``servers`` (``[PROTOCOL://]host:port,...``) can be reached: each
    refused the connection or does not resolve. None once one accepts, or is merely
    slow to answer (the Kafka client's own timeout decides then).

    Asked before a client's first request: a refused connection is known at once,
    but the Kafka client retries it until its request times out (5 s measured).
    """
    errors = []
    for server in filter(None, (part.strip() for part in servers.split(","))):
        host, _, port = server.rpartition("://")[2].rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return None
        except TimeoutError:
            return None
        except (OSError, ValueError) as err:
            errors.append(f"{server}: {getattr(err, 'strerror', None) or err}")
    return "; ".join(errors) or "no address given"
