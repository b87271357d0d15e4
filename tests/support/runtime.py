"""A runtime service (the one-hop ``tests.services.relay`` unless told) as a real process,
in topics of its own, and the orders it is fed.

Used by the runtime, dead-letter and policy-check tests.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts.wire import WireCodec
from opsflow.topics import ensure_topics
from services.contracts import OrderReceived
from tests.support.samples import sample
from tests.support.stack import ROOT, Stack


@dataclass
class Topics:
    prefix: str
    bootstrap: str
    codec: WireCodec

    @property
    def orders(self) -> str:
        return f"{self.prefix}orders"

    @property
    def checks(self) -> str:
        return f"{self.prefix}policy-check"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}orders.dlq"


def make_topics(bootstrap: str, registry_url: str) -> Topics:
    """Fresh topics for one test: its own prefix on the given cluster."""
    prefix = f"rt{uuid.uuid4().hex[:8]}."
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}),
        [f"{prefix}orders", f"{prefix}orders.dlq", f"{prefix}policy-check"],
        partitions=4,
    )
    return Topics(prefix, bootstrap, WireCodec(SchemaRegistryClient({"url": registry_url})))


def orders(count: int, *, notes: dict[int, str] | None = None) -> list[OrderReceived]:
    base = sample("order.received")
    assert isinstance(base, OrderReceived)
    made = []
    for i in range(count):
        order_id = f"ord-{uuid.uuid4().hex[:12]}"
        envelope = base.envelope.model_copy(
            update={
                "event_id": uuid.uuid4(),
                "idempotency_key": f"order:{order_id}",
                "correlation_id": order_id,
            }
        )
        made.append(
            base.model_copy(
                update={"envelope": envelope, "order_id": order_id, "notes": (notes or {}).get(i)}
            )
        )
    return made


def publish(
    topics: Topics,
    events: list[OrderReceived],
    raw: Sequence[bytes] = (),
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    producer = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 10})
    for event in events:
        producer.produce(
            topics.orders,
            key=event.order_id.encode(),
            value=topics.codec.encode(event),
            headers=headers,
        )
    for value in raw:
        producer.produce(topics.orders, key=b"poison", value=value)
    assert producer.flush(30) == 0


class ServiceProcess:
    """One instance of a runtime service (the relay unless told), as a real process."""

    def __init__(
        self,
        stack: Stack,
        topics: Topics,
        log: Path,
        *,
        target: str = "tests.services.relay",
        stack_env: dict[str, str] | None = None,
        **env_extra: str,
    ) -> None:
        self.log = log
        env = {
            **stack.env,
            **(stack.addresses() if stack_env is None else stack_env),
            "OPSFLOW_TOPIC_PREFIX": topics.prefix,
            **env_extra,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opsflow.runtime", target],
            cwd=ROOT,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start(
    started: list[ServiceProcess], stack: Stack, topics: Topics, tmp_path: Path, **env: str
) -> ServiceProcess:
    service = ServiceProcess(stack, topics, tmp_path / f"service-{len(started)}.log", **env)
    started.append(service)
    return service
