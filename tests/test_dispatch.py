"""dispatch on the real stack: one accepted booking per approved order, even under kill -9.

Each test gets its own topics, database schema and carrier stand-in (a real
HTTP server on loopback, with its bookings in a file so they outlive nothing
but the test). Approvals are published with the producer SDK, as the
policy-check and review steps would write them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.producer import Producer
from opsflow.topics import dead_letter_topic, ensure_topics
from services.contracts import (
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    OrderReceived,
    PolicyChecked,
    PolicyOutcome,
)
from tests.samples import sample
from tests.stackctl import Stack
from tests.test_carrier_sim import CarrierProcess

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ("orders", "policy-check", "review", "dispatch")


@dataclass
class World:
    """One test's topics, schema, carrier and dispatch processes."""

    stack: Stack
    prefix: str
    database_url: str
    carrier: CarrierProcess
    producer: Producer
    codec: WireCodec
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_dispatch(self, **env: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"dispatch-{len(self.processes)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsflow.runtime", "services.dispatch"],
            cwd=ROOT,
            env={
                **self.stack.env,
                **self.stack.addresses(),
                "OPSFLOW_TOPIC_PREFIX": self.prefix,
                "DATABASE_URL": self.database_url,
                "CARRIER_URL": self.carrier.url,
                "DISPATCH_BACKOFF_S": "0.05",
                "DISPATCH_BACKOFF_MAX_S": "0.5",
                "DISPATCH_TIMEOUT_S": "1",
                **env,
            },
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.processes.append(proc)
        return proc

    def approve(self, orders: list[OrderReceived], *, key: str = "policy") -> None:
        """Publish the orders and an auto-approval of each, as policy-check would."""
        self.producer.send_many(orders, idempotency_key=f"orders-{uuid.uuid4().hex}")
        checks = [
            PolicyChecked(
                envelope=PolicyChecked.envelope_for(
                    key=o.order_id,
                    idempotency_key=f"{key}:{o.order_id}",
                    producer="policy-check",
                    caused_by=o.envelope,
                ),
                order_id=o.order_id,
                outcome=PolicyOutcome.AUTO_APPROVED,
                reason_codes=[],
                reasons=[],
                rules_version="v1",
            )
            for o in orders
        ]
        self.producer.send_many(checks)

    def dispatch_events(
        self, until: Callable[[list[Event]], bool], timeout: float = 120
    ) -> list[Event]:
        """Every event on the dispatch topic (read_committed), once ``until`` holds for them
        and nothing new arrived for 3 s (late duplicates would show)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.stack.address("KAFKA_BOOTSTRAP_SERVERS"),
                "group.id": f"check-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "session.timeout.ms": 6000,
            }
        )
        consumer.subscribe([f"{self.prefix}dispatch"])
        events: list[Event] = []
        deadline, last_new = time.monotonic() + timeout, time.monotonic()
        try:
            while time.monotonic() < deadline:
                batch = [m for m in consumer.consume(1000, 0.5) if m.error() is None]
                if batch:
                    last_new = time.monotonic()
                    events += [self.codec.decode(m.value()) for m in batch]
                elif until(events) and time.monotonic() - last_new >= 3:
                    return events
        finally:
            consumer.close()
        raise AssertionError(
            f"dispatch topic never settled: {Counter(e.event_type for e in events)}"
        )

    def bookings(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.carrier.url}/bookings", timeout=10).json())


@pytest.fixture
def world(
    stack: Stack, bootstrap_servers: str, registry_url: str, database_url: str, tmp_path: Path
) -> Iterator[World]:
    prefix = f"dp{uuid.uuid4().hex[:8]}."
    names = [f"{prefix}{t}" for t in TOPICS]
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap_servers}),
        names + [dead_letter_topic(n) for n in names],
        partitions=4,
    )
    db.migrate(database_url)
    carrier = CarrierProcess(
        tmp_path / "carrier.log",
        {
            "CARRIER_DB": str(tmp_path / "carrier.db"),
            # Refusals are answered before anything is booked; 503s and ghosts (booked,
            # then answered 503) make dispatch retry the same key.
            "CARRIER_ERROR_RATE": "0.15",
            "CARRIER_GHOST_RATE": "0.15",
            "CARRIER_REFUSED_COUNTRIES": "KP",
            "CARRIER_SEED": "7",
        },
    ).start()
    producer = Producer(
        "dispatch-tests",
        bootstrap_servers=bootstrap_servers,
        registry_url=registry_url,
        topic_prefix=prefix,
    )
    world = World(
        stack,
        prefix,
        database_url,
        carrier,
        producer,
        WireCodec(SchemaRegistryClient({"url": registry_url})),
        tmp_path,
    )
    yield world
    for proc in world.processes:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    producer.close()
    carrier.stop()


def make_orders(count: int, *, country: str = "DE") -> list[OrderReceived]:
    base = sample("order.received")
    assert isinstance(base, OrderReceived)
    made = []
    for _ in range(count):
        order_id = f"ord-{uuid.uuid4().hex[:12]}"
        made.append(
            base.model_copy(
                update={
                    "order_id": order_id,
                    "envelope": base.envelope.model_copy(
                        update={
                            "event_id": uuid.uuid4(),
                            "idempotency_key": f"order:{order_id}",
                            "correlation_id": order_id,
                        }
                    ),
                    "destination": base.destination.model_copy(update={"country": country}),
                }
            )
        )
    return made


def outcomes(events: list[Event]) -> dict[str, list[Event]]:
    by_order: dict[str, list[Event]] = {}
    for event in events:
        by_order.setdefault(event.order_id, []).append(event)
    return by_order


def settled(order_ids: set[str]) -> Callable[[list[Event]], bool]:
    """Every order has its dispatch outcome (executed or failed)."""

    def check(events: list[Event]) -> bool:
        done = {e.order_id for e in events if isinstance(e, DispatchExecuted | DispatchFailed)}
        return order_ids <= done

    return check


@pytest.mark.process
def test_dispatch_books_every_approved_order_once_at_the_carrier_after_kill_9(
    world: World,
) -> None:
    orders = make_orders(600)
    ids = {o.order_id for o in orders}
    world.approve(orders)
    first = world.start_dispatch()
    # Kill it in the middle of booking: some orders booked, some not yet.
    deadline = time.monotonic() + 90
    while world.bookings()["count"] < 150:
        assert time.monotonic() < deadline, "dispatch booked nothing"
        assert first.poll() is None, (world.logs / "dispatch-0.log").read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert world.bookings()["count"] < len(orders), "killed too late to prove anything"
    world.start_dispatch()

    events = world.dispatch_events(settled(ids))
    per_order = outcomes(events)
    assert set(per_order) == ids
    for order_id, evs in per_order.items():
        kinds = Counter(e.event_type for e in evs)
        assert kinds["dispatch.requested"] == 1, (order_id, kinds)
        assert kinds["dispatch.executed"] + kinds["dispatch.failed"] == 1, (order_id, kinds)
    bookings = world.bookings()
    assert bookings["duplicates"] == []
    booked = Counter(b["order_id"] for b in bookings["bookings"])
    executed = {e.order_id: e for e in events if isinstance(e, DispatchExecuted)}
    failed = [e for e in events if isinstance(e, DispatchFailed)]
    # 5 attempts against 30% faults: about 1 order in 400 runs out of retries.
    assert len(executed) >= len(orders) - 10
    assert all(f.retries_exhausted for f in failed)
    assert all(booked[order_id] == 1 for order_id in executed)
    assert all(booked[order_id] <= 1 for order_id in ids)
    by_reference = {b["booking_reference"]: b for b in bookings["bookings"]}
    requests = {e.order_id: e for e in events if isinstance(e, DispatchRequested)}
    for order_id, done in executed.items():
        booking = by_reference[done.booking_reference]
        assert booking["order_id"] == order_id
        assert booking["idempotency_key"] == requests[order_id].envelope.idempotency_key
        assert done.envelope.causation_id == str(requests[order_id].envelope.event_id)


def test_a_refused_destination_ends_in_dispatch_failed_with_the_carriers_reason(
    world: World,
) -> None:
    refused, fine = make_orders(3, country="KP"), make_orders(3)
    world.approve(refused + fine)
    world.start_dispatch()
    events = world.dispatch_events(settled({o.order_id for o in refused + fine}))
    failed = {e.order_id: e for e in events if isinstance(e, DispatchFailed)}
    assert set(failed) == {o.order_id for o in refused}
    for failure in failed.values():
        assert failure.failure_class is DispatchFailureClass.PERMANENT
        assert not failure.retries_exhausted
        assert "422" in failure.reason and "KP" in failure.reason
    assert {e.order_id for e in events if isinstance(e, DispatchExecuted)} == {
        o.order_id for o in fine
    }


def test_a_carrier_outage_exhausts_retries_into_dispatch_failed_not_silence(
    world: World,
) -> None:
    httpx.put(f"{world.carrier.url}/faults", json={"error_rate": 1.0}, timeout=5)
    orders = make_orders(4)
    world.approve(orders)
    world.start_dispatch(DISPATCH_MAX_ATTEMPTS="3")
    events = world.dispatch_events(settled({o.order_id for o in orders}))
    failed = [e for e in events if isinstance(e, DispatchFailed)]
    assert len(failed) == 4
    assert all(f.retries_exhausted and f.attempt == 3 for f in failed)
    assert all(f.failure_class is DispatchFailureClass.TRANSIENT for f in failed)
    assert world.bookings()["count"] == 0


def test_a_second_approval_of_a_dispatched_order_books_nothing_more(world: World) -> None:
    orders = make_orders(5)
    world.approve(orders)
    world.start_dispatch()
    ids = {o.order_id for o in orders}
    world.dispatch_events(settled(ids))
    # The same orders approved again under other keys (a duplicate submission).
    world.approve(orders, key="again")
    time.sleep(5)
    events = world.dispatch_events(settled(ids))
    assert Counter(e.event_type for e in events)["dispatch.requested"] == 5
    assert world.bookings()["count"] == 5


@pytest.mark.process
def test_a_clean_stop_closes_the_carrier_client_and_the_pool_so_nothing_is_reported_at_exit(
    world: World,
) -> None:
    orders = make_orders(3)
    world.approve(orders)
    proc = world.start_dispatch()
    world.dispatch_events(settled({o.order_id for o in orders}))  # the carrier was called
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    output = (world.logs / "dispatch-0.log").read_text()  # its stdout and stderr
    assert '"message": "stopped"' in output, output[-3000:]
    leaks = ("Unclosed", "Task was destroyed", "Event loop is closed", "Traceback")
    assert [line for line in output.splitlines() if any(w in line for w in leaks)] == []
