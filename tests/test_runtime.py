"""The service runtime on the real stack: exactly once under kill -9, clean stops,
takeover between instances, dead letters and retries.

Each test runs the one-hop ``tests.services.relay`` service as a real process
(``python -m opsflow.runtime``) against the session's broker and registry, in
topics of its own (``OPSFLOW_TOPIC_PREFIX``).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts import OrderReceived, PolicyChecked
from opsflow.contracts.lineage import derive_idempotency_key
from opsflow.contracts.wire import WireCodec
from opsflow.topics import ensure_topics
from tests.samples import sample
from tests.stackctl import Stack, free_port, stack_env

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Topics:
    prefix: str
    bootstrap: str
    codec: WireCodec

    @property
    def orders(self) -> str:
        return f"{self.prefix}orders"

    @property
    def checks(self) -> str:
        return f"{self.prefix}policy-check"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}orders.dlq"


def make_topics(bootstrap: str, registry_url: str) -> Topics:
    """Fresh topics for one test: its own prefix on the given cluster."""
    prefix = f"rt{uuid.uuid4().hex[:8]}."
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}),
        [f"{prefix}orders", f"{prefix}orders.dlq", f"{prefix}policy-check"],
        partitions=4,
    )
    return Topics(prefix, bootstrap, WireCodec(SchemaRegistryClient({"url": registry_url})))


@pytest.fixture
def topics(stack: Stack, bootstrap_servers: str, registry_url: str) -> Topics:
    return make_topics(bootstrap_servers, registry_url)


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
    """One instance of the relay service, as a real process."""

    def __init__(self, stack: Stack, topics: Topics, log: Path, **env_extra: str) -> None:
        self.log = log
        env = {
            **stack.env,
            **stack.status()["env"],
            "OPSFLOW_TOPIC_PREFIX": topics.prefix,
            **env_extra,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opsflow.runtime", "tests.services.relay"],
            cwd=ROOT,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def services(stack: Stack, topics: Topics, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        if service.proc.poll() is None:
            service.kill9()


def start(
    started: list[ServiceProcess], stack: Stack, topics: Topics, tmp_path: Path, **env: str
) -> ServiceProcess:
    service = ServiceProcess(stack, topics, tmp_path / f"service-{len(started)}.log", **env)
    started.append(service)
    return service


def read_all(
    bootstrap: str, topic: str, *, at_least: int, timeout: float = 180, quiet: float = 3.0
) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
    """Every record on ``topic`` read ``read_committed``, once at least ``at_least`` are
    there and nothing more has arrived for ``quiet`` seconds (to catch late duplicates)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    records: list[tuple[bytes, bytes, dict[str, bytes]]] = []
    deadline, last_new = time.monotonic() + timeout, time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(1000, 0.5) if m.error() is None]
            if batch:
                last_new = time.monotonic()
                records += [(m.key(), m.value(), dict(m.headers() or [])) for m in batch]
            elif len(records) >= at_least and time.monotonic() - last_new >= quiet:
                break
    finally:
        consumer.close()
    return records


