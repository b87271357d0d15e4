"""The topics as an AsyncAPI 3.0.0 document, generated from the catalogue.

``schemas/`` stays the single source of the contract; this module only restates
it in the form tools outside opsflow understand (code generators, catalogues,
documentation sites). ``opsflow contracts asyncapi`` prints it, and the checked-in
``asyncapi.yaml`` is compared with a fresh rendering by the tests, so the two
cannot drift apart.

Whose point of view: AsyncAPI 3 operations say what the *described application*
does, not what the broker does. The document is the contract opsflow offers to
readers outside it (analytics, data-warehouse loaders, audit), so the described
application is such a reader: every channel gets one ``receive`` operation.
opsflow's own services both read and write these topics, but how they do is
internal and not promised to anyone; describing them as ``send`` operations would
invite readers to depend on which service writes what.

Topic names are the contract's, unprefixed: an environment may put
``OPSFLOW_TOPIC_PREFIX`` in front of every one of them (dead-letter topics
included), which the document says once rather than baking one environment's
names in.

Output is deterministic: dicts are built in catalogue order (the application's
event classes, as declared), never from sets or the file system's listing order, and the
YAML is dumped without aliases, so the same schemas give the same bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import yaml

from opsflow.contracts.catalogue import Catalogue, EventType, catalogue
from opsflow.contracts.evolution import REPLAY_LEVEL
from opsflow.contracts.headers import (
    DEAD_LETTER_HEADERS,
    EVENT_HEADERS,
    OPTIONAL_DEAD_LETTER_HEADERS,
)
from opsflow.contracts.topics import Topic
from opsflow.topics import RECORD_TOPIC_CONFIG, dead_letter_topic

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
AVRO_SCHEMA_FORMAT = "application/vnd.apache.avro;version=1.9.0"
"""AsyncAPI's name for an Avro schema in JSON form (the ``.avsc`` files as they are)."""
AVRO_CONTENT_TYPE = "application/vnd.apache.avro+binary"
"""Avro binary encoding; the Confluent framing around it is stated by the Kafka
binding (``schemaIdLocation: payload``, ``schemaIdPayloadEncoding: confluent``)."""
DEAD_LETTER_CONTENT_TYPE = "application/octet-stream"
SERVER = "production"
DEAD_LETTER_MESSAGE = "dead-letter"
SUBJECT_NAME_STRATEGY = "TopicRecordNameStrategy"


def _key_schema(topic: Topic | None) -> dict[str, Any]:
    """The record key: the instance's id, as the event's topic names it (a dead letter
    keeps its source record's key)."""
    held = f"The event's `{topic.key}` field" if topic else "The source record's key"
    return {
        "type": "string",
        "description": (
            f"{held}, UTF-8 encoded (no schema-registry framing): "
            "every event of one workflow instance is on one partition, in order."
        ),
    }


def _contract_version() -> str:
    """The opsflow release the contract belongs to; the schemas evolve with releases."""
    try:
        return version("opsflow")
    except PackageNotFoundError:  # pragma: no cover - only outside an installed checkout
        return "0.0.0"


