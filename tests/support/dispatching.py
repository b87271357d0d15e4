"""Dispatch's world: one test's topics, schema, carrier stand-in and dispatch, and when
a service has done everything it will ever do for what is on its input topics.

Used by the dispatch and replay tests (``world`` is a fixture: a test module
imports it by name), and its orders and in-process dispatch by the review tests.

Dispatch runs either as a real process (``World.start_dispatch``: for the tests
whose subject is the process, kill -9 and a clean stop) or as the runtime's
``Worker`` in a thread of the test process against the real broker, database
and carrier stand-in (``World.run_dispatch``, as ``opsflow.testing`` runs a
service), which saves the process's start and lets a test see exactly when the
worker has drained its inputs (``ServiceThread.settled``) instead of waiting for
a quiet spell.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.producer import Producer
from opsflow.runtime import Delivery, Service, Worker
from opsflow.settings import KafkaSettings, RuntimeSettings
from opsflow.testing import InThread
from opsflow.topics import (
    Partition,
    dead_letter_topic,
    ensure_topics,
    partitions_of,
    reader_config,
)
from services.contracts import (
    DispatchExecuted,
    DispatchFailed,
    OrderReceived,
    PolicyChecked,
    PolicyOutcome,
)
from tests.support.carrier import CarrierProcess
from tests.support.samples import sample
from tests.support.stack import QUICK_JOIN, ROOT, Stack

TOPICS = ("orders", "policy-check", "review", "dispatch")
# What the in-process dispatch gets from the environment, as the process would.
DISPATCH_ENV = {
    "DISPATCH_BACKOFF_S": "0.05",
    "DISPATCH_BACKOFF_MAX_S": "0.5",
    "DISPATCH_TIMEOUT_S": "1",
}


class LogReader:
    """A ``read_committed`` reader of every partition of some topics, from their start,
    that knows how far it has read: the offset of the last record of each partition
    and where it found each partition's end (its end-of-partition events).

    It assigns the partitions (no group to join) and keeps its place between calls of
    ``read_to``; ``records`` are the (timestamp, value) of the records read so far, by
    topic, each partition in log order.
    """

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.kafka = {"bootstrap.servers": bootstrap}
        # Empty fetches come back after 10 ms: an end is seen soon after it is reached.
        self.consumer = Consumer({**reader_config(self.kafka, "check"), "fetch.wait.max.ms": 10})
        self.partitions: list[Partition] = partitions_of(self.consumer, list(topics))
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in self.partitions])
        self.last: dict[Partition, int] = {}
        self.end: dict[Partition, int] = {}
        self.records: dict[str, list[tuple[int, bytes]]] = {t: [] for t, _ in self.partitions}

    def read_to(self, ends: dict[Partition, int], timeout: float) -> bool:
        """Read until every partition's end was found at or past ``ends`` (so every record
        before it is committed and read); False if that did not happen in ``timeout``
        (a transaction still open holds a ``read_committed`` reader back)."""
        deadline = time.monotonic() + timeout
        while any(self.end.get(tp, -1) < at for tp, at in ends.items()):
            if time.monotonic() > deadline:
                return False
            for message in self.consumer.consume(1000, 0.05):
                where = (message.topic() or "", message.partition() or 0)
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    self.end[where] = message.offset() or 0
                    continue
                self.last[where] = message.offset() or 0
                self.records[where[0]].append((message.timestamp()[1], message.value() or b""))
        return True

    def ends(self) -> dict[Partition, int]:
        """Every partition's end now (``high_watermarks``)."""
        return high_watermarks(self.kafka, self.partitions)

    def close(self) -> None:
        self.consumer.close()


def high_watermarks(kafka: dict[str, Any], partitions: Iterable[Partition]) -> dict[Partition, int]:
    """Each partition's end now: the offset after its last record, records of open
    transactions and transaction markers included, so that any write moves it.

    As ``opsflow.topics.end_offsets`` learns them (from a fresh fetch's response, not
    ListOffsets, which the embedded broker answers short of the end), but read
    ``read_uncommitted``: a ``read_committed`` reader's end is the last stable offset,
    which a write inside an open transaction does not move.
    """
    parts = sorted(set(partitions))
    consumer = Consumer(
        {**reader_config(kafka, "ends", isolation="read_uncommitted"), "fetch.wait.max.ms": 10}
    )
    try:
        consumer.list_topics(timeout=10)  # leaders known before the assignment
        consumer.assign([TopicPartition(t, p, OFFSET_END) for t, p in parts])
        found: dict[Partition, int] = {}
        deadline = time.monotonic() + 10
        while len(found) < len(parts):
            assert time.monotonic() < deadline, (
                f"no end learnt for {sorted(set(parts) - set(found))}"
            )
            consumer.consume(1000, 0.05)
            for t, p in parts:
                if (t, p) not in found:
                    high = consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)[1]
                    if high >= 0:
                        found[(t, p)] = high
        return found
    finally:
        consumer.close()


