"""``opsflow new service NAME``: the starting point of a team's own application.

A team building on opsflow starts from a package of its own that depends on
opsflow and declares one application: two topics, an event type on each (the
request its service takes and the answer it gives), their Avro schemas, one
service, a unit test and the contract gate. Installed (``pip install -e .``),
its entry point makes it the application every ``opsflow`` command runs:
``opsflow up`` provisions its topics and schemas and runs its service.

Everything written is plain code the team then owns; nothing here is called at
run time.
"""

from __future__ import annotations

import json
import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from opsflow.application import RESERVED_NAMES
from opsflow.contracts.catalogue import read_envelope
from opsflow.errors import ConfigurationError

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,29}$")


@dataclass(frozen=True)
class Names:
    """How NAME is spelled in each place it appears."""

    name: str  # the service, the program, the application: "greeter"
    package: str  # the Python package: "greeter"
    requests: str  # the input topic: "greeter-requests"
    results: str  # the output topic: "greeter-results"

    @classmethod
    def of(cls, name: str) -> Names:
        """Raises:
        ConfigurationError: NAME cannot be a service name and a package name."""
        package = name.replace("-", "_")
        if not _NAME.fullmatch(name) or keyword.iskeyword(package) or name in RESERVED_NAMES:
            raise ConfigurationError(
                f"service name {name!r}",
                "cannot name a service and its package",
                "Use lower-case letters, digits and '-', starting with a letter "
                f"(and none of {', '.join(sorted(RESERVED_NAMES))}).",
            )
        return cls(name, package, f"{name}-requests", f"{name}-results")


def _schema(names: Names, record: str, doc: str, fields: list[dict[str, Any]]) -> str:
    schema = {
        "type": "record",
        "name": record,
        "namespace": f"{names.package}.events",
        "doc": doc,
        "fields": [
            {
                "name": "envelope",
                "type": read_envelope(),
                "doc": "opsflow's envelope: ids, time, causation, producer.",
            },
            *fields,
        ],
    }
    return json.dumps(schema, indent=2) + "\n"


_KEY_FIELD = {
    "name": "request_id",
    "type": "string",
    "doc": "The request this event belongs to; also the Kafka message key.",
}

