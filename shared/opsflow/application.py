"""An application: the programs a workflow runs, declared once for every opsflow command.

opsflow's library knows no workflow. An application (the order workflow in
``services/`` is the reference one) declares its topics and event types, where
their Avro schemas are, the programs it runs, its read models, its tables'
migrations, how ``opsflow trace`` says where an instance stands, and commands
of its own; provisioning creates its topics and registers its schemas, ``opsflow
up`` starts its programs, ``opsflow status`` shows their consumer lag, ``opsflow
replay --into`` re-drives records into them, the projector keeps its read
models, from that declaration and not from lists of their own::

    from pathlib import Path
    from opsflow.application import Application, Program

    application = Application(
        name="invoices",
        instance="invoice",
        topics=(INVOICES, APPROVALS),
        events=(InvoiceSubmitted, InvoiceApproved),
        schemas=Path(__file__).parent / "schemas",
        programs=(
            Program("approve", service="invoices.approve"),
            Program("intake", module="invoices.intake", port_env="INTAKE_PORT",
                    url_env="INTAKE_URL"),
        ),
    )

It is found through ``OPSFLOW_APP``, else through the entry points of the
``opsflow.applications`` group installed with applications' packages
(``[project.entry-points."opsflow.applications"]``), so an application
installed outside this repository is found like the reference one. Several
found (installed, or named in ``OPSFLOW_APP=orders,refunds``) run together, as
one combination (``combine``): one stack, every part's programs, topics and
read models, each part's schemas and migrations its own.
"""

from __future__ import annotations

import functools
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsflow.contracts import Event, Topic
from opsflow.errors import ConfigurationError
from opsflow.targets import load_target

if TYPE_CHECKING:
    from opsflow.projections import Projection

# The entry point group an installed application registers itself under.
ENTRY_POINT_GROUP = "opsflow.applications"
# The stack's own components: an application's programs may not take their names.
RESERVED_NAMES = frozenset(
    {
        "bucket",
        "broker",
        "kafka",
        "postgres",
        "registry",
        "projector",
        "provision",
        "supervisor",
        "console",
    }
)
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class Program:
    """One process of an application, as ``opsflow up`` runs it.

    Attributes:
        name: its name in ``opsflow status``, the stack's logs and ``replay --into``.
        service: ``module[:attribute]`` of the ``Service`` it runs (a stream
            service: it consumes topics, so ``status`` shows its lag and
            ``replay --into`` can re-drive records into it).
        module: what ``python -m`` runs, for a program with a ``__main__`` of
            its own (an HTTP API; with ``service`` too when it also runs that
            service's worker, as the review desk does). Without it the opsflow
            runtime runs ``service``.
        port_env: the variable its loopback port is passed in (HTTP programs).
        url_env: the variable under which the stack tells every other process
            (and ``opsflow env``) where it listens.
        env: its own further settings. ``{VARIABLE}`` in a value is filled from
            the stack's variables (another program's ``url_env``,
            ``DATABASE_URL``...), ``{program_dir}`` with a directory of its own
            under the data directory; a variable set in the environment wins.
        stand_in: it stands in for an external partner (a carrier, a payment
            provider): when ``url_env`` is set in the environment, that partner
            is used and this program is not started.
        api_key_env: the variable in which it gets an ingest API key of its own
            (a partner stand-in calling the application's webhooks).
        off_path: it may fall behind the workflow when cores are busy (a
            webhook intake, an auditor): it runs at a lower CPU priority.
        gateway_for: the event types it writes on behalf of external producers
            (an intake such as ingest, which authenticates their API keys): what
            ``opsflow acls`` lets its principal write. What a program writes as
            itself follows from its service and the events' ``emitted_by``.
    """

    name: str
    service: str | None = None
    module: str | None = None
    port_env: str | None = None
    url_env: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    stand_in: bool = False
    api_key_env: str | None = None
    off_path: bool = False
    gateway_for: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"program {self.name!r}"
        if not _NAME.match(self.name):
            raise ConfigurationError(
                where, "is not a valid program name", "Use lower case letters, digits and '-'."
            )
        if self.name in RESERVED_NAMES:
            raise ConfigurationError(
                where, "takes the name of one of the stack's own components", "Rename it."
            )
        if not self.service and not self.module:
            raise ConfigurationError(
                where, "runs nothing", "Give it a `service` (module:attribute) or a `module`."
            )
        if self.port_env and not self.module:
            raise ConfigurationError(
                where, "has a port but no module to listen on it", "Give it a `module`."
            )
        if (self.url_env or self.stand_in) and not self.port_env:
            raise ConfigurationError(
                where, "has a URL but no port", "Give it a `port_env` to listen on."
            )
        if self.stand_in and not self.url_env:
            raise ConfigurationError(
                where, "stands in for a partner without naming its URL variable", "Set `url_env`."
            )
        for variable in (self.port_env, self.url_env, self.api_key_env, *self.env):
            if variable is not None and not _ENV_NAME.match(variable):
                raise ConfigurationError(
                    where, f"names the variable {variable!r}", "Use upper case, digits and '_'."
                )

    @property
    def command(self) -> tuple[str, ...]:
        """What ``python -m`` runs: its module, or the opsflow runtime with its service."""
        if self.module:
            return (self.module,)
        assert self.service is not None
        return ("opsflow.runtime", self.service)


