"""The topic contract: which topic carries which event types, and their registry subjects.

A topic carries the events of one workflow step, keyed by order id, so a consumer
of that step sees all of an order's events on one partition, in order. Several
event types therefore share a topic, which is why subjects follow Confluent's
``TopicRecordNameStrategy`` (``<topic>-<record full name>``): each event type on a
topic evolves under its own subject and compatibility history.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class Topic(StrEnum):
    """The topics of record; values are the Kafka topic names."""

    ORDERS = "orders"
    POLICY_CHECK = "policy-check"
    REVIEW = "review"
    DISPATCH = "dispatch"
    POD = "pod"
    POD_REJECTS = "pod-rejects"


EVENT_TOPICS: Mapping[str, Topic] = MappingProxyType(
    {
        "order.received": Topic.ORDERS,
        "policy.checked": Topic.POLICY_CHECK,
        "review.requested": Topic.REVIEW,
        "review.claimed": Topic.REVIEW,
        "review.released": Topic.REVIEW,
        "review.decided": Topic.REVIEW,
        "review.escalated": Topic.REVIEW,
        "review.sla_breached": Topic.REVIEW,
        "dispatch.requested": Topic.DISPATCH,
        "dispatch.executed": Topic.DISPATCH,
        "dispatch.failed": Topic.DISPATCH,
        "pod.captured": Topic.POD,
        "pod.rejected": Topic.POD_REJECTS,
    }
)
"""Event type name -> the topic that carries it. The set of event types opsflow knows."""


def subject_name(topic: str, record_full_name: str) -> str:
    """The registry subject under Confluent's ``TopicRecordNameStrategy``.

    >>> subject_name("orders", "opsflow.events.OrderReceived")
    'orders-opsflow.events.OrderReceived'
    """
    return f"{topic}-{record_full_name}"
