"""What an application says about one of its human steps (``HumanTask``).

The step's events are the application's own (its schemas, its names, its
topic and key), in the shape every human task has: a task is requested with a
due time and its reasons, claimed, released, decided (approved or rejected,
with a reason) by an authenticated person, escalated to the second tier when
its first SLA passes, and recorded as breached when the second one does.
``HumanTask`` checks that shape when it is declared, so a field missing from
an event class fails at start, not at the first decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from opsflow.contracts import AvroRecord, Event, Topic
from opsflow.errors import ConfigurationError
from opsflow.nodes.human.facts import FactsReader
from opsflow.nodes.human.settings import HumanTaskSettings

# The fields each event kind must have, next to the topic's key field.
_FIELDS: dict[str, tuple[str, ...]] = {
    "requested": ("task_id", "tier", "due_at", "reason_codes", "reasons"),
    "claimed": ("task_id", "actor", "tier"),
    "released": ("task_id", "actor", "tier", "reason"),
    "decided": ("task_id", "actor", "tier", "decision", "reason"),
    "escalated": ("task_id", "previous_tier", "tier", "breached_due_at", "due_at"),
    "breached": ("task_id", "tier", "due_at"),
}


@dataclass(frozen=True)
class TaskEvents:
    """The application's event class for each thing that happens to a task."""

    requested: type[Event]
    claimed: type[Event]
    released: type[Event]
    decided: type[Event]
    escalated: type[Event]
    breached: type[Event]

    def __iter__(self) -> Any:
        return iter((name, getattr(self, name)) for name in _FIELDS)


@dataclass(frozen=True)
class HumanTask:
    """One human step of an application.

    Attributes:
        name: the step's name: the producer of its events, its consumer group,
            its log lines ("approval").
        subject: what a task decides about ("invoice"), as pages and messages say it.
        events: its event classes, all on one topic (keyed by the instance's id).
        actor: its Avro record of a person (``user_id``, ``display_name``, ``role``).
        tiers: its enum of tiers, in escalation order: the first tier's tasks go to
            reviewers (and supervisors), the second's to supervisors only.
        roles: its enum of actors' roles, with ``REVIEWER`` and ``SUPERVISOR``
            (opsflow's user roles that may act).
        decisions: its enum of decisions, with ``APPROVED`` and ``REJECTED``.
        opener: ``module:attribute`` of the ``Service`` that opens tasks (an
            event that needs a person becomes ``events.requested``); the step's
            process runs it next to the API.
        settings: its settings class (a ``HumanTaskSettings`` with its own
            variable prefix and SLA file).
        facts: what a task's page shows of the instance it is about, read from the
            application's read models (``opsflow.nodes.human.facts``); without it the
            page shows the task alone.
    """

    name: str
    subject: str
    events: TaskEvents
    actor: type[AvroRecord]
    tiers: type[StrEnum]
    roles: type[StrEnum]
    decisions: type[StrEnum]
    opener: str
    settings: type[HumanTaskSettings]
    facts: FactsReader | None = None

    def __post_init__(self) -> None:
        where = f"human task {self.name!r}"
        topics = {event.topic.value for _, event in self.events}
        if len(topics) != 1:
            raise ConfigurationError(
                where, f"has events on several topics ({', '.join(sorted(topics))})", "Use one."
            )
        for kind, event in self.events:
            wanted = (*_FIELDS[kind], self.topic.key)
            missing = [name for name in wanted if name not in event.model_fields]
            if missing:
                raise ConfigurationError(
                    where,
                    f"has {event.__name__} as its {kind} event, without {', '.join(missing)}",
                    "Give the event class (and its schema) the fields of a task's "
                    f"{kind} event: {', '.join(wanted)}.",
                )
        for name in ("user_id", "display_name", "role"):
            if name not in self.actor.model_fields:
                raise ConfigurationError(where, f"has an actor without {name!r}", "Add it.")
        for enum, symbols in (
            (self.roles, ("REVIEWER", "SUPERVISOR")),
            (self.decisions, ("APPROVED", "REJECTED")),
        ):
            absent = [s for s in symbols if s not in enum.__members__]
            if absent:
                raise ConfigurationError(
                    where, f"has {enum.__name__} without {', '.join(absent)}", "Add the symbols."
                )
        if len(self.tiers) != 2:
            raise ConfigurationError(
                where,
                f"has {len(self.tiers)} tiers in {self.tiers.__name__}",
                "Declare two: the first tier, and the one a task escalates to.",
            )

    @property
    def topic(self) -> Topic:
        """The topic of the step's events."""
        return self.events.requested.topic

    @property
    def key_field(self) -> str:
        """The field naming the instance a task is about (``invoice_id``)."""
        return self.topic.key

    @property
    def first_tier(self) -> StrEnum:
        return next(iter(self.tiers))

    @property
    def second_tier(self) -> StrEnum:
        return list(self.tiers)[1]

    @property
    def approved(self) -> StrEnum:
        return self.decisions["APPROVED"]

    @property
    def rejected(self) -> StrEnum:
        return self.decisions["REJECTED"]

    @property
    def reviewer(self) -> StrEnum:
        return self.roles["REVIEWER"]

    @property
    def supervisor(self) -> StrEnum:
        return self.roles["SUPERVISOR"]

    def actor_of(self, user_id: str, display_name: str, role: StrEnum) -> AvroRecord:
        """A person as the step's events record them."""
        return self.actor.model_validate(
            {"user_id": user_id, "display_name": display_name, "role": role}
        )
