"""opsflow's schema registry against Confluent's contract.

The official confluent-kafka client and Avro serde must work against it
unchanged, and raw HTTP calls must see Confluent's status codes, error codes
and JSON shapes. Every test runs on the real registry process and PostgreSQL
of the ``registry_url`` fixture, on subjects of its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from confluent_kafka.schema_registry import (
    Schema,
    SchemaRegistryClient,
    topic_record_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
LEVELS = [
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
]


def record(*fields: dict[str, Any], name: str = "Order") -> str:
    """An Avro record schema as JSON text."""
    return json.dumps(
        {"type": "record", "name": name, "namespace": "opsflow.test", "fields": list(fields)}
    )


def field(name: str, type_: Any = "int", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


V1 = record(field("a"))
V2 = record(field("a"), field("b", "string", default="x"))


def unique(prefix: str = "subject") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def http(registry_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry_url, timeout=10) as client:
        yield client


@pytest.fixture
def client(registry_url: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry_url})


def register(http: httpx.Client, subject: str, schema: str, **body: Any) -> httpx.Response:
    return http.post(f"/subjects/{subject}/versions", json={"schema": schema, **body})


def assert_error(response: httpx.Response, status: int, error_code: int) -> str:
    """Check Confluent's error shape and return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error_code", "message"}
    assert body["error_code"] == error_code
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"])


# -- the official client ----------------------------------------------------------


def test_official_client_registers_and_reads_back_schemas(client: SchemaRegistryClient) -> None:
    subject = unique()
    first = client.register_schema(subject, Schema(V1, "AVRO"))
    second = client.register_schema(subject, Schema(V2, "AVRO"))
    assert first != second

    assert json.loads(client.get_schema(first).schema_str) == json.loads(V1)
    latest = client.get_latest_version(subject)
    assert (latest.subject, latest.version, latest.schema_id) == (subject, 2, second)
    assert latest.schema.schema_type == "AVRO"
    assert json.loads(latest.schema.schema_str) == json.loads(V2)
    version_one = client.get_version(subject, 1)
    assert (version_one.version, version_one.schema_id) == (1, first)
    found = client.lookup_schema(subject, Schema(V1, "AVRO"))
    assert (found.subject, found.version, found.schema_id) == (subject, 1, first)
    assert subject in client.get_subjects()
    assert client.get_versions(subject) == [1, 2]
    assert client.get_schema_types() == ["AVRO"]
    # An id belongs to the schema, so other subjects that registered the same schema
    # (other tests on this registry) are listed with it too.
    versions = client.get_schema_versions(second)
    assert (subject, 2) in [(v.subject, v.version) for v in versions]
    assert (subject, 1) not in [(v.subject, v.version) for v in versions]


def test_official_client_deletes_softly_then_permanently(client: SchemaRegistryClient) -> None:
    subject = unique()
    client.register_schema(subject, Schema(V1, "AVRO"))
    client.register_schema(subject, Schema(V2, "AVRO"))

    assert client.delete_version(subject, 2) == 2
    assert client.get_versions(subject) == [1]
    assert client.delete_version(subject, 2, permanent=True) == 2
    assert client.get_versions(subject, deleted=True) == [1]

    assert client.delete_subject(subject) == [1]
    assert subject not in client.get_subjects()
    assert subject in client.get_subjects(deleted=True)
    assert client.delete_subject(subject, permanent=True) == [1]
    assert subject not in client.get_subjects(deleted=True)
    with pytest.raises(SchemaRegistryError) as err:
        client.get_versions(subject)
    assert (err.value.http_status_code, err.value.error_code) == (404, 40401)


def test_official_client_tests_compatibility_and_sets_levels(
    client: SchemaRegistryClient,
) -> None:
    subject = unique()
    client.register_schema(subject, Schema(V1, "AVRO"))
    breaking = Schema(record(field("c")), "AVRO")

    assert client.test_compatibility(subject, Schema(V2, "AVRO")) is True
    assert client.test_compatibility(subject, breaking, version=1) is False
    assert client.test_compatibility_all_versions(subject, breaking) is False

    assert client.get_compatibility() == "BACKWARD"
    assert client.set_compatibility(subject, "none") == {"compatibility": "NONE"}
    assert client.get_compatibility(subject) == "NONE"
    assert client.test_compatibility(subject, breaking) is True
    assert client.register_schema(subject, breaking) > 0