def _camel(*words: str) -> str:
    """``("receive", "policy-check")`` -> ``receivePolicyCheck``: AsyncAPI's id style."""
    parts = [p for word in words for p in word.replace(".", "-").split("-") if p]
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def _string_headers(
    described: Mapping[str, str],
    *,
    required: list[str],
    fixed: Mapping[str, str] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Kafka headers as a JSON Schema object: header values are bytes, UTF-8 text here."""
    properties: dict[str, Any] = {}
    for name, text in described.items():
        schema: dict[str, Any] = {"type": "string", "description": text}
        if fixed and name in fixed:
            schema["const"] = fixed[name]
        properties[name] = schema
    headers: dict[str, Any] = {"type": "object"}
    if description:
        headers["description"] = description
    headers["properties"] = properties
    if required:
        headers["required"] = required
    return headers


def _kafka_message_binding(*, topic: Topic | None) -> dict[str, Any]:
    """An event's binding (its topic given: Confluent-framed) or a dead letter's."""
    binding: dict[str, Any] = {"key": _key_schema(topic)}
    framed = topic is not None
    if framed:
        binding |= {
            "schemaIdLocation": "payload",
            "schemaIdPayloadEncoding": "confluent",
            "schemaLookupStrategy": SUBJECT_NAME_STRATEGY,
        }
    binding["bindingVersion"] = KAFKA_BINDING_VERSION
    return binding


def _event_message(event: EventType) -> dict[str, Any]:
    """One event type as a message: its latest schema inline, since that is the reader
    schema every record on the topic (written with any published version) resolves to."""
    versions = ", ".join(f"v{n}" for n in event.versions)
    return {
        "name": event.name,
        "title": event.record_name,
        "summary": str(event.latest_schema.get("doc", event.name)),
        "description": (
            f"Avro record `{event.record_name}` under registry subject `{event.subject}` "
            f"({SUBJECT_NAME_STRATEGY}). Published versions: {versions}; the schema "
            f"below is v{event.latest_version}, which reads records written with any of "
            f"them ({REPLAY_LEVEL.name})."
        ),
        "contentType": AVRO_CONTENT_TYPE,
        "headers": _string_headers(
            EVENT_HEADERS, required=[], fixed={"opsflow-event-type": event.name}
        ),
        "payload": {
            "schemaFormat": AVRO_SCHEMA_FORMAT,
            "schema": copy.deepcopy(event.latest_schema),
        },
        "bindings": {"kafka": _kafka_message_binding(topic=event.topic)},
    }


def _dead_letter_message() -> dict[str, Any]:
    return {
        "name": DEAD_LETTER_MESSAGE,
        "title": "Dead letter",
        "summary": "A record a service or projection could not process, with its key and bytes.",
        "description": (
            "Key and value are the original record's, byte for byte: usually a "
            "Confluent-framed Avro event of the source topic, but possibly the very bytes "
            "that failed to decode. The headers say who failed, on what, why and when. Records "
            "here are not replayed automatically."
        ),
        "contentType": DEAD_LETTER_CONTENT_TYPE,
        "headers": _string_headers(
            {**DEAD_LETTER_HEADERS, **OPTIONAL_DEAD_LETTER_HEADERS},
            required=list(DEAD_LETTER_HEADERS),
            description="The original record's headers (any of an event's) come first, then these.",
        ),
        "payload": {
            "type": "string",
            "format": "binary",
            "description": "The original record value, unchanged.",
        },
        "bindings": {"kafka": _kafka_message_binding(topic=None)},
    }


def _channel(address: str, description: str, messages: list[str]) -> dict[str, Any]:
    return {
        "address": address,
        "title": address,
        "description": description,
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
        "bindings": {
            "kafka": {
                "topicConfiguration": _topic_configuration(),
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


def _receive(channel: str, messages: list[str], summary: str) -> dict[str, Any]:
    return {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in messages],
    }


def _topic_configuration() -> dict[str, Any]:
    """What provisioning creates every topic with, in the binding's types: it tells
    readers they may start from the earliest offset and see the whole history."""
    return {
        "cleanup.policy": RECORD_TOPIC_CONFIG["cleanup.policy"].split(","),
        "retention.ms": int(RECORD_TOPIC_CONFIG["retention.ms"]),
    }


_DESCRIPTION = """\
The topics of record of an opsflow application: every event of its workflow, kept
forever, Avro-encoded with Confluent framing. This document describes what an
application reading them (analytics, a warehouse loader, an audit) can rely on;
docs/contracts.md says the same in prose, field by field.

- Topic names are given without the environment's prefix: where
  `OPSFLOW_TOPIC_PREFIX` is set, every topic (dead-letter topics included) is
  named `<prefix><topic>`.
- Keys are the id of the workflow instance (each topic names the event field that
  holds it) as UTF-8 text. Values are Confluent wire format
  (magic byte 0, 4-byte big-endian schema id, Avro binary body); read them with
  a stock Confluent `AvroDeserializer` and the schema registry.
- Several event types share a topic; subjects follow TopicRecordNameStrategy
  (`<topic>-<record full name>`), so tell them apart by the writer schema's
  record name (or the optional `opsflow-event-type` header).
- Every new schema version is BACKWARD_TRANSITIVE compatible with all earlier
  ones: the latest schema reads every record ever written.
"""


def asyncapi_document(contracts: Catalogue | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of ``contracts`` (default: the repository's catalogue)."""
    contracts = contracts if contracts is not None else catalogue()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    topics = contracts.topics
    for topic in topics:
        events = contracts.for_topic(topic)
        names = [event.name for event in events]
        channels[topic.value] = _channel(
            topic.value,
            f"Topic of record carrying {', '.join(f'`{n}`' for n in names)}, "
            f"keyed by `{topic.key}`.",
            names,
        )
        operations[_camel("receive", topic.value)] = _receive(
            topic.value, names, f"Read the {', '.join(names)} events."
        )
        for event in events:
            messages[event.name] = _event_message(event)
    for topic in topics:
        dlq = dead_letter_topic(topic.value)
        channels[dlq] = _channel(
            dlq,
            f"Dead letters of `{topic.value}`: records a service or projection could not process.",
            [DEAD_LETTER_MESSAGE],
        )
        operations[_camel("receive", dlq)] = _receive(
            dlq, [DEAD_LETTER_MESSAGE], f"Read the records of `{topic.value}` that failed."
        )
    messages[DEAD_LETTER_MESSAGE] = _dead_letter_message()
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "opsflow",
            "version": _contract_version(),
            "description": _DESCRIPTION,
            "license": {
                "name": "Apache-2.0",
                "url": "https://www.apache.org/licenses/LICENSE-2.0",
            },
        },
        "defaultContentType": AVRO_CONTENT_TYPE,
        "servers": {
            SERVER: {
                "host": "{bootstrap}",
                "protocol": "kafka",
                "description": (
                    "The environment's Kafka cluster, with a Confluent-compatible schema "
                    "registry at its `SCHEMA_REGISTRY_URL`."
                ),
                "variables": {
                    "bootstrap": {
                        "default": "kafka:9092",
                        "description": "The cluster's bootstrap servers "
                        "(`KAFKA_BOOTSTRAP_SERVERS` of the environment).",
                    }
                },
                "bindings": {
                    "kafka": {
                        "schemaRegistryVendor": "confluent",
                        "bindingVersion": KAFKA_BINDING_VERSION,
                    }
                },
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


class _Dumper(yaml.SafeDumper):
    """Block style, text with line breaks as ``|`` literals, and no anchors/aliases
    (a shared dict would otherwise come out as ``&id001``, which readers trip over)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def render_yaml(document: Mapping[str, Any]) -> str:
    """``document`` as YAML, keys in the order they were built, byte-stable."""
    return yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )


def asyncapi_yaml(contracts: Catalogue | None = None) -> str:
    """What ``opsflow contracts asyncapi`` prints and ``asyncapi.yaml`` holds."""
    return render_yaml(asyncapi_document(contracts))
