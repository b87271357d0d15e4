"""``opsflow demo``: seeded orders for every path of the workflow, sent through the real
ingest API and followed through the real topics.

The generator tests need no stack: they check the orders against the policy
rules and the carrier stand-in's refusal logic themselves. The run tests start
``python -m services.ingest`` and ``opsflow run services.policy_check`` as
processes on topics of their own (``OPSFLOW_TOPIC_PREFIX``) and a database
schema of their own, run ``opsflow demo`` as a user would, and compare its
JSON summary with what policy-check actually wrote. The ``--auto-review`` run
adds ``python -m services.review`` and compares the summary with the review
topic. Dispatch is not part of these runs, so approved orders stay "approved"
(awaiting dispatch).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import users
from opsflow.contracts import Envelope, Event
from opsflow.contracts.wire import WireCodec
from opsflow.db import migrate
from opsflow.topics import ensure_topics
from services.carrier_sim.faults import FaultInjector, FaultPlan
from services.contracts import (
    TOPICS,
    DispatchFailureClass,
    OrderReceived,
    PolicyChecked,
    PolicyOutcome,
    ReviewDecided,
    ReviewDecision,
    ReviewRequested,
)
from services.demo.orders import (
    REFUSED_COUNTRIES,
    SCENARIOS,
    Category,
    DemoOrder,
    demo_orders,
)
from services.demo.report import headline
from services.demo.reviewer import Verdict, reason_for, review_plan
from services.demo.run import Summary
from services.demo.states import OrderState, Until
from services.demo.tracker import OrderTrack, percentile, step_timings
from services.policy_check.rules import RULES_DIR, load_rules
from tests.support.samples import ORDER, envelope, sample
from tests.support.stack import (
    OPSFLOW,
    QUICK_JOIN_ENV,
    Stack,
    create_schema,
    drop_schema,
    free_port,
    stack_env,
    start_service,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)
PARTITIONS = 3


def as_event(order: DemoOrder) -> OrderReceived:
    """The event the ingest service makes of a demo order (the envelope does not matter
    to the rules)."""
    envelope = Envelope.new(
        correlation_id=order.order_id,
        idempotency_key=order.order_id,
        producer="demo",
        contract_version=OrderReceived.contract_version,
    )
    return OrderReceived(envelope=envelope, **dict(order.body))


def test_the_same_seed_and_run_give_the_same_orders_and_another_run_only_other_ids() -> None:
    first = demo_orders(200, seed=7, run_id="r1", now=NOW)
    again = demo_orders(200, seed=7, run_id="r1", now=NOW)
    other_run = demo_orders(200, seed=7, run_id="r2", now=NOW)
    other_seed = demo_orders(200, seed=8, run_id="r1", now=NOW)

    assert [o.as_json() for o in first] == [o.as_json() for o in again]
    assert len({o.order_id for o in first}) == 200
    assert not {o.order_id for o in first} & {o.order_id for o in other_run}
    strip = [{**o.as_json(), "order_id": ""} for o in first]
    assert strip == [{**o.as_json(), "order_id": ""} for o in other_run]
    assert [o.as_json() for o in first] != [o.as_json() for o in other_seed]


def test_fifty_orders_exercise_every_scenario_and_policy_judges_each_as_intended() -> None:
    rules = load_rules(RULES_DIR / "v1.yaml")
    orders = demo_orders(50, seed=1, run_id="mix", now=NOW)

    assert {o.scenario for o in orders} == set(SCENARIOS)
    assert Counter(o.scenario.category for o in orders) == {
        Category.AUTO_APPROVE: 30,
        Category.REVIEW: 10,
        Category.REJECT: 7,
        Category.CARRIER_REFUSAL: 3,
    }
    for order in orders:
        verdict = rules.evaluate(as_event(order))
        assert verdict.outcome is order.scenario.category.policy_outcome, order.scenario
        # Each scenario is decided by the one rule it is made for, and only by it.
        rule = order.scenario.rule
        assert verdict.reason_codes == ([rule] if rule else []), order.scenario
    assert {o.body.currency for o in orders} >= {"EUR", "GBP", "NOK"}
    assert {o.body.customer_risk_tier for o in orders} == {"LOW", "MEDIUM", "HIGH"}


def test_only_the_carrier_refusal_orders_go_where_the_carrier_refuses_to_deliver() -> None:
    carrier = FaultInjector(FaultPlan(refused_countries=list(REFUSED_COUNTRIES)))
    orders = demo_orders(400, seed=3, run_id="carrier", now=NOW)

    refused = {
        order.order_id
        for order in orders
        if carrier.refusal(country=order.body.destination.country, city="") is not None
    }
    assert refused == {
        order.order_id for order in orders if order.scenario.category is Category.CARRIER_REFUSAL
    }
    assert len(refused) == 20


def test_the_auto_reviewer_plans_the_same_verdicts_for_a_seed_leaving_a_tenth_open() -> None:
    orders = demo_orders(500, seed=4, run_id="r1", now=NOW)
    plan = review_plan(orders, seed=4)

    review = {o.order_id for o in orders if o.scenario.category is Category.REVIEW}
    assert set(plan) == review
    assert Counter(plan.values()) == {Verdict.APPROVE: 63, Verdict.REJECT: 27, Verdict.LEAVE: 10}
    # The plan follows the orders' numbers, not the run id; another seed plans otherwise.
    other_run = review_plan(demo_orders(500, seed=4, run_id="r2", now=NOW), seed=4)
    assert [v for _, v in sorted(other_run.items())] == [v for _, v in sorted(plan.items())]
    assert review_plan(orders, seed=5) != plan
    small = Counter(review_plan(demo_orders(20, seed=4, run_id="r1", now=NOW), seed=4).values())
    assert small == {Verdict.APPROVE: 2, Verdict.REJECT: 1, Verdict.LEAVE: 1}
    assert reason_for(Verdict.REJECT, ["ADDRESS_INCOMPLETE"]).startswith("Address cannot")


# --- following an order -------------------------------------------------------------


def fact(event_type: str, n: int, **changes: Any) -> Event:
    """The sample event of a type as the ``n``-th event of the order (its own event id)."""
    event = sample(event_type)
    return event.model_copy(update={"envelope": envelope(type(event), n), **changes})


def test_an_order_is_at_its_furthest_step_whatever_order_the_topics_are_read_in() -> None:
    track = OrderTrack(ORDER)
    # Topics are read side by side: the proof of delivery may come in first.
    approved = fact("policy.checked", 2, outcome=PolicyOutcome.AUTO_APPROVED)
    read = [
        (fact("pod.captured", 5), 4_000),
        (fact("dispatch.requested", 3), 1_300),
        (fact("order.received", 1), 1_000),
        (fact("dispatch.executed", 4), 2_000),
        (approved, 1_100),
    ]
    for event, written_ms in read:
        assert track.apply(event, written_ms)

    assert track.state is OrderState.DELIVERED
    timings = {t.step: (t.orders, t.p50_ms, t.p99_ms) for t in step_timings([track])}
    assert timings == {
        "received -> policy.checked": (1, 100, 100),
        "policy.checked -> dispatch.requested": (1, 200, 200),
        "dispatch.requested -> dispatch.executed": (1, 700, 700),
        "dispatch.executed -> pod.captured": (1, 2_000, 2_000),
        "end to end (received -> pod.captured)": (1, 3_000, 3_000),
        "received -> dispatch.executed, no review": (1, 1_000, 1_000),
    }
    reviewed = OrderTrack(ORDER)
    for event, written_ms in [*read, (fact("review.requested", 6), 1_150)]:
        reviewed.apply(event, written_ms)
    machine_only = {t.step: t.orders for t in step_timings([reviewed])}
    assert machine_only["received -> dispatch.executed, no review"] == 0


def test_reviews_retries_and_final_failures_move_an_order_as_the_workflow_does() -> None:
    track = OrderTrack(ORDER)
    transient = {"failure_class": DispatchFailureClass.TRANSIENT, "retries_exhausted": False}
    steps: list[tuple[Event, OrderState]] = [
        (fact("order.received", 1), OrderState.RECEIVED),
        (fact("policy.checked", 2), OrderState.NEEDS_REVIEW),
        (fact("review.requested", 3), OrderState.IN_REVIEW),
        (fact("review.claimed", 4), OrderState.IN_REVIEW),
        (fact("review.decided", 5), OrderState.APPROVED),
        (first_request := fact("dispatch.requested", 6), OrderState.DISPATCH_REQUESTED),
        (fact("dispatch.failed", 7, **transient), OrderState.DISPATCH_RETRYING),
        (fact("dispatch.requested", 8, attempt=2), OrderState.DISPATCH_REQUESTED),
        (fact("dispatch.failed", 9, retries_exhausted=True), OrderState.DISPATCH_FAILED),
    ]
    for event, state in steps:
        track.apply(event, 0)
        assert track.state is state, event.event_type
    # A repeat of an event already taken in (same event id) changes nothing.
    assert not track.apply(first_request, 0)
    assert track.state is OrderState.DISPATCH_FAILED

    refused = OrderTrack(ORDER)
    refused.apply(fact("policy.checked", 1), 0)
    refused.apply(fact("review.decided", 2, decision=ReviewDecision.REJECTED), 0)
    assert refused.state is OrderState.REVIEW_REJECTED
    permanent = OrderTrack(ORDER)
    permanent.apply(fact("dispatch.failed", 1, failure_class=DispatchFailureClass.PERMANENT), 0)
    assert permanent.state is OrderState.DISPATCH_FAILED
    bad_proof = OrderTrack(ORDER)
    bad_proof.apply(fact("dispatch.executed", 1), 0)
    bad_proof.apply(fact("pod.rejected", 2), 0)
    assert bad_proof.state is OrderState.POD_REJECTED


def test_until_says_which_states_are_far_enough() -> None:
    decided = {OrderState.APPROVED, OrderState.NEEDS_REVIEW, OrderState.REJECTED}
    assert decided <= {s for s in OrderState if Until.APPROVED.reached(s)}
    assert not Until.APPROVED.reached(OrderState.RECEIVED)
    assert Until.DISPATCHED.reached(OrderState.DISPATCHED)
    assert not Until.DELIVERED.reached(OrderState.DISPATCHED)
    assert not Until.DELIVERED.reached(OrderState.APPROVED)
    assert {s for s in OrderState if Until.DELIVERED.reached(s)} == {
        OrderState.NEEDS_REVIEW,
        OrderState.IN_REVIEW,
        OrderState.REJECTED,
        OrderState.REVIEW_REJECTED,
        OrderState.DISPATCH_FAILED,
        OrderState.DELIVERED,
        OrderState.POD_REJECTED,
    }
    assert (percentile(list(range(1, 21)), 50), percentile(list(range(1, 21)), 95)) == (10, 19)


# --- runs on the real stack ----------------------------------------------------------


@dataclass
class Pipeline:
    """An ingest service and policy-check on topics and a database schema of their own."""

    env: dict[str, str]
    prefix: str
    bootstrap: str
    registry_url: str

    def demo(self, *args: str, timeout: float = 90, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OPSFLOW, "demo", *args],
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def pipeline(
    stack: Stack,
    bootstrap_servers: str,
    registry_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    base = stack.address("DATABASE_URL")
    schema, database_url = create_schema(base)
    migrate(database_url)
    prefix = f"demo{uuid.uuid4().hex[:8]}."
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap_servers}),
        [f"{prefix}{topic}" for topic in TOPICS] + [f"{prefix}orders.dlq"],
        partitions=PARTITIONS,
    )
    port = free_port()
    env = {
        **stack.env,
        **stack.addresses(),
        **QUICK_JOIN_ENV,
        "DATABASE_URL": database_url,
        "OPSFLOW_TOPIC_PREFIX": prefix,
        "INGEST_URL": f"http://127.0.0.1:{port}",
    }
    logs = tmp_path_factory.mktemp("demo")
    ingest = start_service(
        ["-m", "services.ingest"],
        {**env, "INGEST_HOST": "127.0.0.1", "INGEST_PORT": str(port)},
        logs / "ingest.log",
        f"{env['INGEST_URL']}/readyz",
    )
    metrics_port = free_port()
    try:
        # Ready once it has joined its group: a demo with a short timeout would
        # otherwise spend it on policy-check's start when it runs first.
        policy = start_service(
            ["-m", "opsflow", "run", "services.policy_check"],
            {**env, "POLICY_RULES_VERSION": "v1", "OPSFLOW_METRICS_PORT": str(metrics_port)},
            logs / "policy-check.log",
            f"http://127.0.0.1:{metrics_port}/readyz",
        )
        try:
            yield Pipeline(env, prefix, bootstrap_servers, registry_url)
        finally:
            stop_process(policy)
    finally:
        stop_process(ingest)
        drop_schema(base, schema)


def read_topic(pipeline: Pipeline, topic: str, order_id_prefix: str) -> list[Event]:
    """The events of a run's orders on one of the pipeline's topics, read
    ``read_committed`` from its start to its end."""
    consumer = Consumer(
        {
            "bootstrap.servers": pipeline.bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 50,
        }
    )
    name = f"{pipeline.prefix}{topic}"
    consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    codec = WireCodec(SchemaRegistryClient({"url": pipeline.registry_url}))
    found: list[Event] = []
    at_end: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while len(at_end) < PARTITIONS:
            assert time.monotonic() < deadline, f"did not reach the end of {name}"
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    at_end.add(message.partition() or 0)
                    continue
                event = codec.decode(message.value())
                if event.order_id.startswith(order_id_prefix):
                    found.append(event)
    finally:
        consumer.close()
    return found


def policy_checks(pipeline: Pipeline, order_id_prefix: str) -> dict[str, PolicyOutcome]:
    """What policy-check wrote for a run's orders: order id -> outcome."""
    outcomes: dict[str, PolicyOutcome] = {}
    for event in read_topic(pipeline, "policy-check", order_id_prefix):
        assert isinstance(event, PolicyChecked)
        assert event.order_id not in outcomes, f"{event.order_id} checked twice"
        outcomes[event.order_id] = event.outcome
    return outcomes


