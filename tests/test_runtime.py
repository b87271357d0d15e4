"""The service runtime on the real stack: exactly once under kill -9, clean stops,
takeover between instances, dead letters and retries.

Each test runs the one-hop ``tests.services.relay`` service against the session's
broker and registry, in topics of its own (``OPSFLOW_TOPIC_PREFIX``): as a real
process (``python -m opsflow.runtime``) where the process is the subject (kill -9,
SIGTERM, takeover, a stall, its metrics endpoint and logs), else as the runtime's
worker in a thread of the test process. What a service wrote is checked once its
consumer group has committed every input (see ``tests.support.runtime``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from opsflow import db
from opsflow.contracts import Event
from opsflow.contracts.lineage import derive_idempotency_key
from opsflow.contracts.wire import WireCodec
from opsflow.errors import RetryableError
from opsflow.runtime import observability, recovery
from opsflow.settings import for_producer
from opsflow.topics import (
    ReadToEnd,
    consumer_config,
    dead_letter_topic,
    end_offsets,
    ensure_topics,
    reader_config,
)
from services.contracts import (
    DispatchExecuted,
    DispatchFailed,
    DispatchRequested,
    OrderReceived,
    PolicyChecked,
)
from tests.support.carrier import CarrierProcess
from tests.support.runtime import (
    ServiceProcess,
    Topics,
    headers_of,
    make_topics,
    orders,
    publish,
    record_ends,
    running,
    runtime_log,
    settled_records,
    start,
    wait_for,
    wait_until_processed,
)
from tests.support.stack import Stack, create_schema, drop_schema, free_port, stack_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def topics(stack: Stack, bootstrap_servers: str, registry_url: str) -> Topics:
    return make_topics(bootstrap_servers, registry_url)


@pytest.fixture
def services(stack: Stack, topics: Topics, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        if service.proc.poll() is None:
            service.kill9()


def assert_exactly_once(
    topics: Topics, inputs: list[OrderReceived], processes: Sequence[ServiceProcess] = ()
) -> None:
    """Once the relay has committed every input, each input has exactly one output (no
    input lost, none duplicated), with the output's derived idempotency key."""
    wait_until_processed(topics, processes=processes)
    records = settled_records(topics.bootstrap, topics.checks)
    outputs = [topics.codec.decode(msg.value()) for msg in records]
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
    for msg in records:
        headers = headers_of(msg)
        assert headers["opsflow-event-type"] == b"policy.checked" and msg.key()