class ServiceThread(InThread[Worker]):
    """A runtime service's ``Worker`` in a thread of the test process, against the real
    broker (its codec, lineage and Kafka transactions as in production), that can tell
    when it has finished what it was given (``finished``)."""

    @classmethod
    def serve(cls, service: Service, kafka: dict[str, Any], registry_url: str) -> ServiceThread:
        """Build the worker (its topics' prefix is ``OPSFLOW_TOPIC_PREFIX`` now) and run it."""
        worker = Worker(
            service,
            kafka=kafka,
            registry=SchemaRegistryClient({"url": registry_url}),
            delivery=Delivery(RuntimeSettings().delivery),
        )
        started = InThread.start(worker, name=service.name)
        return cls(started.program, started.thread, started.failed)

    @property
    def worker(self) -> Worker:
        return self.program

    def finished(self, reader: LogReader) -> bool:
        """Whether the worker has handled every record of its inputs and committed every
        output of them, so that it will write nothing more until a new input comes.

        ``reader`` reads the worker's input topics (its own outputs among them, when
        it reads back its topic). One round: learn the ends of the inputs (any write
        moves them: ``high_watermarks``); read them ``read_committed`` to those ends (so
        no transaction is open there and every record before them is read); then
        every input partition must be the worker's, its recovery done, not waiting to
        retry, its last read record handled (the worker's position past it, read
        before and after) and no batch open; then the ends, learnt again, must not
        have moved. A batch committed meanwhile would have moved them (its outputs)
        or left a record the worker has not handled; a batch still open fails the
        check. This holds even where the broker drops the offsets of a transaction
        that wrote nothing (the embedded one does: measured), which rules out reading
        the group's committed offsets instead.
        """
        self.raise_failure()
        before = reader.ends()
        if not reader.read_to(before, timeout=5):
            return False
        for where in reader.partitions:
            part = self.worker.partitions.get(where)
            if part is None:
                return False
            handled, position = reader.last.get(where, -1) + 1, part.position
            # Read in this order: a batch committed after ``open`` was read leaves the
            # position where it was; a batch redone rewinds it (and clears ``skip``).
            if part.open or position < handled:
                return False
            if part.position < handled or part.skip is None or part.paused_until is not None:
                return False
            if part.failed or self.worker.partitions.get(where) is not part:
                return False
        return reader.ends() == before


def run_dispatch(
    monkeypatch: pytest.MonkeyPatch,
    *,
    bootstrap: str,
    registry_url: str,
    prefix: str,
    database_url: str,
    carrier_url: str,
    **env: str,
) -> ServiceThread:
    """dispatch in a thread of the test process, set up from the environment as
    ``python -m opsflow.runtime services.dispatch`` would be (``monkeypatch`` keeps the
    variables for the test, which the worker reads while it runs)."""
    from services.dispatch.config import DispatchSettings

    # The module, not the package's ``service`` attribute (the Service) of the same name.
    dispatch = importlib.import_module("services.dispatch.service")

    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SCHEMA_REGISTRY_URL": registry_url,
        "OPSFLOW_TOPIC_PREFIX": prefix,
        "DATABASE_URL": database_url,
        "CARRIER_URL": carrier_url,
        **DISPATCH_ENV,
        **env,
    }.items():
        monkeypatch.setenv(name, value)
    # Read once at import in the process; read again here with this test's variables.
    monkeypatch.setattr(dispatch, "SETTINGS", DispatchSettings())
    return ServiceThread.serve(
        dispatch.service, {**KafkaSettings().client_config(), **QUICK_JOIN}, registry_url
    )


