"""The refund workflow, opsflow's second application, end to end on the real stack.

It is started as a user starts it (`opsflow up`, with `OPSFLOW_APP=refunds`),
against the session's cluster under a topic prefix of its own: the rules
step, the human task, the effect step with its payment partner stand-in, the
projector. Refund requests are sent with the SDK; people decide the ones the
rules send to them over the human task's API (one after the agents' SLA has
passed, by the finance lead); meanwhile the effect step is killed with
SIGKILL again and again, beside a second instance of it that is not (the two
share its partitions). Every refund must reach exactly one terminal state,
and the partner must hold no duplicate payout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db, users
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.producer import Producer, body_model
from services.refunds.contracts import (
    TOPICS,
    ApprovalDecided,
    ApprovalEscalated,
    CheckOutcome,
    Decision,
    PayoutFailed,
    PayoutRequested,
    RefundChecked,
    RefundPaid,
    RefundReason,
    RefundRequested,
)
from tests.support.stack import OPSFLOW, Stack, create_schema, drop_schema, stop_process

APP = "services.refunds.application:application"


@dataclass
class Refunds:
    """The refund application running under `opsflow up` on the session's cluster."""

    env: dict[str, str]
    prefix: str
    database_url: str

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            [*OPSFLOW, *args], env=self.env, capture_output=True, text=True, timeout=240
        )
        if check:
            assert result.returncode == 0, f"opsflow {args}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("status", "--json", check=False))
        return data

    def pid(self, program: str) -> int | None:
        for row in self.status()["components"]:
            if row["name"] == program and row.get("pid"):
                return int(row["pid"])
        return None


@pytest.fixture
def refunds(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Refunds]:
    base = stack.address("DATABASE_URL")
    schema, url = create_schema(base)
    prefix = f"rf{uuid.uuid4().hex[:6]}."
    env = {
        **os.environ,
        "OPSFLOW_APP": APP,
        "OPSFLOW_DATA_DIR": str(tmp_path / "stack"),
        "KAFKA_BOOTSTRAP_SERVERS": stack.address("KAFKA_BOOTSTRAP_SERVERS"),
        "SCHEMA_REGISTRY_URL": stack.address("SCHEMA_REGISTRY_URL"),
        "DATABASE_URL": url,
        "OPSFLOW_TOPIC_PREFIX": prefix,
        "OPSFLOW_SERVICES": "true",
        # The approval service's clock may be moved forward (to pass an SLA).
        "REFUND_APPROVAL_TEST_CLOCK": "1",
        # The partner refuses GBP payouts (a permanent failure) and answers every
        # third first call with 503 (a transient one, retried).
        "PAYMENTS_REFUSED_CURRENCIES": "GBP",
        "PAYMENTS_FAIL_EVERY": "3",
    }
    # This process encodes and decodes the refund workflow's events too.
    monkeypatch.setenv("OPSFLOW_APP", APP)
    app = Refunds(env, prefix, url)
    app.run("up", "--detach")
    try:
        yield app
    finally:
        app.run("down", check=False)
        drop_schema(base, schema)