@dataclass(frozen=True)
class Gauge:
    """A number the on-call operator watches on ``opsflow status``, read from the
    application's tables: ``sql`` returns one row with one count ("open reviews")."""

    label: str
    sql: str


@dataclass(frozen=True)
class Verdict:
    """Where one instance of the workflow stands: ``state`` (a short word, e.g. the
    read model's), a sentence for people, and whether it is done (``terminal``) or
    waiting for someone or something."""

    state: str
    now: str
    terminal: bool


# An instance's events in time order, the time now, and when each event's record was
# written (event id -> time, where known) -> where it stands.
Standing = Callable[[Sequence[Event], datetime, Mapping[str, datetime]], Verdict]


@dataclass(frozen=True, eq=False)
class Application:
    """What a workflow carries, runs and keeps, and how opsflow reads it.

    Attributes:
        name: what it is called.
        topics: its topics of record (``opsflow.contracts.Topic``: name, key
            field, partitions), which provisioning creates.
        events: its event classes (``opsflow.contracts.Event``), each naming one
            of ``topics``; their schemas are ``schemas/<event type>/vN.avsc``.
        schemas: the folder of its Avro schemas (an absolute path, resolved from
            its package, so every command finds it from any directory).
        instance: what one instance of the workflow is called ("order"), as
            ``opsflow trace`` and ``replay`` say it.
        programs: what ``opsflow up`` runs (see ``Program``).
        standing: where an instance stands, from its events: the "now:" line of
            ``opsflow trace`` (without it, the last event says).
        summary: the facts worth a line in ``opsflow trace`` of one event.
        read_models: its projections (``opsflow.projections``), which the
            projector keeps current next to the audit log.
        migrations: the package holding its ``NNNN_name.sql`` migrations (its
            services' tables, its read models' tables), applied after opsflow's.
        commands: ``module:function`` of commands of its own that ``opsflow``
            offers next to its own (a typer command function each; its name,
            ``_`` as ``-``, is the command's), imported only by the CLI.
        gauges: what ``opsflow status`` counts for the on-call operator (``Gauge``:
            work waiting for people, tasks past their SLA).
        parts: for a combination of applications (``combine``), the applications
            it is made of; empty for one declared by a team.
    """

    name: str
    programs: tuple[Program, ...] = ()
    topics: tuple[Topic, ...] = ()
    events: tuple[type[Event], ...] = ()
    schemas: Path | None = None
    instance: str = "instance"
    standing: Standing | None = None
    summary: Callable[[Event], str] | None = None
    read_models: tuple[Projection, ...] = ()
    migrations: str | None = None
    commands: tuple[str, ...] = ()
    gauges: tuple[Gauge, ...] = ()
    parts: tuple[Application, ...] = ()

    def __post_init__(self) -> None:
        where = f"application {self.name!r}"
        topics = {topic.value: topic for topic in self.topics}
        if len(topics) != len(self.topics):
            raise ConfigurationError(where, "declares a topic twice", "Declare each once.")
        types: set[str] = set()
        for event in self.events:
            if not isinstance(getattr(event, "topic", None), Topic):
                raise ConfigurationError(
                    where, f"lists {event.__name__}, which has no topic", "Set its `topic`."
                )
            declared = topics.get(event.topic.value)
            if declared is None or declared.key != event.topic.key:
                raise ConfigurationError(
                    where,
                    f"lists {event.__name__}, carried by {event.topic.value!r}, "
                    "which is not one of its topics",
                    "Add the topic to `topics`.",
                )
            if event.event_type in types:
                raise ConfigurationError(
                    where, f"lists the event type {event.event_type!r} twice", "List it once."
                )
            types.add(event.event_type)
        if self.events and self.schemas is None and not self.parts:
            raise ConfigurationError(
                where, "declares events but not its schemas folder", "Set `schemas`."
            )
        if self.schemas is not None and not self.schemas.is_absolute():
            raise ConfigurationError(
                where,
                f"names its schemas folder {self.schemas} relative to the working directory",
                "Resolve it from the package: Path(__file__).parent / 'schemas'.",
            )
        seen: set[str] = set()
        for program in self.programs:
            if program.name in seen:
                raise ConfigurationError(
                    f"application {self.name!r}",
                    f"declares the program {program.name!r} twice",
                    "Give each program a name of its own.",
                )
            seen.add(program.name)

    @property
    def models(self) -> dict[str, type[Event]]:
        """Each event type's name (``"order.received"``) and class, in declared order."""
        return {event.event_type: event for event in self.events}

    @property
    def services(self) -> dict[str, str]:
        """Each stream service's program name and ``Service`` target, in declared order."""
        return {p.name: p.service for p in self.programs if p.service}

    @property
    def members(self) -> tuple[Application, ...]:
        """The declared applications this one is: its parts, or itself."""
        return self.parts or (self,)

    def part_for(self, topic: str) -> Application:
        """The declared application whose topics include ``topic`` (itself when it is not
        a combination, or when no part has the topic)."""
        for part in self.parts:
            if any(t.value == topic for t in part.topics):
                return part
        return self

    def program(self, name: str) -> Program | None:
        return next((p for p in self.programs if p.name == name), None)


