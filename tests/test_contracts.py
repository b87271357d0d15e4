"""The event contracts: schemas and models agree, round-trip, and only evolve compatibly.

The schemas in ``schemas/`` are the contract and the topics are the replay source,
so these tests check (without Kafka or a database) that the Python models are an
exact mirror of the latest schemas, that events survive the wire unchanged, and
that every record ever written stays readable by the newest schema.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fastavro
import pydantic
import pytest

from opsflow.application import load_application
from opsflow.compatibility import CompatibilityLevel
from opsflow.contracts import (
    ENVELOPE_FILE,
    SCHEMAS_DIR_VARIABLE,
    AvroRecord,
    Envelope,
    catalogue,
    check_evolution,
    load_catalogue,
    schemas_dir,
)
from opsflow.contracts.lineage import EVENT_ID_NAMESPACE, caused_by, derived_event_id
from opsflow.contracts.mirror import avro_shape, flatten, mismatches, model_shape
from opsflow.errors import BadInputError
from services.contracts import (
    DISPATCH,
    MODELS,
    ORDERS,
    POD,
    POD_REJECTS,
    POLICY_CHECK,
    REVIEW,
    CustomerRiskTier,
    OrderReceived,
    ReviewRequested,
    ReviewSlaBreached,
)
from tests.support.samples import ORDER, envelope, sample

SCHEMAS = schemas_dir()
CATALOGUE = load_catalogue(SCHEMAS)
ENVELOPE_SCHEMA = json.loads(ENVELOPE_FILE.read_text())
NAMESPACE = "opsflow.events"


def walk_named(schema: Any) -> Iterator[dict[str, Any]]:
    """Every named type (record, enum) defined in a schema, outermost first."""
    if isinstance(schema, list):
        for branch in schema:
            yield from walk_named(branch)
    elif isinstance(schema, dict):
        if schema["type"] in ("record", "enum"):
            yield schema
        if schema["type"] == "record":
            for field in schema["fields"]:
                yield from walk_named(field["type"])
        elif schema["type"] == "array":
            yield from walk_named(schema["items"])


def walk_fields(schema: Any) -> Iterator[dict[str, Any]]:
    """Every field of every record defined in a schema."""
    for named in walk_named(schema):
        if named["type"] == "record":
            yield from named["fields"]


ALL_VERSIONS = [
    pytest.param(et.versions[n], id=f"{name}-v{n}")
    for name, et in CATALOGUE.items()
    for n in et.versions
]
OLDER_VERSIONS = [
    pytest.param(name, n, id=f"{name}-v{n}")
    for name, et in CATALOGUE.items()
    for n in et.versions
    if n < et.latest_version
]


def optional_fields(model: type[AvroRecord]) -> list[str]:
    return [name for name, info in model.model_fields.items() if not info.is_required()]


def encode(schema: dict[str, Any], datum: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), datum)
    return buffer.getvalue()


def decode(data: bytes, writer: dict[str, Any], reader: dict[str, Any]) -> Any:
    return fastavro.schemaless_reader(
        io.BytesIO(data), fastavro.parse_schema(writer), fastavro.parse_schema(reader)
    )


# --- the catalogue and the topic contract ------------------------------------------------


def test_catalogue_routes_each_event_type_to_its_step_topic_and_record_name_subject() -> None:
    table = {name: (et.topic, et.record_name, et.subject) for name, et in CATALOGUE.items()}
    ev = "opsflow.events"
    assert table == {
        "order.received": (ORDERS, f"{ev}.OrderReceived", f"orders-{ev}.OrderReceived"),
        "policy.checked": (
            POLICY_CHECK,
            f"{ev}.PolicyChecked",
            f"policy-check-{ev}.PolicyChecked",
        ),
        "review.requested": (
            REVIEW,
            f"{ev}.ReviewRequested",
            f"review-{ev}.ReviewRequested",
        ),
        "review.claimed": (REVIEW, f"{ev}.ReviewClaimed", f"review-{ev}.ReviewClaimed"),
        "review.released": (REVIEW, f"{ev}.ReviewReleased", f"review-{ev}.ReviewReleased"),
        "review.decided": (REVIEW, f"{ev}.ReviewDecided", f"review-{ev}.ReviewDecided"),
        "review.escalated": (
            REVIEW,
            f"{ev}.ReviewEscalated",
            f"review-{ev}.ReviewEscalated",
        ),
        "review.sla_breached": (
            REVIEW,
            f"{ev}.ReviewSlaBreached",
            f"review-{ev}.ReviewSlaBreached",
        ),
        "dispatch.requested": (
            DISPATCH,
            f"{ev}.DispatchRequested",
            f"dispatch-{ev}.DispatchRequested",
        ),
        "dispatch.executed": (
            DISPATCH,
            f"{ev}.DispatchExecuted",
            f"dispatch-{ev}.DispatchExecuted",
        ),
        "dispatch.failed": (
            DISPATCH,
            f"{ev}.DispatchFailed",
            f"dispatch-{ev}.DispatchFailed",
        ),
        "pod.captured": (POD, f"{ev}.PodCaptured", f"pod-{ev}.PodCaptured"),
        "pod.rejected": (POD_REJECTS, f"{ev}.PodRejected", f"pod-rejects-{ev}.PodRejected"),
    }


def test_every_event_type_has_a_model_whose_contract_version_is_the_latest_schema() -> None:
    assert set(MODELS) == set(CATALOGUE)
    for name, et in CATALOGUE.items():
        assert et.model is MODELS[name]
        assert et.model.event_type == name
        assert et.model.contract_version == et.latest_version, name
        assert et.record_name == f"{NAMESPACE}.{et.model.__name__}"


def test_order_received_follows_its_v2_schema() -> None:
    assert CATALOGUE["order.received"].latest_version == 2
    assert OrderReceived.contract_version == 2


def test_catalogue_finds_event_types_by_record_name_and_by_topic() -> None:
    assert CATALOGUE.by_record_name("opsflow.events.ReviewDecided").name == "review.decided"
    assert [et.name for et in CATALOGUE.for_topic(DISPATCH)] == [
        "dispatch.requested",
        "dispatch.executed",
        "dispatch.failed",
    ]


def test_schemas_dir_can_be_pointed_at_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_dir = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, copy_dir)
    monkeypatch.setenv(SCHEMAS_DIR_VARIABLE, str(copy_dir))
    assert schemas_dir() == copy_dir
    assert catalogue().directory == copy_dir.resolve()


def test_schema_directory_without_a_known_event_type_is_refused(tmp_path: Path) -> None:
    copy_dir = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, copy_dir)
    (copy_dir / "order.cancelled").mkdir()
    with pytest.raises(BadInputError, match=r"unknown event type\(s\) order\.cancelled"):
        load_catalogue(copy_dir)


# --- schemas and models agree -------------------------------------------------------------


@pytest.mark.parametrize("event_type", list(MODELS))
def test_model_mirrors_latest_schema_field_by_field(event_type: str) -> None:
    et = CATALOGUE[event_type]
    assert flatten(model_shape(et.model)) == flatten(avro_shape(et.latest_schema))


def test_envelope_model_mirrors_envelope_schema() -> None:
    assert flatten(model_shape(Envelope)) == flatten(avro_shape(ENVELOPE_SCHEMA))


def test_shape_comparison_catches_a_field_added_to_only_one_side() -> None:
    extended = pydantic.create_model(
        "OrderReceived", __base__=OrderReceived, gift_wrap=(bool | None, None)
    )
    schema = CATALOGUE["order.received"].latest_schema
    assert model_shape(extended) != avro_shape(schema)
    grown = copy.deepcopy(schema)
    grown["fields"].append({"name": "gift_wrap", "type": ["null", "boolean"], "default": None})
    assert model_shape(OrderReceived) != avro_shape(grown)
    assert model_shape(extended) == avro_shape(grown)


def undocumented(schema: Any) -> Any:
    """The schema without its docs (which a published version keeps as it was written)."""
    if isinstance(schema, dict):
        return {k: undocumented(v) for k, v in schema.items() if k != "doc"}
    if isinstance(schema, list):
        return [undocumented(item) for item in schema]
    return schema


@pytest.mark.parametrize("event_type", list(MODELS))
def test_latest_schema_starts_with_the_shared_envelope(event_type: str) -> None:
    first = CATALOGUE[event_type].latest_schema["fields"][0]
    assert first["name"] == "envelope"
    assert undocumented(first["type"]) == undocumented(ENVELOPE_SCHEMA)
    assert CATALOGUE.envelope_schema == ENVELOPE_SCHEMA


def test_named_types_are_defined_identically_in_every_schema() -> None:
    """One Python class per record/enum name, so every schema must define it the same way."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, et in CATALOGUE.items():
        for named in walk_named(et.latest_schema):
            assert named.get("namespace") == NAMESPACE, (name, named["name"])
            first = seen.setdefault(named["name"], (name, named))
            assert named == first[1], f"{named['name']} differs in {name} and {first[0]}"


