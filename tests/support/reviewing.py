"""The review service's world: one test's topics, migrated schema, people and processes.

Used by the review tests and by the reviewer inbox's browser tests.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db, users
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.producer import Producer
from opsflow.topics import dead_letter_topic, end_offsets, ensure_topics
from services.contracts import PolicyChecked, PolicyOutcome, Reason, ReviewDecided
from tests.support.dispatching import LogReader
from tests.support.samples import ADDRESS
from tests.support.stack import (
    QUICK_JOIN_ENV,
    ROOT,
    Stack,
    create_schema,
    drop_schema,
    free_port,
    stop_process,
)

TOPICS = ("orders", "policy-check", "review", "dispatch")
PARTITIONS = 4


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
            **QUICK_JOIN_ENV,
            "OPSFLOW_TOPIC_PREFIX": self.prefix,
            "DATABASE_URL": self.database_url,
            **extra,
        }

    def start(self, *, port: int | None = None, **env: str) -> subprocess.Popen[bytes]:
        """Start the review service and wait until it is ready (topic replayed); on
        ``port``, for a second instance (default: the world's ``port``)."""
        return self.ready(self.launch(port=port, **env), port=port)

    def launch(self, *, port: int | None = None, **env: str) -> subprocess.Popen[bytes]:
        """Start the review service without waiting for it (``ready`` waits)."""
        log = self.logs / f"review-{len(self.processes)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.review"],
            cwd=ROOT,
            env=self.env(REVIEW_PORT=str(port or self.port), REVIEW_TEST_CLOCK="1", **env),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.processes.append(proc)
        return proc

    def ready(
        self, proc: subprocess.Popen[bytes], *, port: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Wait until the launched service answers ``/readyz`` (its topic replayed)."""
        log = self.logs / f"review-{self.processes.index(proc)}.log"
        url = f"http://127.0.0.1:{port or self.port}"
        deadline = time.monotonic() + 60
        try:
            while True:
                assert proc.poll() is None, f"review exited {proc.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"review never got ready:\n{log.read_text()}"
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        return proc
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        except AssertionError:
            stop_process(proc)
            raise

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
                    destination=ADDRESS,
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
            # Each look lists every open task: look less often when there are many.
            time.sleep(0.05 if len(wanted) <= 20 else 0.2)
        raise AssertionError(f"tasks never opened: {len(wanted) - len(found)} missing")

    def events(
        self,
        topic: str,
        until: Callable[[list[Event]], bool],
        timeout: float = 60,
        quiet: float | None = None,
    ) -> list[tuple[int, Event]]:
        """Every event on ``topic`` (read_committed) with its record timestamp, once ``until``
        holds for them and the events that could still be coming are in:

        - ``quiet=None``: the service's task opener has handled every policy decision
          published so far and committed its tasks (``opener_done``), and the topic is
          read to its end. People's actions are written before the API answers, so
          every action answered is in too; what this does not wait for is a timer.
        - ``quiet=S``: nothing new arrived for ``S`` seconds (late repeats would show):
          for the tests whose writers include the timers, or a process of their own.
        """
        name = f"{self.prefix}{topic}"
        reader = LogReader(self.stack.address("KAFKA_BOOTSTRAP_SERVERS"), [name])
        deadline, last_new, seen = time.monotonic() + timeout, time.monotonic(), -1
        found: list[tuple[int, Event]] = []
        try:
            while time.monotonic() < deadline:
                opened = quiet is not None or self.opener_done()
                reader.read_to(reader.ends(), timeout=1)
                found = [
                    (timestamp, self.codec.decode(value))
                    for timestamp, value in reader.records[name]
                ]
                if len(found) != seen:
                    seen, last_new = len(found), time.monotonic()
                    if quiet:
                        continue
                settled = opened if quiet is None else time.monotonic() - last_new >= quiet
                if settled and until([e for _, e in found]):
                    return found
                time.sleep(0.05)
        finally:
            reader.close()
        raise AssertionError(
            f"{topic} never settled (the opener done: {self.opener_done()}): "
            f"{Counter(e.event_type for _, e in found)}"
        )

    def opener_done(self) -> bool:
        """Whether the task opener (the runtime worker, group ``<prefix>review``) has
        committed its offsets at the end of every partition of the policy decisions,
        learnt before: then every task it opens for them is committed too (the offsets
        and its outputs commit in one transaction). Every decision published in these
        worlds needs review, so each of the opener's transactions writes a task (the
        embedded broker keeps no offsets of a transaction that wrote nothing: measured).
        """
        kafka = {"bootstrap.servers": self.stack.address("KAFKA_BOOTSTRAP_SERVERS")}
        name = f"{self.prefix}policy-check"
        ends = end_offsets(kafka, [(name, p) for p in range(PARTITIONS)])
        consumer = Consumer({**kafka, "group.id": f"{self.prefix}review"})
        try:
            committed = consumer.committed(
                [TopicPartition(name, p) for p in range(PARTITIONS)], timeout=10
            )
        finally:
            consumer.close()
        return all(tp.offset >= ends[(name, tp.partition)] for tp in committed)


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
        partitions=PARTITIONS,
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


def decided(order_ids: set[str]) -> Callable[[list[Event]], bool]:
    return lambda events: order_ids <= {e.order_id for e in events if isinstance(e, ReviewDecided)}