@pytest.mark.process
def test_kill_9_mid_stream_leaves_every_output_exactly_once(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    inputs = orders(10_000)
    publish(topics, inputs)
    first = start(services, stack, topics, tmp_path)
    wait_for(topics.bootstrap, topics.checks, 3_000)
    first.kill9()
    second = start(services, stack, topics, tmp_path)
    assert_exactly_once(topics, inputs, [second])


@pytest.mark.process
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
    second = start(services, stack, topics, tmp_path)
    assert_exactly_once(topics, inputs, [second])


@pytest.mark.process
def test_two_instances_split_partitions_and_the_survivor_takes_over_after_kill_9(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    inputs = orders(8_000)
    one = start(services, stack, topics, tmp_path)
    two = start(services, stack, topics, tmp_path)
    # Both in the group, with partitions of their own, before the stream starts.
    one.wait_logged(b'"assigned"')
    two.wait_logged(b'"assigned"')
    publish(topics, inputs)
    wait_for(topics.bootstrap, topics.checks, 2_000)
    assert b'"assigned"' in one.log.read_bytes() and b'"assigned"' in two.log.read_bytes()
    two.kill9()
    assert_exactly_once(topics, inputs, [one])
    assert one.proc.poll() is None, "the survivor is still running"


def test_poison_inputs_are_dead_lettered_with_headers_while_good_ones_flow(
    topics: Topics,
) -> None:
    inputs = orders(300, notes={10: "reject", 20: "crash"})
    good = [event for event in inputs if event.notes is None]
    undecodable = b"not avro at all"
    unknown_schema = struct.pack(">bI", 0, 999_999) + b"\x00"
    publish(topics, inputs, raw=[undecodable, unknown_schema])
    with running(topics):
        assert_exactly_once(topics, good)

    dead = [
        (msg.value(), headers_of(msg))
        for msg in settled_records(topics.bootstrap, topics.dead_letters)
    ]
    assert len(dead) == 4
    classes = Counter(headers["opsflow-error-class"] for _, headers in dead)
    assert classes == {b"BadInputError": 3, b"KeyError": 1}
    values = {value for value, _ in dead}
    assert undecodable in values and unknown_schema in values
    for _, headers in dead:
        assert headers["opsflow-source-topic"] == topics.orders.encode()
        assert int(headers["opsflow-source-partition"]) in range(4)
        assert int(headers["opsflow-source-offset"]) >= 0
        assert headers["opsflow-service"] == b"relay"
        assert headers["opsflow-error-message"] and headers["opsflow-failed-at"]
    messages = b" ".join(h["opsflow-error-message"] for _, h in dead)
    assert b"not the magic byte 0" in messages and b"unknown schema id 999999" in messages
    assert b"asked to be rejected" in messages


def test_an_input_with_a_header_that_is_not_text_is_handled_not_a_crash(topics: Topics) -> None:
    """The event-type header only lets a worker pass over records it has no handler
    for; one that is not UTF-8 says nothing, so the record is decoded and handled."""
    inputs = orders(40)
    publish(topics, inputs[:20], headers=[("opsflow-event-type", b"\xff\xfe"), ("empty", b"")])
    publish(topics, inputs[20:])
    with running(topics):
        assert_exactly_once(topics, inputs)
    assert settled_records(topics.bootstrap, topics.dead_letters) == []


def test_batches_without_outputs_are_committed_each_time(topics: Topics) -> None:
    """Records no handler takes (as after a take-over, inputs whose outputs a previous
    owner wrote) make batches without outputs; each such batch moves the group's
    offset, not only the first one a producer commits."""
    passed_over = [("opsflow-event-type", b"not.for.the.relay")]
    with running(topics):
        for _ in range(3):
            publish(topics, orders(10), headers=passed_over)
            wait_until_processed(topics, timeout=30)
    assert settled_records(topics.bootstrap, topics.checks) == []


def test_a_takeover_passes_over_outputs_whose_source_header_no_worker_wrote(
    topics: Topics,
) -> None:
    """A new owner reads the outputs of its uncommitted inputs' time; a record there with
    a malformed source header (not UTF-8, not topic/partition/offset) names no input
    and must not fail every take-over, while a well-formed one still counts."""
    producer = Producer({"bootstrap.servers": topics.bootstrap})
    producer.produce(topics.orders, key=b"k", value=b"an input", partition=0)
    written = f"{topics.orders}/0/0#0"
    for source in (b"\xff\xfe", b"nonsense", b"a/b/c#d", written.encode()):
        producer.produce(
            topics.checks, key=b"k", value=b"an output", partition=0,
            headers=[("opsflow-source", source)],
        )  # fmt: skip
    assert producer.flush(10) == 0

    found = recovery.recover(
        {"bootstrap.servers": topics.bootstrap}, [topics.checks], {(topics.orders, 0): 0}
    )
    assert found == {(topics.orders, 0): {written}}


def test_a_transient_handler_error_is_retried_and_then_processed_once(topics: Topics) -> None:
    inputs = orders(50, notes={5: "flaky:2"})
    publish(topics, inputs)
    with runtime_log("retrying") as retries, running(topics):
        assert_exactly_once(topics, inputs)
    flaky = str(inputs[5].envelope.event_id)
    assert [getattr(r, "event_id", None) for r in retries] == [flaky, flaky]
    assert settled_records(topics.bootstrap, topics.dead_letters) == []


def test_a_retry_whose_rewind_the_consumer_did_not_take_skips_no_input(topics: Topics) -> None:
    # A partition is rewound to an input to retry it; if the consumer then delivers a
    # later record first, it did not take the rewind, and taking that record would
    # skip the input. Made to happen: while the retry waits, the consumer is moved
    # three records past it behind the worker's back.
    inputs = orders(80, notes={0: "flaky:1"})  # the first input: records follow it
    publish(topics, inputs)
    ends = record_ends(topics.bootstrap, topics.orders)
    message = "a partition rewound for a retry delivered a later record: fetching again"
    with runtime_log(message) as refetched, running(topics) as worker:
        deadline = time.monotonic() + 60
        while not any(part.paused_until for part in list(worker.partitions.values())):
            assert time.monotonic() < deadline, "the flaky input was never retried"
            time.sleep(0.001)
        (waiting,) = [part for part in list(worker.partitions.values()) if part.paused_until]
        assert ends[waiting.partition] > waiting.position + 3
        worker.consumer.seek(TopicPartition(waiting.topic, waiting.partition, waiting.position + 3))
        assert_exactly_once(topics, inputs)
    assert refetched, "the worker took the later record"
    assert {getattr(r, "partition", None) for r in refetched} == {
        f"{waiting.topic}/{waiting.partition}"
    }


def test_a_database_out_of_reach_is_retried_not_dead_lettered(topics: Topics) -> None:
    # As when PostgreSQL restarts under a service: the input did nothing wrong.
    inputs = orders(30, notes={4: "nodb:2"})
    publish(topics, inputs)
    closed = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    with runtime_log("retrying") as retries, running(topics, RELAY_NO_DATABASE=closed):
        assert_exactly_once(topics, inputs)
    waiting = str(inputs[4].envelope.event_id)
    assert [getattr(r, "event_id", None) for r in retries] == [waiting, waiting]
    assert settled_records(topics.bootstrap, topics.dead_letters) == []


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_trace_id_on_the_input_appears_on_every_output(topics: Topics) -> None:
    inputs = orders(20)
    publish(
        topics, inputs, headers=[("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode())]
    )
    with running(topics):
        wait_until_processed(topics)
    records = settled_records(topics.bootstrap, topics.checks)
    assert len(records) == len(inputs)
    for msg in records:
        headers = headers_of(msg)
        version, trace_id, span_id, _ = headers["traceparent"].decode().split("-")
        assert (version, trace_id) == ("00", TRACE_ID)
        assert span_id != "00f067aa0ba902b7", "the output's parent is the processing span"


PARENTS = {
    "sampled": [("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode())],
    "unsampled, random": [("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-02".encode())],
    "with state": [
        ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()),
        ("tracestate", b"vendor=abc,other=1"),
    ],
    "zero trace id": [("traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01")],
    "zero span id": [("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01".encode())],
    "version ff": [("traceparent", f"ff-{TRACE_ID}-00f067aa0ba902b7-01".encode())],
    "malformed": [("traceparent", b"00-nothex-01")],
    "none": [],
}


@pytest.mark.parametrize("case", PARENTS)
def test_the_direct_trace_context_is_what_opentelemetry_would_write(case: str) -> None:
    """Without an exporter the runtime parses and writes ``traceparent`` itself: the
    output's trace id, flags and state must be the SDK's (a new span id either way)."""
    headers = PARENTS[case]
    tracer = observability.tracer("relay")
    with observability.process_span(tracer, headers, "orders") as span:
        sdk = dict(observability.trace_headers(span))
    direct = dict(observability.trace_headers(observability.unrecorded_span(headers), direct=True))
    assert direct.keys() == sdk.keys()
    ours, theirs = direct["traceparent"].split(b"-"), sdk["traceparent"].split(b"-")
    assert (ours[0], ours[3]) == (theirs[0], theirs[3]), "version and flags"
    if headers and case not in ("zero trace id", "zero span id", "version ff", "malformed"):
        assert ours[1] == theirs[1] == TRACE_ID.encode(), "the input's trace"
    assert direct.get("tracestate") == sdk.get("tracestate")


@pytest.mark.process
def test_metrics_health_and_json_logs_describe_what_the_service_did(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    port = free_port()
    inputs = orders(40, notes={3: "reject"})
    publish(topics, inputs)
    service = start(services, stack, topics, tmp_path, OPSFLOW_METRICS_PORT=str(port))
    wait_until_processed(topics, processes=[service])
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


@pytest.mark.process
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


# --- log-scan delivery -----------------------------------------------------------------


@pytest.mark.process
def test_log_scan_a_stalled_instance_resuming_after_a_takeover_writes_no_duplicate(
    stack: Stack, topics: Topics, services: list[ServiceProcess], tmp_path: Path
) -> None:
    """An instance stopped (SIGSTOP) in the middle of a batch loses its partitions to a
    second one; resumed while the second is still working through them, it must
    write nothing of the batch it held: it notices it stood still, holds back, and
    learns from the group that the partitions are gone."""
    inputs = orders(30, notes={i: "slow:0.5" for i in range(30)})
    publish(topics, inputs)
    # No linger: an output handed to the client just before the stop is on the wire
    # at once (the one window the worker cannot close; see README, "Exactly once").
    log_scan = {"OPSFLOW_DELIVERY": "log-scan", "KAFKA_LINGER_MS": "0"}
    stalled = start(services, stack, topics, tmp_path, **log_scan)
    wait_for(topics.bootstrap, topics.checks, 3)
    stalled.proc.send_signal(signal.SIGSTOP)
    try:
        start(services, stack, topics, tmp_path, **log_scan)
        # The taker joins once the stopped member's session has timed out, then
        # writes the rest; resume the stopped one while that is under way.
        wait_for(topics.bootstrap, topics.checks, 10, timeout=60)
    finally:
        stalled.proc.send_signal(signal.SIGCONT)
    stalled.wait_logged(b"stood still")  # it has seen its stop before anything is read
    assert_exactly_once(topics, inputs)
    assert b"stood still" in stalled.log.read_bytes()
    assert stalled.proc.poll() is None, "the resumed instance carries on"


def _source_headers(topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [(recovery.SOURCE_HEADER, recovery.source_of(topic, partition, offset, 0).encode())]


def test_recovery_scan_finds_exactly_the_outputs_of_uncommitted_inputs(
    stack: Stack, topics: Topics
) -> None:
    producer = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 5})
    for offset in range(20):
        producer.produce(topics.orders, b"in", partition=0)
        producer.produce(topics.checks, b"out", headers=_source_headers(topics.orders, 0, offset))
    for offset in range(10):
        producer.produce(topics.orders, b"in", partition=1)
        producer.produce(topics.checks, b"out", headers=_source_headers(topics.orders, 1, offset))
    assert producer.flush(30) == 0
    config = {"bootstrap.servers": topics.bootstrap}

    found = recovery.recover(
        config,
        [topics.checks],
        {(topics.orders, 0): 12, (topics.orders, 1): 10, (topics.orders, 2): 0},
    )

    assert found == {
        (topics.orders, 0): {recovery.source_of(topics.orders, 0, o, 0) for o in range(12, 20)},
        (topics.orders, 1): set(),  # committed to its end: nothing uncommitted
        (topics.orders, 2): set(),  # empty
    }


def test_recovery_scan_stops_at_the_end_it_found_while_other_writers_keep_appending(
    stack: Stack, topics: Topics
) -> None:
    producer = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 5})
    producer.produce(topics.orders, b"in", partition=0)
    producer.produce(topics.checks, b"out", headers=_source_headers(topics.orders, 0, 0))
    assert producer.flush(30) == 0
    stop = threading.Event()

    def keep_writing() -> None:
        other = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 5})
        offset = 0
        while not stop.is_set():
            offset += 1
            other.produce(topics.checks, b"x", headers=_source_headers(topics.orders, 3, offset))
            other.poll(0.001)
        other.flush(30)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(1)
        began = time.monotonic()
        found = recovery.recover(
            {"bootstrap.servers": topics.bootstrap}, [topics.checks], {(topics.orders, 0): 0}
        )
        took = time.monotonic() - began
    finally:
        stop.set()
        writer.join(60)
    assert found == {(topics.orders, 0): {recovery.source_of(topics.orders, 0, 0, 0)}}
    assert took < 20, f"the scan chased the writer for {took:.1f}s"


def test_recovery_scan_ends_at_an_open_transaction_instead_of_waiting_past_it(
    stack: Stack, topics: Topics
) -> None:
    # A transaction left open on an output partition (its producer died; the
    # embedded broker never times it out) puts the end a read_committed reader
    # can reach short of the high watermark: the scan must stop there, not retry
    # for ever (a dispatch restarted in the 1,000-order workflow test did).
    producer = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 5})
    producer.produce(topics.orders, b"in", partition=0)
    producer.produce(
        topics.checks, b"out", partition=0, headers=_source_headers(topics.orders, 0, 0)
    )
    assert producer.flush(30) == 0
    stuck = Producer(
        {"bootstrap.servers": topics.bootstrap, "transactional.id": f"stuck-{uuid.uuid4()}"}
    )
    stuck.init_transactions(30)
    stuck.begin_transaction()
    stuck.produce(topics.checks, b"open", partition=0)
    assert stuck.flush(30) == 0  # written, never committed

    began = time.monotonic()
    found = recovery.recover(
        {"bootstrap.servers": topics.bootstrap}, [topics.checks], {(topics.orders, 0): 0}
    )

    assert found == {(topics.orders, 0): {recovery.source_of(topics.orders, 0, 0, 0)}}
    assert time.monotonic() - began < 20


