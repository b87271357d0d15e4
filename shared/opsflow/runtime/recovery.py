"""Recovery after an unclean stop: which outputs of uncommitted inputs are already written.

Kafka transactions make outputs and input offsets commit together, and on
Apache Kafka the outputs of a transaction that never committed are aborted
and hidden from ``read_committed`` readers. Not every Kafka-protocol broker
does that: the embedded broker (Tansu) keeps no list of aborted transactions,
so ``read_committed`` readers see every record once its producer's next
transaction commits, and an open transaction of a dead producer is never timed
out. Measured on it: a producer killed mid-transaction, restarted under the
same ``transactional.id``, commits the dead process's records with its own.
Log-scan delivery (``opsflow.runtime.Delivery``) has no transactions at all:
its outputs are visible as soon as they are written.

So, when a worker takes partitions (or redoes a batch on one), it:

1. (transactions) resolves the previous owner's transaction by committing one
   under the same per-partition ``transactional.id``;
2. reads the tails of its output topics, once for all the partitions it took,
   and collects the ``opsflow-source`` header of every output written for
   their uncommitted inputs (``recover``);
3. skips producing those outputs again when it re-processes the inputs.

Every output names its source (``<topic>/<partition>/<offset>#<n>``), and a
source's outputs are deterministic, so skipping by source is exact for every
output written before the scan reached the end it set out to read.

The scan is bounded by offsets: it learns each output partition's end first
and reads up to there, never chasing records other writers keep appending.
Where it starts is a time: the first uncommitted input was written before any
of its outputs, so nothing of interest is older than that input's timestamp
(less ``CLOCK_SKEW_MS``). A position recorded at the last commit would be
tighter, but it cannot be kept in the committed offset's metadata: the
embedded broker stores the metadata and answers every offset fetch without it
(Tansu 0.6 ``OffsetFetch`` returns ``metadata: null``; measured). The cost:
after a takeover with a large lag, the scan reads everything written to the
output topics since the oldest uncommitted input was produced.

A scan gives up only when it stops making progress (no record and no end of
partition for ``stall_s``), never because it is long, and callers retry it
from the poll loop: a slow scan delays its partitions, it does not crash the
process into a restart that would start the same scan again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from opsflow.errors import RetryableError
from opsflow.topics import Partition, ReadToEnd, end_offsets, offsets_at, reader_config

log = logging.getLogger("opsflow.runtime")

SOURCE_HEADER = "opsflow-source"
# Record timestamps come from producers' clocks; scan this much earlier than
# the first uncommitted input's timestamp to allow for skew between machines.
CLOCK_SKEW_MS = 60_000
# A scan that has read nothing new for this long is given up (and retried).
STALL_S = 60.0


class Cancelled(Exception):
    """The scan was called off: its worker is stopping."""


def source_of(topic: str, partition: int, offset: int, index: int | str) -> str:
    """The ``opsflow-source`` header value naming which input an output came from."""
    return f"{topic}/{partition}/{offset}#{index}"


def _scanner(config: dict[str, Any]) -> Consumer:
    """A throwaway reader whose fetch queue is as small as the worker's own: a scan runs
    in the worker's process, beside its consumer."""
    return Consumer({**reader_config(config, "recovery"), "queued.max.messages.kbytes": 4096})


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled


