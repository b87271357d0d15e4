"""How a worker makes each input's outputs appear exactly once: its delivery.

The worker's loop is the same whatever the delivery: it takes partitions,
keeps them paused until the recovery scan (``recovery``) has found what was
already written for their uncommitted inputs, handles batches of inputs and
commits them. A ``DeliveryStrategy`` does what differs between the modes of
``opsflow.runtime.Delivery``: getting ready to produce for partitions taken,
producing into a partition's open batch, committing batches (and redoing
those that could not be committed), letting go of partitions revoked or lost,
and holding back writes after the process stood still. ``Worker`` picks one
when it is built: ``TransactionalDelivery`` or ``LogScanDelivery``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from opsflow.runtime.observability import Metrics
from opsflow.runtime.service import RetryPolicy

if TYPE_CHECKING:
    from opsflow.runtime.worker import Headers, StallWatch, _Partition

log = logging.getLogger("opsflow.runtime")

_TXN_TIMEOUT_S = 30.0
_TAKE_OVER_ATTEMPTS = 8
# Log-scan delivery: how long one wait for delivery reports lasts before the
# worker logs that it is still waiting (it then waits on: see LogScanDelivery.commit).
_REPORT_WAIT_S = 5.0
# Log-scan delivery: a request unanswered this long is sent again on a new
# connection. Safe with the idempotent producer (the broker drops the copy by
# its sequence number), and it gets writes moving again soon after a broker
# that stood still resumes.
_REQUEST_TIMEOUT_MS = 5_000
# After standing still, wait this long (two of the worker's heartbeats and their
# answers) before trusting the assignment again: the consumer learns a loss from
# a heartbeat.
_CONFIRM_S = 2.5


class DeliveryStrategy(ABC):
    """What a worker's delivery mode decides; the worker calls it at these points."""

    # A producer error that ends the worker: it stops after the commit that saw
    # it and raises it once stopped (its supervisor starts a fresh process).
    fatal: KafkaError | None = None

    @abstractmethod
    def assigned(self, parts: Sequence[_Partition]) -> None:
        """Get ready to produce for partitions just taken, from their committed offsets
        (in the consumer's rebalance callback, before they are registered)."""

    @abstractmethod
    def begin(self, part: _Partition) -> None:
        """A batch opens on the partition: its first input is about to be produced for."""

    @abstractmethod
    def produce(
        self,
        part: _Partition,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
    ) -> None:
        """Write one output into the partition's open batch."""

    @abstractmethod
    def poll(self, parts: Sequence[_Partition]) -> None:
        """Serve delivery reports for the partitions' open batches, without waiting."""

    @abstractmethod
    def commit(self, parts: Sequence[_Partition]) -> None:
        """Commit the partitions' open batches: their outputs and the input offset after
        each. A batch that cannot be committed is redone (``_Partition.redo``). The
        worker closes every batch afterwards, committed or not."""

    @abstractmethod
    def revoked(self, parts: Sequence[_Partition]) -> None:
        """Let go of partitions given up in a rebalance, once their batches are committed."""

    @abstractmethod
    def lost(self, parts: Sequence[_Partition]) -> None:
        """Let go of partitions another member owns now, without committing anything."""

    @abstractmethod
    def stood_still(self) -> bool:
        """Whether what the worker took in so far must not be produced or committed,
        because the process stood still since this was last asked.

        Asked before anything is produced or committed.
        """

    @abstractmethod
    def close(self) -> None:
        """At shutdown, once the consumer has closed: send what is still queued."""


