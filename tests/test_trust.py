"""Attacks on who may cause an effect, each test named after the one it stops.

Each event type declares who may emit it (``Event.emitted_by``). The HTTP
surfaces refuse keys beyond their declaration (``test_ingest``,
``test_pod_capture``); here: a record forged straight onto a topic, where only
the envelope's word says who wrote it, the producer SDK, and the broker ACLs
that take the envelope's word out of it on a real cluster.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from confluent_kafka import Producer as KafkaProducer

from opsflow import testing
from opsflow.contracts import ForbiddenProducerError
from opsflow.producer import Producer, body_model
from opsflow.topics import dead_letter_topic
from services.application import application
from services.contracts import EVENTS, Address, DispatchExecuted, PolicyChecked, PolicyOutcome
from tests.support.dispatching import LogReader, World, make_orders, settled
from tests.support.dispatching import world as world


def forged_approval(order_id: str, destination: Address, producer: str) -> PolicyChecked:
    return PolicyChecked(
        envelope=PolicyChecked.envelope_for(
            key=order_id, idempotency_key=f"forged:{order_id}", producer=producer
        ),
        order_id=order_id,
        outcome=PolicyOutcome.AUTO_APPROVED,
        reason_codes=[],
        reasons=[],
        rules_version="v1",
        destination=destination,
    )


def test_an_approval_forged_onto_the_topic_by_a_shop_is_dead_lettered_and_books_nothing(
    world: World,
) -> None:
    """Written with a plain Kafka client (no SDK to stop it), an auto-approval whose
    envelope names the shop, not policy-check: dispatch refuses to act on it, says why
    in the dead letter, and books the genuine approvals around it."""
    forged, *genuine = make_orders(3)
    kafka = KafkaProducer({"bootstrap.servers": world.stack.address("KAFKA_BOOTSTRAP_SERVERS")})
    topic = f"{world.prefix}policy-check"
    record = forged_approval(forged.order_id, forged.destination, producer="shop")
    kafka.produce(topic, world.codec.encode(record), forged.order_id.encode())
    assert kafka.flush(10) == 0
    world.approve(genuine)
    world.run_dispatch()

    events = world.dispatch_events(settled({o.order_id for o in genuine}))
    assert {e.order_id for e in events if isinstance(e, DispatchExecuted)} == {
        o.order_id for o in genuine
    }
    assert forged.order_id not in {e.order_id for e in events}
    assert world.bookings()["count"] == len(genuine)
    dlq = dead_letter_topic(topic)
    reader = LogReader(world.stack.address("KAFKA_BOOTSTRAP_SERVERS"), [dlq])
    try:
        assert reader.read_to(reader.ends(), timeout=30)
        [(_, value)] = reader.records[dlq]
    finally:
        reader.close()
    assert world.codec.decode(value).order_id == forged.order_id


def test_the_sdk_refuses_to_send_an_event_its_producer_may_not_emit(
    bootstrap_servers: str, registry_url: str
) -> None:
    producer = Producer("shop", bootstrap_servers=bootstrap_servers, registry_url=registry_url)
    try:
        body = body_model(DispatchExecuted).model_validate(
            {
                "order_id": "ord-forged",
                "dispatch_id": "dsp-forged",
                "carrier": "simcarrier",
                "attempt": 1,
                "booking_reference": "BK-FORGED",
            }
        )
        refused = "dispatch.executed written by producer 'shop', which may not emit it"
        with pytest.raises(ForbiddenProducerError, match=refused):
            producer.send(body)
    finally:
        producer.close()


def test_at_the_broker_only_the_declared_writer_of_each_event_type_may_write_its_topic() -> None:
    """`opsflow acls`: the writers of each topic are the services its event types name
    and the gateways that take them from outside; the operator's commands alone write
    every topic. A shop's gateway cannot write decisions, dispatch cannot write reviews."""
    result = testing.command("acls", "--json")
    assert result.returncode == 0, result.stderr
    writers: dict[str, set[str]] = defaultdict(set)
    for rule in json.loads(result.stdout):
        if rule["resource"] == "topic" and "Write" in rule["operations"]:
            writers[rule["name"]].add(rule["principal"].removeprefix("User:"))
    declared: dict[str, set[str]] = defaultdict(set)
    for model in EVENTS:
        gateways = {p.name for p in application.programs if model.event_type in p.gateway_for}
        declared[model.topic.value] |= model.emitted_by.services | gateways
    assert {topic: writers[topic] for topic in declared} == declared
    assert writers["*"] == {"operator"}
    assert writers["review"] == {"review"}
    assert writers["dispatch"] == {"dispatch"}
    assert writers["orders"] == {"ingest"}
    assert writers["pod"] == {"ingest", "pod-webhook"}