@dataclass
class World:
    """One test's topics, schema, carrier and dispatch (processes or threads)."""

    stack: Stack
    prefix: str
    database_url: str
    carrier: CarrierProcess
    producer: Producer
    codec: WireCodec
    logs: Path
    monkeypatch: pytest.MonkeyPatch
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    threads: list[ServiceThread] = field(default_factory=list)

    def start_dispatch(self, **env: str) -> subprocess.Popen[bytes]:
        """dispatch as a real process (``python -m opsflow.runtime services.dispatch``)."""
        log = self.logs / f"dispatch-{len(self.processes)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsflow.runtime", "services.dispatch"],
            cwd=ROOT,
            env={
                **self.stack.env,
                **self.stack.addresses(),
                "OPSFLOW_TOPIC_PREFIX": self.prefix,
                "DATABASE_URL": self.database_url,
                "CARRIER_URL": self.carrier.url,
                **DISPATCH_ENV,
                **env,
            },
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.processes.append(proc)
        return proc

    def run_dispatch(self, **env: str) -> ServiceThread:
        """dispatch's worker in a thread of the test process (see the module docstring)."""
        running = run_dispatch(
            self.monkeypatch,
            bootstrap=self.stack.address("KAFKA_BOOTSTRAP_SERVERS"),
            registry_url=self.stack.address("SCHEMA_REGISTRY_URL"),
            prefix=self.prefix,
            database_url=self.database_url,
            carrier_url=self.carrier.url,
            **env,
        )
        self.threads.append(running)
        return running

    def approve(self, orders: list[OrderReceived], *, key: str = "policy") -> None:
        """Publish the orders and an auto-approval of each, as policy-check would (dispatch
        reads only the approval; the orders are there for the tests that trace or replay)."""
        self.producer.send_many(orders, idempotency_key=f"orders-{uuid.uuid4().hex}")
        checks = [
            PolicyChecked(
                envelope=PolicyChecked.envelope_for(
                    key=o.order_id,
                    idempotency_key=f"{key}:{o.order_id}",
                    producer="policy-check",
                    caused_by=o.envelope,
                ),
                order_id=o.order_id,
                outcome=PolicyOutcome.AUTO_APPROVED,
                reason_codes=[],
                reasons=[],
                rules_version="v1",
                destination=o.destination,
            )
            for o in orders
        ]
        self.producer.send_many(checks)

    def dispatch_events(
        self, until: Callable[[list[Event]], bool], timeout: float = 120
    ) -> list[Event]:
        """Every event on the dispatch topic (read_committed), once ``until`` holds for them
        and no more can come for what has been published:

        - with dispatch running in this process, once it has handled and committed
          every input (``ServiceThread.finished``);
        - with a dispatch process running, once nothing new arrived for 3 s (late
          duplicates would show);
        - with no dispatch running, nothing can write: the topic read to its end.
        """
        name = f"{self.prefix}dispatch"
        threads = [t for t in self.threads if t.running]
        if threads:
            assert len(threads) == 1, "one dispatch at a time"
            return settled_events(threads[0], self.stack, name, self.codec, until, timeout)
        if any(proc.poll() is None for proc in self.processes):
            return quiet_events(self.stack, name, self.codec, until, timeout)
        reader = LogReader(self.stack.address("KAFKA_BOOTSTRAP_SERVERS"), [name])
        try:
            assert reader.read_to(reader.ends(), timeout=30), f"{name} has a transaction open"
            events = [self.codec.decode(value) for _, value in reader.records[name]]
        finally:
            reader.close()
        assert until(events), (
            f"{name} with no dispatch running: {Counter(e.event_type for e in events)}"
        )
        return events

    def dead_letters(self, topic: str) -> list[Event]:
        """The records dead-lettered from the world's ``topic`` (no prefix), decoded."""
        dlq = dead_letter_topic(f"{self.prefix}{topic}")
        reader = LogReader(self.stack.address("KAFKA_BOOTSTRAP_SERVERS"), [dlq])
        try:
            assert reader.read_to(reader.ends(), timeout=30), f"{dlq} has a transaction open"
            return [self.codec.decode(value) for _, value in reader.records[dlq]]
        finally:
            reader.close()

    def bookings(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.carrier.url}/bookings", timeout=10).json())


