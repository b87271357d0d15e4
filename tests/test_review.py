"""The review service on the real stack: tasks from policy decisions, decisions over HTTP.

The service runs as a subprocess (``python -m services.review``) in topics of
its own (a prefix) and a fresh database schema; policy decisions are published
with the producer SDK, as the policy check would write them. What the tests
check is on the review topic (and, for an approval, on the dispatch topic),
read ``read_committed`` the way downstream services read it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db, users
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.producer import Producer
from opsflow.topics import dead_letter_topic, ensure_topics
from services.contracts import (
    DispatchExecuted,
    PolicyChecked,
    PolicyOutcome,
    Reason,
    ReviewDecided,
    ReviewDecision,
    ReviewEscalated,
    ReviewRequested,
    ReviewSlaBreached,
)
from services.review.service import task_id_for
from tests.stackctl import Stack, create_schema, drop_schema, free_port, start_service
from tests.test_carrier_sim import CarrierProcess
from tests.test_dispatch import make_orders

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ("orders", "policy-check", "review", "dispatch")


@contextmanager
def fresh_schema(stack: Stack) -> Iterator[str]:
    """A database URL whose connections work in a new, migrated schema."""
    base = stack.address("DATABASE_URL")
    schema, url = create_schema(base)
    db.migrate(url)
    try:
        yield url
    finally:
        drop_schema(base, schema)


@dataclass
class Person:
    user_id: str
    display_name: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class World:
    """One review service's topics, schema, people and processes."""

    stack: Stack
    prefix: str
    database_url: str
    producer: Producer
    codec: WireCodec
    logs: Path
    people: dict[str, Person]
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **self.stack.env,
            **self.stack.addresses(),
            "OPSFLOW_TOPIC_PREFIX": self.prefix,
            "DATABASE_URL": self.database_url,
            **extra,
        }

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        """Start the review service and wait until it is ready (topic replayed)."""
        log = self.logs / f"review-{len(self.processes)}.log"
        proc = start_service(
            ["-m", "services.review"],
            self.env(REVIEW_PORT=str(self.port), REVIEW_TEST_CLOCK="1", **env),
            log,
            f"{self.url}/readyz",
        )
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        proc.send_signal(sig)
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert proc.wait(30) in (0, -sig)

    def request_review(
        self, count: int, *, codes: Callable[[int], list[str]] = lambda _i: ["AMOUNT_OVER_LIMIT"]
    ) -> list[PolicyChecked]:
        """Publish ``count`` NEEDS_REVIEW policy decisions (reason codes per index)."""
        checks = []
        for index in range(count):
            order_id = f"ord-{uuid.uuid4().hex[:12]}"
            reason_codes = codes(index)
            checks.append(
                PolicyChecked(
                    envelope=PolicyChecked.envelope_for(
                        key=order_id,
                        idempotency_key=f"policy:{order_id}",
                        producer="policy-check",
                    ),
                    order_id=order_id,
                    outcome=PolicyOutcome.NEEDS_REVIEW,
                    reason_codes=reason_codes,
                    reasons=[Reason(code=c, message=f"{c} for {order_id}") for c in reason_codes],
                    rules_version="v1",
                )
            )
        self.producer.send_many(checks)
        return checks

    def call(self, method: str, path: str, who: str | None, **kwargs: Any) -> httpx.Response:
        headers = self.people[who].auth if who else {}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def queue(self, who: str = "ann", **params: Any) -> list[dict[str, Any]]:
        response = self.call("GET", "/tasks", who, params=params)
        assert response.status_code == 200, response.text
        tasks: list[dict[str, Any]] = response.json()["tasks"]
        return tasks

    def tasks_for(self, checks: list[PolicyChecked], timeout: float = 60) -> dict[str, Any]:
        """The open task of every decision, by order id, once all are listed."""
        wanted = {c.order_id for c in checks}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {t["order_id"]: t for t in self.queue() if t["order_id"] in wanted}
            if len(found) == len(wanted):
                return found
            time.sleep(0.2)
        raise AssertionError(f"tasks never opened: {len(wanted) - len(found)} missing")

    def events(
        self,
        topic: str,
        until: Callable[[list[Event]], bool],
        timeout: float = 60,
        quiet: float = 2,
    ) -> list[tuple[int, Event]]:
        """Every event on ``topic`` (read_committed) with its record timestamp, once ``until``
        holds and nothing new arrived for ``quiet`` seconds (late repeats would show)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.stack.address("KAFKA_BOOTSTRAP_SERVERS"),
                "group.id": f"check-{uuid.uuid4().hex}",
                "isolation.level": "read_committed",
            }
        )
        # Assigned, not subscribed: no group join to wait for.
        name = f"{self.prefix}{topic}"
        partitions = consumer.list_topics(name, timeout=10).topics[name].partitions
        consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in partitions])
        found: list[tuple[int, Event]] = []
        deadline, last_new = time.monotonic() + timeout, time.monotonic()
        try:
            while time.monotonic() < deadline:
                batch = [m for m in consumer.consume(1000, 0.3) if m.error() is None]
                if batch:
                    last_new = time.monotonic()
                    found += [(m.timestamp()[1], self.codec.decode(m.value())) for m in batch]
                elif until([e for _, e in found]) and time.monotonic() - last_new >= quiet:
                    return found
        finally:
            consumer.close()
        raise AssertionError(f"{topic} never settled: {Counter(e.event_type for _, e in found)}")


def _people(database_url: str) -> dict[str, Person]:
    made = {}
    with db.connect(database_url) as conn:
        for name, display, role in (
            ("ann", "Ann Reviewer", users.Role.REVIEWER),
            ("bob", "Bob Reviewer", users.Role.REVIEWER),
            ("sue", "Sue Supervisor", users.Role.SUPERVISOR),
            ("otto", "Otto Operator", users.Role.OPERATOR),
        ):
            created = users.create_user(conn, name, role, display_name=display)
            made[name] = Person(created.user.user_id, display, created.token)
    return made


@contextmanager
def make_world(stack: Stack, logs: Path) -> Iterator[World]:
    bootstrap = stack.address("KAFKA_BOOTSTRAP_SERVERS")
    registry = stack.address("SCHEMA_REGISTRY_URL")
    prefix = f"rv{uuid.uuid4().hex[:8]}."
    names = [f"{prefix}{t}" for t in TOPICS]
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}),
        names + [dead_letter_topic(n) for n in names],
        partitions=4,
    )
    with fresh_schema(stack) as url:
        producer = Producer(
            "review-tests", bootstrap_servers=bootstrap, registry_url=registry, topic_prefix=prefix
        )
        world = World(
            stack,
            prefix,
            url,
            producer,
            WireCodec(SchemaRegistryClient({"url": registry})),
            logs,
            _people(url),
        )
        try:
            yield world
        finally:
            for proc in world.processes:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            producer.close()


@pytest.fixture(scope="module")
def shared(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One running service for the tests that leave its clock alone."""
    with make_world(stack, tmp_path_factory.mktemp("review")) as world:
        world.start()
        yield world


