"""The whole workflow on a real `opsflow up` stack, with dispatch killed mid-run.

1,000 demo orders go in through the ingest API's batch endpoint; policy-check,
review, dispatch, the carrier stand-in and pod-capture run as the stack runs
them (supervised processes). dispatch is killed with kill -9 while it is
booking and its supervisor restarts it. Meanwhile a reviewer (a user made with
`opsflow users create`) decides every review task through the review API,
approving about 70% and rejecting the rest, chosen by a hash of the order id.
Every order must end in exactly one terminal state: delivered (review-approved
ones included), rejected (by policy or by the reviewer) or dispatch failed;
none is left waiting. The carrier must hold no duplicate booking. Decisions come
long before any review SLA (an hour or more), so no task escalates.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from services.contracts import (
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    PodCaptured,
    PolicyChecked,
    PolicyOutcome,
    ReviewDecided,
    ReviewDecision,
)
from services.demo.orders import Category, DemoOrder, demo_orders, new_run_id
from tests.support.stack import Stack, stack_env

# The whole stack as `make run` starts it, with dispatch killed mid-run.
pytestmark = pytest.mark.process

ORDERS = 1_000
TOPICS = ("policy-check", "review", "dispatch", "pod", "pod-rejects")
APPROVE_SHARE = 0.7


def reviewer_approves(order_id: str) -> bool:
    """The test reviewer's decision: fixed per order id, about 70% approvals."""
    return hashlib.sha256(order_id.encode()).digest()[0] < APPROVE_SHARE * 256


def terminal_state(events: list[Event]) -> str | None:
    """Where an order ended, from its events; None while it is still moving (waiting for
    review included: every review is decided in this test)."""
    checks = [e for e in events if isinstance(e, PolicyChecked)]
    decisions = [e for e in events if isinstance(e, ReviewDecided)]
    if checks and checks[0].outcome is PolicyOutcome.REJECTED:
        return "rejected"
    if decisions and decisions[0].decision is ReviewDecision.REJECTED:
        return "rejected"
    if checks and checks[0].outcome is PolicyOutcome.NEEDS_REVIEW and not decisions:
        return None
    if any(isinstance(e, PodCaptured) for e in events):
        return "delivered"
    if any(isinstance(e, DispatchFailed) for e in events):
        return "dispatch failed"
    return None


