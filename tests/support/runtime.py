"""A runtime service (the one-hop ``tests.services.relay`` unless told) in topics of its
own, as a real process or as a worker in a thread of the test process, the orders it is
fed, and reading back what it wrote.

Used by the runtime, dead-letter, policy-check and wire-format tests.

Reading back never joins a consumer group (a join costs half the session timeout on
the embedded broker: 3 s at 6 s, 23 s at the client's default; measured): partitions
are assigned. And it waits for a precise condition, not for a quiet spell: a service
commits its input offsets together with (transactions) or after (log-scan delivery)
the outputs of those inputs, so once its group has committed the offset after the
last record of every input partition (``wait_until_processed``), every output it
will ever write for those inputs is there, and a reading to each output partition's
high watermark (``settled_records``) sees all of them, duplicates included.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts.wire import WireCodec
from opsflow.runtime import Delivery, Service, Worker, load_service
from opsflow.settings import KafkaSettings
from opsflow.testing import in_thread
from opsflow.topics import ensure_topics, reader_config
from services.contracts import OrderReceived
from tests.support.samples import sample
from tests.support.stack import QUICK_JOIN, ROOT, Stack


@dataclass
class Topics:
    prefix: str
    bootstrap: str
    codec: WireCodec
    registry_url: str

    @property
    def orders(self) -> str:
        return f"{self.prefix}orders"

    @property
    def checks(self) -> str:
        return f"{self.prefix}policy-check"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}orders.dlq"

    def group(self, service: str = "relay") -> str:
        """The consumer group of ``service`` in these topics (its offsets say what it did)."""
        return f"{self.prefix}{service}"


def make_topics(bootstrap: str, registry_url: str) -> Topics:
    """Fresh topics for one test: its own prefix on the given cluster."""
    prefix = f"rt{uuid.uuid4().hex[:8]}."
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}),
        [f"{prefix}orders", f"{prefix}orders.dlq", f"{prefix}policy-check"],
        partitions=4,
    )
    registry = SchemaRegistryClient({"url": registry_url})
    return Topics(prefix, bootstrap, WireCodec(registry), registry_url)


def orders(count: int, *, notes: dict[int, str] | None = None) -> list[OrderReceived]:
    base = sample("order.received")
    assert isinstance(base, OrderReceived)
    made = []
    for i in range(count):
        order_id = f"ord-{uuid.uuid4().hex[:12]}"
        envelope = base.envelope.model_copy(
            update={
                "event_id": uuid.uuid4(),
                "idempotency_key": f"order:{order_id}",
                "correlation_id": order_id,
            }
        )
        made.append(
            base.model_copy(
                update={"envelope": envelope, "order_id": order_id, "notes": (notes or {}).get(i)}
            )
        )
    return made


def publish(
    topics: Topics,
    events: list[OrderReceived],
    raw: Sequence[bytes] = (),
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    producer = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 10})
    for event in events:
        producer.produce(
            topics.orders,
            key=event.order_id.encode(),
            value=topics.codec.encode(event),
            headers=headers,
        )
    for value in raw:
        producer.produce(topics.orders, key=b"poison", value=value)
    assert producer.flush(30) == 0


class ServiceProcess:
    """One instance of a runtime service (the relay unless told), as a real process."""

    def __init__(
        self,
        stack: Stack,
        topics: Topics,
        log: Path,
        *,
        target: str = "tests.services.relay",
        stack_env: dict[str, str] | None = None,
        **env_extra: str,
    ) -> None:
        self.log = log
        env = {
            **stack.env,
            **(stack.addresses() if stack_env is None else stack_env),
            "OPSFLOW_TOPIC_PREFIX": topics.prefix,
            **env_extra,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opsflow.runtime", target],
            cwd=ROOT,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait_logged(self, text: bytes, *, timeout: float = 60) -> None:
        """Block until the process has logged ``text``; fails if it exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_bytes():
            assert self.proc.poll() is None, f"exited before logging {text!r}"
            assert time.monotonic() < deadline, f"{text!r} not logged within {timeout:g} s"
            time.sleep(0.05)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start(
    started: list[ServiceProcess], stack: Stack, topics: Topics, tmp_path: Path, **env: str
) -> ServiceProcess:
    service = ServiceProcess(stack, topics, tmp_path / f"service-{len(started)}.log", **env)
    started.append(service)
    return service


# --- in process ------------------------------------------------------------------------


@contextmanager
def running(
    topics: Topics,
    service: Service | None = None,
    *,
    delivery: Delivery = Delivery.TRANSACTIONS,
    **env: str,
) -> Iterator[Worker]:
    """``service`` (the relay unless told) run by the runtime's ``Worker`` in a thread of
    this process against the real broker and registry, in ``topics``, until the block
    ends (as ``opsflow.testing``'s ``Env.running`` does; for tests whose subject is
    not the process). ``env`` is set while it runs (e.g. ``RELAY_FIXED``).

    The block starts at once: the worker joins its group meanwhile, and a test waits
    for what it did (``wait_until_processed``). A worker that failed fails the test.
    """
    chosen = load_service("tests.services.relay") if service is None else service
    with mock.patch.dict(os.environ, {"OPSFLOW_TOPIC_PREFIX": topics.prefix, **env}):
        worker = Worker(
            chosen,
            kafka={
                **KafkaSettings().client_config(),
                **QUICK_JOIN,
                "bootstrap.servers": topics.bootstrap,
            },
            registry=SchemaRegistryClient({"url": topics.registry_url}),
            delivery=delivery,
        )
        with in_thread(worker, name=chosen.name, joined_within=None):
            yield worker


