"""The review service on the real stack: tasks from policy decisions, decisions over HTTP.

The service runs as a subprocess (``python -m services.review``) in topics of
its own (a prefix) and a fresh database schema; policy decisions are published
with the producer SDK, as the policy check would write them. What the tests
check is on the review topic (and, for an approval, on the dispatch topic, where
dispatch's worker runs in a thread of the test process), read ``read_committed``
the way downstream services read it.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer as KafkaProducer
from psycopg.types.json import Jsonb

from opsflow import db
from services.contracts import (
    Actor,
    ActorRole,
    DispatchExecuted,
    PolicyChecked,
    PolicyOutcome,
    Reason,
    ReviewDecided,
    ReviewDecision,
    ReviewEscalated,
    ReviewRequested,
    ReviewSlaBreached,
    ReviewTier,
)
from services.review.service import task_id_for
from tests.support.carrier import CarrierProcess
from tests.support.dispatching import make_orders, run_dispatch, settled_events
from tests.support.reviewing import World, decided, make_world
from tests.support.stack import Stack, free_port


@pytest.fixture(scope="module")
def shared(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One running service for the tests that leave its clock alone."""
    with make_world(stack, tmp_path_factory.mktemp("review")) as world:
        world.start()
        yield world


@pytest.fixture
def carrier(tmp_path: Path) -> Iterator[CarrierProcess]:
    """The carrier stand-in dispatch books with: launched, not waited for (``ready``), so
    it starts while the test does the review."""
    launched = CarrierProcess(tmp_path / "carrier.log", {"CARRIER_DB": str(tmp_path / "c.db")})
    launched.launch()
    yield launched
    launched.stop()


@pytest.fixture
def world(stack: Stack, tmp_path: Path) -> Iterator[World]:
    with make_world(stack, tmp_path) as made:
        yield made


# --- the happy paths ---------------------------------------------------------------------