class TransactionalDelivery(DeliveryStrategy):
    """Kafka transactions: one transactional producer per owned input partition.

    Each input partition a worker owns gets its own transactional producer
    (``transactional.id`` = ``<group>.<topic>.<partition>``). The outputs of a
    batch of that partition's inputs and the offset after the batch are committed
    in one Kafka transaction (``send_offsets_to_transaction``). A stable id per
    partition means whoever owns the partition next, this process after a restart
    or another instance after a rebalance, fences the previous owner and settles
    its unfinished transaction before processing anything (see ``recovery``).
    No transaction ever spans a partition the worker no longer owns: partitions
    are committed on revocation and dropped, without commit, when lost.

    Args:
        consumer: the worker's consumer (group metadata, high marks, rewinds).
        producing: librdkafka settings for producers.
        group: the consumer group, which prefixes every ``transactional.id``.
        retry: the backoff between attempts to take a partition over.
        metrics: the service's metrics.
    """

    def __init__(
        self,
        *,
        consumer: Consumer,
        producing: dict[str, Any],
        group: str,
        retry: RetryPolicy,
        metrics: Metrics,
    ) -> None:
        self.consumer = consumer
        self.producing = producing
        self.group = group
        self.retry = retry
        self.metrics = metrics
        self.producers: dict[tuple[str, int], Producer] = {}
        # The partitions whose open transaction holds outputs (see _end_transaction).
        self.writing: set[tuple[str, int]] = set()
        # Commits and take-overs wait on the broker, not the CPU: one thread per
        # partition a service commonly owns.
        self._committer = ThreadPoolExecutor(max_workers=32, thread_name_prefix="commit")

    def _producer(self, part: _Partition) -> Producer:
        return self.producers[(part.topic, part.partition)]

    def assigned(self, parts: Sequence[_Partition]) -> None:
        # Each take-over is a few broker round trips: do them side by side. (The
        # group metadata is read here: asking the consumer for it from another
        # thread during its rebalance callback deadlocks.)
        group = self.consumer.consumer_group_metadata()
        producers = self._committer.map(lambda part: self._take_over(part, group), parts)
        for part, producer in zip(parts, producers, strict=True):
            self.producers[(part.topic, part.partition)] = producer

    def begin(self, part: _Partition) -> None:
        self._producer(part).begin_transaction()

    def produce(
        self,
        part: _Partition,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
    ) -> None:
        self.writing.add((part.topic, part.partition))
        _send(self._producer(part), topic, key, value, headers, on_delivery=None)

    def poll(self, parts: Sequence[_Partition]) -> None:
        for part in parts:
            self._producer(part).poll(0)

    def commit(self, parts: Sequence[_Partition]) -> None:
        group = self.consumer.consumer_group_metadata()
        if len(parts) == 1:
            errors = [self._end_transaction(parts[0], group)]
        else:
            errors = list(self._committer.map(self._end_transaction, parts, [group] * len(parts)))
        for part, error in zip(parts, errors, strict=True):
            if error is None:
                self._committed(part)
            else:
                self._transaction_failed(part, error)

    def revoked(self, parts: Sequence[_Partition]) -> None:
        for part in parts:
            self.producers.pop((part.topic, part.partition)).flush(10)

    def lost(self, parts: Sequence[_Partition]) -> None:
        for part in parts:
            self.writing.discard((part.topic, part.partition))
            producer = self.producers.pop((part.topic, part.partition))
            if part.open:
                try:
                    producer.abort_transaction(_TXN_TIMEOUT_S)
                except KafkaException as exc:
                    log.warning("abort after loss failed", extra={"error": str(exc)})

    def stood_still(self) -> bool:
        # Nothing to fence here: a previous owner's transactions are fenced by its
        # partition's transactional.id (see the class docstring).
        return False

    def close(self) -> None:
        self._committer.shutdown()
        for producer in self.producers.values():
            producer.flush(10)
        self.producers.clear()

    def _end_transaction(self, part: _Partition, group: object) -> KafkaError | None:
        """Commit the partition's open transaction with its input offset (on a pool thread:
        the client releases the interpreter while it waits for the broker)."""
        started = time.perf_counter()
        producer = self._producer(part)
        written = (part.topic, part.partition) in self.writing
        self.writing.discard((part.topic, part.partition))
        offsets = (
            []
            if part.next_offset is None
            else [TopicPartition(part.topic, part.partition, part.next_offset)]
        )
        try:
            if offsets and written:
                producer.send_offsets_to_transaction(offsets, group, _TXN_TIMEOUT_S)
            elif offsets:
                # A batch without outputs (all found written by a previous owner,
                # or passed over) has nothing to be atomic with: a plain group
                # commit, fenced by the group's generation, before the empty
                # transaction ends (so a failed commit leaves it open to abort).
                # The embedded broker applies only a producer's first offsets-only
                # transaction and drops later ones without an error (measured),
                # which left a taken-over partition's offset behind for good.
                self.consumer.commit(offsets=offsets, asynchronous=False)
            producer.commit_transaction(_TXN_TIMEOUT_S)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            return error
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        return None

    def _committed(self, part: _Partition) -> None:
        if part.next_offset is not None:
            part.committed = part.next_offset
        # The high mark from fetch responses (cached) is right on every broker
        # tried; ListOffsets("latest") is not on the embedded one.
        high = self.consumer.get_watermark_offsets(part.tp, cached=True)[1]
        self.metrics.lag.labels(part.topic, str(part.partition)).set(max(high - part.position, 0))

    def _transaction_failed(self, part: _Partition, error: KafkaError) -> None:
        log.warning(
            "transaction failed",
            extra={
                "partition": f"{part.topic}/{part.partition}",
                "error": str(error),
                "fatal": error.fatal(),
            },
        )
        if error.fatal():
            # The producer is unusable (fenced, or its sequence state lost):
            # start over as a new owner of the partition would.
            self.producers[(part.topic, part.partition)] = self._take_over(
                part, self.consumer.consumer_group_metadata()
            )
        else:
            self._producer(part).abort_transaction(_TXN_TIMEOUT_S)
        # Re-process from the last commit; outputs the failed transaction
        # left visible (on brokers that show them) are found again and skipped.
        part.redo(self.consumer)

    def _take_over(self, part: _Partition, group: object) -> Producer:
        """A producer for a newly owned partition, with the previous owner settled
        at the partition's committed offset.

        The broker may be briefly unavailable (restarting, electing a
        coordinator): retry with the service's backoff rather than crash, up to
        a bound after which the process exits and its supervisor restarts it.
        """
        topic, partition = part.topic, part.partition
        for attempt in range(1, _TAKE_OVER_ATTEMPTS + 1):
            try:
                producer = self._transactional_producer(topic, partition)
                self._settle(producer, topic, partition, part.committed, group)
                return producer
            except KafkaException as exc:
                if attempt == _TAKE_OVER_ATTEMPTS:
                    raise
                delay = self.retry.delay(attempt)
                log.warning(
                    "taking over partition failed, retrying",
                    extra={
                        "partition": f"{topic}/{partition}",
                        "attempt": attempt,
                        "delay_s": round(delay, 3),
                        "error": str(exc.args[0]),
                    },
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _transactional_producer(self, topic: str, partition: int) -> Producer:
        producer = Producer(
            {
                **self.producing,
                "transactional.id": f"{self.group}.{topic}.{partition}",
                "linger.ms": 5,
            }
        )
        producer.init_transactions(_TXN_TIMEOUT_S)
        return producer

    def _settle(
        self, producer: Producer, topic: str, partition: int, offset: int, group: object
    ) -> None:
        """Commit an offsets-only transaction at ``offset``.

        On Apache Kafka, ``init_transactions`` has already fenced the previous
        owner and aborted its open transaction, so this only re-commits the same
        offset. Brokers that do neither (the embedded one) end the previous
        owner's transaction with this commit, which makes its records visible;
        ``recovery`` then finds them so they are not written twice.
        """
        producer.begin_transaction()
        producer.send_offsets_to_transaction(
            [TopicPartition(topic, partition, offset)],
            group,
            _TXN_TIMEOUT_S,
        )
        producer.commit_transaction(_TXN_TIMEOUT_S)


class LogScanDelivery(DeliveryStrategy):
    """Log-scan delivery: no transactions; written, acknowledged, then committed.

    For brokers whose transactions are too costly or unreliable
    (``Delivery.LOG_SCAN``). It writes outputs through one idempotent producer
    that never gives up on a write, commits the input offsets once every output
    of the batch is acknowledged, and relies on the recovery scan after a
    takeover or a redo; see ``commit`` and ``StallWatch`` (``stood_still``) for
    what makes it exact.

    Args:
        consumer: the worker's consumer (offset commits, rewinds).
        producing: librdkafka settings for producers.
        metrics: the service's metrics.
        owned: the worker's partitions, as they change: a stall distrusts them all.
        stalls: the watch that tells whether the process stood still.
        stopping: whether the worker was told to stop.
    """

    def __init__(
        self,
        *,
        consumer: Consumer,
        producing: dict[str, Any],
        metrics: Metrics,
        owned: Mapping[tuple[str, int], _Partition],
        stalls: StallWatch,
        stopping: Callable[[], bool],
    ) -> None:
        self.consumer = consumer
        self.metrics = metrics
        self.owned = owned
        self.stalls = stalls
        self.stopping = stopping
        self._checked = time.monotonic()
        # One idempotent producer that never gives up on a write (no message
        # timeout): a request that timed out is sent again with the same sequence
        # numbers, and the broker drops the copy it already has. So a write is
        # never reported failed while the broker may still apply it (a broker that
        # stood still and resumes), and a batch is redone only after writes the
        # broker refused outright.
        self.producer = Producer(
            {
                **producing,
                "enable.idempotence": True,
                "acks": "all",
                "message.timeout.ms": 0,
                "request.timeout.ms": _REQUEST_TIMEOUT_MS,
                "linger.ms": producing.get("linger.ms", 5),
            }
        )

    def assigned(self, parts: Sequence[_Partition]) -> None:
        # Nothing to settle: the one producer serves every partition, and the
        # recovery scan of each partition taken finds what its previous owner wrote.
        pass

    def begin(self, part: _Partition) -> None:
        pass

    def produce(
        self,
        part: _Partition,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
    ) -> None:
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                part.failed = True
                if err.fatal():
                    self.fatal = err

        _send(self.producer, topic, key, value, headers, on_delivery=delivered)

    def poll(self, parts: Sequence[_Partition]) -> None:
        if parts:
            self.producer.poll(0)

    def commit(self, parts: Sequence[_Partition]) -> None:
        """Once every output of the batches is written, commit their offsets.

        It waits for every delivery report, however long the broker takes. The
        producer never gives up on a write, so a report is final: written
        (once: the broker drops resent copies by sequence number), or refused
        by the broker and never written. So when a batch is redone, nothing of
        it is still queued or in flight: no write can land after the recovery
        scan that decides what to write again. A batch is committed only if all
        its writes succeeded and the process did not stand still meanwhile
        (``stood_still``); otherwise it is redone from the last commit and the
        scan skips what was written.

        A worker told to stop while the broker does not answer leaves without
        committing (the next owner's scan finds what it wrote). A fatal producer
        error (``fatal``) stops the worker, which then raises it: its supervisor
        starts a fresh process, whose scan finds what this one wrote.
        """
        started = time.perf_counter()
        while unsent := self.producer.flush(_REPORT_WAIT_S):
            if self.fatal is not None or self.stopping():
                break
            log.warning("waiting for the broker to acknowledge writes", extra={"unsent": unsent})
        if self.fatal is not None or unsent:
            if self.fatal is not None:
                log.error("the producer failed for good", extra={"error": str(self.fatal)})
            return
        self.stood_still()
        written = [part for part in parts if not part.failed]
        offsets = [
            TopicPartition(part.topic, part.partition, part.next_offset)
            for part in written
            if part.next_offset is not None
        ]
        try:
            if offsets:
                self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("offset commit failed", extra={"error": str(exc.args[0])})
            written = []
        done = {id(part) for part in written}
        for part in parts:
            if id(part) in done:
                if part.next_offset is not None:
                    part.committed = part.next_offset
                continue
            log.warning(
                "batch not committed, redoing it",
                extra={"partition": f"{part.topic}/{part.partition}"},
            )
            part.redo(self.consumer)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def revoked(self, parts: Sequence[_Partition]) -> None:
        if parts:
            self.producer.flush(10)

    def lost(self, parts: Sequence[_Partition]) -> None:
        # Nothing to abort: the partitions' next owner scans for what was written.
        pass

    def stood_still(self) -> bool:
        """Whether the process stood still since the last time this was asked; if so,
        every owned partition is distrusted (``_distrust``).

        Asked before anything is produced or committed, so every stall is seen
        before the next write, wherever in the loop the process stood still.
        """
        now = time.monotonic()
        stalled = self.stalls.stalled_since(self._checked)
        self._checked = now
        if stalled:
            self._distrust()
        return stalled

    def _distrust(self) -> None:
        """After the process stood still: write nothing more of what it took in before,
        and confirm each partition is still ours before producing for it again.

        Another member may own the partitions now (our heartbeats stopped too),
        and no broker check stops a plain producer's writes, so the worker fences
        itself: open batches are marked failed (never committed; redone), every
        partition is rewound to its last commit and paused, and its recovery scan
        may finish only after ``_CONFIRM_S``, by when the consumer's heartbeats have
        told it of a lost assignment (the partitions are then dropped, unwritten).
        If the partitions are still ours, the scan finds what was written and
        processing goes on from the last commit.
        """
        confirm = time.monotonic() + _CONFIRM_S
        for part in self.owned.values():
            part.recover_after = confirm
            if part.open:
                part.failed = True
            else:
                part.redo(self.consumer)
        log.warning(
            "stood still: outputs held back until the assignment is confirmed",
            extra={"partitions": [f"{t}/{p}" for t, p in self.owned]},
        )

    def close(self) -> None:
        self.producer.flush(10)


def _send(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    *,
    on_delivery: Callable[[KafkaError | None, Message], None] | None,
) -> None:
    while True:
        try:
            producer.produce(
                topic,
                key=key,
                value=value,
                headers=headers,  # type: ignore[arg-type]
                on_delivery=on_delivery,
            )
            return
        except BufferError:
            producer.poll(0.05)  # local queue full: let deliveries drain