def test_reading_to_the_end_stops_at_each_partitions_end_with_or_without_end_events(
    stack: Stack, topics: Topics
) -> None:
    # Committed in a transaction: offsets 0-4 are records, then (on brokers that write one)
    # its marker, which no reader is given; a bounded reading must still see its end.
    config = {"bootstrap.servers": topics.bootstrap}
    writer = Producer({**config, "transactional.id": f"reads-{uuid.uuid4()}"})
    writer.init_transactions(30)
    writer.begin_transaction()
    for n in range(5):
        writer.produce(topics.checks, f"r{n}".encode(), partition=0)
    writer.commit_transaction(30)
    where, empty = (topics.checks, 0), (topics.checks, 1)
    ends = end_offsets(config, [where, empty], timeout=30)
    assert ends[where] >= 5 and ends[empty] == 0

    def offsets(consumer: Consumer, reading: ReadToEnd) -> list[int]:
        try:
            return [msg.offset() or 0 for msg in reading]
        finally:
            consumer.close()

    with_events = Consumer(reader_config(config, "test-reader"))
    reading = ReadToEnd(with_events, {where: 2, empty: 0}, timeout_s=30)
    assert offsets(with_events, reading) == [2, 3, 4]
    # A reader without end events (the long-lived readers' settings) ends at its position.
    without = Consumer(consumer_config(config, f"test-{uuid.uuid4().hex}"))
    reading = ReadToEnd(without, {where: 0, empty: 0}, ends=ends, timeout_s=30)
    assert offsets(without, reading) == [0, 1, 2, 3, 4]
    # An end it cannot reach is given up, naming the partition.
    without = Consumer(consumer_config(config, f"test-{uuid.uuid4().hex}"))
    reading = ReadToEnd(without, {where: 0}, ends={where: ends[where] + 3}, timeout_s=2)
    with pytest.raises(RetryableError, match=re.escape(f"{topics.checks}[0]")):
        offsets(without, reading)