@contextmanager
def runtime_log(message: str) -> Iterator[list[logging.LogRecord]]:
    """The runtime's log records with ``message`` while the block runs (in this process)."""
    found: list[logging.LogRecord] = []
    logger = logging.getLogger("opsflow.runtime")

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == message:
                found.append(record)

    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- reading back ----------------------------------------------------------------------


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    assert meta.error is None and meta.partitions, f"no topic {topic}"
    return sorted(meta.partitions)


def settled_records(bootstrap: str, topic: str, *, timeout: float = 60) -> list[Message]:
    """Every committed record on ``topic``: each partition read ``read_committed`` from its
    start until the reader stands at its high watermark, past every record written
    to it so far. A transaction still open there holds the reader back (it waits for
    the transaction to end, and fails after ``timeout``), so no record written
    before the call is missed. Assigned, not subscribed: no group to join.
    """
    consumer = Consumer(
        {**reader_config({"bootstrap.servers": bootstrap}, "check"), "fetch.wait.max.ms": 10}
    )
    found: list[Message] = []
    try:
        partitions = _partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at: dict[int, int] = {}  # where each partition reported its end (its last stable offset)
        remaining = set(partitions)
        deadline = time.monotonic() + timeout
        while remaining:
            assert time.monotonic() < deadline, f"{topic}{sorted(remaining)} never settled"
            for msg in consumer.consume(1000, 0.05):
                error = msg.error()
                if error is None:
                    found.append(msg)
                    continue
                assert error.code() == KafkaError._PARTITION_EOF, error
                at[msg.partition() or 0] = msg.offset() or 0
            for p in [p for p in remaining if p in at]:
                tp = TopicPartition(topic, p)
                high = consumer.get_watermark_offsets(tp, cached=True)[1]
                position = consumer.position([tp])[0].offset
                if high >= 0 and max(at[p], position) >= high:
                    remaining.discard(p)
    finally:
        consumer.close()
    return found


def headers_of(msg: Message) -> dict[str, bytes]:
    """A record's headers by name (every value is bytes)."""
    pairs = msg.headers() or []
    found = dict(pairs.items()) if isinstance(pairs, dict) else dict(pairs)
    assert all(isinstance(value, bytes) for value in found.values()), found
    return {name: value for name, value in found.items() if isinstance(value, bytes)}


def record_ends(bootstrap: str, topic: str) -> dict[int, int]:
    """The offset after the last record of each partition of ``topic`` that has one."""
    ends: dict[int, int] = {}
    for msg in settled_records(bootstrap, topic):
        partition, offset = msg.partition() or 0, msg.offset() or 0
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


def wait_until_processed(
    topics: Topics,
    *,
    service: str = "relay",
    topic: str | None = None,
    timeout: float = 120,
    processes: Sequence[ServiceProcess] = (),
) -> None:
    """Block until ``service``'s consumer group has committed, on every partition of its
    input ``topic`` (the orders unless told), the offset after the last record there
    now: every input handled, and (offsets being committed with or after the outputs)
    every output of them written. Fails after ``timeout``, or at once if one of the
    ``processes`` that should be doing the work has exited."""
    source = topics.orders if topic is None else topic
    ends = record_ends(topics.bootstrap, source)
    group = topics.group(service)
    admin = AdminClient({"bootstrap.servers": topics.bootstrap})
    asked = ConsumerGroupTopicPartitions(group, [TopicPartition(source, p) for p in ends])
    deadline = time.monotonic() + timeout
    while True:
        answer = admin.list_consumer_group_offsets([asked])[group].result()
        committed = {tp.partition: tp.offset for tp in answer.topic_partitions}
        behind = {
            p: (committed.get(p, -1), end) for p, end in ends.items() if committed.get(p, -1) < end
        }
        if not behind:
            return
        for proc in processes:
            assert proc.proc.poll() is None, f"{proc.log.name} exited: {proc.log.read_text()}"
        assert time.monotonic() < deadline, (
            f"{group} committed (offset, end) {behind} of {source} within {timeout:g} s"
        )
        time.sleep(0.05)


def wait_for(bootstrap: str, topic: str, count: int, *, timeout: float = 120) -> None:
    """Block until at least ``count`` committed records are on ``topic`` (assigned, not
    subscribed: no group to join)."""
    consumer = Consumer(
        {**reader_config({"bootstrap.servers": bootstrap}, "wait"), "fetch.wait.max.ms": 10}
    )
    seen, deadline = 0, time.monotonic() + timeout
    try:
        partitions = _partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while seen < count:
            assert time.monotonic() < deadline, f"only {seen} of {count} records on {topic}"
            seen += sum(1 for m in consumer.consume(1000, 0.1) if m.error() is None)
    finally:
        consumer.close()
