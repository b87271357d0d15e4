"""`opsflow trace ORDER_ID`: one order's causal history, read from the topics.

The pure half (the tree, the "where is it waiting" verdict) is tested with
events built here; the command is tested as an operator runs it, against the
session stack, in topics of this module's own (a prefix), with histories from
``tests.support.histories`` plus records written here with a W3C trace context.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db, trace
from opsflow.application import Verdict
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.topics import dead_letter_topic, ensure_topics, topic_name
from services import progress
from services.contracts import (
    TOPICS,
    Actor,
    ActorRole,
    Address,
    CustomerRiskTier,
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    OrderItem,
    OrderReceived,
    PodCaptured,
    PolicyChecked,
    PolicyOutcome,
    Reason,
    ReviewClaimed,
    ReviewDecided,
    ReviewDecision,
    ReviewEscalated,
    ReviewReleased,
    ReviewRequested,
    ReviewTier,
)
from tests.support.histories import histories, publish
from tests.support.stack import (
    OPSFLOW,
    Stack,
    create_schema,
    drop_schema,
    free_port,
    start_service,
    stop_process,
)

REVIEWER = Actor(user_id="ada", display_name="Ada Reviewer", role=ActorRole.REVIEWER)
BOSS = Actor(user_id="grace", display_name="Grace Supervisor", role=ActorRole.SUPERVISOR)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


# --- building events --------------------------------------------------------------------


class Chain:
    """Events of one order, each caused by the one before, at given times."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.events: list[Event] = []

    def add(self, model: type[Event], at: datetime, **fields: Any) -> Event:
        last = self.events[-1] if self.events else None
        envelope = model.envelope_for(
            key=self.order_id,
            idempotency_key=f"{model.event_type}:{self.order_id}:{len(self.events)}",
            producer=model.emitted_by.example,
            caused_by=last.envelope if last else None,
            occurred_at=at,
        )
        event = model(envelope=envelope, order_id=self.order_id, **fields)
        self.events.append(event)
        return event


def received(chain: Chain, at: datetime) -> Event:
    address = Address(
        name="Receiving", street="Hafenstr. 1", city="Hamburg", postal_code="20457", country="DE"
    )
    return chain.add(
        OrderReceived,
        at,
        customer_id="cust-1",
        customer_name="Acme GmbH",
        customer_risk_tier=CustomerRiskTier.HIGH,
        amount_minor=250_000,
        currency="EUR",
        destination=address,
        items=[OrderItem(sku="SKU-1", description="Crate", quantity=1, unit_price_minor=250_000)],
        placed_at=at,
    )


def needs_review(chain: Chain, at: datetime) -> None:
    chain.add(
        PolicyChecked,
        at,
        outcome=PolicyOutcome.NEEDS_REVIEW,
        reason_codes=["AMOUNT_OVER_LIMIT"],
        reasons=[Reason(code="AMOUNT_OVER_LIMIT", message="over the limit")],
        rules_version="v1",
    )


def escalated_review(order_id: str, now: datetime) -> Chain:
    """An order in review: escalated to supervisors, due 37 minutes from ``now``,
    claimed by a supervisor."""
    chain = Chain(order_id)
    received(chain, now - timedelta(hours=3))
    needs_review(chain, now - timedelta(hours=3) + timedelta(seconds=1))
    missed = now - timedelta(minutes=23)
    chain.add(
        ReviewRequested,
        now - timedelta(hours=3) + timedelta(seconds=2),
        task_id=f"task-{order_id}",
        tier=ReviewTier.REVIEWER,
        due_at=missed,
        reason_codes=["AMOUNT_OVER_LIMIT"],
        reasons=[],
    )
    chain.add(
        ReviewClaimed,
        now - timedelta(hours=2),
        task_id=f"task-{order_id}",
        actor=REVIEWER,
        tier=ReviewTier.REVIEWER,
    )
    chain.add(
        ReviewEscalated,
        missed + timedelta(seconds=5),
        task_id=f"task-{order_id}",
        previous_tier=ReviewTier.REVIEWER,
        tier=ReviewTier.SUPERVISOR,
        breached_due_at=missed,
        due_at=now + timedelta(minutes=37, seconds=20),
    )
    chain.add(
        ReviewClaimed,
        now - timedelta(minutes=5),
        task_id=f"task-{order_id}",
        actor=BOSS,
        tier=ReviewTier.SUPERVISOR,
    )
    return chain


