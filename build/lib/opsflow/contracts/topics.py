"""The topic contract: a topic of record, what keys its records, and its registry subjects.

An application declares its topics (``Application.topics``) and, on each event
type, the topic that carries it (``Event.topic``). A topic carries the events of
one workflow step, keyed by the field that names the workflow instance (an
order id, an invoice id), so a consumer of that step sees all of an instance's
events on one partition, in order. Several event types therefore share a topic,
which is why subjects follow Confluent's ``TopicRecordNameStrategy``
(``<topic>-<record full name>``): each event type on a topic evolves under its
own subject and compatibility history.
"""

from __future__ import annotations

import re

from opsflow.errors import ConfigurationError

# Kafka's legal topic names, shorter than its limit so a prefix and ".dlq" still fit.
_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,99}$")
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")


class Topic(str):
    """A topic of record: the string is its Kafka name (what ``topic_name`` prefixes),
    so a ``Topic`` goes wherever a topic name does.

    Attributes:
        key: the event field whose value keys every record on the topic: the id of
            the workflow instance the event belongs to (``"order_id"``). Every event
            type on the topic has it, and its envelope's correlation id is it.
        partitions: how many partitions provisioning creates; None: the
            environment's default (``OPSFLOW_TOPIC_PARTITIONS``), since how far a
            step must scale out is a property of the deployment more than of the
            workflow.
    """

    key: str
    partitions: int | None

    def __new__(cls, name: str, *, key: str, partitions: int | None = None) -> Topic:
        if not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"topic {name!r}",
                "is not a topic name",
                "Use lower-case letters, digits, '.', '_' and '-', starting with a letter.",
            )
        if not _FIELD.fullmatch(key):
            raise ConfigurationError(
                f"topic {name!r}", f"has the key {key!r}", "Name an event field (snake_case)."
            )
        if partitions is not None and partitions < 1:
            raise ConfigurationError(
                f"topic {name!r}", f"has {partitions} partitions", "Give it at least one."
            )
        topic = super().__new__(cls, name)
        topic.key = key
        topic.partitions = partitions
        return topic

    @property
    def value(self) -> str:
        """The plain name (as a ``StrEnum`` member's ``value``)."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Topic({self.value!r}, key={self.key!r}, partitions={self.partitions})"

    def __reduce__(self) -> tuple[object, ...]:
        return (_topic, (self.value, self.key, self.partitions))


def _topic(name: str, key: str, partitions: int | None) -> Topic:
    return Topic(name, key=key, partitions=partitions)


def subject_name(topic: str, record_full_name: str) -> str:
    """The registry subject under Confluent's ``TopicRecordNameStrategy``.

    >>> subject_name("orders", "opsflow.events.OrderReceived")
    'orders-opsflow.events.OrderReceived'
    """
    return f"{topic}-{record_full_name}"