def test_avro_serde_round_trip_with_topic_record_subject_strategy(
    client: SchemaRegistryClient,
) -> None:
    topic = unique("orders")
    schema = record(field("id", "string"), field("qty"), name="OrderPlaced")
    serializer = AvroSerializer(
        client, schema, conf={"subject.name.strategy": topic_record_subject_name_strategy}
    )
    deserializer = AvroDeserializer(client)
    context = SerializationContext(topic, MessageField.VALUE)
    value = {"id": "o-1", "qty": 3}

    framed = serializer(value, context)

    assert framed is not None and framed[0] == 0  # Confluent's magic byte
    assert deserializer(framed, context) == value
    # A fresh client reads the schema back by id, as a consumer elsewhere would.
    assert AvroDeserializer(SchemaRegistryClient(client.config()))(framed, context) == value
    assert client.get_subjects(subject_prefix=topic) == [f"{topic}-opsflow.test.OrderPlaced"]


# -- ids and versions ---------------------------------------------------------------


def test_same_schema_under_two_subjects_gets_the_same_id(http: httpx.Client) -> None:
    spaced = json.dumps(json.loads(V1), indent=4)
    first = register(http, unique(), V1).json()["id"]
    second = register(http, unique(), spaced).json()["id"]
    assert first == second
    # The text comes back as first registered, not normalized.
    assert http.get(f"/schemas/ids/{first}").json() == {"schema": V1}


def test_reregistering_a_schema_returns_its_id_without_a_new_version(
    http: httpx.Client,
) -> None:
    subject = unique()
    first = register(http, subject, V1).json()
    again = register(http, subject, V1, schemaType="AVRO", references=[]).json()
    assert first == again
    assert set(first) == {"id"}
    assert http.get(f"/subjects/{subject}/versions").json() == [1]


def test_concurrent_registrations_of_one_schema_get_one_id(http: httpx.Client) -> None:
    schema = record(field(f"f{uuid.uuid4().hex}"))
    shared = unique()
    subjects = [shared] * 6 + [unique() for _ in range(6)]
    with ThreadPoolExecutor(len(subjects)) as pool:
        responses = list(pool.map(lambda s: register(http, s, schema), subjects))
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["id"] for r in responses}) == 1
    assert http.get(f"/subjects/{shared}/versions").json() == [1]


def test_schema_by_id_omits_schema_type_and_lists_its_versions(http: httpx.Client) -> None:
    a, b = unique(), unique()
    schema_id = register(http, a, V1).json()["id"]
    register(http, b, V1)
    response = http.get(f"/schemas/ids/{schema_id}")
    assert response.json() == {"schema": V1}
    uses = http.get(f"/schemas/ids/{schema_id}/versions").json()
    assert {"subject": a, "version": 1} in uses
    assert {"subject": b, "version": 1} in uses


def test_version_and_raw_schema_have_confluent_shapes(http: httpx.Client) -> None:
    subject = unique()
    schema_id = register(http, subject, V1).json()["id"]
    response = http.get(f"/subjects/{subject}/versions/latest")
    assert response.headers["content-type"].startswith(MEDIA_TYPE)
    assert response.json() == {"subject": subject, "version": 1, "id": schema_id, "schema": V1}
    assert http.get(f"/subjects/{subject}/versions/1/schema").text == V1
    assert http.get("/").json() == {}
    assert http.get("/schemas/types").json() == ["AVRO"]


def test_lookup_returns_subject_id_version_and_schema(http: httpx.Client) -> None:
    subject = unique()
    schema_id = register(http, subject, V1).json()["id"]
    spaced = json.dumps(json.loads(V1), indent=2)
    found = http.post(f"/subjects/{subject}", json={"schema": spaced}).json()
    assert found == {"subject": subject, "version": 1, "id": schema_id, "schema": V1}


def test_soft_deleted_subject_is_listed_only_with_deleted_true(http: httpx.Client) -> None:
    subject = unique()
    register(http, subject, V1)
    assert http.delete(f"/subjects/{subject}").json() == [1]
    assert subject not in http.get("/subjects").json()
    assert subject in http.get("/subjects", params={"deleted": "true"}).json()
    assert_error(http.get(f"/subjects/{subject}/versions/1"), 404, 40401)
    found = http.get(f"/subjects/{subject}/versions/1", params={"deleted": "true"})
    assert found.json()["version"] == 1
    # Registering again continues the version numbers.
    register(http, subject, V2)
    assert http.get(f"/subjects/{subject}/versions").json() == [2]


# -- errors -------------------------------------------------------------------------


