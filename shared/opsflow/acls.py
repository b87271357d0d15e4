"""The Kafka ACLs that enforce, at the broker, who may read and write what.

Consumers check each record's envelope against its type's declaration
(``Event.emitted_by``), but an envelope is written by whoever holds the
topic: on a real cluster, only the broker can stop a principal from writing
where it should not. Each program of the application gets a principal of its
own (``User:<program>``) allowed exactly what it does:

- a stream service: read (and describe) what it consumes, read and write what
  it produces (it reads its outputs back after a takeover, to write none
  twice), write the dead-letter topics of its inputs, its consumer group, and
  the transactional ids of its delivery (``<group>.<topic>.<partition>``);
- a gateway (ingest, a webhook intake): write the topics of the event types it
  takes from external producers (``Program.gateway_for``);
- any program: write the topics of the event types that name it in
  ``emitted_by`` (the review desk's API writes its decisions);
- the projector: read every topic and write their dead-letter topics;
- provisioning: create topics and set their configuration;
- the operator's commands (replay, dead-letter redrive, status, trace) and the
  operator console (``opsflow.console``, which runs them as pages): read and
  write every topic, describe every group. The console is not a principal of
  its own: it does what an operator's commands do, so it authenticates as the
  operator.

Writing with idempotence needs nothing more on Kafka 3.0 and later (KIP-679:
``IdempotentWrite`` is implied by ``Write`` on the topic).

A principal is what the broker makes of how a client authenticated: the SASL
user name (PLAIN, SCRAM), the token's subject (OAUTHBEARER; ``sub`` unless the
broker is told another claim), the certificate's subject (mTLS; the whole
distinguished name unless ``ssl.principal.mapping`` shortens it), or a service
account id on Confluent Cloud. ``principal_format`` says how a program's name
becomes its principal (``User:{program}`` when each program authenticates as a
user of its own name); ``principals`` names those that follow no pattern.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from opsflow.application import Application
from opsflow.errors import ConfigurationError
from opsflow.runtime import load_service
from opsflow.topics import dead_letter_topic, topic_name

Resource = Literal["topic", "group", "transactional-id", "cluster"]
Pattern = Literal["literal", "prefixed"]

PROJECTOR = "projector"
PROVISION = "provision"
OPERATOR = "operator"


@dataclass(frozen=True, order=True)
class Acl:
    """One allow rule: ``principal`` may do ``operations`` on a resource."""

    principal: str
    resource: Resource
    name: str
    pattern: Pattern
    operations: tuple[str, ...]

    def command(self) -> str:
        """The ``kafka-acls.sh`` invocation that adds it."""
        resource = {
            "topic": ["--topic", self.name],
            "group": ["--group", self.name],
            "transactional-id": ["--transactional-id", self.name],
            "cluster": ["--cluster"],
        }[self.resource]
        operations = [arg for op in self.operations for arg in ("--operation", op)]
        return " ".join(
            [
                'kafka-acls.sh --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS"',
                '--command-config "$KAFKA_ADMIN_CONFIG" --add',
                f"--allow-principal {shlex.quote(self.principal)}",
                *(shlex.quote(arg) for arg in operations),
                *(shlex.quote(arg) for arg in resource),
                *(["--resource-pattern-type", "prefixed"] if self.pattern == "prefixed" else []),
            ]
        )

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "operations": list(self.operations)}


def _topics(names: set[str], principal: str, operations: tuple[str, ...]) -> list[Acl]:
    return [Acl(principal, "topic", name, "literal", operations) for name in sorted(names)]


DEFAULT_PRINCIPAL_FORMAT = "User:{program}"


def principal_namer(
    names: list[str], principal_format: str, principals: Mapping[str, str]
) -> dict[str, str]:
    """The principal of each of ``names`` (programs, and the projector, provisioning
    and operator): from ``principals`` when named there, else ``principal_format``.

    Raises:
        ConfigurationError: a format without ``{program}`` or not ``Type:name``; a
            principal given for a name that has none.
    """
    head, colon, tail = principal_format.partition(":")
    if not (head and colon and tail) or "{program}" not in principal_format:
        raise ConfigurationError(
            "--principal-format",
            f"{principal_format!r} is not TYPE:NAME with {{program}} in it",
            "Give e.g. User:{program}, User:opsflow-{program} or User:CN={program}.example.com",
        )
    unknown = sorted(set(principals) - set(names))
    if unknown:
        raise ConfigurationError(
            "--principal",
            f"no program called {', '.join(unknown)}",
            f"Name one of: {', '.join(names)}",
        )
    return {
        name: principals.get(name) or principal_format.replace("{program}", name) for name in names
    }


def acls_for(
    application: Application,
    *,
    prefix: str | None = None,
    principal_format: str = DEFAULT_PRINCIPAL_FORMAT,
    principals: Mapping[str, str] | None = None,
) -> list[Acl]:
    """Every ACL the application's principals need (topic and group names with
    ``prefix``, ``OPSFLOW_TOPIC_PREFIX`` by default, as the programs use them), each
    program's principal named by ``principal_format`` or ``principals`` (see
    ``principal_namer``)."""
    events = {model.event_type: model for model in application.events}
    on_cluster = [program.name for program in application.programs if not program.stand_in]
    principal_of = principal_namer(
        [*on_cluster, PROJECTOR, PROVISION, OPERATOR], principal_format, principals or {}
    )

    def name(topic: str) -> str:
        return topic_name(topic, prefix=prefix)

    found: list[Acl] = []
    for program in application.programs:
        if program.stand_in:
            continue  # an external partner's stand-in: not on the cluster
        principal = principal_of[program.name]
        names = {program.name}
        reads: set[str] = set()
        if program.service:
            service = load_service(program.service)
            names.add(service.name)
            inputs = {name(t.value) for t in service.consumes}
            outputs = {name(t.value) for t in service.produces}
            # Outputs are read back after a takeover, to write none of them twice.
            reads = inputs | outputs
            writes = outputs | {dead_letter_topic(t) for t in inputs}
            group = name(service.name)
            found.append(Acl(principal, "group", group, "literal", ("Read", "Describe")))
            found.append(
                Acl(principal, "transactional-id", f"{group}.", "prefixed", ("Write", "Describe"))
            )
        else:
            writes = set()
        writes |= {
            name(model.topic.value)
            for event_type, model in events.items()
            if event_type in program.gateway_for or names & model.emitted_by.services
        }
        found += _topics(reads - writes, principal, ("Read", "Describe"))
        found += _topics(reads & writes, principal, ("Read", "Write", "Describe"))
        found += _topics(writes - reads, principal, ("Write", "Describe"))

    every = {name(topic.value) for topic in application.topics}
    principal = principal_of[PROJECTOR]
    found += _topics(every, principal, ("Read", "Describe"))
    found += _topics({dead_letter_topic(t) for t in every}, principal, ("Write", "Describe"))
    principal = principal_of[PROVISION]
    found.append(Acl(principal, "cluster", "kafka-cluster", "literal", ("Create",)))
    found.append(
        Acl(principal, "topic", "*", "literal", ("Describe", "DescribeConfigs", "AlterConfigs"))
    )
    principal = principal_of[OPERATOR]
    found.append(Acl(principal, "topic", "*", "literal", ("Read", "Write", "Describe")))
    found.append(Acl(principal, "group", "*", "literal", ("Read", "Describe")))
    return found