@pytest.fixture
def world(stack: Stack, tmp_path: Path) -> Iterator[World]:
    with make_world(stack, tmp_path) as made:
        yield made


def decided(order_ids: set[str]) -> Callable[[list[Event]], bool]:
    return lambda events: order_ids <= {e.order_id for e in events if isinstance(e, ReviewDecided)}


# --- the happy paths ---------------------------------------------------------------------


def test_a_needs_review_decision_opens_a_task_that_is_claimed_approved_and_dispatched(
    shared: World, tmp_path: Path
) -> None:
    orders = make_orders(1)
    shared.producer.send_many(orders, idempotency_key=f"orders-{uuid.uuid4().hex}")
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
    )
    shared.producer.send(check)
    task = shared.tasks_for([check])[order.order_id]
    assert task["task_id"] == task_id_for(check)
    assert task["tier"] == "REVIEWER" and task["status"] == "open"
    assert [r["code"] for r in task["reasons"]] == ["CUSTOMER_HIGH_RISK", "AMOUNT_OVER_LIMIT"]
    # The shortest SLA of its reasons (sla.yaml: high risk 1 h), from the decision's time.
    requested, due = (datetime.fromisoformat(task[k]) for k in ("requested_at", "due_at"))
    assert due - requested == timedelta(hours=1)
    assert abs(requested - check.envelope.occurred_at) < timedelta(seconds=10)
    path = f"/tasks/{task['task_id']}"

    claimed = shared.call("POST", f"{path}/claim", "ann")
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["claimed_by"]["display_name"] == "Ann Reviewer"
    # Read after write: the queue shows the claim at once.
    assert (
        shared.queue(claimed="true", reason="CUSTOMER_HIGH_RISK")[0]["task_id"] == task["task_id"]
    )
    approved = shared.call("POST", f"{path}/approve", "ann", json={"reason": "Known customer"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"

    review = shared.events("review", decided({order.order_id}))
    mine = [e for _, e in review if e.order_id == order.order_id]
    assert [e.event_type for e in mine] == ["review.requested", "review.claimed", "review.decided"]
    decision = mine[2]
    assert isinstance(decision, ReviewDecided)
    assert decision.decision is ReviewDecision.APPROVED and decision.reason == "Known customer"
    assert decision.actor.user_id == shared.people["ann"].user_id
    assert decision.actor.role.value == "REVIEWER"
    assert decision.envelope.causation_id == str(mine[1].envelope.event_id)

    # Dispatch takes the approval on: the order is booked with the carrier.
    carrier = CarrierProcess(tmp_path / "carrier.log", {"CARRIER_DB": str(tmp_path / "c.db")})
    carrier.start()
    dispatch = subprocess.Popen(
        [sys.executable, "-m", "opsflow.runtime", "services.dispatch"],
        cwd=ROOT,
        env=shared.env(CARRIER_URL=carrier.url),
        stdout=(tmp_path / "dispatch.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        booked = shared.events(
            "dispatch",
            lambda events: any(
                isinstance(e, DispatchExecuted) and e.order_id == order.order_id for e in events
            ),
            quiet=0,
        )
    finally:
        dispatch.kill()
        dispatch.wait(10)
        carrier.stop()
    assert [e.event_type for _, e in booked if e.order_id == order.order_id] == [
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
    assert httpx.get(f"{shared.url}/docs", timeout=10).status_code == 200


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
    events = world.events(
        "review",
        lambda evs: any(isinstance(e, ReviewSlaBreached) for e in evs),
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
    requested = world.events(
        "review", lambda evs: sum(isinstance(e, ReviewRequested) for e in evs) >= 500, quiet=1
    )
    assert sum(isinstance(e, ReviewRequested) for _, e in requested) == 500