def first_uncommitted(
    config: dict[str, Any],
    committed: Mapping[Partition, int],
    *,
    stall_s: float = STALL_S,
    cancel: threading.Event | None = None,
) -> dict[Partition, int]:
    """The timestamp of the record at each partition's committed offset, for the partitions
    that have one (a partition read to its end has nothing uncommitted).

    Raises:
        RetryableError: reading made no progress for ``stall_s``.
        Cancelled: ``cancel`` was set.
    """
    consumer = _scanner(config)
    found: dict[Partition, int] = {}
    try:
        # Not ``ReadToEnd``: one record of each partition is wanted, not its end, and
        # each fetch asks for as many events as partitions still unanswered, so a
        # take-over whose partitions are all read to their end returns at once.
        consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in committed.items()])
        remaining = set(committed)
        progress = time.monotonic()
        while remaining:
            _check(cancel)
            if time.monotonic() - progress > stall_s:
                raise RetryableError(f"reading uncommitted inputs stalled ({sorted(remaining)})")
            for msg in consumer.consume(len(remaining), 0.5):
                where = (msg.topic() or "", msg.partition() or 0)
                if where not in remaining:
                    continue
                error = msg.error()
                if error is None:
                    found[where] = msg.timestamp()[1]
                elif error.code() != KafkaError._PARTITION_EOF:
                    continue
                progress = time.monotonic()
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
    stall_s: float = STALL_S,
    cancel: threading.Event | None = None,
) -> dict[Partition, set[str]]:
    """For each source partition, the sources of outputs already on ``topics`` that came
    from its inputs at or after ``uncommitted[partition]`` (its first uncommitted
    offset), looking at records written since ``since_ms`` and up to each output
    partition's end as it is when the scan starts.

    One pass over the output tails serves every partition a worker takes over.

    Raises:
        RetryableError: the tails could not be located, or reading them stalled.
        Cancelled: ``cancel`` was set.
    """
    found: dict[Partition, set[str]] = {where: set() for where in uncommitted}
    consumer = _scanner(config)
    try:
        metadata = consumer.list_topics(timeout=30)
        # A topic the broker does not have yet (a dead-letter topic nothing was ever
        # written to) holds no outputs: nothing of it to scan.
        parts = [
            (t, p) for t in topics if t in metadata.topics for p in metadata.topics[t].partitions
        ]
        if not parts:
            return found
        ends = end_offsets(config, parts, timeout=30)
        _check(cancel)
        # Not the broker's time lookup alone: one answers 0 for a time after its
        # newest record, and a take-over then re-read whole output topics.
        since = offsets_at(consumer, max(since_ms - CLOCK_SKEW_MS, 0), ends, timeout=stall_s)
        reading = ReadToEnd(
            consumer,
            {where: since[where] for where in parts},
            ends={where: ends[where] for where in parts},
            stall_s=stall_s,
            check=lambda: _check(cancel),
            wait_s=0.5,
        )
        for msg in reading:
            for key, value in header_pairs(msg):
                if key == SOURCE_HEADER:
                    source = value.decode(errors="replace")
                    parsed = _parse(source)
                    if parsed is None:
                        # Not written by a worker (a malformed or forged header): it
                        # names no input, and must not stop every take-over.
                        log.warning(
                            "output with a malformed source header passed over",
                            extra={"source": source[:200]},
                        )
                        continue
                    topic, partition, offset = parsed
                    first = uncommitted.get((topic, partition))
                    if first is not None and offset >= first:
                        found[(topic, partition)].add(source)
        return found
    finally:
        consumer.close()


def recover(
    config: dict[str, Any],
    outputs: Iterable[str],
    committed: Mapping[Partition, int],
    *,
    stall_s: float = STALL_S,
    cancel: threading.Event | None = None,
) -> dict[Partition, set[str]]:
    """For each partition of ``committed`` (its committed offset), the sources of the
    outputs already written on ``outputs`` for its uncommitted inputs: what a new
    owner must not write again. A partition with nothing uncommitted gets an
    empty set without reading the outputs.

    Raises:
        RetryableError: a read made no progress for ``stall_s`` (retry it).
        Cancelled: ``cancel`` was set.
    """
    firsts = first_uncommitted(config, committed, stall_s=stall_s, cancel=cancel)
    found: dict[Partition, set[str]] = {where: set() for where in committed}
    if firsts:
        found.update(
            written_sources(
                config,
                outputs,
                uncommitted={where: committed[where] for where in firsts},
                since_ms=min(firsts.values()),
                stall_s=stall_s,
                cancel=cancel,
            )
        )
    return found


def header_pairs(msg: Message) -> list[tuple[str, bytes]]:
    """A record's headers as (name, bytes) pairs, leaving out headers without a value."""
    raw: Any = msg.headers() or []
    return [(key, value) for key, value in raw if isinstance(value, bytes)]


def _parse(source: str) -> tuple[str, int, int] | None:
    """``<topic>/<partition>/<offset>#<n>`` -> (topic, partition, offset); None when
    ``source`` does not have that shape."""
    try:
        topic, partition, rest = source.split("/")
        return topic, int(partition), int(rest.split("#")[0])
    except ValueError:
        return None