def test_a_demo_run_until_approved_reports_what_policy_check_decided_for_all_50(
    pipeline: Pipeline,
) -> None:
    result = pipeline.demo("--orders", "50", "--seed", "5", "--until", "approved", "--json")

    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    assert summary["sent"] == summary["orders"] == 50
    assert summary["stopped"] == "reached"
    assert sum(summary["states"].values()) == 50

    decided = Counter(policy_checks(pipeline, summary["order_id_prefix"]).values())
    assert sum(decided.values()) == 50
    assert summary["states"]["approved"] == decided[PolicyOutcome.AUTO_APPROVED] > 0
    assert summary["states"]["needs_review"] == decided[PolicyOutcome.NEEDS_REVIEW] > 0
    assert summary["states"]["rejected"] == decided[PolicyOutcome.REJECTED] > 0
    assert summary["policy_outcomes"] == {outcome.value: n for outcome, n in decided.items()}
    intended = Counter(
        o.scenario.category.policy_outcome for o in demo_orders(50, seed=5, run_id="x", now=NOW)
    )
    assert decided == intended

    first_step = summary["steps"][0]
    assert first_step["step"] == "received -> policy.checked" and first_step["orders"] == 50
    assert 0 <= first_step["p50_ms"] <= first_step["p95_ms"]
    assert "record timestamps" in summary["timing_source"]
    assert any("no review service answered" in note for note in summary["notes"])


