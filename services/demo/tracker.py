"""Following orders through the topics of record: each order's latest state, and when
each of its events was written.

The tracker reads every topic of record ``read_committed`` (what a downstream
service sees), assigned (no consumer group) from a point in time just before
the demo started, and keeps only the records keyed by one of the run's order
ids: the key is checked before a value is decoded, so other traffic on a busy
stack costs little.

An order's state is derived from the latest event of each step, not from the
last record read: the topics are read side by side, so an order's
``dispatch.requested`` may be read before its ``policy.checked``. Within one
topic an order's events are in order (one key, one partition), and a later
step outranks an earlier one.

Step times use Kafka record timestamps (when each event was written to its
topic), not the envelopes' ``occurred_at``: a service's output carries the
record time of its *input* as ``occurred_at`` (see ``opsflow.contracts.lineage``),
so ``occurred_at`` cannot time the step that produced it.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException
from confluent_kafka import TopicPartition as Partition
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.errors import BadInputError, ConfigurationError, RetryableError
from opsflow.settings import RegistrySettings
from opsflow.topics import end_offsets, offsets_at, topic_name
from services.contracts import (
    TOPICS,
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    PodCaptured,
    PodRejected,
    PolicyChecked,
    PolicyOutcome,
    ReviewDecided,
    ReviewDecision,
)
from services.demo.states import OrderState, Until

TIMING_SOURCE = "Kafka record timestamps (when each event was written to its topic)"


@dataclass
class OrderTrack:
    """What the topics said about one order so far."""

    order_id: str
    written_ms: dict[str, int] = field(default_factory=dict)
    """Event type -> record timestamp (ms) of its first event for this order."""
    policy: PolicyOutcome | None = None
    review_open: bool = False
    review_decision: ReviewDecision | None = None
    dispatch: Event | None = None
    """The latest dispatch.* event (the dispatch topic keeps an order's events in order)."""
    delivered: bool = False
    pod_rejected: bool = False
    _seen: set[uuid.UUID] = field(default_factory=set, repr=False)

    def apply(self, event: Event, written_ms: int) -> bool:
        """Take in one of the order's events; False for a repeat (same ``event_id``),
        which the at-least-once paths (ingest retries, replays) may write."""
        if event.envelope.event_id in self._seen:
            return False
        self._seen.add(event.envelope.event_id)
        self.written_ms.setdefault(event.event_type, written_ms)
        if isinstance(event, PolicyChecked):
            self.policy = event.outcome
        elif isinstance(event, ReviewDecided):
            self.review_decision = event.decision
        elif event.event_type.startswith("review."):
            self.review_open = True
        elif isinstance(event, DispatchRequested | DispatchExecuted | DispatchFailed):
            self.dispatch = event
        elif isinstance(event, PodCaptured):
            self.delivered = True
        elif isinstance(event, PodRejected):
            self.pod_rejected = True
        return True

    @property
    def state(self) -> OrderState:
        """The most advanced step the order's events show."""
        if self.delivered:
            return OrderState.DELIVERED
        if self.pod_rejected:
            return OrderState.POD_REJECTED
        if isinstance(self.dispatch, DispatchExecuted):
            return OrderState.DISPATCHED
        if isinstance(self.dispatch, DispatchFailed):
            final = (
                self.dispatch.retries_exhausted
                or self.dispatch.failure_class is DispatchFailureClass.PERMANENT
            )
            return OrderState.DISPATCH_FAILED if final else OrderState.DISPATCH_RETRYING
        if isinstance(self.dispatch, DispatchRequested):
            return OrderState.DISPATCH_REQUESTED
        if self.review_decision is ReviewDecision.APPROVED:
            return OrderState.APPROVED
        if self.review_decision is ReviewDecision.REJECTED:
            return OrderState.REVIEW_REJECTED
        if self.review_open:
            return OrderState.IN_REVIEW
        if self.policy is not None:
            return _AFTER_POLICY[self.policy]
        if "order.received" in self.written_ms:
            return OrderState.RECEIVED
        return OrderState.SENT


_AFTER_POLICY = {
    PolicyOutcome.AUTO_APPROVED: OrderState.APPROVED,
    PolicyOutcome.NEEDS_REVIEW: OrderState.NEEDS_REVIEW,
    PolicyOutcome.REJECTED: OrderState.REJECTED,
}


@dataclass(frozen=True)
class Step:
    """A step of the workflow, timed from the first event of one type to another's."""

    name: str
    start: str
    end: str
    # Orders with an event of this type are left out (the machine-only path).
    unless: str | None = None


STEPS: tuple[Step, ...] = (
    Step("received -> policy.checked", "order.received", "policy.checked"),
    Step("policy.checked -> dispatch.requested", "policy.checked", "dispatch.requested"),
    Step("dispatch.requested -> dispatch.executed", "dispatch.requested", "dispatch.executed"),
    Step("dispatch.executed -> pod.captured", "dispatch.executed", "pod.captured"),
    Step("end to end (received -> pod.captured)", "order.received", "pod.captured"),
    Step(
        "received -> dispatch.executed, no review",
        "order.received",
        "dispatch.executed",
        unless="review.requested",
    ),
)
"""The steps the summary times. policy.checked -> dispatch.requested includes the
review for orders approved by a person."""


@dataclass(frozen=True)
class StepTiming:
    """How long one step took over the orders that made it (milliseconds)."""

    step: str
    orders: int
    p50_ms: int | None
    p95_ms: int | None
    p99_ms: int | None


def percentile(values: list[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of non-empty ``values``:
    always a value that was measured, which keeps small samples honest."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def step_timings(tracks: Iterable[OrderTrack]) -> list[StepTiming]:
    """p50, p95 and p99 of every step over the orders that have both of its events."""
    durations: dict[str, list[int]] = {step.name: [] for step in STEPS}
    for track in tracks:
        for step in STEPS:
            start, end = track.written_ms.get(step.start), track.written_ms.get(step.end)
            if start is not None and end is not None and step.unless not in track.written_ms:
                durations[step.name].append(end - start)
    timings = []
    for step in STEPS:
        values = durations[step.name]
        p50, p95, p99 = (percentile(values, q) if values else None for q in (50, 95, 99))
        timings.append(StepTiming(step.name, len(values), p50, p95, p99))
    return timings


class Tracker:
    """Reads the topics of record and keeps the state of each of the given orders.

    Args:
        order_ids: the orders to follow; records of any other key are skipped.
        kafka: librdkafka settings (``bootstrap.servers`` and any security ones).
        registry_url: the schema registry that decodes the records.
        prefix: the topic prefix (``OPSFLOW_TOPIC_PREFIX``).
    """

    def __init__(
        self,
        order_ids: Iterable[str],
        *,
        kafka: Mapping[str, Any],
        registry_url: str,
        prefix: str,
    ) -> None:
        self.tracks = {order_id: OrderTrack(order_id) for order_id in order_ids}
        self._keys = {order_id.encode(): track for order_id, track in self.tracks.items()}
        self._states = {order_id: OrderState.SENT for order_id in self.tracks}
        self.counts: Counter[OrderState] = Counter({OrderState.SENT: len(self.tracks)})
        self.review_seen = False
        """Whether any review.* event was read for these orders: a review service answers."""
        self.undecodable = 0
        self._topics = [topic_name(topic, prefix=prefix) for topic in TOPICS]
        self._kafka = dict(kafka)
        self._bootstrap = str(kafka.get("bootstrap.servers", ""))
        self._registry_url = registry_url
        self._registry = SchemaRegistryClient(RegistrySettings().client_config(registry_url))
        self._codec = WireCodec(self._registry)
        self._consumer = Consumer(
            {
                **kafka,
                # Never joins or commits: the group id is only what librdkafka requires.
                "group.id": f"opsflow-demo-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 100,
                "queued.max.messages.kbytes": 4096,
                # Connection failures become one ConfigurationError, not log lines.
                "log_level": 2,
            }
        )

    def start(self, since_ms: int, *, timeout_s: float = 10.0) -> None:
        """Assign every partition of every topic of record from the first record written
        at or after ``since_ms``; call it before the orders are sent.

        Raises:
            ConfigurationError: the cluster or the registry does not answer, or a topic
                is missing.
        """
        try:
            self._registry.get_subjects()
        except Exception as err:  # connection errors come from the HTTP library underneath
            raise ConfigurationError(
                "SCHEMA_REGISTRY_URL",
                f"the schema registry at {self._registry_url} does not answer ({err})",
                "Start the stack with `opsflow up --detach`, or point SCHEMA_REGISTRY_URL "
                "at a running registry",
            ) from err
        try:
            metadata = self._consumer.list_topics(timeout=timeout_s)
        except KafkaException as err:
            raise ConfigurationError(
                "KAFKA_BOOTSTRAP_SERVERS",
                f"the Kafka cluster at {self._bootstrap} does not answer ({err.args[0].str()})",
                "Start the stack with `opsflow up --detach`, or point KAFKA_BOOTSTRAP_SERVERS "
                "at a running cluster",
            ) from err
        missing = [
            name
            for name in self._topics
            if name not in metadata.topics or metadata.topics[name].error is not None
        ]
        if missing:
            raise ConfigurationError(
                "OPSFLOW_TOPIC_PREFIX",
                f"the cluster has no topic {', '.join(missing)}",
                "Provision the topics of record (`python -m opsflow.provision`, which "
                "`opsflow up` runs), or fix OPSFLOW_TOPIC_PREFIX",
            )
        parts = [
            (name, partition)
            for name in self._topics
            for partition in metadata.topics[name].partitions
        ]
        try:
            # Where the run's records will start: the first record written since the
            # start time, or the end (a topic's history is never read).
            ends = end_offsets(self._kafka, parts, timeout=timeout_s)
            starts = offsets_at(self._consumer, since_ms, ends, timeout=timeout_s)
        except KafkaException as err:
            raise RetryableError(f"could not find where the demo's records start: {err}") from err
        self._consumer.assign([Partition(t, p, offset) for (t, p), offset in starts.items()])

    def poll(self, timeout_s: float) -> int:
        """Read what has arrived (waiting up to ``timeout_s`` for the first record);
        returns how many events of the followed orders were new.

        Raises:
            RetryableError: the client failed for good, or the registry cannot be asked.
        """
        changed = 0
        for msg in self._consumer.consume(1000, timeout_s):
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise RetryableError(f"the Kafka client failed: {error.str()}")
                continue  # transient: librdkafka reconnects and refetches by itself
            key = msg.key()
            track = self._keys.get(key) if isinstance(key, bytes) else None
            if track is None:
                continue
            try:
                event = self._codec.decode(msg.value())
            except BadInputError:
                self.undecodable += 1
                continue
            kind, written = msg.timestamp()
            if (
                kind == TIMESTAMP_NOT_AVAILABLE
            ):  # a very old broker: the envelope's time is next best
                written = int(event.envelope.occurred_at.timestamp() * 1000)
            if event.event_type.startswith("review."):
                self.review_seen = True
            if track.apply(event, written):
                changed += 1
                self._restate(track)
        return changed

    def _restate(self, track: OrderTrack) -> None:
        old, new = self._states[track.order_id], track.state
        if old is not new:
            self._states[track.order_id] = new
            self.counts[old] -= 1
            self.counts[new] += 1

    def state_of(self, order_id: str) -> OrderState:
        """Where one of the followed orders stands now."""
        return self._states[order_id]

    def review_decisions(self) -> dict[str, int]:
        """How many of the followed orders a reviewer decided, by decision (from the
        review topic, whoever decided them)."""
        decided = Counter(
            track.review_decision.value
            for track in self.tracks.values()
            if track.review_decision is not None
        )
        return dict(sorted(decided.items()))

    def reached(self, until: Until) -> int:
        """How many followed orders have gone as far as ``until`` asks."""
        return sum(n for state, n in self.counts.items() if until.reached(state))

    def close(self) -> None:
        """Leave the cluster; the tracker cannot be used after."""
        self._consumer.close()
