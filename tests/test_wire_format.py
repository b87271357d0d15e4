"""opsflow's wire format is Confluent's: stock serializers and opsflow read each other.

Runs on the session stack: real broker, real registry over HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import (
    Schema,
    SchemaRegistryClient,
    topic_record_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from opsflow.contracts import catalogue
from opsflow.contracts.catalogue import Catalogue
from opsflow.contracts.topics import Topic
from opsflow.contracts.wire import WireCodec
from opsflow.errors import BadInputError, RetryableError
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


def _on_a_subject_of_its_own(event_type: str) -> Catalogue:
    """The repository's contract of ``event_type`` on a topic of its own, so its subject
    starts out empty in the session's registry."""
    contracts = catalogue()
    found = contracts[event_type]
    topic = Topic(f"wire-{uuid.uuid4().hex[:10]}", key=found.topic.key)
    moved = dataclasses.replace(found, topic=topic)
    return Catalogue(contracts.directory, contracts.envelope_schema, [moved])


def _provision(registry_url: str, contracts: Catalogue, event_type: str, versions: int) -> int:
    """Register the first ``versions`` versions of ``event_type``, oldest first, as
    provisioning does (through a client of its own, so the codec's cache knows nothing)."""
    provisioning = SchemaRegistryClient({"url": registry_url})
    found = contracts[event_type]
    ids = [
        provisioning.register_schema(found.subject, Schema(json.dumps(found.versions[n]), "AVRO"))
        for n in range(1, versions + 1)
    ]
    return ids[-1] if ids else 0


def _versions_under(registry_url: str, subject: str) -> list[int]:
    try:
        versions: list[int] = SchemaRegistryClient({"url": registry_url}).get_versions(subject)
    except SchemaRegistryError as err:
        if err.http_status_code != 404:
            raise
        return []
    return versions


def test_without_auto_registration_the_codec_writes_with_the_id_provisioning_registered(
    registry_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCHEMA_REGISTRY_AUTO_REGISTER", "false")
    contracts = _on_a_subject_of_its_own("order.received")
    order = contracts["order.received"]
    latest_id = _provision(registry_url, contracts, "order.received", order.latest_version)
    codec = WireCodec(SchemaRegistryClient({"url": registry_url}), contracts)
    event = sample("order.received")
    value = codec.encode(event)
    assert struct.unpack_from(">bI", value) == (0, latest_id)
    assert codec.decode(value) == event
    assert _versions_under(registry_url, order.subject) == sorted(order.versions)


@pytest.mark.parametrize("provisioned", [0, 1], ids=["no-subject", "only-v1"])
def test_without_auto_registration_an_unprovisioned_schema_fails_and_stays_unregistered(
    registry_url: str, monkeypatch: pytest.MonkeyPatch, provisioned: int
) -> None:
    """A service reading with auto-registration off must not write its schemas itself:
    the error names the subject and says to run provisioning."""
    monkeypatch.setenv("SCHEMA_REGISTRY_AUTO_REGISTER", "false")
    contracts = _on_a_subject_of_its_own("order.received")
    order = contracts["order.received"]
    assert order.latest_version > provisioned, "the subject must lack the latest version"
    _provision(registry_url, contracts, "order.received", provisioned)
    codec = WireCodec(SchemaRegistryClient({"url": registry_url}), contracts)
    with pytest.raises(
        RetryableError, match=rf"subject {re.escape(order.subject)} .*run provisioning"
    ):
        codec.encode(sample("order.received"))
    assert _versions_under(registry_url, order.subject) == list(range(1, provisioned + 1))
