"""opsflow's wire format is Confluent's: stock serializers and opsflow read each other.

Runs on the session stack: real broker, real registry over HTTP.
"""

from __future__ import annotations

import json
import struct
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from opsflow.contracts import catalogue
from opsflow.contracts.wire import WireCodec
from opsflow.errors import BadInputError
from services.contracts import MODELS, OrderReceived
from tests.support.runtime import settled_records
from tests.support.samples import sample


@pytest.fixture(scope="module")
def registry(registry_url: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry_url})


def _round_trip_through_broker(bootstrap: str, values: list[bytes]) -> list[bytes]:
    """``values`` written to a new topic (one key: one partition, in order) and read back,
    by assignment (no consumer group to join)."""
    topic = f"wire-{uuid.uuid4().hex[:10]}"
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for value in values:
        producer.produce(topic, key=b"ord-1", value=value)
    assert producer.flush(30) == 0
    return [m.value() or b"" for m in settled_records(bootstrap, topic)]


def test_stock_deserializer_reads_every_event_type_opsflow_wrote(
    registry: SchemaRegistryClient, bootstrap_servers: str
) -> None:
    codec = WireCodec(registry)
    events = [sample(name) for name in MODELS]
    received = _round_trip_through_broker(bootstrap_servers, [codec.encode(e) for e in events])
    stock = AvroDeserializer(registry)
    for event, value in zip(events, received, strict=True):
        ctx = SerializationContext(str(catalogue()[event.event_type].topic), MessageField.VALUE)
        datum = stock(value, ctx)
        assert type(event).from_avro(datum) == event


def test_opsflow_reads_every_event_type_a_stock_serializer_wrote(
    registry: SchemaRegistryClient, bootstrap_servers: str
) -> None:
    events = [sample(name) for name in MODELS]
    values = []
    for event in events:
        event_type = catalogue()[event.event_type]
        serializer = AvroSerializer(
            registry,
            json.dumps(event_type.latest_schema),
            conf={"subject.name.strategy": topic_record_subject_name_strategy},
        )
        ctx = SerializationContext(str(event_type.topic), MessageField.VALUE)
        values.append(serializer(event.to_avro(), ctx))
    received = _round_trip_through_broker(bootstrap_servers, values)
    codec = WireCodec(registry)
    assert [codec.decode(value) for value in received] == events


def test_a_record_written_with_v1_decodes_into_the_latest_model(
    registry: SchemaRegistryClient,
) -> None:
    order_type = catalogue()["order.received"]
    v1 = order_type.versions[1]
    event = sample("order.received")
    datum = {k: v for k, v in event.to_avro().items() if k != "sales_channel"}
    serializer = AvroSerializer(
        registry, json.dumps(v1), conf={"subject.name.strategy": topic_record_subject_name_strategy}
    )
    value = serializer(datum, SerializationContext("orders", MessageField.VALUE))
    decoded = WireCodec(registry).decode(value)
    assert isinstance(decoded, OrderReceived)
    assert decoded.sales_channel is None
    assert decoded.model_dump(exclude={"sales_channel"}) == event.model_dump(
        exclude={"sales_channel"}
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"", "not Confluent-framed"),
        (b"\x01\x00\x00\x00\x01abc", "not the magic byte 0"),
        (struct.pack(">bI", 0, 987_654_321) + b"\x02", "unknown schema id 987654321"),
    ],
)
def test_undecodable_values_are_bad_input_naming_the_problem(
    registry: SchemaRegistryClient, value: bytes, problem: str
) -> None:
    with pytest.raises(BadInputError, match=problem):
        WireCodec(registry).decode(value)


def test_a_truncated_body_is_bad_input(registry: SchemaRegistryClient) -> None:
    codec = WireCodec(registry)
    value = codec.encode(sample("order.received"))
    with pytest.raises(BadInputError, match=r"order\.received body does not match"):
        codec.decode(value[:20])