def records_of(events: list[Event]) -> list[trace.Record]:
    return [trace.Record(e.topic.value, 0, offset, e) for offset, e in enumerate(events)]


def verdict_of(chain: Chain, now: datetime) -> Verdict:
    return progress.verdict(chain.events, now)


NOW = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


# --- the verdict: where an order is waiting now -----------------------------------------


def test_an_escalated_claimed_review_waits_with_its_tier_sla_and_holder() -> None:
    found = verdict_of(escalated_review("o-1", NOW), NOW)
    assert found.state == "in_review" and not found.terminal
    assert "waiting for review, SLA due in 37 min" in found.now
    assert "tier supervisor" in found.now
    assert "claimed by Grace Supervisor (supervisor)" in found.now


def test_an_overdue_review_says_by_how_much_and_an_escalation_ends_the_reviewers_claim() -> None:
    chain = escalated_review("o-1", NOW)
    chain.events.pop()  # the supervisor's claim
    found = verdict_of(chain, NOW + timedelta(minutes=50))
    assert "SLA overdue by 13 min" in found.now
    assert "not claimed" in found.now  # Ada's claim ended with the escalation


def test_a_released_claim_leaves_the_task_unclaimed() -> None:
    chain = escalated_review("o-1", NOW)
    chain.add(
        ReviewReleased,
        NOW - timedelta(minutes=1),
        task_id="task-o-1",
        actor=BOSS,
        tier=ReviewTier.SUPERVISOR,
        reason="shift over",
    )
    assert "not claimed" in verdict_of(chain, NOW).now


def test_an_approval_without_a_dispatch_request_waits_for_dispatch() -> None:
    chain = escalated_review("o-1", NOW)
    chain.add(
        ReviewDecided,
        NOW,
        task_id="task-o-1",
        actor=BOSS,
        tier=ReviewTier.SUPERVISOR,
        decision=ReviewDecision.APPROVED,
        reason="ok",
    )
    found = verdict_of(chain, NOW + timedelta(minutes=2))
    assert found.state == "approved"
    assert found.now.startswith("waiting for dispatch (approved by Grace Supervisor")


def test_a_rejection_names_who_rejected_and_why_and_is_final() -> None:
    chain = escalated_review("o-1", NOW)
    chain.add(
        ReviewDecided,
        NOW,
        task_id="task-o-1",
        actor=BOSS,
        tier=ReviewTier.SUPERVISOR,
        decision=ReviewDecision.REJECTED,
        reason="could not verify the buyer",
    )
    found = verdict_of(chain, NOW)
    assert (found.state, found.terminal) == ("rejected", True)
    assert "Grace Supervisor (supervisor)" in found.now and "could not verify" in found.now


def test_a_policy_rejection_is_final_and_an_auto_approval_waits_for_dispatch() -> None:
    for outcome, state, terminal in (
        (PolicyOutcome.REJECTED, "rejected", True),
        (PolicyOutcome.AUTO_APPROVED, "approved", False),
    ):
        chain = Chain("o-2")
        received(chain, NOW)
        chain.add(
            PolicyChecked,
            NOW,
            outcome=outcome,
            reason_codes=["X"],
            reasons=[],
            rules_version="v1",
        )
        found = verdict_of(chain, NOW)
        assert (found.state, found.terminal) == (state, terminal)
    assert "waiting for dispatch" in found.now