def test_a_thousand_orders_each_end_once_with_dispatch_killed_mid_run(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    stack = Stack(
        data_dir,
        stack_env(
            data_dir,
            OPSFLOW_SERVICES="true",
            OPSFLOW_BROKER_STORAGE="memory",
            CARRIER_REFUSED_COUNTRIES="IS",
            CARRIER_ERROR_RATE="0.05",
            CARRIER_GHOST_RATE="0.05",
            CARRIER_SEED="11",
            CARRIER_POD_DELAY_S="1",
            DISPATCH_BACKOFF_S="0.05",
            DISPATCH_TIMEOUT_S="2",
        ),
    )
    stack.run("up", "--detach")
    try:
        pids = {name: c["pid"] for name, c in stack.components().items() if c["pid"]}
        assert psutil.Process(pids["projector"]).nice() > psutil.Process(pids["dispatch"]).nice()
        env = stack.addresses()
        created = stack.run(
            "keys", "create", "--producer", "e2e-shop", DATABASE_URL=env["DATABASE_URL"]
        )
        key = created.stdout.strip().splitlines()[-1]
        reviewer = stack.run(
            "users", "create", "e2e-reviewer", "--role", "reviewer",
            DATABASE_URL=env["DATABASE_URL"],
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        orders = demo_orders(ORDERS, seed=5, run_id=new_run_id(), now=datetime.now(UTC))
        category = {o.order_id: o.scenario.category for o in orders}

        with httpx.Client(base_url=env["INGEST_URL"], timeout=60) as ingest:
            for start in range(0, ORDERS, 250):
                response = ingest.post(
                    "/events:batch",
                    headers={"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex},
                    json={
                        "events": [
                            {"event_type": "order.received", "event": o.as_json()}
                            for o in orders[start : start + 250]
                        ]
                    },
                )
                assert response.status_code == 202, response.text

        # Kill dispatch while it is booking; its supervisor starts it again.
        carrier = env["CARRIER_URL"]
        deadline = time.monotonic() + 120
        while httpx.get(f"{carrier}/bookings", timeout=10).json()["count"] < 100:
            assert time.monotonic() < deadline, "dispatch booked nothing"
            time.sleep(0.05)
        killed = stack.components()["dispatch"]["pid"]
        os.kill(killed, signal.SIGKILL)
        booked_at_kill = httpx.get(f"{carrier}/bookings", timeout=10).json()["count"]

        # Approvals reach dispatch while it is down or restarting.
        reviews = [o for o in orders if o.scenario.category is Category.REVIEW]
        decide_reviews(env["REVIEW_URL"], reviewer, reviews, timeout=240)

        events = follow(env, set(category), timeout=240)
        assert stack.components()["dispatch"]["pid"] != killed, "dispatch was restarted"
        assert booked_at_kill < sum(
            c in (Category.AUTO_APPROVE, Category.CARRIER_REFUSAL) for c in category.values()
        ), "killed too late to prove anything"

        states = {order_id: terminal_state(evs) for order_id, evs in events.items()}
        assert None not in states.values()
        for order_id, evs in events.items():
            kinds = Counter(e.event_type for e in evs)
            assert kinds["policy.checked"] == 1, (order_id, kinds)
            assert kinds["dispatch.requested"] <= 1, (order_id, kinds)
            assert kinds["dispatch.executed"] + kinds["dispatch.failed"] <= 1, (order_id, kinds)
            assert kinds["pod.captured"] <= 1, (order_id, kinds)
            review = category[order_id] is Category.REVIEW
            assert kinds["review.requested"] == int(review), (order_id, kinds)
            assert kinds["review.decided"] == int(review), (order_id, kinds)
        expected = {
            order.order_id: expected_state(order, reviewer_approves(order.order_id))
            for order in orders
        }
        decided = Counter(reviewer_approves(o.order_id) for o in reviews)
        assert decided[True] > decided[False] > 0, decided
        wrong = {
            order_id: (category[order_id], state)
            for order_id, state in states.items()
            if state != expected[order_id]
            # 5 attempts against 10% faults: a rare order may exhaust its retries.
            and not (
                state == "dispatch failed"
                and any(
                    isinstance(e, DispatchFailed) and e.retries_exhausted for e in events[order_id]
                )
            )
        }
        assert not wrong, wrong
        for evs in events.values():
            for failed in (e for e in evs if isinstance(e, DispatchFailed)):
                assert (
                    failed.failure_class is DispatchFailureClass.PERMANENT
                    or failed.retries_exhausted
                )

        bookings = httpx.get(f"{carrier}/bookings", timeout=10).json()
        assert bookings["duplicates"] == []
        booked = Counter(b["order_id"] for b in bookings["bookings"])
        for order_id, evs in events.items():
            executed = [e for e in evs if isinstance(e, DispatchExecuted)]
            if executed:
                assert booked[order_id] == 1
                request = next(e for e in evs if isinstance(e, DispatchRequested))
                booking = next(b for b in bookings["bookings"] if b["order_id"] == order_id)
                assert booking["idempotency_key"] == request.envelope.idempotency_key
            assert booked[order_id] <= 1
    finally:
        stack.run("down")


def expected_state(order: DemoOrder, approved_by_reviewer: bool) -> str:
    """Where a demo order should end, given the reviewer's decision if it is reviewed."""
    category = order.scenario.category
    if category is Category.REVIEW and not approved_by_reviewer:
        return "rejected"
    if category is Category.CARRIER_REFUSAL or order.scenario.name == "incomplete-address":
        # The carrier refuses an address without a postal code, even an approved one.
        return "dispatch failed"
    if category is Category.REJECT:
        return "rejected"
    return "delivered"


def decide_reviews(url: str, token: str, orders: list[DemoOrder], *, timeout: float) -> None:
    """Decide the review task of every one of ``orders`` through the review API, as a
    reviewer does: list the open tasks, claim one, approve or reject it with a reason."""
    pending = {o.order_id for o in orders}
    deadline = time.monotonic() + timeout
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as review:
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} review tasks never opened"
            listed = review.get("/tasks", params={"status": "open"})
            if listed.status_code == 503:  # still reading the review topic
                time.sleep(0.5)
                continue
            assert listed.status_code == 200, listed.text
            for task in listed.json()["tasks"]:
                if task["order_id"] not in pending:
                    continue
                claimed = review.post(f"/tasks/{task['task_id']}/claim")
                assert claimed.status_code == 200, claimed.text
                approve = reviewer_approves(task["order_id"])
                decided = review.post(
                    f"/tasks/{task['task_id']}/{'approve' if approve else 'reject'}",
                    json={"reason": "documents checked" if approve else "not verifiable"},
                )
                assert decided.status_code == 200, decided.text
                assert decided.json()["status"] == ("approved" if approve else "rejected")
                pending.discard(task["order_id"])
            time.sleep(0.2)


def follow(env: dict[str, str], order_ids: set[str], *, timeout: float) -> dict[str, list[Event]]:
    """Every event of the orders on the workflow's topics, read until each order is in a
    terminal state and nothing new came for 3 s.

    The partitions are assigned, not subscribed to: a group join costs half a session
    timeout on the embedded broker, and reading everything needs no group."""
    codec = WireCodec(SchemaRegistryClient({"url": env["SCHEMA_REGISTRY_URL"]}))
    consumer = Consumer(
        {
            "bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": f"e2e-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 50,
        }
    )
    meta = consumer.list_topics(timeout=10).topics
    consumer.assign(
        [TopicPartition(t, p, OFFSET_BEGINNING) for t in TOPICS for p in meta[t].partitions]
    )
    events: dict[str, list[Event]] = {order_id: [] for order_id in order_ids}
    deadline, last_new = time.monotonic() + timeout, time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(1000, 0.5) if m.error() is None]
            for msg in batch:
                event = codec.decode(msg.value())
                if event.order_id in events:
                    events[event.order_id].append(event)
            if batch:
                last_new = time.monotonic()
            elif time.monotonic() - last_new >= 3 and all(
                terminal_state(evs) is not None for evs in events.values()
            ):
                return events
    finally:
        consumer.close()
    waiting = Counter(terminal_state(evs) for evs in events.values())
    stuck = {
        order_id: [e.event_type for e in evs]
        for order_id, evs in list(events.items())
        if terminal_state(evs) is None
    }
    raise AssertionError(
        f"orders did not settle within {timeout:.0f}s: {waiting}; e.g. {list(stuck.items())[:5]}"
    )


def no_proof_pending(carrier: str) -> bool:
    """The carrier has sent (and had answered) every proof of delivery it will send."""
    pods = httpx.get(f"{carrier}/pods", timeout=10).json()
    return bool(pods["pending"] == 0 and pods["queued"] == 0)


def ends(consumer: Consumer) -> dict[tuple[str, int], int]:
    """The high watermark of every partition ``consumer`` is assigned."""
    return {
        (tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10)[1]
        for tp in consumer.assignment()
    }