def test_without_dispatch_the_demo_times_out_with_approved_orders_awaiting_dispatch(
    pipeline: Pipeline,
) -> None:
    result = pipeline.demo("--orders", "20", "--timeout", "3", "--json")

    assert result.returncode == 3, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    assert summary["stopped"] == "timeout"
    states = summary["states"]
    assert states["approved"] == summary["policy_outcomes"]["AUTO_APPROVED"] > 0
    assert states["approved"] + states["needs_review"] + states["rejected"] == 20
    notes = " ".join(summary["notes"])
    assert "is dispatch running?" in notes
    assert "no review service answered" in notes
    assert summary["auto_review"] is None and summary["review_decisions"] == {}


@pytest.mark.process
def test_a_refused_key_or_an_unreachable_ingest_is_one_line_saying_what_to_do(
    pipeline: Pipeline,
) -> None:
    bad_key = pipeline.demo("--orders", "5", "--api-key", "ofk_nothing_real")
    nobody = pipeline.demo("--orders", "5", "--ingest-url", f"http://127.0.0.1:{free_port()}")
    no_reviews = pipeline.demo(
        "--orders", "5", "--auto-review", "--review-url", f"http://127.0.0.1:{free_port()}"
    )

    for result, variable in (
        (bad_key, "OPSFLOW_API_KEY"),
        (nobody, "INGEST_URL"),
        (no_reviews, "REVIEW_URL"),
    ):
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith(f"error: {variable}: "), result.stderr
        assert "Traceback" not in result.stderr


