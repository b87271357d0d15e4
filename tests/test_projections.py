"""Read models on the real stack: kept exactly once, rebuilt without downtime, tamper-evident.

Each test has topics of its own (a prefix) and a fresh database schema; the
projector runs as a real process (``python -m opsflow.projector``) and the
operator commands through the real CLI. Order histories come from
``tests.support.histories``: every workflow event type, causally consistent. What a
read model should say is computed here from the histories, not by the
projection code under test.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import fastavro
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from opsflow import db
from opsflow.contracts import Event, catalogue
from opsflow.contracts.wire import WireCodec
from opsflow.projections.rebuild import rebuild
from opsflow.projections.runner import ProjectionRunner
from opsflow.projector.service import Projector
from opsflow.readmodels import projections
from opsflow.topics import dead_letter_topic, ensure_topics, topic_name
from services.contracts import ORDERS, TOPICS
from tests.support.histories import histories
from tests.support.projecting import World, projecting
from tests.support.samples import sample
from tests.support.stack import (
    Stack,
    create_schema,
    drop_schema,
    free_port,
    start_service,
    stop_process,
)

# --- what the histories say -----------------------------------------------------------


def final_state(history: list[Event]) -> str:
    """Where an order ended, read off its last event (independently of the projection)."""
    last = history[-1]
    data = last.model_dump()
    match last.event_type:
        case "pod.captured":
            return "delivered"
        case "dispatch.executed":
            return "dispatched"
        case "dispatch.failed":
            assert data["retries_exhausted"]
            return "dispatch_failed"
        case "review.decided" | "policy.checked":
            return "rejected"
    raise AssertionError(f"a history ends with {last.event_type}")


def expected_counts(orders: list[list[Event]]) -> dict[str, int]:
    kinds = Counter(e.event_type for history in orders for e in history)
    return {
        "orders_current": len(orders),
        "review_queue": kinds["review.requested"],
        "sla_breaches": kinds["review.escalated"] + kinds["review.sla_breached"],
        "dispatch_log": kinds["dispatch.requested"]
        + kinds["dispatch.executed"]
        + kinds["dispatch.failed"],
        "audit_log": sum(kinds.values()),
    }


# --- one test's world -------------------------------------------------------------------


@pytest.fixture
def world(
    stack: Stack,
    bootstrap_servers: str,
    registry_url: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> World:
    prefix = f"pj{uuid.uuid4().hex[:8]}."
    monkeypatch.setenv("OPSFLOW_TOPIC_PREFIX", prefix)
    names = [topic_name(t, prefix=prefix) for t in TOPICS]
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap_servers}),
        names + [dead_letter_topic(n) for n in names],
        partitions=3,
    )
    db.migrate(database_url)
    return World(prefix, bootstrap_servers, registry_url, database_url, stack)


@pytest.fixture
def projector(world: World) -> Iterator[Projector]:
    """The projector in this process: for the tests whose subject is the read models."""
    with projecting(world) as running:
        yield running


@pytest.fixture
def projector_process(world: World, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The projector as a real process: for the tests whose subject is that process."""
    port = free_port()
    proc = start_service(
        ["-m", "opsflow.projector"],
        {**world.env, "OPSFLOW_METRICS_PORT": str(port)},
        tmp_path / "projector.log",
        f"http://127.0.0.1:{port}/readyz",
    )
    yield proc
    stop_process(proc)


def assert_models_match(world: World, orders: list[list[Event]]) -> None:
    """Every read model holds exactly what the histories say: nothing lost, nothing twice."""
    for table, count in expected_counts(orders).items():
        assert world.count(table) == count, table
    assert world.states() == {h[0].order_id: final_state(h) for h in orders}


# --- tests ------------------------------------------------------------------------------