def settled_events(
    running: ServiceThread,
    stack: Stack,
    name: str,
    codec: WireCodec,
    until: Callable[[list[Event]], bool],
    timeout: float,
) -> list[Event]:
    """Every event on topic ``name`` (one of ``running``'s inputs), once ``until`` holds
    for them and ``running`` has finished every input (nothing more will come)."""
    reader = LogReader(stack.address("KAFKA_BOOTSTRAP_SERVERS"), running.worker.inputs)
    assert name in running.worker.inputs, f"{name} is not an input of the worker"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if running.finished(reader):
                events = [codec.decode(value) for _, value in reader.records[name]]
                if until(events):
                    return events
            time.sleep(0.05)
        events = [codec.decode(value) for _, value in reader.records[name]]
    finally:
        reader.close()
    raise AssertionError(f"{name} never settled: {Counter(e.event_type for e in events)}")


def quiet_events(
    stack: Stack,
    name: str,
    codec: WireCodec,
    until: Callable[[list[Event]], bool],
    timeout: float,
    quiet: float = 3,
) -> list[Event]:
    """Every event on topic ``name`` (read_committed), once ``until`` holds for them and
    nothing new arrived for ``quiet`` seconds; read by assignment (no group to join)."""
    reader = LogReader(stack.address("KAFKA_BOOTSTRAP_SERVERS"), [name])
    deadline, last_new, seen = time.monotonic() + timeout, time.monotonic(), 0
    try:
        while time.monotonic() < deadline:
            reader.read_to(reader.ends(), timeout=0.5)
            if len(reader.records[name]) > seen:
                seen, last_new = len(reader.records[name]), time.monotonic()
                continue
            events = [codec.decode(value) for _, value in reader.records[name]]
            if until(events) and time.monotonic() - last_new >= quiet:
                return events
            time.sleep(0.1)
        events = [codec.decode(value) for _, value in reader.records[name]]
    finally:
        reader.close()
    raise AssertionError(f"{name} never settled: {Counter(e.event_type for e in events)}")


@pytest.fixture
def world(
    stack: Stack,
    bootstrap_servers: str,
    registry_url: str,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    prefix = f"dp{uuid.uuid4().hex[:8]}."
    names = [f"{prefix}{t}" for t in TOPICS]
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap_servers}),
        names + [dead_letter_topic(n) for n in names],
        partitions=4,
    )
    carrier = CarrierProcess(
        tmp_path / "carrier.log",
        {
            "CARRIER_DB": str(tmp_path / "carrier.db"),
            # Refusals are answered before anything is booked; 503s and ghosts (booked,
            # then answered 503) make dispatch retry the same key.
            "CARRIER_ERROR_RATE": "0.15",
            "CARRIER_GHOST_RATE": "0.15",
            "CARRIER_REFUSED_COUNTRIES": "KP",
            "CARRIER_SEED": "7",
        },
    ).launch()
    try:
        db.migrate(database_url)  # while the carrier starts
        carrier.ready()
    except BaseException:
        carrier.stop()
        raise
    producer = Producer(
        "dispatch-tests",
        bootstrap_servers=bootstrap_servers,
        registry_url=registry_url,
        topic_prefix=prefix,
    )
    world = World(
        stack,
        prefix,
        database_url,
        carrier,
        producer,
        WireCodec(SchemaRegistryClient({"url": registry_url})),
        tmp_path,
        monkeypatch,
    )
    yield world
    for running in world.threads:
        if running.running:
            running.stop()
    for proc in world.processes:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    producer.close()
    carrier.stop()


def make_orders(count: int, *, country: str = "DE") -> list[OrderReceived]:
    base = sample("order.received")
    assert isinstance(base, OrderReceived)
    made = []
    for _ in range(count):
        order_id = f"ord-{uuid.uuid4().hex[:12]}"
        made.append(
            base.model_copy(
                update={
                    "order_id": order_id,
                    "envelope": base.envelope.model_copy(
                        update={
                            "event_id": uuid.uuid4(),
                            "idempotency_key": f"order:{order_id}",
                            "correlation_id": order_id,
                        }
                    ),
                    "destination": base.destination.model_copy(update={"country": country}),
                }
            )
        )
    return made


def settled(order_ids: set[str]) -> Callable[[list[Event]], bool]:
    """Every order has its dispatch outcome (executed or failed)."""

    def check(events: list[Event]) -> bool:
        done = {e.order_id for e in events if isinstance(e, DispatchExecuted | DispatchFailed)}
        return order_ids <= done

    return check
