"""Dispatch's world: one test's topics, schema, carrier stand-in and dispatch processes.

Used by the dispatch and replay tests (``world`` is a fixture: a test module
imports it by name), and its orders by the review tests.
"""

from __future__ import annotations

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
    OrderReceived,
    PolicyChecked,
    PolicyOutcome,
)
from tests.support.carrier import CarrierProcess
from tests.support.samples import sample
from tests.support.stack import ROOT, Stack

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


def settled(order_ids: set[str]) -> Callable[[list[Event]], bool]:
    """Every order has its dispatch outcome (executed or failed)."""

    def check(events: list[Event]) -> bool:
        done = {e.order_id for e in events if isinstance(e, DispatchExecuted | DispatchFailed)}
        return order_ids <= done

    return check