@pytest.fixture
def review_url(pipeline: Pipeline, tmp_path: Path) -> Iterator[str]:
    """The review service on the pipeline's topics and schema, for one test (so the
    other runs see no review service)."""
    ensure_topics(
        AdminClient({"bootstrap.servers": pipeline.bootstrap}),
        [f"{pipeline.prefix}policy-check.dlq"],
        partitions=PARTITIONS,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "review.log"
    review = start_service(
        ["-m", "services.review"],
        {**pipeline.env, "REVIEW_HOST": "127.0.0.1", "REVIEW_PORT": str(port)},
        log,
        f"{url}/readyz",
    )
    try:
        yield url
    finally:
        stop_process(review)


def test_auto_review_decides_its_planned_share_through_the_review_api_and_leaves_a_tenth_open(
    pipeline: Pipeline, review_url: str
) -> None:
    result = pipeline.demo(
        "--orders", "100", "--seed", "9", "--until", "approved", "--auto-review", "--json",
        REVIEW_URL=review_url,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    assert summary["stopped"] == "reached"
    plan = Counter(
        v.value for v in review_plan(demo_orders(100, seed=9, run_id="x", now=NOW), seed=9).values()
    )
    auto = summary["auto_review"]
    assert auto["planned"] == dict(plan) == {"approve": 13, "reject": 5, "leave": 2}

    # Every decision the summary counts is a review.decided on the topic, and no more.
    review = read_topic(pipeline, "review", summary["order_id_prefix"])
    decisions = [e for e in review if isinstance(e, ReviewDecided)]
    on_topic = Counter(e.decision.value for e in decisions)
    assert summary["review_decisions"] == dict(on_topic)
    assert on_topic == {"APPROVED": auto["approved"], "REJECTED": auto["rejected"]}
    assert (auto["approved"], auto["rejected"], auto["skipped"]) == (13, 5, 0)
    assert len({e.order_id for e in decisions}) == len(decisions)
    assert {e.actor.display_name for e in decisions} == {"opsflow demo (auto-review)"}
    assert all(e.reason.endswith("(opsflow demo --auto-review)") for e in decisions)

    # The orders left alone keep their tasks open: requested, never decided.
    requested = {e.order_id for e in review if isinstance(e, ReviewRequested)}
    assert len(requested) == summary["policy_outcomes"]["NEEDS_REVIEW"] == 20
    left = requested - {e.order_id for e in decisions}
    assert len(left) == auto["left_open"] == plan["leave"]
    states = summary["states"]
    # (A task may open just after the run stopped: its order is then "needs_review".)
    assert states["in_review"] + states["needs_review"] == len(left)
    assert states["review_rejected"] == on_topic["REJECTED"]
    assert states["approved"] == summary["policy_outcomes"]["AUTO_APPROVED"] + on_topic["APPROVED"]
    assert states["rejected"] == summary["policy_outcomes"]["REJECTED"]

    notes = " ".join(summary["notes"])
    assert "no review service answered" not in notes
    assert f"left {len(left)} orders undecided on purpose" in notes
    with psycopg.connect(pipeline.env["DATABASE_URL"]) as conn:
        made = [u for u in users.list_users(conn) if u.name.endswith(summary["run_id"])]
    assert [(u.role, u.active) for u in made] == [(users.Role.REVIEWER, False)]
    assert f"Made reviewer {made[0].name} ({made[0].user_id})" in notes


def test_without_a_running_stack_the_demo_says_to_start_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [*OPSFLOW, "demo", "--orders", "5"],
        cwd=ROOT,
        env=stack_env(tmp_path / "no-stack"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "no stack is running" in result.stderr and "opsflow up --detach" in result.stderr


def test_the_headline_after_a_carrier_outage_says_none_was_delivered() -> None:
    """It once said every order "got as far as 'delivered'" when none was: as a stop,
    "delivered" is the end of the workflow, which a failed dispatch reaches too."""
    outage = Summary(
        run_id="run1",
        seed=1,
        orders=3,
        sent=3,
        until=Until.DELIVERED,
        stopped="reached",
        elapsed_s=1.0,
        states={OrderState.DISPATCH_FAILED: 2, OrderState.REJECTED: 1},
        policy_outcomes={},
        scenarios={},
        steps=[],
        review_service_answered=True,
    )
    assert headline(outage) == "every order reached the end of the workflow (0 delivered)"
    booked = replace(outage, until=Until.DISPATCHED, states={OrderState.DELIVERED: 3})
    assert (
        headline(booked) == "every order was booked with the carrier or stopped before (3 booked)"
    )
    late = replace(outage, stopped="timeout")
    assert headline(late) == "timed out before every order reached the end of the workflow"