def dispatched(chain: Chain, *outcomes: tuple[DispatchFailureClass, bool] | str) -> None:
    """Dispatch attempts: a (failure class, retries exhausted) pair fails one, "ok" books."""
    address = Address(name="R", street="S", city="C", postal_code="1", country="DE")
    for attempt, outcome in enumerate(outcomes, start=1):
        chain.add(
            DispatchRequested,
            NOW,
            dispatch_id="d",
            carrier="stand-in",
            attempt=attempt,
            destination=address,
        )
        if outcome == "ok":
            chain.add(
                DispatchExecuted,
                NOW,
                dispatch_id="d",
                carrier="stand-in",
                attempt=attempt,
                booking_reference="BK-1",
            )
        elif isinstance(outcome, tuple):
            chain.add(
                DispatchFailed,
                NOW,
                dispatch_id="d",
                carrier="stand-in",
                attempt=attempt,
                failure_class=outcome[0],
                reason="carrier said no",
                retries_exhausted=outcome[1],
            )


def test_dispatch_states_follow_the_latest_attempt() -> None:
    transient = (DispatchFailureClass.TRANSIENT, False)
    cases: list[tuple[tuple[Any, ...], str, bool, str]] = [
        (("pending",), "dispatching", False, "waiting for the carrier booking"),
        ((transient,), "dispatching", False, "retrying the carrier booking"),
        ((transient, "pending"), "dispatching", False, "waiting for the carrier booking"),
        ((transient, "ok"), "dispatched", False, "waiting for proof of delivery: booked BK-1"),
        (((DispatchFailureClass.PERMANENT, False),), "dispatch_failed", True, "refused"),
        (((DispatchFailureClass.TRANSIENT, True),), "dispatch_failed", True, "retries exhausted"),
    ]
    for outcomes, state, terminal, words in cases:
        chain = Chain("o-3")
        received(chain, NOW)
        dispatched(chain, *outcomes)
        found = verdict_of(chain, NOW)
        assert (found.state, found.terminal) == (state, terminal), outcomes
        assert words in found.now, (outcomes, found.now)


def test_a_captured_proof_of_delivery_is_final() -> None:
    chain = Chain("o-4")
    received(chain, NOW)
    dispatched(chain, "ok")
    chain.add(
        PodCaptured,
        NOW,
        carrier="stand-in",
        booking_reference="BK-1",
        delivered_at=NOW,
        received_by="front desk",
    )
    found = verdict_of(chain, NOW)
    assert (found.state, found.terminal) == ("delivered", True)
    assert "received by front desk" in found.now


# --- the tree ---------------------------------------------------------------------------


def test_the_same_event_written_twice_is_one_step_that_says_so() -> None:
    chain = escalated_review("o-5", NOW)
    records = records_of(chain.events)
    records.append(trace.Record("review", 0, 99, chain.events[4]))
    steps = trace.assemble("o-5", records, NOW).steps
    assert [s.event_id for s in steps] == [str(e.envelope.event_id) for e in chain.events]
    assert [s.copies for s in steps] == [1, 1, 1, 1, 2, 1]


def test_effects_hang_under_their_causes_with_the_time_since_the_cause() -> None:
    chain = escalated_review("o-6", NOW)
    roots = trace.build(records_of(chain.events))
    assert len(roots) == 1
    depths = [(depth, step.event.event_type) for depth, step in trace.walk(roots)]
    assert depths == list(enumerate(e.event_type for e in chain.events))
    step = next(s for _, s in trace.walk(roots) if s.event.event_type == "review.escalated")
    assert step.elapsed_since == "cause"
    assert step.elapsed_ms == round(
        (step.at - chain.events[3].envelope.occurred_at).total_seconds() * 1000
    )


def test_an_event_whose_cause_is_missing_hangs_under_the_root_with_a_note() -> None:
    chain = escalated_review("o-7", NOW)
    del chain.events[3]  # the reviewer's claim: the escalation's cause
    roots = trace.build(records_of(chain.events))
    assert [r.event.event_type for r in roots] == ["order.received", "review.escalated"]
    assert roots[1].note and "not among this instance's events" in roots[1].note
    assert roots[1].elapsed_since == "previous"