@pytest.mark.parametrize("schema", ALL_VERSIONS)
def test_every_record_enum_and_field_is_documented(schema: dict[str, Any]) -> None:
    for named in walk_named(schema):
        assert named.get("doc", "").strip(), named["name"]
    for field in walk_fields(schema):
        assert field.get("doc", "").strip(), field["name"]


@pytest.mark.parametrize("schema", ALL_VERSIONS)
def test_every_event_is_keyed_by_order_id(schema: dict[str, Any]) -> None:
    assert [f["name"] for f in schema["fields"][:2]] == ["envelope", "order_id"]
    assert schema["fields"][1]["type"] == "string"


# --- models on the wire ---------------------------------------------------------------------


@pytest.mark.parametrize("event_type", list(MODELS))
def test_event_round_trips_through_fastavro_unchanged(event_type: str) -> None:
    event = sample(event_type)
    assert all(getattr(event, f) is not None for f in optional_fields(type(event)))
    schema = CATALOGUE[event_type].latest_schema
    decoded = decode(encode(schema, event.to_avro()), schema, schema)
    assert type(event).from_avro(decoded) == event


@pytest.mark.parametrize("event_type", list(MODELS))
def test_event_with_optional_fields_unset_round_trips_unchanged(event_type: str) -> None:
    full = sample(event_type)
    event = full.model_copy(update=dict.fromkeys(optional_fields(type(full))))
    schema = CATALOGUE[event_type].latest_schema
    decoded = decode(encode(schema, event.to_avro()), schema, schema)
    assert type(event).from_avro(decoded) == event