def _approvable_orders(count: int) -> list[OrderReceived]:
    """Orders policy-check auto-approves (a small amount, one item)."""
    made = []
    for order in orders(count):
        item = order.items[0].model_copy(update={"quantity": 1, "unit_price_minor": 10_00})
        made.append(order.model_copy(update={"amount_minor": 10_00, "items": [item]}))
    return made


def _read_events(bootstrap: str, codec: WireCodec, topic: str) -> list[Event]:
    """Every event on ``topic`` now: its partitions read from the start to the ends
    learnt first (no consumer group to join)."""
    config = {"bootstrap.servers": bootstrap}
    consumer = Consumer({**config, "group.id": f"check-{uuid.uuid4().hex}"})
    try:
        parts = [
            (topic, p) for p in consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ]
        ends = end_offsets(config, parts, timeout=30)
        remaining = {where for where, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(t, p, 0) for t, p in remaining])
        events: list[Event] = []
        deadline = time.monotonic() + 60
        while remaining:
            assert time.monotonic() < deadline, f"could not read {sorted(remaining)}"
            for msg in consumer.consume(1000, 0.5):
                where = (msg.topic() or "", msg.partition() or 0)
                if msg.error() is None and where in remaining:
                    events.append(codec.decode(msg.value()))
                    if (msg.offset() or 0) + 1 >= ends[where]:
                        remaining.discard(where)
        return events
    finally:
        consumer.close()