_FILES: dict[str, str] = {
    "pyproject.toml": """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "$name"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["opsflow"]

[project.optional-dependencies]
test = ["opsflow[testing]"]

# How every `opsflow` command finds this application.
[project.entry-points."opsflow.applications"]
$name = "$package.application:application"

[tool.setuptools.packages.find]
include = ["$package*"]

[tool.setuptools.package-data]
$package = ["schemas/*/*.avsc"]
""",
    "$package/__init__.py": '''\
"""$name: an application built on opsflow."""
''',
    "$package/contracts.py": '''\
"""$name's topics and event types: the typed face of ``schemas/``.

Every event is keyed by ``request_id``: one request's events stay on one
partition, in order. A new field is a new schema version (``v2.avsc``) with a
default, and the model follows it (``opsflow contracts check`` is the gate).
"""

from __future__ import annotations

from typing import ClassVar

from opsflow.contracts import ANY_PRODUCER, Emitters, Event, Topic

REQUESTS = Topic("$requests", key="request_id")
RESULTS = Topic("$results", key="request_id")


class Requested(Event):
    """``$name.requested`` v1: someone asked $name to greet a name."""

    event_type: ClassVar[str] = "$name.requested"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = REQUESTS
    # Sent from outside, by any producer with an API key for it.
    emitted_by: ClassVar[Emitters] = Emitters(external=ANY_PRODUCER)

    request_id: str
    name: str


class Greeted(Event):
    """``$name.greeted`` v1: $name answered a request."""

    event_type: ClassVar[str] = "$name.greeted"
    contract_version: ClassVar[int] = 1
    topic: ClassVar[Topic] = RESULTS
    emitted_by: ClassVar[Emitters] = Emitters(services={"$name"})

    request_id: str
    greeting: str
''',
    "$package/service.py": '''\
"""The $name service: each request is answered with a greeting.

The runtime decodes the input, derives the output's envelope from it (so a
re-run emits the very same event), writes it, and commits the input's offset
with it.
"""

from __future__ import annotations

from opsflow.runtime import Service
from $package.contracts import REQUESTS, RESULTS, Greeted, Requested

service = Service("$name", consumes=[REQUESTS], produces=[RESULTS])


@service.handler
def greet(request: Requested) -> Greeted:
    # No envelope given: inside a handler the runtime derives it from the request's.
    greeting = f"Hello, {request.name}!"
    return Greeted(request_id=request.request_id, greeting=greeting)  # type: ignore[call-arg]
''',
    "$package/application.py": '''\
"""The $name application: what it carries and what `opsflow up` runs."""

from __future__ import annotations

from pathlib import Path

from opsflow.application import Application, Program
from $package.contracts import REQUESTS, RESULTS, Greeted, Requested

application = Application(
    name="$name",
    instance="request",
    topics=(REQUESTS, RESULTS),
    events=(Requested, Greeted),
    schemas=Path(__file__).resolve().parent / "schemas",
    programs=(Program("$name", service="$package.service:service"),),
)
''',
    "tests/test_$package.py": '''\
"""$name's behaviour: the handler alone, the service on a real broker, its contracts' gate.

``opsflow_env`` comes with opsflow (``opsflow.testing``): it starts an embedded
broker, PostgreSQL and registry once per session (or uses the ones
KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL and DATABASE_URL name) and gives
each test topics and a schema of its own.
"""

from __future__ import annotations

from datetime import UTC, datetime

from opsflow.contracts import check_evolution, load_catalogue
from opsflow.contracts.lineage import caused_by
from opsflow.contracts.mirror import mismatches
from opsflow.producer import body_model
from opsflow.testing import Env
from $package.application import application
from $package.contracts import Greeted, Requested
from $package.service import greet, service


def test_a_request_is_answered_with_a_greeting_keyed_by_the_request() -> None:
    envelope = Requested.envelope_for(key="r-1", idempotency_key="r-1", producer="test")
    request = Requested(envelope=envelope, request_id="r-1", name="Ada")

    with caused_by(envelope, producer="$name", occurred_at=datetime.now(UTC)):
        answer = greet(request)

    assert answer.greeting == "Hello, Ada!"
    assert answer.key == "r-1"
    assert answer.envelope.causation_id == str(envelope.event_id)


def test_the_service_answers_a_published_request_on_the_broker(opsflow_env: Env) -> None:
    with opsflow_env.running(service):
        opsflow_env.publish(body_model(Requested)(request_id="r-2", name="Grace"))
        [answer] = opsflow_env.wait_for(Greeted, where=lambda e: e.request_id == "r-2")
    assert answer.greeting == "Hello, Grace!"
    assert answer.envelope.producer == "$name"


def test_every_schema_version_is_readable_by_the_newest_and_each_class_mirrors_its_schema() -> (
    None
):
    assert check_evolution(application=application) == []
    found = load_catalogue(application=application)
    assert set(found) == {"$name.requested", "$name.greeted"}
    assert [line for event in found.values() for line in mismatches(event)] == []
''',
    "README.md": """\
# $name

An application built on [opsflow](https://pypi.org/project/opsflow/): the
service `$name` answers each `$name.requested` event on `$requests` with a
`$name.greeted` event on `$results`.

    python -m venv .venv && .venv/bin/pip install -e '.[test]'
    .venv/bin/pytest                       # the handler, the service on a real broker
                                           # (opsflow.testing), the contract gate
    .venv/bin/opsflow up                   # broker, PostgreSQL, registry; provisions
                                           # the topics and schemas, runs $name

In another shell, send a request and follow it:

    eval $$(.venv/bin/opsflow env)
    .venv/bin/python -c '
    from opsflow.producer import Producer, body_model
    from $package.contracts import Requested
    with Producer("shell") as producer:
        producer.send(body_model(Requested)(request_id="r-1", name="Ada"), idempotency_key="r-1")
    '
    .venv/bin/opsflow trace r-1

Layout: `$package/contracts.py` (topics and event types),
`$package/schemas/<event type>/vN.avsc` (the Avro contracts),
`$package/service.py` (the service), `$package/application.py` (what opsflow
runs), `tests/`.
""",
}


def write_project(name: str, parent: Path) -> list[Path]:
    """Write the starting point for service ``name`` into ``parent/name``; the paths written.

    Raises:
        ConfigurationError: a bad name, or ``parent/name`` exists already.
    """
    names = Names.of(name)
    root = parent / names.name
    if root.exists():
        raise ConfigurationError(
            str(root), "exists already", "Choose another name or directory (--dir)."
        )
    values = {
        "name": names.name,
        "package": names.package,
        "requests": names.requests,
        "results": names.results,
    }
    files = {
        Template(path).substitute(values): Template(text).substitute(values)
        for path, text in _FILES.items()
    }
    files[f"{names.package}/schemas/{names.name}.requested/v1.avsc"] = _schema(
        names,
        "Requested",
        f"Someone asked {names.name} to greet a name.",
        [_KEY_FIELD, {"name": "name", "type": "string", "doc": "Who to greet."}],
    )
    files[f"{names.package}/schemas/{names.name}.greeted/v1.avsc"] = _schema(
        names,
        "Greeted",
        f"{names.name} answered a request.",
        [_KEY_FIELD, {"name": "greeting", "type": "string", "doc": "What it said."}],
    )
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
