"""The contract for readers outside opsflow: asyncapi.yaml and docs/contracts.md.

Both restate ``schemas/`` and are checked in, so a reader can use them without
running opsflow; these tests fail the moment either no longer says what the
schemas say, and check that the AsyncAPI document is valid AsyncAPI 3.0.0
(against the official JSON Schema, vendored in ``tests/contracts/``: no network).
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

import opsflow
from opsflow.cli import app
from opsflow.contracts import catalogue
from opsflow.contracts.asyncapi import (
    AVRO_SCHEMA_FORMAT,
    DEAD_LETTER_MESSAGE,
    asyncapi_document,
    asyncapi_yaml,
)
from opsflow.contracts.headers import (
    DEAD_LETTER_HEADERS,
    EVENT_HEADERS,
    OPTIONAL_DEAD_LETTER_HEADERS,
)
from opsflow.contracts.reference import BEGIN_MARKER, END_MARKER, with_event_reference
from opsflow.errors import BadInputError
from opsflow.topics import dead_letter_topic
from services.contracts import TOPICS

ROOT = Path(__file__).resolve().parents[1]
ASYNCAPI_FILE = ROOT / "asyncapi.yaml"
CONTRACTS_DOC = ROOT / "docs" / "contracts.md"
ASYNCAPI_SCHEMA = Path(__file__).parent / "contracts" / "asyncapi-3.0.0.json"
REGENERATE_ASYNCAPI = "OPSFLOW_APP=orders .venv/bin/opsflow contracts asyncapi > asyncapi.yaml"
REGENERATE_DOCS = "OPSFLOW_APP=orders .venv/bin/opsflow contracts docs --update docs/contracts.md"


def staleness(name: str, checked_in: str, generated: str, regenerate: str) -> str | None:
    """None when the checked-in text is what generation gives; else what differs, and how
    to regenerate. Every freshness check here goes through this one function."""
    if checked_in == generated:
        return None
    diff = difflib.unified_diff(
        checked_in.splitlines(keepends=True),
        generated.splitlines(keepends=True),
        f"{name} (checked in)",
        f"{name} (generated from schemas/)",
    )
    shown = "".join(line for _, line in zip(range(60), diff, strict=False))
    return f"{name} is stale; regenerate it with `{regenerate}`\n{shown}"


def validation_errors(document: dict[str, Any]) -> list[str]:
    """Where ``document`` breaks the official AsyncAPI 3.0.0 schema, one line each."""
    schema = json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{error.json_path}: {error.message[:300]}" for error in validator.iter_errors(document)
    ]


def references(node: Any) -> Iterator[str]:
    """Every ``$ref`` value anywhere in ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def resolve(document: dict[str, Any], pointer: str) -> Any:
    """The node a local JSON pointer (``#/a/b``) names in ``document``."""
    node: Any = document
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The document as a reader parses the checked-in YAML."""
    parsed: dict[str, Any] = yaml.safe_load(asyncapi_yaml())
    return parsed


# --- freshness ------------------------------------------------------------------------


def test_checked_in_asyncapi_yaml_is_what_the_schemas_generate() -> None:
    checked_in = ASYNCAPI_FILE.read_text(encoding="utf-8") if ASYNCAPI_FILE.exists() else ""
    problem = staleness("asyncapi.yaml", checked_in, asyncapi_yaml(), REGENERATE_ASYNCAPI)
    assert problem is None, problem


def test_checked_in_contracts_doc_reference_is_what_the_schemas_generate() -> None:
    checked_in = CONTRACTS_DOC.read_text(encoding="utf-8")
    problem = staleness(
        "docs/contracts.md", checked_in, with_event_reference(checked_in), REGENERATE_DOCS
    )
    assert problem is None, problem


def test_a_stale_asyncapi_yaml_is_reported_with_the_command_that_regenerates_it() -> None:
    fresh = asyncapi_yaml()
    stale = fresh.replace("name: order.received", "name: order.placed", 1)
    assert stale != fresh

    problem = staleness("asyncapi.yaml", stale, fresh, REGENERATE_ASYNCAPI)

    assert problem is not None
    assert REGENERATE_ASYNCAPI in problem
    changed = [line for line in problem.splitlines() if line[:1] in "-+" and "name: order" in line]
    assert [line.split()[-1] for line in changed] == ["order.placed", "order.received"]


def test_a_hand_edit_inside_the_generated_reference_is_reported_as_stale() -> None:
    fresh = CONTRACTS_DOC.read_text(encoding="utf-8")
    edited = fresh.replace("| `order_id` | string |", "| `order_id` | int |", 1)
    assert edited != fresh

    problem = staleness("docs/contracts.md", edited, with_event_reference(edited), REGENERATE_DOCS)

    assert problem is not None and REGENERATE_DOCS in problem


def test_the_prose_around_the_generated_reference_is_kept_when_it_is_regenerated() -> None:
    text = f"# Before\n\n{BEGIN_MARKER}\nold\n{END_MARKER}\n\n## Read models\n\nhand-written\n"

    fresh = with_event_reference(text)

    assert fresh.startswith(f"# Before\n\n{BEGIN_MARKER}\n")
    assert fresh.endswith(f"{END_MARKER}\n\n## Read models\n\nhand-written\n")
    assert "old" not in fresh and "### `order.received`" in fresh


def test_a_document_without_the_reference_markers_is_refused() -> None:
    with pytest.raises(BadInputError, match="no generated event reference"):
        with_event_reference("# contracts\n\nnothing generated here\n")


def test_generation_is_byte_stable() -> None:
    assert asyncapi_yaml() == asyncapi_yaml()
    assert "&id" not in asyncapi_yaml()  # no YAML anchors: every node is spelled out


def test_cli_prints_the_asyncapi_document_unchanged() -> None:
    result = CliRunner().invoke(app, ["contracts", "asyncapi"])

    assert result.exit_code == 0, result.output
    assert result.stdout == asyncapi_yaml()


def test_cli_docs_update_rewrites_only_the_generated_part(tmp_path: Path) -> None:
    target = tmp_path / "contracts.md"
    target.write_text(f"intro\n{BEGIN_MARKER}\nstale\n{END_MARKER}\noutro\n", encoding="utf-8")

    result = CliRunner().invoke(app, ["contracts", "docs", "--update", str(target)])

    assert result.exit_code == 0, result.output
    text = target.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert text == with_event_reference(text)


# --- validity -------------------------------------------------------------------------


def test_asyncapi_document_is_valid_against_the_asyncapi_3_schema(
    document: dict[str, Any],
) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert validation_errors(document) == []


def test_schema_validation_catches_what_asyncapi_3_forbids(document: dict[str, Any]) -> None:
    # Proves the vendored schema really judges the document, its bindings and its Avro.
    wrong_action = copy.deepcopy(document)
    wrong_action["operations"]["receiveOrders"]["action"] = "subscribe"  # AsyncAPI 2 wording
    broken_avro = copy.deepcopy(document)
    broken_avro["components"]["messages"]["order.received"]["payload"]["schema"]["fields"][1][
        "type"
    ] = 42
    bad_binding = copy.deepcopy(document)
    bad_binding["components"]["messages"]["order.received"]["bindings"]["kafka"][
        "schemaIdLocation"
    ] = "key"

    for broken in (wrong_action, broken_avro, bad_binding):
        assert validation_errors(broken), "the AsyncAPI schema accepted a broken document"


def test_every_reference_in_the_document_resolves(document: dict[str, Any]) -> None:
    found = list(references(document))

    assert found
    for pointer in found:
        assert pointer.startswith("#/"), f"{pointer}: the document must stand alone"
        resolve(document, pointer)


def test_every_operation_receives_only_messages_of_its_own_channel(
    document: dict[str, Any],
) -> None:
    for name, operation in document["operations"].items():
        assert operation["action"] == "receive", name
        channel = operation["channel"]["$ref"]
        assert operation["messages"], name
        for message in operation["messages"]:
            assert message["$ref"].startswith(f"{channel}/messages/"), (name, message)


# --- completeness ---------------------------------------------------------------------


def test_every_topic_and_its_dead_letter_topic_is_a_channel(document: dict[str, Any]) -> None:
    addresses = {channel["address"] for channel in document["channels"].values()}
    topics = {event.topic.value for event in catalogue().values()}

    assert topics == {topic.value for topic in TOPICS}
    assert addresses == topics | {dead_letter_topic(topic) for topic in topics}
    assert len(document["operations"]) == len(addresses)  # one receive per channel


def test_every_event_type_is_a_message_on_its_topic_with_its_latest_schema(
    document: dict[str, Any],
) -> None:
    messages = document["components"]["messages"]
    assert set(messages) == set(catalogue()) | {DEAD_LETTER_MESSAGE}
    for event in catalogue().values():
        message = messages[event.name]
        channel = document["channels"][event.topic.value]
        assert channel["messages"][event.name] == {"$ref": f"#/components/messages/{event.name}"}
        assert message["payload"] == {
            "schemaFormat": AVRO_SCHEMA_FORMAT,
            "schema": event.latest_schema,
        }
        kafka = message["bindings"]["kafka"]
        assert kafka["key"]["type"] == "string"
        assert (kafka["schemaIdLocation"], kafka["schemaIdPayloadEncoding"]) == (
            "payload",
            "confluent",
        )
        assert kafka["schemaLookupStrategy"] == "TopicRecordNameStrategy"
        assert event.subject in message["description"]
        headers = message["headers"]["properties"]
        assert headers["opsflow-event-type"]["const"] == event.name


def test_topic_names_are_the_contracts_not_an_environments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPSFLOW_TOPIC_PREFIX", "staging.")

    addresses = {c["address"] for c in asyncapi_document()["channels"].values()}

    assert not any(address.startswith("staging.") for address in addresses)


def test_documented_headers_are_the_ones_the_runtime_writes() -> None:
    # The code that writes records names its headers in string literals ("opsflow-...");
    # trace context headers come from OpenTelemetry's W3C propagator.
    package = Path(opsflow.__file__).parent
    sources = [
        *sorted((package / "runtime").glob("*.py")),
        *sorted((package / "projections").glob("*.py")),
        *package.glob("deadletters.py"),
        *package.glob("replay.py"),
        *package.glob("dlq.py"),
    ]
    written = {
        name
        for source in sources
        for name in re.findall(r"\"(opsflow-[a-z-]+)\"", source.read_text(encoding="utf-8"))
    }
    documented = set(EVENT_HEADERS) | set(DEAD_LETTER_HEADERS) | set(OPTIONAL_DEAD_LETTER_HEADERS)

    assert written - documented == set(), "document these headers in opsflow.contracts.headers"
    assert documented - {"traceparent", "tracestate"} <= written, "no longer written"


def test_contracts_doc_lists_every_field_of_every_event_type() -> None:
    text = CONTRACTS_DOC.read_text(encoding="utf-8")
    envelope = catalogue().envelope_schema
    for field in envelope["fields"]:
        assert f"| `envelope.{field['name']}` |" in text, field["name"]
    for event in catalogue().values():
        section = text.split(f"### `{event.name}`\n", 1)[1].split("\n### ", 1)[0]
        assert event.subject in section
        for field in event.latest_schema["fields"]:
            row = next(line for line in section.splitlines() if f"| `{field['name']}` |" in line)
            doc = " ".join(str(field.get("doc", "")).split()).replace("|", "\\|")
            assert doc in row, (event.name, field["name"])


def test_contracts_doc_keeps_a_read_models_section() -> None:
    text = CONTRACTS_DOC.read_text(encoding="utf-8")

    assert "\n## Read models\n" in text
    assert text.index(END_MARKER) < text.index("\n## Read models\n")