def test_timestamps_are_kept_as_utc_milliseconds_as_on_the_wire() -> None:
    event = sample("review.sla_breached")
    local = datetime(2025, 3, 14, 11, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    moved = ReviewSlaBreached.model_validate({**event.model_dump(), "due_at": local})
    assert moved.due_at == datetime(2025, 3, 14, 9, 0, 0, 123000, tzinfo=UTC)
    assert moved.due_at.tzinfo is UTC


def test_naive_timestamps_are_refused() -> None:
    data = sample("review.sla_breached").model_dump()
    with pytest.raises(pydantic.ValidationError):
        ReviewSlaBreached.model_validate({**data, "due_at": datetime(2025, 3, 14, 9, 0)})


def test_new_envelope_carries_the_models_contract_version_and_causation() -> None:
    cause = envelope(MODELS["policy.checked"], 7)
    env = ReviewRequested.envelope_for(
        key=ORDER, idempotency_key="k", producer="review", caused_by=cause
    )
    assert env.correlation_id == ORDER
    assert env.causation_id == str(cause.event_id)
    assert env.contract_version == ReviewRequested.contract_version
    assert (
        OrderReceived.envelope_for(
            key=ORDER, idempotency_key="k", producer="intake"
        ).contract_version
        == 2
    )


def test_a_derived_envelope_is_the_model_pydantic_would_construct_with_a_uuid5_id() -> None:
    """The runtime's shortcuts (``of_checked``, ``derived_event_id``) build what the
    library's own calls build: equal, frozen, the same fields set and dumped alike."""
    cause = envelope(MODELS["order.received"], 3)
    with caused_by(cause, producer="policy-check", occurred_at=cause.occurred_at) as lineage:
        key = lineage.next_key("policy.checked")
        derived = lineage.envelope_for("policy.checked", 2)
    assert derived.event_id == uuid.uuid5(EVENT_ID_NAMESPACE, key)
    assert derived_event_id("x\x1fy") == uuid.uuid5(EVENT_ID_NAMESPACE, "x\x1fy")
    constructed = Envelope.model_construct(**dict(derived))
    assert derived == constructed and hash(derived) == hash(constructed)
    assert derived.model_fields_set == constructed.model_fields_set
    assert derived.model_dump() == constructed.model_dump()
    assert Envelope.model_validate(derived.model_dump()) == derived
    with pytest.raises(pydantic.ValidationError):
        derived.producer = "someone else"  # type: ignore[misc]


# --- evolution: the replay guarantee ------------------------------------------------------


@pytest.mark.parametrize(("event_type", "version"), OLDER_VERSIONS)
def test_record_written_with_an_older_version_is_readable_with_the_latest_schema(
    event_type: str, version: int
) -> None:
    et = CATALOGUE[event_type]
    old_schema = et.versions[version]
    old_fields = {f["name"] for f in old_schema["fields"]}
    latest = sample(event_type).to_avro()
    old_datum = {k: v for k, v in latest.items() if k in old_fields}
    old_datum["envelope"] = {**old_datum["envelope"], "contract_version": version}

    replayed = et.model.from_avro(
        decode(encode(old_schema, old_datum), old_schema, et.latest_schema)
    )

    assert replayed.envelope.contract_version == version
    for field in et.latest_schema["fields"]:
        expected = old_datum[field["name"]] if field["name"] in old_fields else field["default"]
        assert replayed.to_avro()[field["name"]] == expected, field["name"]


def test_order_received_v1_record_replays_into_the_v2_model() -> None:
    et = CATALOGUE["order.received"]
    datum = {k: v for k, v in sample("order.received").to_avro().items() if k != "sales_channel"}
    datum["envelope"] = {**datum["envelope"], "contract_version": 1}
    replayed = OrderReceived.from_avro(
        decode(encode(et.versions[1], datum), et.versions[1], et.latest_schema)
    )
    assert replayed.sales_channel is None
    assert replayed.customer_risk_tier is CustomerRiskTier.MEDIUM
    assert replayed.envelope.contract_version == 1


def test_evolution_gate_passes_on_the_repository_schemas() -> None:
    assert check_evolution(SCHEMAS) == []


@pytest.fixture
def schemas_copy(tmp_path: Path) -> Path:
    target = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, target)
    return target