def test_unknown_subject_is_40401(http: httpx.Client) -> None:
    subject = unique()
    assert_error(http.get(f"/subjects/{subject}/versions"), 404, 40401)
    assert_error(http.get(f"/subjects/{subject}/versions/latest"), 404, 40401)
    assert_error(http.post(f"/subjects/{subject}", json={"schema": V1}), 404, 40401)
    assert_error(http.delete(f"/subjects/{subject}"), 404, 40401)
    assert_error(http.delete(f"/subjects/{subject}/versions/1"), 404, 40401)


def test_unknown_version_is_40402(http: httpx.Client) -> None:
    subject = unique()
    register(http, subject, V1)
    assert_error(http.get(f"/subjects/{subject}/versions/7"), 404, 40402)
    assert_error(http.delete(f"/subjects/{subject}/versions/7"), 404, 40402)
    compat = http.post(f"/compatibility/subjects/{subject}/versions/7", json={"schema": V2})
    assert_error(compat, 404, 40402)


def test_unknown_schema_is_40403(http: httpx.Client) -> None:
    subject = unique()
    register(http, subject, V1)
    assert_error(http.post(f"/subjects/{subject}", json={"schema": V2}), 404, 40403)
    assert_error(http.get("/schemas/ids/2147483647"), 404, 40403)
    assert_error(http.get("/schemas/ids/2147483647/versions"), 404, 40403)


def test_permanent_delete_needs_a_soft_delete_first(http: httpx.Client) -> None:
    subject = unique()
    register(http, subject, V1)
    register(http, subject, V2)
    permanent = {"permanent": "true"}
    assert_error(http.delete(f"/subjects/{subject}/versions/2", params=permanent), 404, 40407)
    assert_error(http.delete(f"/subjects/{subject}", params=permanent), 404, 40405)

    assert http.delete(f"/subjects/{subject}/versions/2").json() == 2
    assert_error(http.delete(f"/subjects/{subject}/versions/2"), 404, 40406)
    assert http.delete(f"/subjects/{subject}/versions/2", params=permanent).json() == 2
    assert http.delete(f"/subjects/{subject}").json() == [1]
    assert_error(http.delete(f"/subjects/{subject}"), 404, 40404)
    assert http.delete(f"/subjects/{subject}", params=permanent).json() == [1]
    assert_error(http.get(f"/subjects/{subject}/versions", params={"deleted": "true"}), 404, 40401)


def test_schema_id_disappears_when_its_last_version_is_permanently_deleted(
    http: httpx.Client,
) -> None:
    subject = unique()
    schema_id = register(http, subject, record(field(f"f{uuid.uuid4().hex}"))).json()["id"]
    http.delete(f"/subjects/{subject}")
    assert http.get(f"/schemas/ids/{schema_id}").status_code == 200
    http.delete(f"/subjects/{subject}", params={"permanent": "true"})
    assert_error(http.get(f"/schemas/ids/{schema_id}"), 404, 40403)


def test_subject_without_its_own_level_is_40408_unless_default_to_global(
    http: httpx.Client,
) -> None:
    subject = unique()
    assert_error(http.get(f"/config/{subject}"), 404, 40408)
    response = http.get(f"/config/{subject}", params={"defaultToGlobal": "true"})
    assert response.json() == {"compatibilityLevel": "BACKWARD"}


@pytest.mark.parametrize(
    "schema",
    [
        '{"type": "nope"}',
        '{"type": "record", "name": "R"}',
        "{not json",
        "",
    ],
)
def test_invalid_avro_is_refused_with_42201(http: httpx.Client, schema: str) -> None:
    assert_error(register(http, unique(), schema), 422, 42201)


@pytest.mark.parametrize("schema_type", ["JSON", "PROTOBUF"])
def test_non_avro_schema_types_are_refused_with_42201(http: httpx.Client, schema_type: str) -> None:
    message = assert_error(register(http, unique(), "{}", schemaType=schema_type), 422, 42201)
    assert schema_type in message and "AVRO" in message


def test_schema_references_are_refused_with_42201(http: httpx.Client) -> None:
    reference = {"name": "opsflow.test.Other", "subject": "other", "version": 1}
    assert_error(register(http, unique(), V1, references=[reference]), 422, 42201)


@pytest.mark.parametrize("version", ["0", "-2", "abc", "2147483648"])
def test_invalid_version_is_42202(http: httpx.Client, version: str) -> None:
    subject = unique()
    register(http, subject, V1)
    assert_error(http.get(f"/subjects/{subject}/versions/{version}"), 422, 42202)
    assert_error(http.delete(f"/subjects/{subject}/versions/{version}"), 422, 42202)


