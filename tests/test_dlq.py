"""`opsflow dlq list | show | redrive` on the real stack, as the on-call operator runs it.

The poison storm runs the one-hop ``tests.services.relay`` service (its runtime worker,
in a thread of the test process, against the real broker) in topics of its own; its
``bug:`` notes make it dead-letter orders until a restart with ``RELAY_FIXED``
"deploys the fix". The commands run in the test process (``opsflow.testing.command``)
with the environment an operator's shell has; the unreachable broker is a real
``opsflow`` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db, operator_actions
from opsflow.deadletters import REDRIVEN_FROM, dead_letter_headers
from opsflow.errors import BadInputError
from opsflow.operator_actions import ACTIONS_TOPIC
from opsflow.testing import CommandResult, command
from opsflow.topics import ensure_topics, topic_name
from services.contracts import OrderReceived, PolicyChecked
from tests.support.runtime import (
    Topics,
    headers_of,
    make_topics,
    orders,
    publish,
    running,
    settled_records,
    wait_until_processed,
)
from tests.support.stack import Stack, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def topics(stack: Stack, bootstrap_servers: str, registry_url: str) -> Topics:
    return make_topics(bootstrap_servers, registry_url)


@pytest.fixture
def operator_env(
    stack: Stack, topics: Topics, registry_url: str, database_url: str
) -> dict[str, str]:
    """The shell of an operator pointed at the test's topics (with the operator-actions
    topic provisioning makes) and (migrated) database."""
    db.migrate(database_url)
    ensure_topics(
        AdminClient({"bootstrap.servers": topics.bootstrap}),
        [topic_name(ACTIONS_TOPIC, prefix=topics.prefix)],
        partitions=1,
    )
    return {
        **stack.env,
        "KAFKA_BOOTSTRAP_SERVERS": topics.bootstrap,
        "SCHEMA_REGISTRY_URL": registry_url,
        "DATABASE_URL": database_url,
        "OPSFLOW_TOPIC_PREFIX": topics.prefix,
    }


def opsflow(env: dict[str, str], *args: str, code: int = 0) -> CommandResult:
    result = command(*args, env=env)
    assert result.returncode == code, (
        f"opsflow {' '.join(args)} exited {result.returncode}, not {code}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def opsflow_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(opsflow(env, *args, "--json").stdout)


def records_of(bootstrap: str, topic: str, count: int) -> list[Any]:
    """The records of ``topic`` (all partitions) once there are ``count``, read
    ``read_committed``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    # Assigned, not subscribed: no group to join (seconds on every read).
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found: list[Any] = []
    deadline = time.monotonic() + 120
    try:
        while len(found) < count:
            assert time.monotonic() < deadline, f"only {len(found)} of {count} on {topic}"
            found += [m for m in consumer.consume(1000, 0.2) if m.error() is None]
        return found
    finally:
        consumer.close()


