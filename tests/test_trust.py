"""Attacks on who may cause an effect, each test named after the one it stops.

Each event type declares who may emit it (``Event.emitted_by``). The HTTP
surfaces refuse keys beyond their declaration (``test_ingest``,
``test_pod_capture``); here: a record forged straight onto a topic, where only
the envelope's word says who wrote it, the producer SDK, and the broker ACLs
that take the envelope's word out of it on a real cluster.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter, defaultdict
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Producer as KafkaProducer

from opsflow import testing
from opsflow.contracts import ForbiddenProducerError
from opsflow.errors import transient
from opsflow.producer import Producer, body_model
from services.application import application
from services.contracts import (
    EVENTS,
    Actor,
    ActorRole,
    Address,
    DispatchExecuted,
    PolicyChecked,
    PolicyOutcome,
    ReviewDecided,
    ReviewDecision,
    ReviewTier,
)
from tests.support.dispatching import World, make_orders, settled
from tests.support.dispatching import world as world


def policy_check(
    order_id: str,
    destination: Address,
    producer: str,
    outcome: PolicyOutcome = PolicyOutcome.AUTO_APPROVED,
) -> PolicyChecked:
    return PolicyChecked(
        envelope=PolicyChecked.envelope_for(
            key=order_id, idempotency_key=f"{producer}:{order_id}", producer=producer
        ),
        order_id=order_id,
        outcome=outcome,
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
    record = policy_check(forged.order_id, forged.destination, producer="shop")
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
    [dead] = world.dead_letters("policy-check")
    assert dead.order_id == forged.order_id  # type: ignore[attr-defined]


def decision(order_id: str, verdict: ReviewDecision, n: int) -> ReviewDecided:
    return ReviewDecided(
        envelope=ReviewDecided.envelope_for(
            key=order_id, idempotency_key=f"decided:{order_id}:{n}", producer="review"
        ),
        order_id=order_id,
        task_id=f"task-{order_id}",
        actor=Actor(user_id="ada", display_name="Ada Reviewer", role=ActorRole.REVIEWER),
        tier=ReviewTier.REVIEWER,
        decision=verdict,
        reason=f"decision {n}",
    )


def test_a_later_decision_contradicting_the_first_changes_nothing_and_is_dead_lettered(
    world: World,
) -> None:
    """Whatever arrives on the topic, the effect follows each order's first decision:
    an approval after a reviewer's refusal books nothing, a refusal after the booking
    unbooks nothing, and both go to the dead-letter topic saying so."""
    refused, booked, approved_twice = make_orders(3)
    world.producer.send_many(
        [
            policy_check(
                refused.order_id, refused.destination, "policy-check", PolicyOutcome.NEEDS_REVIEW
            ),
            decision(refused.order_id, ReviewDecision.REJECTED, 1),
            decision(refused.order_id, ReviewDecision.APPROVED, 2),
        ]
    )
    world.approve([booked, approved_twice])
    world.run_dispatch()
    events = world.dispatch_events(settled({booked.order_id, approved_twice.order_id}))
    world.producer.send_many(
        [
            decision(booked.order_id, ReviewDecision.REJECTED, 3),
            decision(approved_twice.order_id, ReviewDecision.APPROVED, 4),
        ]
    )
    events = world.dispatch_events(settled({booked.order_id, approved_twice.order_id}))

    assert refused.order_id not in {e.order_id for e in events}
    assert Counter(e.event_type for e in events) == {
        "dispatch.requested": 2,
        "dispatch.executed": 2,
    }
    assert world.bookings()["count"] == 2
    dead = world.dead_letters("review")
    # The repeated approval of an order already booked is a duplicate, not a
    # contradiction: ignored, not dead-lettered.
    assert sorted((e.order_id, e.reason) for e in dead) == sorted(
        [(refused.order_id, "decision 2"), (booked.order_id, "decision 3")]
    )


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


def test_a_value_too_large_for_an_index_is_the_records_fault_not_a_reason_to_retry(
    database_url: str,
) -> None:
    """psycopg files PostgreSQL's "index row size exceeds" with the server's failures
    (OperationalError); retried like them, it would stall its partition for ever."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE keyed (k text PRIMARY KEY)")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as raised:
            conn.execute("INSERT INTO keyed VALUES (%s)", (secrets.token_urlsafe(9000),))
    assert isinstance(raised.value, psycopg.OperationalError)
    assert not transient(raised.value)


def test_every_attack_in_the_threat_model_names_a_test_that_exists() -> None:
    """docs/security.md lists each attack with the test that stops it: a renamed or
    removed test must not leave the page claiming a protection nobody checks."""
    root = Path(__file__).resolve().parents[1]
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (root / "docs/security.md").read_text())
    assert len(named) >= 15
    for path, test in named:
        assert re.search(rf"^def {test}\(", (root / path).read_text(), re.M), (path, test)