def test_causes_that_form_a_cycle_are_cut_rather_than_lost() -> None:
    chain = Chain("o-8")
    a, b = received(chain, NOW), received(chain, NOW + timedelta(seconds=1))
    a_env = a.envelope.model_copy(update={"causation_id": str(b.envelope.event_id)})
    looped = [a.model_copy(update={"envelope": a_env}), b]
    steps = [s for _, s in trace.walk(trace.build(records_of(looped)))]
    assert sorted(s.event_id for s in steps) == sorted(str(e.envelope.event_id) for e in looped)


def test_the_trace_id_comes_from_the_first_traceparent_header() -> None:
    headers = [
        ("opsflow-event-type", b"review.claimed"),
        ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()),
        ("traceparent", b"00-" + b"1" * 32 + b"-00f067aa0ba902b7-01"),
    ]
    assert trace.trace_id_of(headers) == TRACE_ID
    assert trace.trace_id_of([]) is None
    assert trace.trace_id_of([("traceparent", b"garbage")]) is None


def test_nearest_order_ids_catch_typos_and_fragments() -> None:
    keys = ["tr-0000123", "tr-0000124", "other-1"]
    assert trace.nearest("tr-0000123x", keys)[0] == "tr-0000123"
    assert trace.nearest("other", keys) == ["other-1"]


def test_elapsed_times_read_at_a_glance() -> None:
    assert [trace.elapsed(ms) for ms in (None, 640, 42_000, 185_000, 7_260_000, 200_000_000)] == [
        "",
        "+0.6 s",
        "+42 s",
        "+3 min 05 s",
        "+2 h 01 min",
        "+2 d 7 h",
    ]


def rebooked(order_id: str, first: datetime, later: datetime) -> tuple[Chain, list[datetime]]:
    """An order whose dispatch failed for good at ``first`` and was booked at ``later`` by a
    replay of its request: the booking's ``occurred_at`` is the request's record time (the
    runtime derives it from the input), its record was written at ``later``. Returns the
    chain and each event's record time."""
    chain = Chain(order_id)
    received(chain, first)
    chain.add(
        PolicyChecked,
        first,
        outcome=PolicyOutcome.AUTO_APPROVED,
        reason_codes=[],
        reasons=[],
        rules_version="v1",
    )
    address = Address(name="R", street="S", city="C", postal_code="1", country="DE")
    request = chain.add(
        DispatchRequested,
        first,
        dispatch_id="d",
        carrier="stand-in",
        attempt=1,
        destination=address,
    )
    chain.add(
        DispatchFailed,
        first,
        dispatch_id="d",
        carrier="stand-in",
        attempt=5,
        failure_class=DispatchFailureClass.TRANSIENT,
        reason="carrier answered 503",
        retries_exhausted=True,
    )
    booking = DispatchExecuted.envelope_for(
        key=order_id,
        idempotency_key=f"dispatch.executed:{order_id}",
        producer="dispatch",
        caused_by=request.envelope,
        occurred_at=first,
    )
    chain.events.append(
        DispatchExecuted(
            envelope=booking,
            order_id=order_id,
            dispatch_id="d",
            carrier="stand-in",
            attempt=1,
            booking_reference="BK-LATE",
        )
    )
    second = timedelta(seconds=1)
    return chain, [first, first + second, first + 2 * second, first + 30 * second, later]


def test_a_rebooking_after_a_replay_shows_at_its_own_record_time_not_the_original() -> None:
    first = NOW - timedelta(days=3)
    later = first + timedelta(days=2)
    chain, written = rebooked("o-9", first, later)
    records = [
        trace.Record(e.topic.value, 0, n, e, written_at=at)
        for n, (e, at) in enumerate(zip(chain.events, written, strict=True))
    ]
    result = trace.assemble("o-9", records, NOW)
    booking = next(s for s in result.steps if s.event.event_type == "dispatch.executed")
    assert booking.at == later  # not first, its occurred_at
    assert booking.elapsed_since == "cause"  # under its request, timed from the request's record
    assert booking.elapsed_ms == round((later - written[2]).total_seconds() * 1000)
    assert trace.elapsed(booking.elapsed_ms) == "+47 h 59 min"
    assert result.verdict.state == "dispatched"
    assert "booked BK-LATE with stand-in at 2026-11-02 12:00:00.000Z" in result.verdict.now
    as_json = trace.as_json(result)["events"]
    executed = next(e for e in as_json if e["event_type"] == "dispatch.executed")
    assert executed["written_at"] == "2026-11-02T12:00:00.000+00:00"
    assert executed["occurred_at"] == "2026-10-31T12:00:00.000+00:00"