def wait_for(bootstrap: str, topic: str, count: int, timeout: float = 120) -> None:
    """Block until ``count`` committed records are on ``topic``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"wait-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    seen, deadline = 0, time.monotonic() + timeout
    try:
        while seen < count:
            assert time.monotonic() < deadline, f"only {seen} of {count} records on {topic}"
            seen += sum(1 for m in consumer.consume(1000, 0.5) if m.error() is None)
    finally:
        consumer.close()


def assert_exactly_once(topics: Topics, inputs: list[OrderReceived]) -> None:
    records = read_all(topics.bootstrap, topics.checks, at_least=len(inputs))
    outputs = [topics.codec.decode(value) for _, value, _ in records]
    assert all(isinstance(out, PolicyChecked) for out in outputs)
    causes = Counter(out.envelope.causation_id for out in outputs)
    duplicated = {cause: n for cause, n in causes.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} inputs have more than one output"
    assert set(causes) == {str(event.envelope.event_id) for event in inputs}, "no input is lost"
    expected_keys = {
        derive_idempotency_key(event.envelope.idempotency_key, "relay", "policy.checked", 0)
        for event in inputs
    }
    assert {out.envelope.idempotency_key for out in outputs} == expected_keys
    for key, _, headers in records:
        assert headers["opsflow-event-type"] == b"policy.checked" and key


def test_kill_9_mid_stream_leaves_every_output_exactly_once(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    inputs = orders(10_000)
    publish(topics, inputs)
    first = start(services, stack, topics, tmp_path)
    wait_for(topics.bootstrap, topics.checks, 3_000)
    first.kill9()
    start(services, stack, topics, tmp_path)
    assert_exactly_once(topics, inputs)


def test_sigterm_stops_cleanly_within_bounds_and_loses_nothing(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    inputs = orders(4_000)
    publish(topics, inputs)
    first = start(services, stack, topics, tmp_path)
    wait_for(topics.bootstrap, topics.checks, 1_000)
    began = time.monotonic()
    assert first.terminate(timeout=30) == 0
    assert time.monotonic() - began < 30
    assert b'"message": "stopped"' in first.log.read_bytes()
    start(services, stack, topics, tmp_path)
    assert_exactly_once(topics, inputs)


def test_two_instances_split_partitions_and_the_survivor_takes_over_after_kill_9(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    inputs = orders(8_000)
    one = start(services, stack, topics, tmp_path)
    two = start(services, stack, topics, tmp_path)
    time.sleep(8)  # let both join before the stream starts
    publish(topics, inputs)
    wait_for(topics.bootstrap, topics.checks, 2_000)
    assert b'"assigned"' in one.log.read_bytes() and b'"assigned"' in two.log.read_bytes()
    two.kill9()
    assert_exactly_once(topics, inputs)
    assert one.proc.poll() is None, "the survivor is still running"


def test_poison_inputs_are_dead_lettered_with_headers_while_good_ones_flow(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    inputs = orders(300, notes={10: "reject", 20: "crash"})
    good = [event for event in inputs if event.notes is None]
    undecodable = b"not avro at all"
    unknown_schema = struct.pack(">bI", 0, 999_999) + b"\x00"
    publish(topics, inputs, raw=[undecodable, unknown_schema])
    start(services, stack, topics, tmp_path)
    assert_exactly_once(topics, good)

    dead = read_all(topics.bootstrap, topics.dead_letters, at_least=4)
    assert len(dead) == 4
    classes = Counter(headers["opsflow-error-class"] for _, _, headers in dead)
    assert classes == {b"BadInputError": 3, b"KeyError": 1}
    values = {value for _, value, _ in dead}
    assert undecodable in values and unknown_schema in values
    for _, _, headers in dead:
        assert headers["opsflow-source-topic"] == topics.orders.encode()
        assert int(headers["opsflow-source-partition"]) in range(4)
        assert int(headers["opsflow-source-offset"]) >= 0
        assert headers["opsflow-service"] == b"relay"
        assert headers["opsflow-error-message"] and headers["opsflow-failed-at"]
    messages = b" ".join(h["opsflow-error-message"] for _, _, h in dead)
    assert b"not the magic byte 0" in messages and b"unknown schema id 999999" in messages
    assert b"asked to be rejected" in messages


def test_a_transient_handler_error_is_retried_and_then_processed_once(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    inputs = orders(50, notes={5: "flaky:2"})
    publish(topics, inputs)
    service = start(services, stack, topics, tmp_path)
    assert_exactly_once(topics, inputs)
    log = service.log.read_bytes()
    assert log.count(b'"message": "retrying"') == 2
    assert read_all(topics.bootstrap, topics.dead_letters, at_least=0, quiet=1) == []


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_trace_id_on_the_input_appears_on_every_output(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    inputs = orders(20)
    publish(
        topics, inputs, headers=[("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode())]
    )
    start(services, stack, topics, tmp_path)
    records = read_all(topics.bootstrap, topics.checks, at_least=len(inputs))
    assert len(records) == len(inputs)
    for _, _, headers in records:
        version, trace_id, span_id, _ = headers["traceparent"].decode().split("-")
        assert (version, trace_id) == ("00", TRACE_ID)
        assert span_id != "00f067aa0ba902b7", "the output's parent is the processing span"


def test_metrics_health_and_json_logs_describe_what_the_service_did(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    port = free_port()
    inputs = orders(40, notes={3: "reject"})
    publish(topics, inputs)
    service = start(services, stack, topics, tmp_path, OPSFLOW_METRICS_PORT=str(port))
    read_all(topics.bootstrap, topics.checks, at_least=39)
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/readyz").status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    label = f'topic="{topics.orders}"'
    assert f"opsflow_events_processed_total{{{label}}} 40.0" in metrics
    assert f"opsflow_events_dead_lettered_total{{{label}}} 1.0" in metrics
    assert "opsflow_transaction_commit_seconds_count" in metrics
    assert 'opsflow_consumer_lag{partition="0"' in metrics

    lines = [
        json.loads(line) for line in service.log.read_text().splitlines() if line.startswith("{")
    ]
    assert lines and all(line["service"] == "relay" for line in lines)
    dead = next(line for line in lines if line["message"] == "dead-lettered")
    rejected = inputs[3]
    assert dead["correlation_id"] == rejected.order_id
    assert dead["event_id"] == str(rejected.envelope.event_id)
    assert len(dead["trace_id"]) == 32


def test_running_a_service_without_its_cluster_is_one_clear_line() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL")
    }
    result = subprocess.run(
        [sys.executable, "-m", "opsflow", "run", "tests.services.relay"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "KAFKA_BOOTSTRAP_SERVERS" in result.stderr and "Traceback" not in result.stderr


def test_log_scan_delivery_on_the_durable_broker_is_exactly_once_after_kill_9(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    durable = Stack(tmp_path / "data", stack_env(tmp_path / "data"))
    durable.run("up", "--detach")
    try:
        env = durable.status()["env"]
        assert env["OPSFLOW_DELIVERY"] == "log-scan", "the durable embedded broker asks for it"
        own = make_topics(env["KAFKA_BOOTSTRAP_SERVERS"], env["SCHEMA_REGISTRY_URL"])
        inputs = orders(4_000)
        publish(own, inputs)
        first = start(services, durable, own, tmp_path)
        wait_for(own.bootstrap, own.checks, 1_000)
        first.kill9()
        start(services, durable, own, tmp_path)
        assert_exactly_once(own, inputs)
    finally:
        for service in services:
            if service.proc.poll() is None:
                service.kill9()
        durable.run("down", check=False)
