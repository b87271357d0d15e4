"""What operators did: every redrive, replay and rebuild, as events naming who did it.

An operator action changes what the system does (a redrive writes records back
to a topic every consumer reads, a replay re-drives a range into a service, a
rebuild swaps a read model), so it is audited like any other transition of the
platform: as events on a topic of record, ``opsflow.operator-actions``
(``ACTIONS_TOPIC``, one partition: one order for the whole audit trail, kept
forever like every topic of record), under a contract of the platform itself
(``opsflow.operator.action``, ``contracts/platform/``), which provisioning
creates and registers next to the application's own.

Each action is two events with the same ``action_id`` (the record key): its
intent (``STARTED``), written and acknowledged by the broker *before* the action
takes effect, and its outcome (``ENDED``) once it ended. Without its intent on
the log an action does not run (``ActionLog.begin`` raises); an intent without an
outcome is an action that never finished (the process died mid-way), which the
record says instead of losing it.

Who: from the console, the signed-in user (id, display name, role: the console
authenticates every request, ``opsflow.web.pages``); from the ``opsflow``
command, ``OPSFLOW_ACTOR``, else the operating system's user, with the Kafka
principal the command's writes authenticate as where one is configured (the SASL
user, or the OAuth client id). The principal is the part the broker verified:
only the operator's principal may write the topics of record and this topic
(``opsflow acls``); the name says which person at that principal's keyboard.
Both carry the host the action was taken from.

The ``operator_actions`` table is the read model of these events, the console's
list of actions. It is written by the writer of the events, right after the
broker acknowledged each (``apply``: idempotent, an outcome applied once), so
the console's pages show an action as soon as it is taken without a projector of
their own, and a row never exists without its event. ``restore`` rebuilds the
table from the topic: the log, not the table, is the record. A command run without
``DATABASE_URL`` (a replay may be) writes the events only.

Each step is its own committed write on purpose: the record of an action must
survive the action failing, which one transaction around both would roll back.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cavro
import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from psycopg.types.json import Jsonb

from opsflow import db
from opsflow.contracts.catalogue import read_versions, record_full_name
from opsflow.contracts.topics import Topic, subject_name
from opsflow.db import requires_table
from opsflow.errors import BadInputError, ConfigurationError, RetryableError
from opsflow.settings import RegistrySettings
from opsflow.topics import ReadToEnd, reader_config, topic_name
from opsflow.users import User

ACTIONS_TOPIC = Topic("opsflow.operator-actions", key="action_id", partitions=1)
"""Where operator actions are recorded (with ``OPSFLOW_TOPIC_PREFIX`` in front)."""
EVENT_TYPE = "opsflow.operator.action"
SCHEMAS = Path(__file__).parent / "contracts" / "platform"
"""The platform's own contracts, laid out as an application's (``<type>/vN.avsc``)."""
ACTOR_VARIABLE = "OPSFLOW_ACTOR"

REDRIVE = "dlq.redrive"
REPLAY = "replay"
REBUILD = "projection.rebuild"

STARTED, ENDED = "STARTED", "ENDED"
_HEADER = struct.Struct(">bI")
_OPTIONS = cavro.DEFAULT_OPTIONS.replace(record_decodes_to_dict=True, return_uuid_object=False)
_COLUMNS = (
    "action_id, started_at, user_id, actor, role, action, target, ended_at, outcome, detail,"
    " via, principal, host"
)


def versions() -> dict[int, dict[str, Any]]:
    """Every published version of the contract, oldest first (provisioning registers them)."""
    return read_versions(SCHEMAS, EVENT_TYPE)


def subject() -> str:
    """The contract's registry subject (TopicRecordNameStrategy, as every event type's)."""
    latest = versions()[max(versions())]
    return subject_name(ACTIONS_TOPIC.value, record_full_name(latest))


def kafka_principal(kafka: Mapping[str, Any]) -> str | None:
    """The principal a client with these settings authenticates as, where the settings
    say it (the SASL user name, the OAuth client id); None without authentication or
    with a certificate (its subject is the broker's to read)."""
    user = kafka.get("sasl.username") or kafka.get("sasl.oauthbearer.client.id")
    return f"User:{user}" if user else None


@dataclass(frozen=True)
class Actor:
    """Who takes an action (see the module docstring).

    Attributes:
        name: the person: a console user's display name, or the command's actor.
        via: ``console`` or ``cli``.
        user_id / role: the console user's id and role (None from the command).
        principal: the Kafka principal of the action's writes, where configured.
        host: the machine it was taken from.
    """

    name: str
    via: str
    user_id: str | None = None
    role: str | None = None
    principal: str | None = None
    host: str | None = field(default_factory=socket.gethostname)

    @classmethod
    def console_user(cls, user: User, kafka: Mapping[str, Any]) -> Actor:
        """A user signed in to the console, acting with the console's credentials."""
        return cls(
            user.display_name, "console", user.user_id, user.role.value, kafka_principal(kafka)
        )

    @classmethod
    def command_line(
        cls, kafka: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> Actor:
        """The person running an ``opsflow`` command: ``OPSFLOW_ACTOR``, else the OS user.

        Raises:
            ConfigurationError: ``OPSFLOW_ACTOR`` is set but blank or too long, or it is
                unset and the OS user cannot be found.
        """
        given = (os.environ if environ is None else environ).get(ACTOR_VARIABLE)
        if given is not None:
            name = given.strip()
            if not name or len(name) > 200 or not name.isprintable():
                raise ConfigurationError(
                    ACTOR_VARIABLE,
                    f"is {given!r}, not a name",
                    "Set it to who you are (a name or an e-mail address, up to 200 "
                    "characters), or unset it to be recorded as your OS user",
                )
        else:
            try:
                name = getpass.getuser()
            except Exception as err:  # no user name in the environment or the passwd file
                raise ConfigurationError(
                    ACTOR_VARIABLE,
                    f"is not set and the OS user is unknown ({err})",
                    "Set it to who you are: operator actions are recorded under it",
                ) from err
        return cls(name, "cli", principal=kafka_principal(kafka))

    def as_avro(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "via": self.via,
            "user_id": self.user_id,
            "role": self.role,
            "principal": self.principal,
            "host": self.host,
        }

    def __str__(self) -> str:
        where = f"{self.role}" if self.role else self.via
        return f"{self.name} ({where}{f', {self.principal}' if self.principal else ''})"


@dataclass(frozen=True)
class ActionEvent:
    """One record of ``ACTIONS_TOPIC``: an action's intent (STARTED) or outcome (ENDED)."""

    action_id: str
    phase: str
    at: datetime
    action: str
    target: str
    actor: Actor
    outcome: str | None = None
    detail: dict[str, Any] | None = None

    def as_avro(self) -> dict[str, Any]:
        return {
            "action_id": self.action_id,
            "phase": self.phase,
            "at": self.at,
            "action": self.action,
            "target": self.target,
            "actor": self.actor.as_avro(),
            "outcome": self.outcome,
            "detail": None if self.detail is None else json.dumps(self.detail, default=str),
        }

    @classmethod
    def from_avro(cls, datum: Mapping[str, Any]) -> ActionEvent:
        detail = datum.get("detail")
        return cls(
            action_id=str(datum["action_id"]),
            phase=str(datum["phase"]),
            at=datum["at"],
            action=datum["action"],
            target=datum["target"],
            actor=Actor(**datum["actor"]),
            outcome=datum.get("outcome"),
            detail=None if detail is None else json.loads(detail),
        )


class ActionCodec:
    """Operator actions on the wire: Confluent-framed Avro, as every event of opsflow.

    Writes with the latest version of the contract, registered under its subject on
    first use unless ``SCHEMA_REGISTRY_AUTO_REGISTER`` is off (then provisioning must
    have registered it, as for the application's contracts).
    """

    def __init__(self, registry: SchemaRegistryClient) -> None:
        self._registry = registry
        latest = versions()[max(versions())]
        self._latest_json = latest
        self._latest = cavro.Schema(json.dumps(latest), options=_OPTIONS)
        self._latest_id: int | None = None
        self._readers: dict[int, Any] = {}

    def _id(self) -> int:
        if self._latest_id is None:
            schema = Schema(json.dumps(self._latest_json), "AVRO")
            try:
                if RegistrySettings().schema_registry_auto_register:
                    found = int(self._registry.register_schema(subject(), schema))
                else:
                    found = int(self._registry.lookup_schema(subject(), schema).schema_id or 0)
            except SchemaRegistryError as err:
                raise ConfigurationError(
                    "SCHEMA_REGISTRY_URL",
                    f"the registry has no {subject()} to record operator actions with "
                    f"({err.error_message})",
                    "Run provisioning (python -m opsflow.provision) with this release",
                ) from err
            except Exception as err:  # the registry does not answer
                raise RetryableError(f"the schema registry did not answer: {err}") from err
            self._latest_id = found
        return self._latest_id

    def encode(self, event: ActionEvent) -> bytes:
        body: bytes = self._latest.binary_encode(event.as_avro())
        return _HEADER.pack(0, self._id()) + body

    def decode(self, data: bytes | None) -> ActionEvent:
        """The action a record value holds.

        Raises:
            BadInputError: not Confluent-framed, or not an operator action.
        """
        if data is None or len(data) < _HEADER.size or data[0] != 0:
            raise BadInputError("an operator action record is not Confluent-framed Avro")
        _, schema_id = _HEADER.unpack_from(data)
        reader = self._readers.get(schema_id)
        if reader is None:
            try:
                writer = json.loads(self._registry.get_schema(schema_id).schema_str or "{}")
            except SchemaRegistryError as err:
                raise BadInputError(f"unknown schema id {schema_id}: {err.error_message}") from err
            if record_full_name(writer) != record_full_name(self._latest_json):
                raise BadInputError(f"schema id {schema_id} is not an operator action")
            written = cavro.Schema(json.dumps(writer), options=_OPTIONS)
            reader = self._latest.reader_for_writer(written)
            self._readers[schema_id] = reader
        return ActionEvent.from_avro(reader.binary_decode(data[_HEADER.size :]))


@dataclass(frozen=True)
class OperatorAction:
    """One action as the table keeps it (``outcome`` None: not finished, or never will)."""

    action_id: str
    started_at: datetime
    user_id: str | None
    actor: str
    role: str | None
    action: str
    target: str
    ended_at: datetime | None
    outcome: str | None
    detail: dict[str, Any] | None
    via: str
    principal: str | None
    host: str | None


@dataclass(frozen=True)
class Begun:
    """An action whose intent is recorded: what ``ActionLog.finish`` records the end of."""

    action_id: str
    action: str
    target: str
    actor: Actor


class ActionLog:
    """Records operator actions: each event on the topic, then its row (module docstring).

    Args:
        kafka: librdkafka settings with the operator's credentials.
        registry: the schema registry client.
        database_url: where the ``operator_actions`` table is; None: events only.
        prefix: ``OPSFLOW_TOPIC_PREFIX`` (None: the environment's).
    """

    def __init__(
        self,
        kafka: Mapping[str, Any],
        registry: SchemaRegistryClient,
        database_url: str | None,
        *,
        prefix: str | None = None,
    ) -> None:
        self.kafka = {k: v for k, v in kafka.items() if not k.startswith("fetch.")}
        self.codec = ActionCodec(registry)
        self.database_url = database_url or None
        self.topic = topic_name(ACTIONS_TOPIC, prefix=prefix)
        self._producer: Producer | None = None

    def begin(
        self, actor: Actor, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> Begun:
        """Record that ``actor`` starts ``action`` on ``target``, before it takes effect.

        Raises:
            RetryableError: the broker did not take the record: the action must not run.
            ConfigurationError: the registry lacks the contract, or the table is missing.
        """
        begun = Begun(str(uuid.uuid4()), action, target, actor)
        self._record(
            ActionEvent(begun.action_id, STARTED, _now(), action, target, actor, detail=detail)
        )
        return begun

    def finish(self, begun: Begun, outcome: str, detail: dict[str, Any] | None = None) -> None:
        """Record how the action ended: ``outcome`` in words, ``detail`` as data."""
        self._record(
            ActionEvent(
                begun.action_id,
                ENDED,
                _now(),
                begun.action,
                begun.target,
                begun.actor,
                outcome,
                detail or {},
            )
        )

    @contextmanager
    def recorded(
        self, actor: Actor, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> Iterator[Outcome]:
        """Around an action: its intent before, its outcome after (what the block set on
        the ``Outcome`` it gets, or ``failed: <error>`` when it raised; then re-raised)."""
        begun = self.begin(actor, action, target, detail)
        ended = Outcome()
        try:
            yield ended
        except BaseException as err:
            self.finish(begun, f"failed: {err or type(err).__name__}", {"error": str(err)})
            raise
        self.finish(begun, ended.text or "done", ended.detail)

    def run(
        self,
        actor: Actor,
        action: str,
        target: str,
        act: Callable[[], tuple[str, dict[str, Any]]],
        detail: dict[str, Any] | None = None,
    ) -> str:
        """Record the intent, run ``act`` (its outcome in words and as data), record the
        outcome (``failed: <error>`` when it raised, which is not raised again: the
        record says it); the action's id, for a page that shows how it ended.

        Raises:
            RetryableError: the intent could not be recorded: nothing was done.
        """
        begun = self.begin(actor, action, target, detail)
        try:
            outcome, ended = act()
        except Exception as err:
            outcome, ended = f"failed: {err}", {"error": str(err)}
        self.finish(begun, outcome, ended)
        return begun.action_id

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(30)
            self._producer = None

    def _record(self, event: ActionEvent) -> None:
        self._write(event)
        if self.database_url is not None:
            with db.connect(self.database_url) as conn:
                apply(conn, event)

    def _write(self, event: ActionEvent) -> None:
        """Write one record and wait for the broker to acknowledge it."""
        if self._producer is None:
            self._producer = Producer(
                {**self.kafka, "acks": "all", "enable.idempotence": True, "linger.ms": 0}
            )
        failed: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failed.append(err)

        self._producer.produce(
            self.topic,
            key=event.action_id.encode(),
            value=self.codec.encode(event),
            on_delivery=delivered,
        )
        unsent = self._producer.flush(30)
        if failed or unsent:
            why = failed[0].str() if failed else "not acknowledged within 30 s"
            raise RetryableError(
                f"the operator action could not be recorded on {self.topic} ({why})"
                + ("; nothing was done" if event.phase == STARTED else "")
            )


@dataclass
class Outcome:
    """What an action recorded by ``ActionLog.recorded`` says of its end."""

    text: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(UTC)


def apply(conn: psycopg.Connection[Any], event: ActionEvent) -> None:
    """Apply one event to the ``operator_actions`` table; a repeat changes nothing.

    Raises:
        ConfigurationError: the table is missing (migrations not applied).
    """
    actor = event.actor
    with requires_table("operator_actions"), conn.transaction():
        conn.execute(
            "INSERT INTO operator_actions (action_id, started_at, user_id, actor, role,"
            " action, target, via, principal, host)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (action_id) DO NOTHING",
            (
                event.action_id,
                event.at,
                actor.user_id,
                actor.name,
                actor.role,
                event.action,
                event.target,
                actor.via,
                actor.principal,
                actor.host,
            ),
        )
        if event.phase == ENDED:
            conn.execute(
                "UPDATE operator_actions SET ended_at = %s, outcome = %s, detail = %s"
                " WHERE action_id = %s AND outcome IS NULL",
                (event.at, event.outcome, Jsonb(event.detail or {}), event.action_id),
            )


def events(
    kafka: Mapping[str, Any], registry: SchemaRegistryClient, *, prefix: str | None = None
) -> list[ActionEvent]:
    """Every operator action event on the topic, oldest first."""
    codec = ActionCodec(registry)
    name = topic_name(ACTIONS_TOPIC, prefix=prefix)
    consumer = Consumer(reader_config(kafka, "operator-actions"))
    try:
        metadata = consumer.list_topics(name, timeout=10).topics.get(name)
        if metadata is None or metadata.error is not None:
            return []
        starts = {(name, p): OFFSET_BEGINNING for p in sorted(metadata.partitions)}
        return [codec.decode(msg.value()) for msg in ReadToEnd(consumer, starts, timeout_s=60)]
    finally:
        consumer.close()


def restore(
    conn: psycopg.Connection[Any],
    kafka: Mapping[str, Any],
    registry: SchemaRegistryClient,
    *,
    prefix: str | None = None,
) -> int:
    """Apply every event of the topic to the table (rows it lacks are added, outcomes it
    lacks are set); the number of events read."""
    found = events(kafka, registry, prefix=prefix)
    for event in found:
        apply(conn, event)
    return len(found)


def _action(row: tuple[Any, ...]) -> OperatorAction:
    action_id, *rest = row
    return OperatorAction(str(action_id), *rest)


def get(conn: psycopg.Connection[Any], action_id: str) -> OperatorAction | None:
    try:
        uuid.UUID(action_id)
    except ValueError:
        return None
    with requires_table("operator_actions"):
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM operator_actions WHERE action_id = %s", (action_id,)
        ).fetchone()
    return _action(row) if row else None


def recent(
    conn: psycopg.Connection[Any], *, target: str | None = None, limit: int = 50
) -> list[OperatorAction]:
    """The latest actions, newest first (on ``target`` only, if given)."""
    with requires_table("operator_actions"):
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM operator_actions"
            " WHERE %(target)s::text IS NULL OR target = %(target)s"
            " ORDER BY started_at DESC LIMIT %(limit)s",
            {"target": target, "limit": limit},
        ).fetchall()
    return [_action(row) for row in rows]
