"""``runstack``: the stack ``make run`` starts, as a newcomer meets it, empty and with history.

A stack of its own is started exactly as ``make run`` does (``opsflow up``:
durable broker store, every service, the carrier stand-in with its default
proof-of-delivery delay), then measured as a user would meet it:

- **start-up**: ``opsflow up --detach`` until every component answers;
- **status**: one ``opsflow status`` (the operator's first command);
- **throughput**: ``opsflow demo --orders 1000 --auto-review --until dispatched``,
  orders sent as fast as ingest takes them: orders over the seconds until every
  one was booked, rejected or decided (the demo's own elapsed time);
- **latency**: the same demo paced at 100 orders/s: the p99 of order.received to
  dispatch.executed over the orders no person reviewed (record timestamps).

Then 1,000,000 records of history are written to the workflow's topics (the
events of 200,000 finished orders, in batches of at most 50 records as a busy
producer writes them), every service's group is moved past them, the stack is
restarted, the projector catches up, the store has merged the history's batches
and PostgreSQL's autovacuum has been through the projector's rows (as both would
have, had the history been written over time), and everything is measured
again: the cost of a hop must not grow with what the topics hold. On that stack the
operator's read-only commands are timed too, once each as a user runs them:
``opsflow trace`` of an order in the middle of the history, ``opsflow dlq
list`` and ``opsflow projections list`` (target: 2 s each).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts import Envelope, Event
from opsflow.contracts.wire import WireCodec
from opsflow.runtime.worker import EVENT_TYPE_HEADER
from opsflow.stack.bucket import CompactionPolicy
from opsflow.topics import end_offsets, topic_name
from services.contracts import MODELS, PolicyOutcome
from tests.bench.harness import BenchError, Case, Metric, StackInfo
from tests.support.samples import sample
from tests.support.stack import Stack, stack_env

ORDERS = 1_000
RATE = 100.0
HISTORY_RECORDS = 1_000_000
# The events of one finished, auto-approved order: five records of history.
HISTORY_PATH = (
    "order.received",
    "policy.checked",
    "dispatch.requested",
    "dispatch.executed",
    "pod.captured",
)
# The consumer groups of the workflow's services, moved past the history.
SERVICE_GROUPS = ("policy-check", "review", "dispatch", "pod-capture")
CATCH_UP_TIMEOUT_S = 900.0


class RunStackCase(Case):
    """`make run`'s stack: start-up, status and the demo, empty and with 1M records of history."""

    name: ClassVar[str] = "runstack"
    summary: ClassVar[str] = (
        "`make run`'s stack (durable store, every service): start-up, status, a "
        f"{ORDERS:,}-order demo, empty and with {HISTORY_RECORDS:,} records of history"
    )
    metrics: ClassVar[tuple[Metric, ...]] = tuple(
        metric
        for when, label in (("", "empty"), ("history_", "with history"))
        for metric in (
            Metric(f"{when}startup_s", f"opsflow up, {label}", "s", True, target=30),
            Metric(f"{when}status_s", f"opsflow status, {label}", "s", True, target=2),
            Metric(
                f"{when}orders_per_s",
                f"demo of {ORDERS:,} as fast as ingest takes them, {label}",
                "orders/s",
                target=100,
            ),
            Metric(
                f"{when}p99_ms",
                f"order.received to dispatch.executed p99 at {RATE:.0f}/s, {label}",
                "ms",
                True,
                target=1000,
            ),
        )
    ) + tuple(
        Metric(f"history_{key}_s", f"opsflow {command}, with history", "s", True, target=2)
        for key, command in (
            ("trace", "trace ORDER_ID"),
            ("dlq_list", "dlq list"),
            ("projections_list", "projections list"),
        )
    )
    default_repeat: ClassVar[int] = 1

    def __init__(self, stack: StackInfo, *, events: int | None = None) -> None:
        super().__init__(stack, events=events)
        self.history_records = events or HISTORY_RECORDS
        self._tmp = tempfile.TemporaryDirectory(prefix="opsflow-bench-runstack-")
        self.up = False
        self.batch_objects = 0
        self.vacuumed = False

    def params(self) -> dict[str, Any]:
        return {"orders": ORDERS, "rate": RATE, "history_records": self.history_records}

    def notes(self) -> list[str]:
        return [
            f"runstack: history written as {self.batch_objects:,} batch objects, then compacted "
            "by the store; the services' groups were moved past it, the projector read it all"
            + (", PostgreSQL's autovacuum went through it" if self.vacuumed else "")
        ]

    def _opsflow(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.local.run(*args, timeout=600, check=False, **env)

    def _start(self, **env: str) -> float:
        began = time.perf_counter()
        started = self._opsflow("up", "--detach", **env)
        elapsed = time.perf_counter() - began
        self.up = True
        if started.returncode != 0:
            raise BenchError(f"runstack: `opsflow up` failed\n{started.stdout}{started.stderr}")
        status = json.loads(self._opsflow("status", "--json").stdout)
        self.addresses: dict[str, str] = status["env"]
        return elapsed

    def _stop(self) -> None:
        self._opsflow("down")
        self.up = False

    def prepare(self) -> None:
        pass

    def measure(self, repetition: int) -> dict[str, float]:
        # Each repetition from an empty data directory, as a newcomer starts.
        self.data_dir = Path(self._tmp.name) / f"data-{repetition}"
        # What `make run` starts: nothing overridden but the data directory.
        self.local = Stack(self.data_dir, stack_env(self.data_dir, OPSFLOW_SERVICES="true"))
        figures = {"startup_s": self._start(), **self._measure_running()}
        self._stop()
        self._start(OPSFLOW_SERVICES="false")
        self._write_history()
        written = time.monotonic()
        self._stop()
        figures["history_startup_s"] = self._start()
        self._wait_for_projector()
        self._wait_for_store(written)
        self._wait_for_vacuum()
        figures.update(self._measure_read_only())
        figures.update({f"history_{key}": value for key, value in self._measure_running().items()})
        print(
            "  runstack: " + ", ".join(f"{key} {value:,.2f}" for key, value in figures.items()),
            flush=True,
        )
        return figures

    def _measure_running(self) -> dict[str, float]:
        began = time.perf_counter()
        status = self._opsflow("status")
        status_s = time.perf_counter() - began
        if status.returncode != 0:
            raise BenchError(f"runstack: `opsflow status` failed: {status.stderr}")
        burst = self._demo("--until", "dispatched", seed=7)
        paced = self._demo("--rate", str(RATE), seed=8)
        (machine,) = [s for s in paced["steps"] if s["step"].endswith("no review")]
        return {
            "status_s": status_s,
            "orders_per_s": ORDERS / burst["elapsed_s"],
            "p99_ms": float(machine["p99_ms"]),
        }

    def _measure_read_only(self) -> dict[str, float]:
        """The operator's read-only commands on the stack with history, once each."""
        order_id = history_order_id(self.history_records // len(HISTORY_PATH) // 2)
        figures = {}
        for key, args in (
            ("history_trace_s", ("trace", order_id)),
            ("history_dlq_list_s", ("dlq", "list")),
            ("history_projections_list_s", ("projections", "list")),
        ):
            began = time.perf_counter()
            ran = self._opsflow(*args)
            figures[key] = time.perf_counter() - began
            if ran.returncode != 0:
                raise BenchError(f"runstack: `opsflow {' '.join(args)}` failed: {ran.stderr}")
        # The figure is the index's: a trace that fell back to reading every topic is not.
        path = json.loads(self._opsflow("trace", order_id, "--json").stdout)["path"]
        if path != "audit-index":
            raise BenchError(f"runstack: trace read the topics by {path}, not the audit index")
        return figures

    def _demo(self, *args: str, seed: int) -> dict[str, Any]:
        ran = self._opsflow(
            "demo", "--orders", str(ORDERS), "--auto-review", "--seed", str(seed), "--json", *args
        )
        if ran.returncode != 0:
            raise BenchError(f"runstack: the demo did not finish:\n{ran.stdout}{ran.stderr}")
        summary: dict[str, Any] = json.loads(ran.stdout)
        return summary

    def _write_history(self) -> None:
        """The events of finished orders, as the workflow would have written them."""
        kafka = {"bootstrap.servers": self.addresses["KAFKA_BOOTSTRAP_SERVERS"]}
        topics = write_history(self.addresses, self.history_records)
        skip_history(kafka, topics)
        self.batch_objects = self._batch_objects()

    def _wait_for_projector(self) -> None:
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            status = self._opsflow("status", "--json")
            if status.returncode == 0:
                projections = json.loads(status.stdout).get("projections") or []
                if projections and all((p.get("lag") or 0) == 0 for p in projections):
                    return
            time.sleep(5)
        raise BenchError("runstack: the projector did not catch up with the history")

    def _wait_for_store(self, written: float) -> None:
        """Until the store has merged the history as it would have, had it been written
        over time: settled, and no batch object merged for ten seconds."""
        settled = written + CompactionPolicy.settled_s + CompactionPolicy.every_s
        time.sleep(max(0.0, settled - time.monotonic()))
        batches = self._batch_objects()
        while True:
            time.sleep(10)
            now = self._batch_objects()
            if now == batches:
                return
            batches = now

    def _wait_for_vacuum(self) -> None:
        """Until PostgreSQL's autovacuum has been through the projector's million rows, as
        it would have been, had they been written over time: no autovacuum worker at work
        for ten seconds in a row. (Left running, a vacuum of the audit log competes with
        the services for the two cores during the measurement.)"""
        quiet_since = time.monotonic()
        deadline = quiet_since + CATCH_UP_TIMEOUT_S
        with psycopg.connect(self.addresses["DATABASE_URL"], autocommit=True) as conn:
            while time.monotonic() - quiet_since < 10:
                if time.monotonic() > deadline:
                    raise BenchError("runstack: autovacuum did not finish with the history")
                (working,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                ).fetchone() or (0,)
                if working:
                    self.vacuumed = True
                    quiet_since = time.monotonic()
                time.sleep(1)

    def _batch_objects(self) -> int:
        return sum(1 for _ in (self.data_dir / "broker").rglob("*.batch"))

    def close(self) -> None:
        if self.up:
            self._stop()
        self._tmp.cleanup()


def write_history(addresses: Mapping[str, str], records: int) -> list[str]:
    """Write ``records`` records of history: the events of ``records / 5`` finished,
    auto-approved orders (``history-0000000``, ...), as the workflow would have written
    them, in producer batches of at most 50 records. Returns the topics written to.

    A function of its own so a stack can be given history outside the bench (e.g. to
    time the operator's commands on it by hand).

    Raises:
        BenchError: the broker did not take every record.
    """
    kafka = {"bootstrap.servers": addresses["KAFKA_BOOTSTRAP_SERVERS"]}
    codec = WireCodec(SchemaRegistryClient({"url": addresses["SCHEMA_REGISTRY_URL"]}))
    producer = Producer(
        {**kafka, "linger.ms": 20, "batch.num.messages": 50, "enable.idempotence": False}
    )
    templates = {event_type: sample(event_type) for event_type in HISTORY_PATH}
    templates["policy.checked"] = templates["policy.checked"].model_copy(
        update={"outcome": PolicyOutcome.AUTO_APPROVED, "reason_codes": [], "reasons": []}
    )
    topics = {}
    for n in range(records // len(HISTORY_PATH)):
        order_id = history_order_id(n)
        for step, event_type in enumerate(HISTORY_PATH):
            event = _history_event(templates[event_type], order_id, n * 8 + step)
            topic = topic_name(MODELS[event_type].topic)
            topics[topic] = True
            while True:
                try:
                    producer.produce(
                        topic,
                        key=order_id.encode(),
                        value=codec.encode(event),
                        headers=[(EVENT_TYPE_HEADER, event_type.encode())],
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.poll(0)
    if producer.flush(300):
        raise BenchError("runstack: the history was not all written")
    return list(topics)


def history_order_id(n: int) -> str:
    """The id of the ``n``-th order of the history ``write_history`` writes."""
    return f"history-{n:07d}"


def skip_history(kafka: Mapping[str, str], topics: Sequence[str]) -> None:
    """Commit every service group's offsets at the topics' ends: the history is done."""
    consumer = Consumer({**kafka, "group.id": "bench-probe"})
    metadata = consumer.list_topics(timeout=30)
    consumer.close()
    partitions = [(t, p) for t in topics for p in metadata.topics[t].partitions]
    ends = end_offsets(kafka, partitions, timeout=120)
    for group in SERVICE_GROUPS:
        committer = Consumer({**kafka, "group.id": group, "enable.auto.commit": False})
        committer.commit(
            offsets=[TopicPartition(t, p, ends[(t, p)]) for t, p in partitions],
            asynchronous=False,
        )
        committer.close()


def _history_event(template: Event, order_id: str, n: int) -> Event:
    envelope: Envelope = template.envelope.model_copy(
        update={
            "event_id": uuid.UUID(int=n + 1),
            "idempotency_key": f"{template.event_type}:{order_id}",
            "correlation_id": order_id,
        }
    )
    return template.model_copy(update={"envelope": envelope, "order_id": order_id})