def test_a_poison_storm_is_listed_fixed_and_redriven_with_every_event_processed_once(
    topics: Topics, operator_env: dict[str, str]
) -> None:
    good = orders(500)
    # Five of the storm hit a second bug once the first is fixed: they come back.
    poison = orders(
        1000, notes={i: "bug:storm,deep" if i < 5 else "bug:storm" for i in range(1000)}
    )
    # A good order after every second poison one, so the storm hits every partition.
    mixed = [e for i, p in enumerate(poison) for e in ([p, good[i // 2]] if i % 2 else [p])]
    publish(topics, mixed)
    with running(topics):
        # Every order handled, every dead letter written.
        wait_until_processed(topics)

        listed = opsflow_json(operator_env, "dlq", "list")
        assert listed["pending"] == 1000 and listed["redriven"] == 0
        assert listed["groups"] == [
            {
                "topic": "orders",
                "error_class": "PermanentError",
                "consumer": "relay",
                "pending": 1000,
                "redriven": 0,
            }
        ]
        assert {d["key"] for d in listed["dead_letters"]} == {e.order_id for e in poison}
        assert all("relay bug storm" in d["error_message"] for d in listed["dead_letters"])
        by_class = opsflow_json(operator_env, "dlq", "list", "--error-class", "PermanentError")
        assert by_class["pending"] == 1000
        table = opsflow(operator_env, "dlq", "list").stdout
        assert "PermanentError" in table and "1000" in table and "... and 980 more" in table

    # The relay stopped cleanly (the block ended without error); the fix is deployed.
    with running(topics, RELAY_FIXED="storm"):
        redriven = opsflow_json(operator_env, "dlq", "redrive", "--all")
        assert len(redriven["redriven"]) == 1000 and not redriven["failed"]
        originals = {d["id"] for d in listed["dead_letters"]}
        assert {i for r in redriven["redriven"] for i in r["ids"]} == originals

        # Every order, the redriven copies too, handled and its outputs written.
        wait_until_processed(topics)
        fixed = [e for e in good + poison if e.notes != "bug:storm,deep"]
        outputs = [
            topics.codec.decode(msg.value())
            for msg in settled_records(topics.bootstrap, topics.checks)
        ]
        assert all(isinstance(out, PolicyChecked) for out in outputs)
        causes = Counter(out.envelope.causation_id for out in outputs)
        assert causes == Counter(str(e.envelope.event_id) for e in fixed), "each processed once"

        dead = [headers_of(m) for m in settled_records(topics.bootstrap, topics.dead_letters)]
        assert len(dead) == 1005, "the storm once, and the ones that fail again once more"
        again = [h for h in dead if REDRIVEN_FROM in h]
        assert len(again) == 5, "the ones that fail again are dead-lettered anew"
        assert all(b"relay bug deep" in h["opsflow-error-message"] for h in again)

        planned = opsflow_json(operator_env, "dlq", "redrive", "--all", "--dry-run")
        planned_ids = {i for r in planned["redriven"] for i in r["ids"]}
        assert len(planned_ids) == 5 and not planned_ids & originals, "only the new dead letters"
        told = opsflow(operator_env, "dlq", "redrive", "--all", "--dry-run").stdout
        assert "Would redrive 5 record(s)" in told
        one = sorted(originals)[0]
        repeat = opsflow_json(operator_env, "dlq", "redrive", one)
        assert repeat["redriven"] == [] and repeat["skipped"] == [one]
        assert "redriven already" in opsflow(operator_env, "dlq", "redrive", one).stdout

        after = opsflow_json(operator_env, "dlq", "list")
        assert after["pending"] == 5 and after["redriven"] == 1000
        assert all("relay bug deep" in d["error_message"] for d in after["dead_letters"])
        second = opsflow_json(operator_env, "dlq", "redrive", "--all")
        assert {i for r in second["redriven"] for i in r["ids"]} == planned_ids


def test_show_decodes_the_value_and_names_headers_and_error(
    topics: Topics, operator_env: dict[str, str]
) -> None:
    rejected = orders(1, notes={0: "reject"})
    publish(topics, rejected, raw=[b"not avro at all"])
    with running(topics):
        wait_until_processed(topics)
    listed = opsflow_json(operator_env, "dlq", "list")["dead_letters"]
    by_key = {d["key"]: d["id"] for d in listed}
    order = rejected[0]

    shown = opsflow_json(operator_env, "dlq", "show", by_key[order.order_id])
    assert shown["value"]["order_id"] == order.order_id and shown["value_error"] is None
    assert (
        shown["error_class"] == "BadInputError"
        and "asked to be rejected" in (shown["error_message"])
    )
    added = dict(shown["dead_letter_headers"])
    assert added["opsflow-service"] == "relay"
    assert added["opsflow-source-topic"] == topics.orders
    text = opsflow(operator_env, "dlq", "show", by_key[order.order_id]).stdout
    assert order.order_id in text and "BadInputError" in text and "opsflow-failed-at" in text

    raw = opsflow_json(operator_env, "dlq", "show", by_key["poison"])
    assert raw["value"] is None and "magic byte" in raw["value_error"]
    assert raw["value_bytes"]["hex"].startswith(b"not".hex(" "))
    assert "not avro at all" in opsflow(operator_env, "dlq", "show", by_key["poison"]).stdout


def test_an_unknown_id_fails_in_one_line_with_the_nearest_ids(
    stack: Stack,
    topics: Topics,
    operator_env: dict[str, str],
) -> None:
    write_dead_letters(topics, consumers=["relay"])
    known = opsflow_json(operator_env, "dlq", "list")["dead_letters"][0]["id"]
    typo = known.replace("orders.dlq", "order.dlq")
    result = opsflow(operator_env, "dlq", "show", typo, code=1)
    assert f"nearest: {known}" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    redrive = opsflow(operator_env, "dlq", "redrive", typo, code=1)
    assert known in redrive.stderr


def write_dead_letters(topics: Topics, *, consumers: list[str]) -> tuple[Any, OrderReceived]:
    """One order on the orders topic, dead-lettered once by each of ``consumers``, as
    services and projections write dead letters; returns the original record."""
    order = orders(1)[0]
    producer = Producer({"bootstrap.servers": topics.bootstrap})
    producer.produce(
        topics.orders,
        key=order.order_id.encode(),
        value=topics.codec.encode(order),
        headers=[("opsflow-event-type", b"order.received")],
        timestamp=1_700_000_000_000,
    )
    assert producer.flush(30) == 0
    original = records_of(topics.bootstrap, topics.orders, 1)[0]
    for consumer in consumers:
        extra = dead_letter_headers(
            BadInputError("cannot take it"),
            topic=topics.orders,
            partition=original.partition(),
            offset=original.offset(),
            consumer=consumer,
            attempts=1,
        )
        producer.produce(
            topics.dead_letters,
            key=original.key(),
            value=original.value(),
            headers=[*original.headers(), *extra],
        )
    assert producer.flush(30) == 0
    return original, order


def test_a_record_dead_lettered_by_several_consumers_is_redriven_once_as_it_was(
    stack: Stack, topics: Topics, operator_env: dict[str, str]
) -> None:
    # Two consumers failed on it, one of them twice (a retried batch).
    original, order = write_dead_letters(
        topics, consumers=["relay", "projection:orders_current", "relay"]
    )
    listed = opsflow_json(operator_env, "dlq", "list", "--key", order.order_id)
    assert listed["pending"] == 2, "one case per consumer"
    assert sorted(len(d["duplicates"]) for d in listed["dead_letters"]) == [0, 1]
    only_relay = opsflow_json(operator_env, "dlq", "list", "--service", "relay")
    assert only_relay["pending"] == 1

    redriven = opsflow_json(operator_env, "dlq", "redrive", "--all")
    assert len(redriven["redriven"]) == 1 and len(redriven["redriven"][0]["ids"]) == 3
    copy = records_of(topics.bootstrap, topics.orders, 2)[-1]
    assert (copy.key(), copy.value(), copy.partition()) == (
        original.key(),
        original.value(),
        original.partition(),
    )
    assert copy.timestamp()[1] == original.timestamp()[1], "the original time, for lineage"
    headers = dict(copy.headers())
    assert headers["opsflow-event-type"] == b"order.received"
    assert headers[REDRIVEN_FROM].decode().startswith(f"{topics.dead_letters}/")
    assert not any(name.startswith("opsflow-error") for name in headers)

    assert opsflow_json(operator_env, "dlq", "redrive", "--all")["redriven"] == []
    after = opsflow_json(operator_env, "dlq", "list")
    assert (after["pending"], after["redriven"]) == (0, 2)


def test_a_cli_redrive_is_recorded_as_an_operator_action_event_naming_the_actor(
    stack: Stack, topics: Topics, operator_env: dict[str, str], registry_url: str
) -> None:
    """The intent is on the log before the copy is written, the outcome after; the table
    of actions is their read model, and rebuilds from them alone."""
    _, order = write_dead_letters(topics, consumers=["relay"])
    [dead_letter] = opsflow_json(operator_env, "dlq", "list")["dead_letters"]
    env = {**operator_env, "OPSFLOW_ACTOR": "Dana On-Call"}
    opsflow(env, "dlq", "redrive", "--dry-run", dead_letter["id"])  # writes nothing: no action
    assert actions_of(topics, registry_url) == []
    opsflow(env, "dlq", "redrive", dead_letter["id"])

    started, ended = actions_of(topics, registry_url)
    assert (started.phase, ended.phase) == ("STARTED", "ENDED")
    assert started.action_id == ended.action_id
    assert (started.action, started.target) == ("dlq.redrive", dead_letter["id"])
    assert started.actor == ended.actor
    assert (started.actor.name, started.actor.via, started.actor.user_id) == (
        "Dana On-Call",
        "cli",
        None,
    )
    assert started.at <= ended.at and ended.outcome is not None
    assert ended.outcome.startswith("redriven: written back once as")
    assert ended.detail and ended.detail["redriven"][0]["key"] == order.order_id

    url = operator_env["DATABASE_URL"]
    with db.connect(url) as conn:
        row = conn.execute(
            "SELECT actor, via, user_id, role, action, target, outcome FROM operator_actions"
        ).fetchall()
        assert row == [
            ("Dana On-Call", "cli", None, None, "dlq.redrive", dead_letter["id"], ended.outcome)
        ]
        # The table is a read model of the events: emptied, it comes back from the log.
        conn.execute("DELETE FROM operator_actions")
        conn.commit()
        kafka = {"bootstrap.servers": topics.bootstrap}
        registry = SchemaRegistryClient({"url": registry_url})
        assert operator_actions.restore(conn, kafka, registry, prefix=topics.prefix) == 2
        assert (
            conn.execute(
                "SELECT actor, via, user_id, role, action, target, outcome FROM operator_actions"
            ).fetchall()
            == row
        )

    # A blank actor is refused before anything is written.
    refused = opsflow({**env, "OPSFLOW_ACTOR": "  "}, "dlq", "redrive", "--all", code=2)
    assert "OPSFLOW_ACTOR" in refused.stderr and "not a name" in refused.stderr
    assert len(actions_of(topics, registry_url)) == 2


def actions_of(topics: Topics, registry_url: str) -> list[operator_actions.ActionEvent]:
    """The operator action events of the test's topics, oldest first."""
    return operator_actions.events(
        {"bootstrap.servers": topics.bootstrap},
        SchemaRegistryClient({"url": registry_url}),
        prefix=topics.prefix,
    )


@pytest.mark.process
def test_an_unreachable_broker_is_one_line_naming_the_address_and_variable() -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": address,
        "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    }
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "opsflow", "dlq", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result
    assert time.monotonic() - began < 20
    assert address in result.stderr and "KAFKA_BOOTSTRAP_SERVERS" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