def load_command(target: str) -> Callable[..., Any]:
    """The command function ``module:function`` names (see ``Application.commands``).

    Raises:
        ConfigurationError: no function there.
    """
    command: Callable[..., Any] = load_target(
        target,
        types.FunctionType,
        default="",
        where=target,
        hint="Name a module:function of the application (a typer command function).",
    )
    return command


def load_application(target: str | None = None) -> Application:
    """The application(s) ``target`` names, else ``OPSFLOW_APP``, else every one installed
    under the ``opsflow.applications`` entry point group.

    A target is a comma-separated list of installed entry point names (``orders``)
    or ``module[:attribute]`` paths; several make one combination (``combine``).

    Raises:
        ConfigurationError: nothing found, a name that names nothing, not an
            Application, or applications that cannot run together.
    """
    # One application seen twice (metadata left behind by an older install of its
    # package next to the current one) is still one.
    installed = {
        ep.name: ep
        for ep in sorted(
            {ep.value: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}.values(),
            key=lambda ep: ep.name,
        )
    }
    target = target or os.environ.get("OPSFLOW_APP")
    if target:
        names = [name.strip() for name in target.split(",") if name.strip()]
        return combine(
            [
                _load(installed[name].value, f"entry point {name!r}")
                if name in installed
                else _load(name, "OPSFLOW_APP")
                for name in names
            ]
        )
    if not installed:
        raise ConfigurationError(
            "OPSFLOW_APP",
            f"is not set and no package declares an `{ENTRY_POINT_GROUP}` entry point",
            "Set OPSFLOW_APP=module:attribute to your Application, or install its package.",
        )
    return combine([_load(ep.value, f"entry point {name!r}") for name, ep in installed.items()])


@functools.cache
def _combined(applications: tuple[Application, ...]) -> Application:
    """One combination per set of applications, so what is cached per application (its
    catalogue) is read once."""
    return Application(
        name="+".join(app.name for app in applications),
        programs=tuple(p for app in applications for p in app.programs),
        topics=tuple(t for app in applications for t in app.topics),
        events=tuple(e for app in applications for e in app.events),
        read_models=tuple(r for app in applications for r in app.read_models),
        commands=tuple(c for app in applications for c in app.commands),
        gauges=tuple(g for app in applications for g in app.gauges),
        parts=applications,
    )


def combine(applications: Sequence[Application]) -> Application:
    """Several applications as one: one stack runs every part's programs, provisions
    every part's topics and keeps every part's read models; each part keeps its
    schemas, migrations and ``trace`` rules. One application is itself.

    Raises:
        ConfigurationError: two parts declare the same program, topic or event type.
    """
    parts = tuple(dict.fromkeys(applications))
    if len(parts) == 1:
        return parts[0]
    return _combined(parts)


def _load(target: str, source: str) -> Application:
    return load_target(
        target,
        Application,
        default="application",
        where=source,
        hint="Name a module:attribute holding an opsflow Application.",
    )
