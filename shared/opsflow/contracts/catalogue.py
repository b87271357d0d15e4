"""The catalogue of an application's event types, read from its ``.avsc`` files.

The files are the single source of the contract: ``<schemas>/<event type>/vN.avsc``,
one file per published version, never edited once published (a change is a new
``vN+1``). Everything else here (topic, subject, the latest version producers
write) is derived from them and from the application's event classes, so it
cannot disagree with what is registered and on the topics. Every event schema
inlines opsflow's envelope (``envelope.avsc``, beside this module) as its first
field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from opsflow.contracts.emitters import ForbiddenProducerError
from opsflow.contracts.events import Event
from opsflow.contracts.topics import Topic, subject_name
from opsflow.errors import BadInputError, ConfigurationError

if TYPE_CHECKING:
    from opsflow.application import Application

SCHEMAS_DIR_VARIABLE = "OPSFLOW_SCHEMAS_DIR"
ENVELOPE_FILE = Path(__file__).with_name("envelope.avsc")
_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")


def schemas_dir(application: Application | None = None) -> Path:
    """Where the schemas are: ``$OPSFLOW_SCHEMAS_DIR``, else the application's.

    The application names its folder by an absolute path (resolved from its
    package), so it works from any working directory; the variable lets tests
    and tools point at a copy.

    Raises:
        ConfigurationError: the directory does not exist.
    """
    override = os.environ.get(SCHEMAS_DIR_VARIABLE)
    app = _application(application)
    if app.parts and not override:
        raise ConfigurationError(
            f"application {app.name!r}",
            "combines applications, each with a schemas folder of its own",
            "Ask for one of its parts' folders (`schemas_dir(part)`).",
        )
    path = Path(override) if override else app.schemas
    if path is None:
        raise ConfigurationError(
            SCHEMAS_DIR_VARIABLE,
            "is not set and the application declares no schemas folder",
            "Set the application's `schemas`, or point the variable at the folder.",
        )
    if not path.is_dir():
        raise ConfigurationError(
            SCHEMAS_DIR_VARIABLE,
            f"{path} is not a directory",
            "Point it at the application's schemas folder, or unset it.",
        )
    return path


def _application(application: Application | None) -> Application:
    from opsflow.application import load_application  # it imports the contracts

    return application or load_application()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BadInputError(f"{path}: cannot read schema: {err}") from err
    if not isinstance(value, dict) or value.get("type") != "record":
        raise BadInputError(f"{path}: not an Avro record schema")
    return value


def read_envelope() -> dict[str, Any]:
    """The envelope schema every event schema must inline as its first field."""
    return _read_json(ENVELOPE_FILE)


def read_versions(directory: Path, event_type: str) -> dict[int, dict[str, Any]]:
    """All published versions of one event type, by version number, oldest first.

    Versions must be ``v1.avsc`` .. ``vN.avsc`` without gaps, since a gap means a
    published version was lost or a number was skipped by mistake.

    Raises:
        BadInputError: the directory is missing or empty, holds other files, has gaps, or a
            file is not a JSON record schema.
    """
    folder = directory / event_type
    if not folder.is_dir():
        raise BadInputError(f"{event_type}: no schema directory {folder}")
    versions: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.iterdir()):
        match = _VERSION_FILE.fullmatch(path.name)
        if match is None:
            raise BadInputError(f"{event_type}: {path.name} is not named vN.avsc")
        versions[int(match.group(1))] = _read_json(path)
    if not versions:
        raise BadInputError(f"{event_type}: no published version in {folder}")
    if sorted(versions) != list(range(1, len(versions) + 1)):
        found = ", ".join(f"v{n}" for n in sorted(versions))
        raise BadInputError(f"{event_type}: versions must run v1..vN without gaps, found {found}")
    return dict(sorted(versions.items()))


def record_full_name(schema: Mapping[str, Any]) -> str:
    """The full name of a record schema (``namespace.name``), as subjects use it."""
    name = str(schema["name"])
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


@dataclass(frozen=True)
class EventType:
    """One event type: its schemas, where it travels, and its Python model.

    Treat the schema dicts as read-only; they are shared by every user of the catalogue.
    """

    name: str
    topic: Topic
    versions: Mapping[int, dict[str, Any]]
    model: type[Event]

    @property
    def latest_version(self) -> int:
        """The version producers write (and put in ``envelope.contract_version``)."""
        return max(self.versions)

    @property
    def latest_schema(self) -> dict[str, Any]:
        """The schema producers write with and consumers read with."""
        return self.versions[self.latest_version]

    @property
    def record_name(self) -> str:
        """Full Avro record name, e.g. ``opsflow.events.OrderReceived``."""
        return record_full_name(self.latest_schema)

    @property
    def subject(self) -> str:
        """Registry subject (TopicRecordNameStrategy): ``orders-opsflow.events.OrderReceived``."""
        return subject_name(self.topic, self.record_name)


class Catalogue(Mapping[str, EventType]):
    """Every event type by name (``"order.received"``), with look-ups consumers need.

    A consumer of a shared topic learns the event type from the writer schema's record
    name, hence ``by_record_name``.
    """

    def __init__(self, directory: Path, envelope: dict[str, Any], types: list[EventType]) -> None:
        self.directory = directory
        self.envelope_schema = envelope
        self._types = MappingProxyType({t.name: t for t in types})
        self._by_record = MappingProxyType({t.record_name: t for t in types})
        self.services: frozenset[str] = frozenset().union(
            *(t.model.emitted_by.services for t in types)
        )
        """Every service that writes one of the event types (see ``Emitters``)."""

    def check_producer(self, event_type: str, producer: str) -> None:
        """Refuse a record of ``event_type`` whose envelope names ``producer``, when its
        declaration (``Event.emitted_by``) does not allow that producer.

        Raises:
            ForbiddenProducerError: the producer may not emit the event type.
        """
        emitters = self._types[event_type].model.emitted_by
        if not emitters.allows(producer, self.services):
            raise ForbiddenProducerError(event_type, producer, emitters)

    def __getitem__(self, name: str) -> EventType:
        return self._types[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def by_record_name(self, full_name: str) -> EventType:
        """The event type whose record is ``full_name``.

        Raises:
            KeyError: no event type has that record name.
        """
        return self._by_record[full_name]

    @property
    def topics(self) -> list[Topic]:
        """The topics the event types travel on, each once, in catalogue order."""
        return list(dict.fromkeys(t.topic for t in self._types.values()))

    def for_topic(self, topic: Topic | str) -> list[EventType]:
        """The event types a topic carries, in catalogue order."""
        return [t for t in self._types.values() if t.topic == topic]


def load_catalogue(
    directory: Path | None = None, *, application: Application | None = None
) -> Catalogue:
    """Read the application's catalogue from ``directory`` (default: ``schemas_dir()``).

    Every event class the application declares must have schemas, and every
    schema directory must be a declared event type, so a half-added event type
    fails here rather than at produce time.

    Raises:
        ConfigurationError: the default directory does not exist, or no application.
        BadInputError: a schema directory or file is missing, unknown or malformed.
    """
    application = _application(application)
    if application.parts and directory is None:
        # A combination: each part's event types from its own folder.
        found = [load_catalogue(application=part) for part in application.parts]
        return Catalogue(
            found[0].directory, read_envelope(), [t for c in found for t in c.values()]
        )
    directory = directory if directory is not None else schemas_dir(application)
    models = application.models
    unknown = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name not in models)
    if unknown:
        raise BadInputError(
            f"{directory}: unknown event type(s) {', '.join(unknown)}; "
            f"declare their event classes in the application {application.name!r} (events=...)"
        )
    types = [
        EventType(
            name=name,
            topic=model.topic,
            versions=MappingProxyType(read_versions(directory, name)),
            model=model,
        )
        for name, model in models.items()
    ]
    return Catalogue(directory, read_envelope(), types)


@cache
def _cached(directory: Path, application: Application) -> Catalogue:
    return load_catalogue(directory, application=application)


def catalogue() -> Catalogue:
    """The running application's catalogue, read once per directory per process."""
    application = _application(None)
    if application.parts and not os.environ.get(SCHEMAS_DIR_VARIABLE):
        return _cached_combination(application)
    return _cached(schemas_dir(application).resolve(), application)


@cache
def _cached_combination(application: Application) -> Catalogue:
    return load_catalogue(application=application)