# --- the command on the real stack ------------------------------------------------------


@dataclass
class World:
    prefix: str
    env: dict[str, str]
    escalated: list[Event]
    waiting: list[Event]
    others: list[str]

    def trace(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OPSFLOW, "trace", *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def trace_json(self, order_id: str) -> dict[str, Any]:
        result = self.trace(order_id, "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data


def _escalated_history(run: str) -> tuple[list[Event], list[list[Event]]]:
    """A history in which a reviewer claimed the task, it was escalated, a supervisor
    decided it and the order was delivered; and a few ordinary ones as neighbours."""
    orders = list(histories(3000, seed=11, run=run))
    for history in orders:
        kinds = [e.event_type for e in history]
        if (
            "review.released" in kinds
            and "review.escalated" in kinds
            and kinds[-1] == "pod.captured"
        ):
            return history, orders[:60]
    raise AssertionError("no history with a released claim, an escalation and a delivery")


@pytest.fixture(scope="module")
def world(stack: Stack, bootstrap_servers: str, registry_url: str) -> Iterator[World]:
    prefix = f"trace-{uuid.uuid4().hex[:8]}."
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    ensure_topics(admin, [topic_name(t, prefix=prefix) for t in TOPICS], partitions=3)
    codec = WireCodec(SchemaRegistryClient({"url": registry_url}))
    escalated, neighbours = _escalated_history("tr")
    publish(bootstrap_servers, codec, [e for h in neighbours for e in h] + escalated, prefix=prefix)
    # The escalation written again, as a redrive or a leaky abort would.
    publish(bootstrap_servers, codec, [_first(escalated, "review.escalated")], prefix=prefix)
    # An order still in review, written the way the runtime writes: with a trace context.
    waiting = escalated_review(f"wait-{uuid.uuid4().hex[:6]}", datetime.now(UTC)).events
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    for event in waiting:
        producer.produce(
            topic_name(event.topic, prefix=prefix),
            key=event.order_id.encode(),
            value=codec.encode(event),
            headers=[("traceparent", f"00-{TRACE_ID}-{uuid.uuid4().hex[:16]}-01".encode())],
        )
    assert producer.flush(30) == 0
    env = {
        **stack.env,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "SCHEMA_REGISTRY_URL": registry_url,
        "OPSFLOW_TOPIC_PREFIX": prefix,
    }
    env.pop("DATABASE_URL", None)  # the log is the truth: no database needed
    yield World(prefix, env, escalated, waiting, [h[0].order_id for h in neighbours])


def _first(history: list[Event], event_type: str) -> Event:
    return next(e for e in history if e.event_type == event_type)


def test_trace_of_an_order_through_review_and_escalation_shows_every_step_with_its_actor(
    world: World,
) -> None:
    history = world.escalated
    order_id = history[0].order_id
    result = world.trace(order_id)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Every step, once, in causal order (the history is one chain of causes).
    step_lines = [line for line in lines if re.search(r"\d{2}:\d{2}:\d{2}\.\d{3}Z  ", line)]
    assert len(step_lines) == len(history), result.stdout
    for line, event in zip(step_lines, history, strict=True):
        assert f"  {event.event_type}  " in line, (line, event.event_type)
        assert f"by {event.envelope.producer}" in line
        actor = getattr(event, "actor", None)
        if actor is not None:
            assert f"{actor.display_name} ({actor.role.value.lower()})" in line
    text = result.stdout
    assert "Grace Supervisor (supervisor)" in text
    released = _first(history, "review.released")
    assert released.actor.display_name in text  # type: ignore[attr-defined]
    assert "reviewer -> supervisor" in text  # the escalation's facts
    assert lines[-1].startswith("now: delivered at ")

    data = world.trace_json(order_id)
    events = data["events"]
    assert [e["event_id"] for e in events] == [str(e.envelope.event_id) for e in history]
    by_id = {e["event_id"]: e for e in events}
    for event in events[1:]:
        cause = by_id[event["causation_id"]]  # every edge is a causation id
        assert event["depth"] == cause["depth"] + 1
        assert event["elapsed_since"] == "cause" and event["elapsed_ms"] >= 0
    assert events[0]["causation_id"] is None and events[0]["depth"] == 0
    actors = {e["event_type"]: e["actor"] for e in events if e["actor"]}
    assert actors["review.decided"]["display_name"] == "Grace Supervisor"
    assert actors["review.released"]["role"] == "REVIEWER"
    assert [e["producer"] for e in events] == [e.envelope.producer for e in history]
    assert (data["state"], data["waiting"], data["path"]) == ("delivered", None, "full-scan")


def test_a_record_written_twice_shows_once(world: World) -> None:
    data = world.trace_json(world.escalated[0].order_id)
    ids = [e["event_id"] for e in data["events"]]
    assert len(ids) == len(set(ids)) == len(world.escalated)
    copies = {e["event_type"]: e["copies"] for e in data["events"]}
    assert copies["review.escalated"] == 2 and copies["review.requested"] == 1
    assert world.trace(world.escalated[0].order_id).stdout.count("written 2x") == 1


def test_an_order_waiting_in_review_shows_its_tier_sla_and_trace_id(world: World) -> None:
    order_id = world.waiting[0].order_id
    result = world.trace(order_id)
    assert result.returncode == 0, result.stderr
    now_line = result.stdout.splitlines()[-1]
    assert re.search(r"^now: waiting for review, SLA due in 3[67] min", now_line), now_line
    assert "tier supervisor, claimed by Grace Supervisor (supervisor)" in now_line
    assert TRACE_ID in now_line and f"trace {TRACE_ID[:8]}" in result.stdout
    data = world.trace_json(order_id)
    assert data["state"] == "in_review" and data["waiting"].startswith("waiting for review")
    assert data["trace_ids"] == [TRACE_ID]
    assert {e["trace_id"] for e in data["events"]} == {TRACE_ID}


def test_an_unknown_order_exits_1_and_suggests_the_nearest_order_id(world: World) -> None:
    order_id = world.escalated[0].order_id
    result = world.trace(order_id + "x")
    assert result.returncode == 1
    assert f"no events for order {order_id}x" in result.stderr
    assert f"Did you mean {order_id}" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.process
def test_an_unreachable_broker_names_the_address_and_the_variable(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = world.trace("anything", KAFKA_BOOTSTRAP_SERVERS=address)
    assert result.returncode != 0
    assert "KAFKA_BOOTSTRAP_SERVERS" in result.stderr and address in result.stderr
    # Besides which stack it used for the variables that were not set (one line).
    said = [line for line in result.stderr.strip().splitlines() if "Using the stack" not in line]
    assert "Traceback" not in result.stderr and len(said) <= 2
    assert time.monotonic() - started < 20


def test_a_wrong_topic_prefix_is_named(world: World) -> None:
    result = world.trace("anything", OPSFLOW_TOPIC_PREFIX="no-such-prefix.")
    assert result.returncode != 0
    assert "OPSFLOW_TOPIC_PREFIX" in result.stderr and "Traceback" not in result.stderr


def _write(
    bootstrap: str,
    codec: WireCodec,
    events: list[Event],
    prefix: str,
    *,
    written: list[datetime] | None = None,
) -> None:
    """Write ``events`` as the runtime does (keyed by order); ``written``: record times."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for n, event in enumerate(events):
        producer.produce(
            topic_name(event.topic, prefix=prefix),
            key=event.order_id.encode(),
            value=codec.encode(event),
            timestamp=int(written[n].timestamp() * 1000) if written else 0,  # 0: now
        )
    assert producer.flush(30) == 0


def test_a_rebooking_written_days_later_shows_at_the_time_it_was_written(
    world: World, bootstrap_servers: str, registry_url: str
) -> None:
    first = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    later = first + timedelta(days=2)
    chain, written = rebooked(f"rebook-{uuid.uuid4().hex[:6]}", first, later)
    codec = WireCodec(SchemaRegistryClient({"url": registry_url}))
    _write(bootstrap_servers, codec, chain.events, world.prefix, written=written)
    result = world.trace(chain.order_id)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "dispatch.executed" in line]
    assert later.strftime("%Y-%m-%d %H:%M:%S.000Z") in line, line
    assert "+47 h 59 min" in line  # since its request's record, not since its occurred_at
    assert f"booked BK-LATE with stand-in at {later:%Y-%m-%d %H:%M:%S}" in result.stdout
    data = world.trace_json(chain.order_id)
    times = {e["event_type"]: e["written_at"] for e in data["events"]}
    assert times["dispatch.executed"] == later.isoformat(timespec="milliseconds")
    assert times["dispatch.requested"] == written[2].isoformat(timespec="milliseconds")


# --- the audit log as an index ----------------------------------------------------------


@dataclass
class Indexed:
    """Topics of their own with one order among many, and the audit projection kept of them
    in a schema of its own (then stopped, so what is written after it is past the index)."""

    world: World
    database_url: str
    history: list[Event]
    neighbours: int
    records: int

    def trace(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.world.trace(*args, **{"DATABASE_URL": self.database_url, **env})

    def trace_json(self, order_id: str, **env: str) -> dict[str, Any]:
        result = self.trace(order_id, "--json", **env)
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data


@contextmanager
def indexed_world(
    stack: Stack, bootstrap_servers: str, registry_url: str, logs: Path, *, neighbours_of: int
) -> Iterator[Indexed]:
    prefix = f"trix-{uuid.uuid4().hex[:8]}."
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    names = [topic_name(t, prefix=prefix) for t in TOPICS]
    ensure_topics(admin, names + [dead_letter_topic(n) for n in names], partitions=1)
    codec = WireCodec(SchemaRegistryClient({"url": registry_url}))
    history, _ = _escalated_history("ix")
    neighbours = list(histories(neighbours_of, seed=12, run="nb"))
    # The order first, then its neighbours: its records sit at the start of each partition,
    # and a full scan reads thousands of records where the index reads a handful.
    records = publish(bootstrap_servers, codec, history, prefix=prefix)
    records += publish(bootstrap_servers, codec, [e for h in neighbours for e in h], prefix=prefix)
    # The decision written again before the projector reads it: a copy in audit_copies.
    records += publish(bootstrap_servers, codec, [_first(history, "review.decided")], prefix=prefix)
    base = stack.address("DATABASE_URL")
    schema, url = create_schema(base)
    db.migrate(url)
    env = {
        **stack.env,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "SCHEMA_REGISTRY_URL": registry_url,
        "DATABASE_URL": url,
        "OPSFLOW_TOPIC_PREFIX": prefix,
        "OPSFLOW_PROJECTIONS": "audit_log",
    }
    port = free_port()
    log = logs / "projector.log"
    projector = start_service(
        ["-m", "opsflow.projector"],
        {**env, "OPSFLOW_METRICS_PORT": str(port)},
        log,
        f"http://127.0.0.1:{port}/readyz",
    )
    try:
        deadline = time.monotonic() + 120
        with db.connect(url, autocommit=True) as conn:
            while True:
                applied = conn.execute(
                    "SELECT (SELECT count(*) FROM audit_log) + (SELECT count(*) FROM audit_copies)"
                ).fetchone()
                if applied is not None and applied[0] == records:
                    break
                assert time.monotonic() < deadline, (applied, records, log.read_text()[-2000:])
                time.sleep(0.3)
    finally:
        stop_process(projector)
    world = World(prefix, {k: v for k, v in env.items() if k != "DATABASE_URL"}, history, [], [])
    try:
        yield Indexed(world, url, history, len(neighbours), records)
    finally:
        drop_schema(base, schema)


@pytest.fixture(scope="module")
def indexed(
    stack: Stack,
    bootstrap_servers: str,
    registry_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Indexed]:
    """One order among 1,500, for the tests that only read."""
    logs = tmp_path_factory.mktemp("indexed")
    with indexed_world(stack, bootstrap_servers, registry_url, logs, neighbours_of=1500) as made:
        yield made


@pytest.fixture
def indexed_alone(
    stack: Stack, bootstrap_servers: str, registry_url: str, tmp_path: Path
) -> Iterator[Indexed]:
    """A world of its own with a few neighbours, for a test that writes past the index
    (the shared one's tests count what is on its topics)."""
    with indexed_world(stack, bootstrap_servers, registry_url, tmp_path, neighbours_of=20) as made:
        yield made


def test_with_the_audit_log_trace_reads_only_the_orders_records_and_shows_the_same_history(
    indexed: Indexed,
) -> None:
    order_id = indexed.history[0].order_id
    fast = indexed.trace_json(order_id)
    # The same order traced by reading every topic in full (the index unusable).
    full = indexed.trace_json(order_id, DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    assert (fast["path"], full["path"]) == ("audit-index", "full-scan")
    assert full["records_read"] == indexed.records
    # Its records and the copy, and the few records near them it reads through rather
    # than seek over (a small topic, e.g. pod-rejects, is read through whole).
    assert fast["records_read"] < full["records_read"] / 10, fast["records_read"]
    assert fast["index_behind"] == 0
    for data in (fast, full):
        data.pop("path"), data.pop("records_read"), data.pop("now"), data.pop("waiting")
    assert fast == full
    copies = {e["event_type"]: e["copies"] for e in fast["events"]}
    assert copies["review.decided"] == 2 and set(copies.values()) == {1, 2}
    assert [e["event_id"] for e in fast["events"]] == [
        str(e.envelope.event_id) for e in indexed.history
    ]


def test_records_past_the_projections_position_are_read_from_the_log_and_the_lag_said(
    indexed_alone: Indexed, bootstrap_servers: str, registry_url: str
) -> None:
    indexed = indexed_alone
    """Written after the projector stopped: a new order, and a copy of an indexed event."""
    codec = WireCodec(SchemaRegistryClient({"url": registry_url}))
    late = escalated_review(f"late-{uuid.uuid4().hex[:6]}", datetime.now(UTC)).events
    _write(bootstrap_servers, codec, late, indexed.world.prefix)
    again = _first(indexed.history, "review.escalated")
    _write(bootstrap_servers, codec, [again], indexed.world.prefix)

    data = indexed.trace_json(late[0].order_id)
    assert data["path"] == "audit-index"
    assert data["index_behind"] >= len(late) + 1
    assert [e["event_id"] for e in data["events"]] == [str(e.envelope.event_id) for e in late]
    result = indexed.trace(late[0].order_id)
    assert result.returncode == 0, result.stderr
    said = result.stdout.splitlines()[-2]
    assert said.startswith("index: the audit_log projection was ") and "records behind" in said
    assert result.stdout.splitlines()[-1].startswith("now: waiting for review")

    known = indexed.trace_json(indexed.history[0].order_id)
    copies = {e["event_type"]: e["copies"] for e in known["events"]}
    assert copies["review.escalated"] >= 2  # the copy past the index, found in the tail


def test_an_unknown_order_is_named_with_the_nearest_ids_from_the_index(indexed: Indexed) -> None:
    order_id = indexed.history[0].order_id
    result = indexed.trace(order_id + "x")
    assert result.returncode == 1
    assert f"Did you mean {order_id}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