def test_a_needs_review_decision_opens_a_task_that_is_claimed_approved_and_dispatched(
    world: World, carrier: CarrierProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A world of its own: in the module's shared one, other tests' approvals of orders
    # it never saw would keep dispatch retrying, so it would never be done.
    world.start()
    orders = make_orders(1)
    world.producer.send_many(orders, idempotency_key=f"orders-{uuid.uuid4().hex}")
    order = orders[0]
    check = PolicyChecked(
        envelope=PolicyChecked.envelope_for(
            key=order.order_id,
            idempotency_key=f"policy:{order.order_id}",
            producer="policy-check",
            caused_by=order.envelope,
        ),
        order_id=order.order_id,
        outcome=PolicyOutcome.NEEDS_REVIEW,
        reason_codes=["CUSTOMER_HIGH_RISK", "AMOUNT_OVER_LIMIT"],
        reasons=[
            Reason(code="CUSTOMER_HIGH_RISK", message="Customer is high risk"),
            Reason(code="AMOUNT_OVER_LIMIT", message="Amount over 1,000.00"),
        ],
        rules_version="v1",
        destination=order.destination,
    )
    world.producer.send(check)
    task = world.tasks_for([check])[order.order_id]
    assert task["task_id"] == task_id_for(check)
    assert task["tier"] == "REVIEWER" and task["status"] == "open"
    assert [r["code"] for r in task["reasons"]] == ["CUSTOMER_HIGH_RISK", "AMOUNT_OVER_LIMIT"]
    # The shortest SLA of its reasons (sla.yaml: high risk 1 h), from the decision's time.
    requested, due = (datetime.fromisoformat(task[k]) for k in ("requested_at", "due_at"))
    assert due - requested == timedelta(hours=1)
    assert abs(requested - check.envelope.occurred_at) < timedelta(seconds=10)
    path = f"/tasks/{task['task_id']}"

    claimed = world.call("POST", f"{path}/claim", "ann")
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["claimed_by"]["display_name"] == "Ann Reviewer"
    # Read after write: the queue shows the claim at once.
    assert world.queue(claimed="true", reason="CUSTOMER_HIGH_RISK")[0]["task_id"] == task["task_id"]
    approved = world.call("POST", f"{path}/approve", "ann", json={"reason": "Known customer"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"

    review = world.events("review", decided({order.order_id}))
    mine = [e for _, e in review if e.order_id == order.order_id]
    assert [e.event_type for e in mine] == ["review.requested", "review.claimed", "review.decided"]
    decision = mine[2]
    assert isinstance(decision, ReviewDecided)
    assert decision.decision is ReviewDecision.APPROVED and decision.reason == "Known customer"
    assert decision.actor.user_id == world.people["ann"].user_id
    assert decision.actor.role.value == "REVIEWER"
    assert decision.envelope.causation_id == str(mine[1].envelope.event_id)

    # Dispatch takes the approval on: the order is booked with the carrier. dispatch's
    # worker runs in this process; read once it has handled all it was given.
    try:
        dispatch = run_dispatch(
            monkeypatch,
            bootstrap=world.stack.address("KAFKA_BOOTSTRAP_SERVERS"),
            registry_url=world.stack.address("SCHEMA_REGISTRY_URL"),
            prefix=world.prefix,
            database_url=world.database_url,
            carrier_url=carrier.ready().url,
        )
        try:
            booked = settled_events(
                dispatch,
                world.stack,
                f"{world.prefix}dispatch",
                world.codec,
                lambda events: any(
                    isinstance(e, DispatchExecuted) and e.order_id == order.order_id for e in events
                ),
                timeout=60,
            )
        finally:
            dispatch.stop()
    finally:
        carrier.stop()
    assert [e.event_type for e in booked if e.order_id == order.order_id] == [
        "dispatch.requested",
        "dispatch.executed",
    ]


def test_a_rejection_is_recorded_with_the_authenticated_reviewer_not_a_name_from_the_body(
    shared: World,
) -> None:
    check = shared.request_review(1)[0]
    task = shared.tasks_for([check])[check.order_id]
    path = f"/tasks/{task['task_id']}/reject"
    smuggled = shared.call(
        "POST", path, "bob", json={"reason": "Fraud", "actor": {"display_name": "Somebody"}}
    )
    assert smuggled.status_code == 422
    rejected = shared.call("POST", path, "bob", json={"reason": "Fraud pattern"})
    assert rejected.status_code == 200, rejected.text
    assert rejected.json()["status"] == "rejected"
    events = shared.events("review", decided({check.order_id}))
    decision = next(
        e for _, e in events if isinstance(e, ReviewDecided) and e.order_id == check.order_id
    )
    assert decision.decision is ReviewDecision.REJECTED
    assert decision.actor.display_name == "Bob Reviewer"
    assert decision.actor.user_id == shared.people["bob"].user_id
    assert shared.queue(status="decided", reason="AMOUNT_OVER_LIMIT")


# --- a decision is taken once ------------------------------------------------------------


def test_a_task_is_decided_once_and_each_refusal_says_who_holds_or_decided_it(
    shared: World,
) -> None:
    checks = shared.request_review(2)
    tasks = shared.tasks_for(checks)
    first, second = (f"/tasks/{tasks[c.order_id]['task_id']}" for c in checks)

    assert shared.call("POST", f"{first}/claim", "ann").status_code == 200
    assert shared.call("POST", f"{first}/claim", "ann").status_code == 200  # hers already
    taken = shared.call("POST", f"{first}/claim", "bob")
    assert taken.status_code == 409
    assert "claimed by Ann Reviewer" in taken.json()["detail"]
    other = shared.call("POST", f"{first}/approve", "bob", json={"reason": "fine"})
    assert other.status_code == 409 and "Ann Reviewer" in other.json()["detail"]
    not_hers = shared.call("POST", f"{first}/release", "bob")
    assert not_hers.status_code == 409 and "Ann Reviewer" in not_hers.json()["detail"]
    # A supervisor may take a task back from a reviewer.
    released = shared.call("POST", f"{first}/release", "sue", json={"reason": "Ann is away"})
    assert released.status_code == 200 and released.json()["claimed_by"] is None

    assert shared.call("POST", f"{first}/approve", "bob", json={"reason": "ok"}).status_code == 200
    again = shared.call("POST", f"{first}/reject", "ann", json={"reason": "no"})
    assert again.status_code == 409
    assert "already approved by Bob Reviewer" in again.json()["detail"]
    closed = shared.call("POST", f"{first}/claim", "sue")
    assert closed.status_code == 409 and "Bob Reviewer" in closed.json()["detail"]
    assert shared.call("POST", f"{second}/release", "ann").status_code == 409  # unclaimed
    assert shared.call("POST", "/tasks/nope/claim", "ann").status_code == 404

    events = shared.events("review", decided({checks[0].order_id}))
    decisions = [e for _, e in events if isinstance(e, ReviewDecided)]
    assert [d.order_id for d in decisions].count(checks[0].order_id) == 1


def test_a_decision_forged_onto_the_task_topic_decides_nothing_even_after_a_restart(
    world: World,
) -> None:
    """Written with a plain Kafka client, an approval whose envelope names a shop, not
    the review desk: the desk's replay of its topic at start passes it over (and goes
    on), so the task stays open and a reviewer still decides it."""
    proc = world.start()
    [check] = world.request_review(1)
    task_id = world.tasks_for([check])[check.order_id]["task_id"]
    forged = ReviewDecided(
        envelope=ReviewDecided.envelope_for(
            key=check.order_id, idempotency_key=f"forged:{check.order_id}", producer="shop"
        ),
        order_id=check.order_id,
        task_id=task_id,
        actor=Actor(user_id="sue", display_name="Sue Supervisor", role=ActorRole.SUPERVISOR),
        tier=ReviewTier.REVIEWER,
        decision=ReviewDecision.APPROVED,
        reason="forged",
    )
    kafka = KafkaProducer({"bootstrap.servers": world.stack.address("KAFKA_BOOTSTRAP_SERVERS")})
    kafka.produce(f"{world.prefix}review", world.codec.encode(forged), check.order_id.encode())
    assert kafka.flush(10) == 0
    world.stop(proc)
    world.start()  # ready once its topic, the forged record included, is replayed

    task = world.call("GET", f"/tasks/{task_id}", "ann").json()
    assert task["status"] == "open", task
    approved = world.call("POST", f"/tasks/{task_id}/approve", "ann", json={"reason": "real"})
    assert approved.status_code == 200, approved.text
    log = (world.logs / "review-1.log").read_text()
    assert "task record skipped" in log and "written by producer 'shop'" in log


def test_the_due_soon_filter_and_the_api_document_answer(shared: World) -> None:
    """``GET /tasks?due_soon=true`` and ``/openapi.json`` once answered 500: a query
    parameter's annotation named a variable the route's module could not see."""
    checks = shared.request_review(1)
    task = shared.tasks_for(checks)[checks[0].order_id]

    soon = shared.call("GET", "/tasks?due_soon=true&due_within_s=86400", "ann")
    assert soon.status_code == 200
    assert task["task_id"] in {t["task_id"] for t in soon.json()["tasks"]}
    none_soon = shared.call("GET", "/tasks?due_within_s=0", "ann")
    assert none_soon.status_code == 200
    assert task["task_id"] not in {t["task_id"] for t in none_soon.json()["tasks"]}
    document = httpx.get(f"{shared.url}/openapi.json", timeout=10)
    assert document.status_code == 200
    parameters = document.json()["paths"]["/tasks"]["get"]["parameters"]
    assert "due_soon" in {p["name"] for p in parameters}
    # No documentation page: it would load Swagger UI from a CDN onto the inbox's origin.
    assert httpx.get(f"{shared.url}/docs", timeout=10).status_code == 404


def test_concurrent_decisions_on_one_task_let_exactly_one_through(shared: World) -> None:
    check = shared.request_review(1)[0]
    path = f"/tasks/{shared.tasks_for([check])[check.order_id]['task_id']}"
    answers: list[int] = []
    start = threading.Barrier(8)

    def decide(who: str, verb: str) -> None:
        start.wait()
        answers.append(shared.call("POST", f"{path}/{verb}", who, json={"reason": who}).status_code)

    threads = [
        threading.Thread(target=decide, args=(who, verb))
        for who in ("ann", "bob", "sue", "ann")
        for verb in ("approve", "reject")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [200] + [409] * 7
    events = shared.events("review", decided({check.order_id}))
    assert (
        sum(isinstance(e, ReviewDecided) and e.order_id == check.order_id for _, e in events) == 1
    )


def test_a_decision_recorded_by_an_instance_killed_before_writing_it_is_written_once(
    shared: World,
) -> None:
    """What an instance killed between recording a decision and the broker's
    acknowledgement leaves: the row in ``task_transitions``, not marked written, and no
    record. The next action on the task writes it before deciding (and is refused,
    naming its decider); on a task nobody touches, the timers' round writes it."""
    checks = shared.request_review(2)
    tasks = shared.tasks_for(checks)
    ann = shared.people["ann"]
    recorded = {}
    with db.connect(shared.database_url) as conn:
        for check in checks:
            task_id = tasks[check.order_id]["task_id"]
            event = ReviewDecided(
                envelope=ReviewDecided.envelope_for(
                    key=check.order_id,
                    idempotency_key=f"review:{task_id}:1:decided:{ann.user_id}",
                    producer="review",
                ),
                order_id=check.order_id,
                task_id=task_id,
                actor=Actor(
                    user_id=ann.user_id, display_name=ann.display_name, role=ActorRole.REVIEWER
                ),
                tier=ReviewTier.REVIEWER,
                decision=ReviewDecision.REJECTED,
                reason="recorded, then killed",
            )
            conn.execute(
                "INSERT INTO task_transitions (topic, task_id, version, event_type, event, written)"
                " VALUES (%s, %s, 2, 'review.decided', %s, false)",
                (f"{shared.prefix}review", task_id, Jsonb(event.model_dump(mode="json"))),
            )
            recorded[task_id] = event.envelope.event_id
        conn.commit()
    touched, untouched = recorded
    refused = shared.call("POST", f"/tasks/{touched}/approve", "bob", json={"reason": "mine"})
    assert refused.status_code == 409, refused.text
    assert f"already rejected by {ann.display_name}" in refused.json()["detail"]
    deadline = time.monotonic() + 20
    while shared.call("GET", f"/tasks/{untouched}", "ann").json()["status"] != "rejected":
        assert time.monotonic() < deadline, "the recorded decision was never written"
        time.sleep(0.1)
    events = shared.events("review", decided({c.order_id for c in checks}), quiet=2)
    written = [e for _, e in events if isinstance(e, ReviewDecided) and e.task_id in recorded]
    assert sorted(e.envelope.event_id for e in written) == sorted(recorded.values())
    with db.connect(shared.database_url) as conn:
        rows = conn.execute(
            "SELECT task_id, written FROM task_transitions WHERE task_id = ANY(%s)",
            (list(recorded),),
        ).fetchall()
    assert dict(rows) == dict.fromkeys(recorded, True)


# --- who may act -------------------------------------------------------------------------


def test_no_token_is_401_an_operator_acting_is_403_and_a_revoked_user_is_401(
    shared: World,
) -> None:
    check = shared.request_review(1)[0]
    path = f"/tasks/{shared.tasks_for([check])[check.order_id]['task_id']}"
    anonymous = shared.call("GET", "/tasks", None)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    forged = httpx.get(f"{shared.url}/tasks", headers={"Authorization": "Bearer ofu_x_y"})
    assert forged.status_code == 401
    assert shared.call("GET", "/tasks", "otto").status_code == 200  # operators look
    refused = shared.call("POST", f"{path}/claim", "otto")
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]

    # The command line makes and revokes people; a revoked token is refused at once.
    made = shared.stack.run(
        "users", "create", "carl", "--role", "reviewer", DATABASE_URL=shared.database_url
    )
    token = made.stdout.strip()
    carl = {"Authorization": f"Bearer {token}"}
    assert httpx.post(f"{shared.url}{path}/claim", headers=carl, timeout=10).status_code == 200
    listed = shared.stack.run("users", "list", "--json", DATABASE_URL=shared.database_url)
    assert token not in listed.stdout and '"name": "carl"' in listed.stdout
    shared.stack.run("users", "revoke", "carl", DATABASE_URL=shared.database_url)
    assert httpx.get(f"{shared.url}/tasks", headers=carl, timeout=10).status_code == 401


# --- SLAs and durable timers -------------------------------------------------------------


def test_an_overdue_task_escalates_to_supervisors_who_alone_may_decide_it(world: World) -> None:
    world.start()
    checks = world.request_review(2)
    tasks = world.tasks_for(checks)
    first, second = (tasks[c.order_id] for c in checks)
    assert world.call("POST", f"/tasks/{first['task_id']}/claim", "ann").status_code == 200
    latest_due = max(datetime.fromisoformat(t["due_at"]) for t in (first, second))
    moved = world.call(
        "PUT", "/testing/clock", None, json={"now": (latest_due + timedelta(seconds=1)).isoformat()}
    )
    assert moved.status_code == 200, moved.text
    deadline = time.monotonic() + 20
    while len(world.queue(tier="SUPERVISOR")) < 2:
        assert time.monotonic() < deadline, "tasks never escalated"
        time.sleep(0.1)
    escalated = world.call("GET", f"/tasks/{first['task_id']}", "ann").json()
    assert escalated["claimed_by"] is None  # the reviewer's claim ended with the escalation
    assert datetime.fromisoformat(escalated["due_at"]) == datetime.fromisoformat(
        first["due_at"]
    ) + timedelta(hours=1)
    refused = world.call("POST", f"/tasks/{first['task_id']}/approve", "ann", json={"reason": "ok"})
    assert refused.status_code == 403 and "supervisor" in refused.json()["detail"]
    approved = world.call(
        "POST", f"/tasks/{first['task_id']}/approve", "sue", json={"reason": "ok"}
    )
    assert approved.status_code == 200 and approved.json()["decided_by"]["role"] == "SUPERVISOR"

    # The supervisors' SLA passes too for the undecided one: breached, once.
    breach_at = datetime.fromisoformat(second["due_at"]) + timedelta(hours=1, seconds=1)
    world.call("PUT", "/testing/clock", None, json={"now": breach_at.isoformat()})
    # The timers write these: a repeat would come late, so nothing new for 2 s.
    events = world.events(
        "review",
        lambda evs: any(isinstance(e, ReviewSlaBreached) for e in evs),
        quiet=2,
    )
    kinds = Counter((e.event_type, e.order_id) for _, e in events)
    assert kinds[("review.escalated", checks[0].order_id)] == 1
    assert kinds[("review.escalated", checks[1].order_id)] == 1
    assert kinds[("review.sla_breached", checks[1].order_id)] == 1
    assert kinds[("review.sla_breached", checks[0].order_id)] == 0  # decided in time
    assert world.queue(tier="SUPERVISOR")[0]["sla_breached_at"] is not None


@pytest.mark.process
def test_overdue_timers_fire_once_each_in_deadline_order_after_a_restart(
    world: World, tmp_path: Path
) -> None:
    sla = tmp_path / "sla.yaml"
    sla.write_text(
        "reviewer_minutes: 120\nsupervisor_minutes: 600\n"
        "reasons: {SLA_10: 10, SLA_20: 20, SLA_30: 30, SLA_40: 40}\n"
    )
    first = world.start(REVIEW_SLA_FILE=str(sla))
    codes = ["SLA_40", "SLA_10", "SLA_30", "SLA_20"]
    checks = world.request_review(12, codes=lambda i: [codes[i % 4]])
    tasks = world.tasks_for(checks)
    world.stop(first)

    # Down while every deadline passes (50 minutes later), then up again.
    world.start(REVIEW_SLA_FILE=str(sla), REVIEW_CLOCK_OFFSET_S="3000")
    ids = {c.order_id for c in checks}
    escalated = [
        (ts, e)
        for ts, e in world.events(
            "review",
            lambda evs: ids <= {e.order_id for e in evs if isinstance(e, ReviewEscalated)},
            quiet=2,
        )
        if isinstance(e, ReviewEscalated)
    ]
    assert Counter(e.order_id for _, e in escalated) == dict.fromkeys(ids, 1)
    for ts_a, a in escalated:
        for ts_b, b in escalated:
            if ts_a < ts_b:  # written strictly earlier: not due later
                assert a.breached_due_at <= b.breached_due_at
    for _, e in escalated:
        assert e.breached_due_at == datetime.fromisoformat(tasks[e.order_id]["due_at"])

    # A second restart finds every escalation in the log: nothing fires again.
    world.stop(world.processes[-1])
    world.start(REVIEW_SLA_FILE=str(sla), REVIEW_CLOCK_OFFSET_S="3000")
    again = world.events(
        "review",
        lambda evs: sum(isinstance(e, ReviewEscalated) for e in evs) >= len(ids),
        quiet=3,
    )
    assert sum(isinstance(e, ReviewEscalated) for _, e in again) == len(ids)
    assert not any(isinstance(e, ReviewSlaBreached) for _, e in again)


@pytest.mark.process
def test_after_kill_9_with_500_open_tasks_the_queue_reads_the_same(world: World) -> None:
    first = world.start()
    checks = world.request_review(
        500, codes=lambda i: [["AMOUNT_OVER_LIMIT", "CUSTOMER_HIGH_RISK"][i % 2]]
    )
    tasks = world.tasks_for(checks, timeout=90)
    some = [tasks[c.order_id]["task_id"] for c in checks[:30]]
    for task_id in some[:20]:
        assert world.call("POST", f"/tasks/{task_id}/claim", "ann").status_code == 200
    for task_id in some[:5]:
        assert world.call("POST", f"/tasks/{task_id}/release", "ann").status_code == 200
    for task_id in some[20:30]:
        assert (
            world.call(
                "POST", f"/tasks/{task_id}/approve", "bob", json={"reason": "ok"}
            ).status_code
            == 200
        )
    before = world.queue(status="all")
    assert len(before) == 500
    assert len(world.queue(claimed="true")) == 15

    world.stop(first, signal.SIGKILL)
    world.start()
    assert world.queue(status="all") == before
    # Read once the restarted opener has committed every decision: a task opened twice
    # (an input redone after the kill) would be in the topic by then.
    requested = world.events(
        "review", lambda evs: sum(isinstance(e, ReviewRequested) for e in evs) >= 500
    )
    assert sum(isinstance(e, ReviewRequested) for _, e in requested) == 500


@pytest.mark.process
def test_two_instances_share_the_tasks_and_after_kill_9_the_survivor_decides_and_fires_once(
    world: World, tmp_path: Path
) -> None:
    sla = tmp_path / "sla.yaml"
    sla.write_text("reviewer_minutes: 120\nsupervisor_minutes: 600\nreasons: {SLA_10: 10}\n")
    other = free_port()
    a = world.launch(REVIEW_SLA_FILE=str(sla))
    b = world.launch(port=other, REVIEW_SLA_FILE=str(sla))
    world.ready(a)
    world.ready(b, port=other)
    urls = {"a": world.url, "b": f"http://127.0.0.1:{other}"}

    def call(on: str, method: str, path: str, who: str | None, **kw: Any) -> httpx.Response:
        headers = world.people[who].auth if who else {}
        return httpx.request(method, f"{urls[on]}{path}", headers=headers, timeout=30, **kw)

    checks = world.request_review(
        90, codes=lambda i: ["SLA_10" if i % 3 == 0 else "AMOUNT_OVER_LIMIT"]
    )
    overdue, regular = checks[::3], [c for i, c in enumerate(checks) if i % 3]
    tasks = {order_id: task["task_id"] for order_id, task in world.tasks_for(checks).items()}
    deadline = time.monotonic() + 20
    while len(call("b", "GET", "/tasks", "ann").json()["tasks"]) < len(checks):
        assert time.monotonic() < deadline, "instance b never listed every task"
        time.sleep(0.05)

    # Racing decisions on one task, on the two instances: one wins, the other is refused
    # as on one instance, naming the winner.
    acknowledged: dict[str, tuple[str, str]] = {}  # task id -> (user id, decision)
    refusals: dict[str, list[str]] = {}
    start = threading.Barrier(60)

    def decide(on: str, who: str, verb: str, task_id: str) -> None:
        start.wait()
        answer = call(on, "POST", f"/tasks/{task_id}/{verb}", who, json={"reason": who})
        if answer.status_code == 200:
            assert task_id not in acknowledged, f"{task_id} decided twice"
            body = answer.json()
            acknowledged[task_id] = (body["decided_by"]["user_id"], body["status"])
        else:
            assert answer.status_code == 409, answer.text
            refusals.setdefault(task_id, []).append(answer.json()["detail"])

    racers = [
        threading.Thread(target=decide, args=args)
        for check in regular[:30]
        for args in (
            ("a", "ann", "approve", tasks[check.order_id]),
            ("b", "bob", "reject", tasks[check.order_id]),
        )
    ]
    for thread in racers:
        thread.start()
    for thread in racers:
        thread.join()
    raced = {tasks[c.order_id] for c in regular[:30]}
    assert set(acknowledged) == raced and set(refusals) == raced
    names = {world.people[p].user_id: world.people[p].display_name for p in ("ann", "bob")}
    for task_id, (user_id, status) in acknowledged.items():
        [detail] = refusals[task_id]
        assert f"already {status} by {names[user_id]}" in detail, detail

    # Ann claims on a; b's clock and then a's pass the 10-minute SLA; a is killed while
    # the timers of both fire.
    claimed = [tasks[c.order_id] for c in regular[30:]]
    for task_id in claimed:
        assert call("a", "POST", f"/tasks/{task_id}/claim", "ann").status_code == 200
    due = max(datetime.fromisoformat(t["due_at"]) for t in world.queue(reason="SLA_10"))
    later = {"now": (due + timedelta(seconds=1)).isoformat()}
    assert call("b", "PUT", "/testing/clock", None, json=later).status_code == 200
    assert call("a", "PUT", "/testing/clock", None, json=later).status_code == 200
    while not call("a", "GET", "/tasks", "sue", params={"tier": "SUPERVISOR"}).json()["tasks"]:
        time.sleep(0.005)
    world.stop(a, signal.SIGKILL)

    # The survivor serves a's tasks: ann decides what she claimed there, Sue some
    # escalated ones.
    for task_id in claimed:
        answer = call("b", "POST", f"/tasks/{task_id}/approve", "ann", json={"reason": "ok"})
        assert answer.status_code == 200, answer.text
        acknowledged[task_id] = (world.people["ann"].user_id, "approved")
    for check in overdue[:10]:
        task_id = tasks[check.order_id]
        answer = call("b", "POST", f"/tasks/{task_id}/reject", "sue", json={"reason": "late"})
        assert answer.status_code == 200, answer.text
        acknowledged[task_id] = (world.people["sue"].user_id, "rejected")

    late = {c.order_id for c in overdue}
    events = [
        e
        for _, e in world.events(
            "review",
            lambda evs: late <= {e.order_id for e in evs if isinstance(e, ReviewEscalated)},
            quiet=2,
        )
    ]
    decisions = [e for e in events if isinstance(e, ReviewDecided)]
    assert Counter(e.task_id for e in decisions) == dict.fromkeys(acknowledged, 1)
    assert {
        e.task_id: (e.actor.user_id, e.decision.value.lower()) for e in decisions
    } == acknowledged
    escalations = Counter(e.order_id for e in events if isinstance(e, ReviewEscalated))
    assert escalations == dict.fromkeys(late, 1)
    assert not any(isinstance(e, ReviewSlaBreached) for e in events)
    # And the survivor's table is the log's.
    listed = call("b", "GET", "/tasks", "sue", params={"status": "decided"}).json()["tasks"]
    assert {t["task_id"]: t["status"] for t in listed} == {
        task_id: status for task_id, (_, status) in acknowledged.items()
    }
