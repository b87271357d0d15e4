"""The producer SDK (``opsflow.producer``) on the real stack: it waits for the broker,
builds every envelope by the same rules, and fails clearly.

Each test writes to topics of its own (a fresh prefix) on the session's broker
and registry, with the SDK's idempotent producer (the test stack's broker keeps
its log in memory; see the README for the durable store).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pydantic
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts.wire import WireCodec
from opsflow.errors import ConfigurationError
from opsflow.producer import (
    EventBody,
    EventRejected,
    Producer,
    body_model,
    event_id_for,
)
from services.contracts import OrderReceived
from tests.support.samples import sample
from tests.support.stack import Stack
from tests.support.topics import fresh_topics, records_on

NOW = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def order_body(order_id: str | None = None, **changes: object) -> EventBody:
    """A realistic order body (the sample order minus its envelope) with a fresh id."""
    data = sample("order.received").model_dump(exclude={"envelope"})
    data.update(order_id=order_id or f"ord-{uuid.uuid4().hex[:12]}", **changes)
    return body_model(OrderReceived)(**data)


@dataclass
class Sdk:
    bootstrap: str
    registry_url: str
    prefix: str
    codec: WireCodec

    def producer(self, name: str = "shop-sdk", **options: object) -> Producer:
        return Producer(
            name,
            bootstrap_servers=self.bootstrap,
            registry_url=self.registry_url,
            topic_prefix=self.prefix,
            **options,  # type: ignore[arg-type]
        )

    @property
    def orders(self) -> str:
        return f"{self.prefix}orders"


@pytest.fixture
def sdk(stack: Stack, bootstrap_servers: str, registry_url: str) -> Iterator[Sdk]:
    yield Sdk(
        bootstrap_servers,
        registry_url,
        fresh_topics(bootstrap_servers, "sdk"),
        WireCodec(SchemaRegistryClient({"url": registry_url})),
    )


def test_send_returns_after_the_broker_acknowledged_with_the_envelope_built_by_the_rules(
    sdk: Sdk,
) -> None:
    body = order_body()
    with sdk.producer(clock=lambda: NOW) as producer:
        report = producer.send(body, idempotency_key="checkout-41")

    assert report.topic == sdk.orders
    assert report.event_id == event_id_for("shop-sdk", "checkout-41")
    assert report.idempotency_key == "checkout-41"
    (record,) = records_on(sdk.bootstrap, sdk.orders, keys=[body.order_id])
    assert (record.partition(), record.offset()) == (report.partition, report.offset)
    event = sdk.codec.decode(record.value())
    assert isinstance(event, OrderReceived)
    assert event.model_dump(exclude={"envelope"}) == body.model_dump()
    envelope = event.envelope
    assert envelope.producer == "shop-sdk"
    assert envelope.correlation_id == body.order_id
    assert envelope.idempotency_key == "checkout-41"
    assert envelope.event_id == report.event_id
    assert envelope.occurred_at == NOW
    assert envelope.causation_id is None
    assert envelope.contract_version == OrderReceived.contract_version


def test_a_retry_with_the_same_key_writes_a_record_with_the_same_event_id(sdk: Sdk) -> None:
    body = order_body()
    with sdk.producer() as producer:
        first = producer.send(body, idempotency_key="retry-me")
        again = producer.send(body, idempotency_key="retry-me")
        other = producer.send(body)

    assert again.event_id == first.event_id and again.offset != first.offset
    assert other.event_id != first.event_id and len(other.idempotency_key) == 32
    records = records_on(sdk.bootstrap, sdk.orders, keys=[body.order_id])
    ids = [sdk.codec.decode(r.value()).envelope.event_id for r in records]
    assert sorted(map(str, ids)) == sorted(map(str, [first.event_id] * 2 + [other.event_id]))


def test_send_many_keys_each_event_by_its_index_and_returns_every_report(sdk: Sdk) -> None:
    bodies = [order_body() for _ in range(200)]
    # An event with its envelope (the review desk's, which may write it) goes as it is.
    review = sample("review.claimed")
    with sdk.producer() as producer:
        reports = producer.send_many([*bodies, review], idempotency_key="batch-7")

    assert [r.idempotency_key for r in reports[:200]] == [f"batch-7#{i}" for i in range(200)]
    assert reports[-1].idempotency_key == review.envelope.idempotency_key
    assert len({r.event_id for r in reports}) == 201
    assert reports[-1].topic == f"{sdk.prefix}review" and reports[-1].event_type == "review.claimed"
    records = records_on(sdk.bootstrap, sdk.orders, keys=[b.order_id for b in bodies])
    assert len(records) == 200
    written = {(r.partition(), r.offset()) for r in records}
    assert written == {(r.partition, r.offset) for r in reports[:200]}


def test_the_producer_is_idempotent_unless_told_otherwise(
    sdk: Sdk, monkeypatch: pytest.MonkeyPatch
) -> None:
    with sdk.producer() as producer:
        assert producer.config["enable.idempotence"] is True
        assert producer.config["acks"] == "all"
        producer.send(order_body())  # the test stack's broker takes idempotent producers
    with sdk.producer(idempotence=False) as producer:
        assert producer.config["enable.idempotence"] is False
        producer.send(order_body())
    monkeypatch.setenv("KAFKA_ENABLE_IDEMPOTENCE", "false")
    with sdk.producer() as producer:
        assert producer.config["enable.idempotence"] == "false"


def test_an_event_with_its_own_envelope_is_sent_as_it_is(sdk: Sdk) -> None:
    event = sample("pod.captured")
    with sdk.producer() as producer:
        report = producer.send(event)

    assert report.event_id == event.envelope.event_id
    (record,) = [
        r
        for r in records_on(sdk.bootstrap, f"{sdk.prefix}pod")
        if (r.partition(), r.offset()) == (report.partition, report.offset)
    ]
    assert sdk.codec.decode(record.value()) == event


def test_an_event_that_cannot_be_encoded_fails_the_call_before_anything_is_written(
    sdk: Sdk,
) -> None:
    lone_surrogate = "Grace \ud800 Hopper"  # not Unicode text: no UTF-8 for it
    with pytest.raises(pydantic.ValidationError) as invalid:
        order_body(customer_name=lone_surrogate)
    assert invalid.value.errors()[0]["loc"] == ("customer_name",)
    # Built without validation (model_copy does not validate), the SDK still refuses it.
    good = order_body()
    bad = order_body().model_copy(update={"customer_name": lone_surrogate})
    with sdk.producer() as producer, pytest.raises(EventRejected) as refused:
        producer.send_many([good, bad])

    assert (refused.value.index, refused.value.field) == (1, "customer_name")
    assert records_on(sdk.bootstrap, sdk.orders, keys=[good.order_id]) == []


@pytest.mark.process
def test_an_unreachable_broker_is_one_error_naming_the_address_and_the_variable(
    registry_url: str,
) -> None:
    with pytest.raises(ConfigurationError) as failed:
        Producer(
            "shop-sdk",
            bootstrap_servers="127.0.0.1:1",
            registry_url=registry_url,
            connect_timeout=1.0,
        )

    assert failed.value.variable == "KAFKA_BOOTSTRAP_SERVERS"
    assert "127.0.0.1:1" in str(failed.value)


def test_missing_settings_name_the_variable_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    with pytest.raises(ConfigurationError) as failed:
        Producer("shop-sdk", registry_url="http://127.0.0.1:1")
    assert failed.value.variable == "KAFKA_BOOTSTRAP_SERVERS"

    monkeypatch.delenv("SCHEMA_REGISTRY_URL", raising=False)
    with pytest.raises(ConfigurationError) as failed:
        Producer("shop-sdk", bootstrap_servers="127.0.0.1:1")
    assert failed.value.variable == "SCHEMA_REGISTRY_URL"