def test_invalid_compatibility_level_is_42203(http: httpx.Client) -> None:
    subject = unique()
    assert_error(http.put(f"/config/{subject}", json={"compatibility": "SIDEWAYS"}), 422, 42203)
    assert_error(http.put("/config", json={"compatibility": "SIDEWAYS"}), 422, 42203)


# -- compatibility ------------------------------------------------------------------


def test_incompatible_schema_is_refused_with_409(http: httpx.Client) -> None:
    subject = unique()
    register(http, subject, V1)
    # A new field without a default cannot read data written before it existed.
    breaking = record(field("a"), field("z", "string"))
    message = assert_error(register(http, subject, breaking), 409, 409)
    assert subject in message and "BACKWARD" in message
    assert http.get(f"/subjects/{subject}/versions").json() == [1]


def test_transitive_level_checks_every_earlier_version(http: httpx.Client) -> None:
    subject = unique()
    register(http, subject, V1)
    register(http, subject, V2)
    # Reads V2 data (b is there) but not V1 data (b is not, and has no default).
    only_b = record(field("b", "string"))
    http.put(f"/config/{subject}", json={"compatibility": "BACKWARD_TRANSITIVE"})

    latest = http.post(
        f"/compatibility/subjects/{subject}/versions/latest", json={"schema": only_b}
    )
    assert latest.json() == {"is_compatible": True}
    every = http.post(
        f"/compatibility/subjects/{subject}/versions",
        params={"verbose": "true"},
        json={"schema": only_b},
    ).json()
    assert every["is_compatible"] is False and every["messages"]
    assert_error(register(http, subject, only_b), 409, 409)

    http.put(f"/config/{subject}", json={"compatibility": "BACKWARD"})
    assert register(http, subject, only_b).status_code == 200


def test_verbose_compatibility_check_lists_messages(http: httpx.Client) -> None:
    subject = unique()
    register(http, subject, V1)
    url = f"/compatibility/subjects/{subject}/versions/1"
    verbose = {"verbose": "true"}
    fine = http.post(url, params=verbose, json={"schema": V2}).json()
    assert fine == {"is_compatible": True, "messages": []}
    bad = http.post(url, params=verbose, json={"schema": record(field("a", "string"))}).json()
    assert bad["is_compatible"] is False and len(bad["messages"]) >= 1
    invalid = http.post(url, params=verbose, json={"schema": '{"type": "nope"}'}).json()
    assert invalid["is_compatible"] is False
    assert_error(http.post(url, json={"schema": '{"type": "nope"}'}), 422, 42201)


def test_compatibility_check_on_a_new_subject_is_compatible(http: httpx.Client) -> None:
    response = http.post(f"/compatibility/subjects/{unique()}/versions/latest", json={"schema": V1})
    assert response.json() == {"is_compatible": True}


# -- configuration ------------------------------------------------------------------


def test_every_level_can_be_set_and_read_per_subject(http: httpx.Client) -> None:
    subject = unique()
    for level in LEVELS:
        response = http.put(f"/config/{subject}", json={"compatibility": level.lower()})
        assert response.json() == {"compatibility": level}
        assert http.get(f"/config/{subject}").json() == {"compatibilityLevel": level}


def test_deleting_a_subject_level_falls_back_to_the_global_one(http: httpx.Client) -> None:
    subject = unique()
    assert_error(http.delete(f"/config/{subject}"), 404, 40401)
    http.put(f"/config/{subject}", json={"compatibility": "FULL"})
    assert http.delete(f"/config/{subject}").json() == {"compatibilityLevel": "FULL"}
    assert_error(http.get(f"/config/{subject}"), 404, 40408)


def test_global_level_applies_to_subjects_without_their_own(http: httpx.Client) -> None:
    subject = unique()
    register(http, subject, V1)
    assert http.get("/config").json() == {"compatibilityLevel": "BACKWARD"}
    try:
        assert http.put("/config", json={"compatibility": "NONE"}).json() == {
            "compatibility": "NONE"
        }
        assert http.get(f"/config/{subject}", params={"defaultToGlobal": "true"}).json() == {
            "compatibilityLevel": "NONE"
        }
        assert register(http, subject, record(field("c", "string"))).status_code == 200
    finally:
        http.delete("/config")
    assert http.get("/config").json() == {"compatibilityLevel": "BACKWARD"}