@pytest.mark.process
def test_log_scan_workflow_on_the_durable_broker_is_exactly_once_through_broker_pauses_and_kill_9(
    tmp_path: Path,
) -> None:
    """policy-check and dispatch (log-scan delivery, as `opsflow up` sets it on the
    durable store) book orders at the carrier stand-in while the broker is stopped
    and resumed (SIGSTOP/SIGCONT, longer than the clients' request timeout) and
    both services are killed with kill -9 and restarted, again and again. Every
    input must have exactly one output of each type (by lineage), the carrier
    exactly one booking per order, and nothing may be lost."""
    durable = Stack(tmp_path / "data", stack_env(tmp_path / "data"))
    durable.run("up", "--detach")
    carrier: CarrierProcess | None = None
    running: dict[str, ServiceProcess] = {}
    schema = ""
    env: dict[str, str] = {}
    try:
        status = durable.status()  # one `opsflow status` (a process, ~1.3 s) for both
        env = status["env"]
        broker = {row["name"]: row for row in status["components"]}["broker"]["pid"]
        assert env["OPSFLOW_DELIVERY"] == "log-scan", "the durable embedded broker asks for it"
        own = make_topics(env["KAFKA_BOOTSTRAP_SERVERS"], env["SCHEMA_REGISTRY_URL"])
        names = [f"{own.prefix}{t}" for t in ("review", "dispatch")]
        ensure_topics(
            AdminClient({"bootstrap.servers": own.bootstrap}),
            [*names, *(dead_letter_topic(n) for n in [*names, own.checks])],
            partitions=4,
        )
        schema, database_url = create_schema(env["DATABASE_URL"])
        db.migrate(database_url)
        carrier = CarrierProcess(
            tmp_path / "carrier.log",
            {
                "CARRIER_DB": str(tmp_path / "carrier.db"),
                # 503s and ghosts (booked, then answered 503) make dispatch book again.
                "CARRIER_ERROR_RATE": "0.1",
                "CARRIER_GHOST_RATE": "0.1",
                "CARRIER_SEED": "3",
            },
        ).start()
        service_env = {
            "DATABASE_URL": database_url,
            "CARRIER_URL": carrier.url,
            "DISPATCH_BACKOFF_S": "0.05",
            "DISPATCH_BACKOFF_MAX_S": "0.5",
            "DISPATCH_TIMEOUT_S": "1",
        }

        def launch(name: str) -> None:
            log = tmp_path / f"{name}-{time.monotonic_ns()}.log"
            target = f"services.{name}"
            running[name] = ServiceProcess(
                durable, own, log, target=target, stack_env=env, **service_env
            )

        # Orders arrive in waves, one before each broker stop, so every stop and
        # kill lands while the services have work under way.
        waves = [_approvable_orders(50) for _ in range(4)]
        inputs = [order for wave in waves for order in wave]
        publish(own, waves[0])
        for name in ("policy_check", "dispatch"):
            launch(name)

        bookings = f"{carrier.url}/bookings"
        deadline = time.monotonic() + 90
        while httpx.get(bookings, timeout=10).json()["count"] < 10:
            assert time.monotonic() < deadline, "dispatch booked nothing"
            time.sleep(0.2)
        for round_, wave in enumerate(waves[1:]):
            publish(own, wave)
            time.sleep(0.3)  # stop the broker while the services work on the wave
            os.kill(broker, signal.SIGSTOP)
            time.sleep(6.5)  # past the workers' 5 s request timeout: writes are sent again
            os.kill(broker, signal.SIGCONT)
            time.sleep(1)
            victim = ("dispatch", "policy_check")[round_ % 2]
            running[victim].kill9()
            launch(victim)
        booked_during_chaos = httpx.get(bookings, timeout=10).json()["count"]
        assert booked_during_chaos < len(inputs), "the chaos came too late to prove anything"

        dispatch_topic = f"{own.prefix}dispatch"
        deadline = time.monotonic() + 120
        while True:
            events = _read_events(own.bootstrap, own.codec, dispatch_topic)
            done = {e.order_id for e in events if isinstance(e, DispatchExecuted | DispatchFailed)}
            if len(done) == len(inputs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        checks = _read_events(own.bootstrap, own.codec, own.checks)
        ledger = httpx.get(bookings, timeout=10).json()
    finally:
        for service in running.values():
            if service.proc.poll() is None:
                service.kill9()
        if carrier is not None:
            carrier.stop()
        if schema:
            drop_schema(env["DATABASE_URL"], schema)
        durable.run("down", check=False)

    received = {str(o.envelope.event_id) for o in inputs}
    # One policy.checked per order, one dispatch.requested per approval, and one
    # outcome (executed or failed) per request: counted by cause, each event's lineage.
    by_cause = Counter((e.envelope.causation_id, e.event_type) for e in [*checks, *events])
    duplicated = {key: n for key, n in by_cause.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} inputs have more than one output: {duplicated}"
    assert {e.envelope.causation_id for e in checks} == received, "no order is lost"
    requests = [e for e in events if isinstance(e, DispatchRequested)]
    approvals = {str(e.envelope.event_id) for e in checks}
    assert {e.envelope.causation_id for e in requests} == approvals, "every approval requested"
    outcomes = [e for e in events if isinstance(e, DispatchExecuted | DispatchFailed)]
    assert {e.envelope.causation_id for e in outcomes} == {
        str(e.envelope.event_id) for e in requests
    }, "every request has its outcome"
    assert ledger["duplicates"] == []
    booked = Counter(b["order_id"] for b in ledger["bookings"])
    assert all(n == 1 for n in booked.values()), "one booking per order at the carrier"
    executed = {e.order_id for e in outcomes if isinstance(e, DispatchExecuted)}
    assert executed <= set(booked), "every executed dispatch has its booking"


def test_each_client_takes_only_the_shared_kafka_settings_of_its_kind(
    bootstrap_servers: str,
) -> None:
    # KAFKA_* settings reach every client; each kind must take only its own, or
    # librdkafka warns at every start (CONFWARN) in every service's log.
    shared = {
        "bootstrap.servers": bootstrap_servers,
        "linger.ms": 20,
        "fetch.wait.max.ms": 20,
        "session.timeout.ms": 2000,
    }
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logger = logging.getLogger(f"librdkafka-{uuid.uuid4().hex}")
    logger.addHandler(Collect())
    consumer = Consumer({**reader_config(shared, "settings"), "logger": logger})
    consumer.poll(0.1)
    consumer.close()
    producer = Producer({**for_producer(shared), "logger": logger})
    producer.poll(0.1)
    assert producer.flush(5) == 0
    assert not [line for line in said if "CONFWARN" in line], said