def publish(directory: Path, event_type: str, schema: dict[str, Any]) -> int:
    """Add ``schema`` as the next version of ``event_type``; return its number."""
    number = len(CATALOGUE[event_type].versions) + 1
    (directory / event_type / f"v{number}.avsc").write_text(json.dumps(schema, indent=2))
    return number


def test_evolution_gate_fails_on_a_new_required_field_without_default(schemas_copy: Path) -> None:
    schema = copy.deepcopy(CATALOGUE["dispatch.failed"].latest_schema)
    schema["fields"].append({"name": "risk_score", "type": "long", "doc": "Score."})
    publish(schemas_copy, "dispatch.failed", schema)

    problems = check_evolution(schemas_copy)

    assert problems
    assert all(p.startswith("dispatch.failed v2 (against v1): ") for p in problems)
    assert "reader_field_missing_default_value (risk_score)" in problems[0]


def test_evolution_gate_fails_on_a_removed_enum_symbol(schemas_copy: Path) -> None:
    schema = copy.deepcopy(CATALOGUE["review.decided"].latest_schema)
    decision = next(f for f in schema["fields"] if f["name"] == "decision")
    decision["type"]["symbols"].remove("REJECTED")
    publish(schemas_copy, "review.decided", schema)

    problems = check_evolution(schemas_copy)

    assert len(problems) == 1
    assert problems[0].startswith("review.decided v2 (against v1): ")
    assert "missing_enum_symbols ({'REJECTED'})" in problems[0]


def test_evolution_gate_checks_every_earlier_version_not_only_the_last(
    schemas_copy: Path,
) -> None:
    """v3 dropping the default of v2's new field reads v2 data but not v1 data."""
    schema = copy.deepcopy(CATALOGUE["order.received"].latest_schema)
    del schema["fields"][-1]["default"]
    publish(schemas_copy, "order.received", schema)

    assert check_evolution(schemas_copy, CompatibilityLevel.BACKWARD) == []
    problems = check_evolution(schemas_copy)
    assert len(problems) == 1
    assert problems[0].startswith("order.received v3 (against v1): ")
    assert "reader_field_missing_default_value (sales_channel)" in problems[0]


def test_evolution_gate_fails_on_a_renamed_record_and_a_version_gap(schemas_copy: Path) -> None:
    renamed = copy.deepcopy(CATALOGUE["pod.captured"].latest_schema)
    renamed["name"] = "ProofOfDeliveryCaptured"
    publish(schemas_copy, "pod.captured", renamed)
    (schemas_copy / "pod.rejected" / "v3.avsc").write_text(
        json.dumps(CATALOGUE["pod.rejected"].latest_schema)
    )

    problems = check_evolution(schemas_copy)

    assert any(
        p.startswith("pod.captured v2: record renamed from opsflow.events.PodCaptured")
        for p in problems
    )
    assert any(
        p.startswith("pod.rejected: versions must run v1..vN without gaps") for p in problems
    )


def test_every_installed_applications_classes_mirror_their_schemas_as_the_gate_says() -> None:
    both = load_application("orders,refunds")
    for part in both.parts:
        found = load_catalogue(application=part)
        assert [line for event in found.values() for line in mismatches(event)] == []


def test_the_gate_names_the_field_a_class_and_its_schema_disagree_on(tmp_path: Path) -> None:
    copy_dir = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, copy_dir)
    path = copy_dir / "review.decided" / "v1.avsc"
    schema = json.loads(path.read_text())
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "reason"]
    path.write_text(json.dumps(schema))
    found = load_catalogue(copy_dir)
    assert mismatches(found["review.decided"]) == [
        "review.decided v1: <event>: the schema has record ReviewDecided "
        "['envelope', 'order_id', 'task_id', 'actor', 'tier', 'decision'], ReviewDecided has "
        "record ReviewDecided ['envelope', 'order_id', 'task_id', 'actor', 'tier', 'decision', "
        "'reason']",
        "review.decided v1: reason (default): the schema has nothing, ReviewDecided has "
        "'<required>'",
        "review.decided v1: reason: the schema has nothing, ReviewDecided has string",
    ]