def test_every_read_model_rebuilt_from_the_topics_equals_the_incrementally_kept_one(
    world: World, projector: Projector
) -> None:
    orders = list(histories(300, run=world.prefix))
    world.publish(orders)
    world.wait_caught_up()
    assert_models_match(world, orders)

    for name in projections():
        done = world.cli("projections", "rebuild", name, "--verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verified: the rebuilt model equals the incrementally kept one" in done.stdout
    assert_models_match(world, orders)
    # So few records are replayed in one process; the worker processes of a large
    # rebuild, asked for here, give the same rows.
    parallel = rebuild(
        projections()["orders_current"],
        kafka={"bootstrap.servers": world.bootstrap},
        registry=world.registry,
        database_url=world.database_url,
        verify=True,
        workers=2,
        parallel_from=0,
    )
    assert parallel.verified, parallel
    assert_models_match(world, orders)

    listed = world.cli("projections", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == set(projections())
    assert all(row["lag"] == 0 and row["last_error"] is None for row in rows.values()), rows
    assert rows["audit_log"]["position"] == expected_counts(orders)["audit_log"]


def test_a_rebuild_under_live_load_and_two_projectors_lose_and_duplicate_nothing(
    world: World, projector: Projector
) -> None:
    second = ExitStack()  # a second projector, beside the fixture's
    second.enter_context(projecting(world))
    orders = list(histories(600, run=world.prefix, seed=11))
    world.publish(orders[:200])
    world.wait_caught_up()

    def keep_publishing() -> None:
        for start in range(200, 600, 50):
            world.publish(orders[start : start + 50])
            time.sleep(0.2)

    seen: list[int] = []
    reading = threading.Event()

    def keep_reading() -> None:
        # A reader during the rebuild sees the old model or the new one, never an
        # empty or half-built table: counts only grow.
        with db.connect(world.database_url, autocommit=True) as conn:
            while not reading.is_set():
                seen.append(conn.execute("SELECT count(*) FROM orders_current").fetchone()[0])  # type: ignore[index]
                time.sleep(0.02)

    publisher = threading.Thread(target=keep_publishing)
    reader = threading.Thread(target=keep_reading)
    publisher.start()
    reader.start()
    try:
        done = world.cli("projections", "rebuild", "orders_current", "--verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verified" in done.stdout
    finally:
        publisher.join()
        reading.set()
        reader.join()
        second.close()
    assert seen and seen[0] >= 200 and seen == sorted(seen), seen[:20]
    world.wait_caught_up()
    assert_models_match(world, orders)
    intact = world.cli("audit", "verify")
    assert intact.returncode == 0 and "intact" in intact.stdout, intact.stdout + intact.stderr


def test_events_read_out_of_causal_order_give_the_same_rows_as_in_order(
    world: World, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Orders' events applied one per batch: once in causal order, once backwards
    # (delivery first, receipt last), each pass in topics and a database of its
    # own; the rows must be equal.
    base = stack.address("DATABASE_URL")
    other, other_url = create_schema(base)
    backwards = f"{world.prefix}bw."
    names = [topic_name(t, prefix=backwards) for t in TOPICS]
    ensure_topics(AdminClient({"bootstrap.servers": world.bootstrap}), names, partitions=3)
    try:
        db.migrate(other_url)
        orders = [h for h in histories(40, run=world.prefix, seed=5) if len(h) >= 8][:3]
        assert orders, "the seed gives histories through review and dispatch"
        codec = WireCodec(world.registry)
        producer = Producer({"bootstrap.servers": world.bootstrap, "linger.ms": 0})
        for url, prefix in ((world.database_url, world.prefix), (other_url, backwards)):
            monkeypatch.setenv("OPSFLOW_TOPIC_PREFIX", prefix)
            runners = [
                ProjectionRunner(
                    p,
                    # Each event is awaited alone: ask the broker not to hold fetches.
                    kafka={"bootstrap.servers": world.bootstrap, "fetch.wait.max.ms": 10},
                    registry=world.registry,
                    database_url=url,
                    # A step waits this long unless a full batch is there, which it
                    # never is here: each is awaited alone.
                    max_wait_s=0.005,
                )
                for p in projections().values()
            ]
            for runner in runners:
                runner.open()
            try:
                for history in orders:
                    for event in reversed(history) if prefix == backwards else history:
                        publish_one(producer, codec, event, prefix)
                        topic = event.topic
                        for runner in runners:
                            if topic in runner.projection.topics:
                                wanted = runner.applied + 1
                                while runner.applied < wanted:
                                    runner.step()
            finally:
                for runner in runners:
                    runner.close()
        for table, key in (
            ("orders_current", "order_id"), ("daily_summary", "day"),
            ("review_queue", "task_id"), ("sla_breaches", "event_id"),
            ("dispatch_log", "event_id"),
        ):  # fmt: skip
            assert rows(world.database_url, table, key) == rows(other_url, table, key), table
        assert {r["state"] for r in rows(other_url, "orders_current", "order_id")} <= {
            "delivered", "dispatched", "dispatch_failed", "rejected",
        }  # fmt: skip
    finally:
        drop_schema(base, other)


def publish_one(producer: Producer, codec: WireCodec, event: Event, prefix: str) -> None:
    """Write one event and wait for the broker's acknowledgement."""
    producer.produce(
        topic_name(event.topic, prefix=prefix),
        key=event.order_id.encode(),
        value=codec.encode(event),
    )
    assert producer.flush(10) == 0


def rows(url: str, table: str, key: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()


@pytest.mark.process
def test_postgres_restarted_mid_projection_loses_nothing_and_the_projector_resumes_by_itself(
    world: World, stack: Stack, projector_process: subprocess.Popen[bytes]
) -> None:
    projector = projector_process
    postgres = stack.components().get("postgres")
    if postgres is None:
        pytest.skip("PostgreSQL is external (DATABASE_URL): this test restarts the embedded one")
    orders = list(histories(800, run=world.prefix, seed=3))
    world.publish(orders)
    deadline = time.monotonic() + 60
    while world.count("audit_log") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(postgres["pid"], signal.SIGINT)  # a fast shutdown; the supervisor starts it again
    deadline = time.monotonic() + 120
    while True:
        now = stack.components()["postgres"]
        if now["pid"] != postgres["pid"] and now["healthy"]:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    world.wait_caught_up()
    assert projector.poll() is None, "the projector kept running through the restart"
    assert_models_match(world, orders)
    intact = world.cli("audit", "verify")
    assert intact.returncode == 0, intact.stdout + intact.stderr


@pytest.mark.process
def test_two_projector_processes_one_killed_mid_stream_keep_models_equal_to_a_rebuild(
    world: World, tmp_path: Path, projector_process: subprocess.Popen[bytes]
) -> None:
    port = free_port()
    second = start_service(
        ["-m", "opsflow.projector"],
        {**world.env, "OPSFLOW_METRICS_PORT": str(port)},
        tmp_path / "projector-2.log",
        f"http://127.0.0.1:{port}/readyz",
    )
    try:
        orders = list(histories(1000, run=world.prefix, seed=5))
        before, after = orders[:500], orders[500:]
        world.publish(before)
        deadline = time.monotonic() + 60
        while world.count("audit_log") < expected_counts(before)["audit_log"] // 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Both write (each batch fenced on the stored position); one dies mid-stream
        # (or, on a fast day, once the first half is in), and the rest is the survivor's.
        projector_process.send_signal(signal.SIGKILL)
        projector_process.wait(10)
        world.publish(after)
        world.wait_caught_up()
        assert second.poll() is None, "the survivor is still running"
    finally:
        stop_process(second)
    assert_models_match(world, orders)
    for name in ("orders_current", "audit_log"):
        done = world.cli("projections", "rebuild", name, "--verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verified: the rebuilt model equals the incrementally kept one" in done.stdout


def test_an_order_written_with_the_older_schema_version_projects_and_rebuilds(
    world: World, projector: Projector
) -> None:
    (history,) = histories(1, run=world.prefix, seed=1)
    received, rest = history[0], history[1:]
    event_type = catalogue()["order.received"]
    v1 = event_type.versions[1]
    v1_id = world.registry.lookup_schema(
        event_type.subject, schema=_schema(v1)
    ).schema_id  # registered by provisioning, as every published version
    datum = {k: v for k, v in received.to_avro().items() if k != "sales_channel"}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(v1), datum)
    producer = Producer({"bootstrap.servers": world.bootstrap})
    producer.produce(
        topic_name(ORDERS, prefix=world.prefix),
        key=received.order_id.encode(),
        value=b"\x00" + v1_id.to_bytes(4, "big") + body.getvalue(),
    )
    assert producer.flush(10) == 0
    world.publish([rest])
    world.wait_caught_up()
    with db.connect(world.database_url) as conn:
        row = conn.execute(
            "SELECT state, customer_id, sales_channel FROM orders_current WHERE order_id = %s",
            (received.order_id,),
        ).fetchone()
    assert row == (final_state(history), received.customer_id, None)
    done = world.cli("projections", "rebuild", "orders_current", "--verify")
    assert done.returncode == 0 and "verified" in done.stdout, done.stdout + done.stderr


def _schema(schema: dict[str, Any]) -> Any:
    from confluent_kafka.schema_registry import Schema

    return Schema(json.dumps(schema), "AVRO")


def test_a_tampered_or_removed_audit_row_is_named_by_audit_verify(
    world: World, projector: Projector
) -> None:
    orders = list(histories(20, run=world.prefix, seed=9))
    world.publish(orders)
    world.wait_caught_up()
    intact = world.cli("audit", "verify")
    assert intact.returncode == 0 and "intact" in intact.stdout, intact.stdout
    total = expected_counts(orders)["audit_log"]
    assert f"{total:,} rows chained" in intact.stdout

    with db.connect(world.database_url, autocommit=True) as conn:
        conn.execute("UPDATE audit_log SET producer = 'mallory' WHERE seq = 7")
    changed = world.cli("audit", "verify")
    assert changed.returncode == 1
    assert "broken at row 7" in changed.stdout and "was changed" in changed.stdout, changed.stdout

    with db.connect(world.database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 7")
    removed = world.cli("audit", "verify")
    assert removed.returncode == 1
    assert "row 7 is missing" in removed.stdout, removed.stdout


def dead_letters(world: World, topic: str, count: int) -> list[tuple[bytes, dict[str, bytes]]]:
    """The first ``count`` records (value, headers) dead-lettered from ``topic``."""
    consumer = Consumer({"bootstrap.servers": world.bootstrap, "group.id": uuid.uuid4().hex})
    consumer.assign([TopicPartition(dead_letter_topic(topic), p, 0) for p in range(3)])
    letters: list[tuple[bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + 30
    try:
        while len(letters) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                letters.append((msg.value(), dict(msg.headers() or [])))  # type: ignore[arg-type]
    finally:
        consumer.close()
    return letters


def test_an_undecodable_record_is_dead_lettered_and_the_projections_go_on(
    world: World, projector: Projector
) -> None:
    orders = list(histories(30, run=world.prefix, seed=2))
    producer = Producer({"bootstrap.servers": world.bootstrap})
    orders_topic = topic_name(ORDERS, prefix=world.prefix)
    producer.produce(orders_topic, key=b"poison", value=b"not avro at all")
    assert producer.flush(10) == 0
    world.publish(orders)
    world.wait_caught_up()
    assert_models_match(world, orders)

    # orders_current and audit_log both read the orders topic: one letter each.
    letters = dead_letters(world, orders_topic, 2)
    assert all(value == b"not avro at all" for value, _ in letters)
    assert sorted(h["opsflow-service"] for _, h in letters) == [
        b"projection:audit_log", b"projection:orders_current",
    ]  # fmt: skip
    assert all(h["opsflow-error-class"] == b"BadInputError" for _, h in letters)
    assert all(h["opsflow-source-topic"] == orders_topic.encode() for _, h in letters)


def test_a_record_too_large_for_an_index_is_dead_lettered_and_the_projections_go_on(
    world: World, projector: Projector
) -> None:
    """An order id of 12,000 random characters is valid Avro, but no btree index takes
    it: PostgreSQL's "index row size exceeds" (SQLSTATE 54000, filed by psycopg with
    the server's failures) is the record's fault. It is dead-lettered by each
    projection that cannot take it, and the others' records are applied."""
    orders = list(histories(20, run=world.prefix, seed=3))
    huge = sample("order.received").model_copy(update={"order_id": secrets.token_urlsafe(9000)})
    codec = WireCodec(world.registry)
    producer = Producer({"bootstrap.servers": world.bootstrap})
    publish_one(producer, codec, huge, world.prefix)
    world.publish(orders)
    world.wait_caught_up()
    assert_models_match(world, orders)

    letters = dead_letters(world, topic_name(ORDERS, prefix=world.prefix), 2)
    assert all(value == codec.encode(huge) for value, _ in letters)
    assert sorted(h["opsflow-service"] for _, h in letters) == [
        b"projection:audit_log", b"projection:orders_current",
    ]  # fmt: skip
    assert all(h["opsflow-error-class"] == b"ProgramLimitExceeded" for _, h in letters)

    # A rebuild folds the replay in memory and writes each row once: the table refuses
    # the folded rows whole, and the rebuild replays batch by batch instead, which
    # dead-letters the record again and keeps the others.
    rebuild(
        projections()["orders_current"],
        kafka={"bootstrap.servers": world.bootstrap},
        registry=world.registry,
        database_url=world.database_url,
    )
    assert_models_match(world, orders)
    again = dead_letters(world, topic_name(ORDERS, prefix=world.prefix), 3)
    assert sorted(h["opsflow-service"] for _, h in again).count(b"projection:orders_current") == 2