@pytest.fixture
def second_payout(refunds: Refunds, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A second instance of the payout step, beside the one `opsflow up` supervises: the
    two share its partitions (one consumer group)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "opsflow.runtime", "services.refunds.payout:service"],
        env={**refunds.env, **refunds.status()["env"]},
        stdout=(tmp_path / "payout-2.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    yield proc
    stop_process(proc)


def _request(n: int, amount: int, currency: str, reason: RefundReason, days_ago: int) -> Any:
    now = datetime.now(UTC)
    return body_model(RefundRequested)(
        refund_id=f"rf-{n:04d}",
        order_id=f"ord-{n:04d}",
        customer_id=f"cus-{n % 7}",
        amount_minor=amount,
        currency=currency,
        charged_minor=50_000,
        reason=reason,
        purchased_at=now - timedelta(days=days_ago),
    )


# What each kind of request must end as, and how many of each are sent.
_PLAN: list[tuple[str, int, str, RefundReason, int, str]] = [
    # kind, amount, currency, reason, days since purchase, terminal state
    ("small", 4_500, "EUR", RefundReason.DAMAGED, 3, "paid"),
    ("small-usd", 9_900, "USD", RefundReason.WRONG_ITEM, 10, "paid"),
    ("gbp", 2_000, "GBP", RefundReason.DAMAGED, 2, "payout_failed"),
    ("too-much", 60_000, "EUR", RefundReason.DAMAGED, 2, "rejected"),
    ("late", 3_000, "EUR", RefundReason.CHANGED_MIND, 45, "rejected"),
    ("big-approved", 25_000, "EUR", RefundReason.DAMAGED, 5, "paid"),
    ("big-rejected", 30_000, "USD", RefundReason.DAMAGED, 5, "rejected"),
]


@pytest.mark.process
def test_every_refund_ends_once_and_the_partner_pays_none_twice_under_kill_9(
    refunds: Refunds, stack: Stack, tmp_path: Path, second_payout: subprocess.Popen[bytes]
) -> None:
    people = _people(refunds.database_url)
    expected: dict[str, str] = {}
    bodies = []
    for n in range(70):
        _kind, amount, currency, reason, days, end = _PLAN[n % len(_PLAN)]
        bodies.append(_request(n, amount, currency, reason, days))
        expected[f"rf-{n:04d}"] = end
    # One more that nobody decides in time: it escalates, and the finance lead approves.
    late = _request(999, 20_000, "EUR", RefundReason.NOT_DELIVERED, 1)
    expected["rf-0999"] = "paid"

    killer = _Killer(refunds, "refund-payout")
    killer.start()
    try:
        with Producer(
            "refund-desk",
            bootstrap_servers=refunds.env["KAFKA_BOOTSTRAP_SERVERS"],
            registry_url=refunds.env["SCHEMA_REGISTRY_URL"],
            topic_prefix=refunds.prefix,
        ) as producer:
            producer.send(late, idempotency_key="rf-0999")
            for body in bodies:
                producer.send(body, idempotency_key=body.refund_id)
                time.sleep(0.1)
        addresses = refunds.status()["env"]
        approval_url = addresses["REFUND_APPROVAL_URL"]
        _decide(approval_url, people, expected)
        _escalate_and_approve(approval_url, people, "rf-0999")
    finally:
        killer.stop()
    assert killer.kills >= 4, f"the effect step was killed {killer.kills} times"
    # The second instance was never killed: it shared the work and took over at each kill.
    assert second_payout.poll() is None, (tmp_path / "payout-2.log").read_text()[-3000:]

    events = _settled(refunds, expected)
    ends: dict[str, list[str]] = defaultdict(list)
    for event in events:
        end = _end_of(event)
        if end is not None:
            ends[event.key].append(end)
    assert {key: value for key, value in ends.items() if len(value) != 1} == {}
    assert {key: value[0] for key, value in ends.items()} == expected
    requests = Counter(e.refund_id for e in events if isinstance(e, PayoutRequested))
    assert max(requests.values()) == 1, "one payout request per refund"
    assert any(isinstance(e, ApprovalEscalated) and e.refund_id == "rf-0999" for e in events)

    payments_url = addresses["PAYMENTS_URL"]
    payouts = httpx.get(f"{payments_url}/refunds", timeout=10).json()
    per_refund = Counter(p["refund_id"] for p in payouts)
    assert [r for r, count in per_refund.items() if count > 1] == [], "a refund paid twice"
    paid = {r for r, end in expected.items() if end == "paid"}
    assert set(per_refund) == paid
    references = {e.refund_id: e.payout_reference for e in events if isinstance(e, RefundPaid)}
    assert references == {p["refund_id"]: p["payout_reference"] for p in payouts}

    # The read model says the same, and trace tells one refund's story by the app's rules.
    _projected(refunds.database_url, expected)
    gauges = refunds.status()["gauges"]
    assert gauges == {
        "refunds awaiting approval": 0,
        "refund payouts failed": sum(end == "payout_failed" for end in expected.values()),
    }
    # The operator's tools read the refund workflow's declaration: a dry-run replay of
    # the checks into the payout step finds every payout already in the log, and no
    # record was dead-lettered.
    planned = json.loads(
        refunds.run("replay", "refund-checks", "--into", "refund-payout", "--dry-run", "--json")
    )
    assert planned["handled"] == len(expected) and set(planned["instances"]) == set(expected)
    auto = sum(isinstance(e, RefundChecked) and e.outcome.value == "AUTO_APPROVED" for e in events)
    assert planned["already_done"] == auto, "each auto-approved check has its payout request"
    assert json.loads(refunds.run("dlq", "list", "--json"))["pending"] == 0
    trace = json.loads(refunds.run("trace", "rf-0999", "--json"))
    assert trace["instance"] == "refund" and trace["state"] == "paid", trace["now"]


# --- people ------------------------------------------------------------------------------


def _people(database_url: str) -> dict[str, str]:
    """Tokens of an agent and the finance lead (opsflow's reviewer and supervisor roles)."""
    made = {}
    with db.connect(database_url) as conn:
        for name, role in (("agent", users.Role.REVIEWER), ("lead", users.Role.SUPERVISOR)):
            made[name] = users.create_user(conn, name, role, display_name=name.title()).token
    return made


def _tasks(url: str, token: str, **params: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while True:
        answer = httpx.get(
            f"{url}/tasks", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        if answer.status_code == 200:
            tasks: list[dict[str, Any]] = answer.json()["tasks"]
            return tasks
        assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
        time.sleep(0.5)


def _decide(url: str, people: dict[str, str], expected: dict[str, str]) -> None:
    """The agent decides every task but rf-0999's: as the plan says."""
    wanted = {r for r, end in expected.items() if r != "rf-0999" and _needs_approval(r)}
    decided: set[str] = set()
    deadline = time.monotonic() + 120
    while decided != wanted:
        assert time.monotonic() < deadline, f"tasks never opened: {sorted(wanted - decided)}"
        for task in _tasks(url, people["agent"], status="open"):
            refund = task["refund_id"]
            if refund not in wanted or refund in decided:
                continue
            verb = "approve" if expected[refund] == "paid" else "reject"
            answer = httpx.post(
                f"{url}/tasks/{task['task_id']}/{verb}",
                json={"reason": f"{verb}d by the test"},
                headers={"Authorization": f"Bearer {people['agent']}"},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            decided.add(refund)
        time.sleep(0.3)


def _needs_approval(refund_id: str) -> bool:
    kind = _PLAN[int(refund_id.split("-")[1]) % len(_PLAN)][0]
    return kind.startswith("big")


def _escalate_and_approve(url: str, people: dict[str, str], refund_id: str) -> None:
    """Move the approval service's clock past the agents' SLA (60 min for a claim of
    non-delivery): the task escalates, the agent may no longer decide, the lead does."""
    task = next(t for t in _tasks(url, people["agent"]) if t["refund_id"] == refund_id)
    later = datetime.fromisoformat(task["due_at"]) + timedelta(minutes=1)
    assert httpx.put(f"{url}/testing/clock", json={"now": later.isoformat()}).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        task = next(t for t in _tasks(url, people["lead"]) if t["refund_id"] == refund_id)
        if task["tier"] == "FINANCE_LEAD":
            break
        assert time.monotonic() < deadline, task
        time.sleep(0.2)
    refused = httpx.post(
        f"{url}/tasks/{task['task_id']}/approve",
        json={"reason": "too late for an agent"},
        headers={"Authorization": f"Bearer {people['agent']}"},
        timeout=30,
    )
    assert refused.status_code == 403, refused.text
    approved = httpx.post(
        f"{url}/tasks/{task['task_id']}/approve",
        json={"reason": "the carrier confirms the loss"},
        headers={"Authorization": f"Bearer {people['lead']}"},
        timeout=30,
    )
    assert approved.status_code == 200, approved.text


# --- the effect step under SIGKILL ----------------------------------------------------------


class _Killer:
    """Kills a program with SIGKILL every 1.5 s until stopped (its supervisor restarts it)."""

    def __init__(self, app: Refunds, program: str) -> None:
        self.app, self.program = app, program
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, at_least: int = 4, timeout: float = 60) -> None:
        """Stop once it has killed ``at_least`` times (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while self.kills < at_least and time.monotonic() < deadline:
            time.sleep(0.2)
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(1.5):
            pid = self.app.pid(self.program)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                self.kills += 1
            except ProcessLookupError:
                pass


# --- reading the outcome ------------------------------------------------------------------


def _settled(app: Refunds, expected: dict[str, str], timeout: float = 120) -> list[Event]:
    """Every committed event of the workflow once each refund has its end, in log order."""
    deadline = time.monotonic() + timeout
    while True:
        events = _read(app)
        ended = {e.key for e in events if _end_of(e) is not None}
        if ended >= set(expected):
            # A little longer, so a duplicate written late would be seen too.
            time.sleep(2)
            return _read(app)
        assert time.monotonic() < deadline, f"never ended: {sorted(set(expected) - ended)}"
        time.sleep(0.2)


def _end_of(event: Event) -> str | None:
    """The terminal state ``event`` puts its refund in, if it is a terminal event."""
    if isinstance(event, RefundPaid):
        return "paid"
    if isinstance(event, PayoutFailed):
        return "payout_failed"
    if isinstance(event, RefundChecked) and event.outcome is CheckOutcome.REJECTED:
        return "rejected"
    if isinstance(event, ApprovalDecided) and event.decision is Decision.REJECTED:
        return "rejected"
    return None


def _read(app: Refunds) -> list[Event]:
    codec = WireCodec(SchemaRegistryClient({"url": app.env["SCHEMA_REGISTRY_URL"]}))
    consumer = Consumer(
        {
            "bootstrap.servers": app.env["KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": f"refunds-test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        names = [f"{app.prefix}{topic}" for topic in TOPICS]
        metadata = consumer.list_topics(timeout=10)
        parts = [
            TopicPartition(name, p, 0) for name in names for p in metadata.topics[name].partitions
        ]
        consumer.assign(parts)
        remaining, events = {(tp.topic, tp.partition) for tp in parts}, []
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                error = msg.error()
                if error is None:
                    events.append(codec.decode(msg.value()))
                elif error.code() == KafkaError._PARTITION_EOF:
                    remaining.discard((msg.topic(), msg.partition()))
        return events
    finally:
        consumer.close()


def _projected(database_url: str, expected: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(database_url) as conn:
            rows = dict(conn.execute("SELECT refund_id, state FROM refunds_current").fetchall())
        if rows == expected:
            return
        assert time.monotonic() < deadline, {
            r: (rows.get(r), end) for r, end in expected.items() if rows.get(r) != end
        }
        time.sleep(0.2)
