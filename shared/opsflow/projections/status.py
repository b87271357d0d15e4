"""Where every projection stands: position, lag in records and in time, last error."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as KafkaPartition

from opsflow.projections import Projection, positions
from opsflow.projections.positions import TopicPartition
from opsflow.topics import consumer_config, end_offsets, partitions_of, topic_name


@dataclass(frozen=True)
class ProjectionStatus:
    """One projection's standing; ``lag_s`` is the age of the oldest record not yet applied."""

    name: str
    description: str
    position: int
    lag: int
    lag_s: float
    last_event_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "position": self.position,
            "lag": self.lag,
            "lag_s": round(self.lag_s, 3),
            "last_event_at": self.last_event_at.isoformat() if self.last_event_at else None,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
        }


def statuses(
    conn: psycopg.Connection[Any],
    projections: Iterable[Projection],
    kafka: Mapping[str, Any],
    *,
    ends: Mapping[TopicPartition, int] | None = None,
) -> list[ProjectionStatus]:
    """The standing of each projection (read from its stored position and the topics' ends).

    ``ends``: the partitions' ends when the caller learned them already (one pass
    over the broker serves a whole status screen); looked up here otherwise.
    """
    consumer = Consumer(consumer_config(kafka, "projections-status"))
    try:
        found = []
        projections = list(projections)
        if ends is None:
            topics = sorted({topic_name(t) for p in projections for t in p.topics})
            ends = end_offsets(kafka, partitions_of(consumer, topics))
        for projection in projections:
            names = {topic_name(t) for t in projection.topics}
            parts = [tp for tp in ends if tp[0] in names]
            at = positions.load(conn, projection.name)
            behind = {tp: at.get(tp, 0) for tp in parts if at.get(tp, 0) < ends[tp]}
            last_event, error, error_at = conn.execute(
                "SELECT (SELECT max(last_event_at) FROM projection_positions"
                " WHERE projection = %s),"
                " s.last_error, s.last_error_at FROM (SELECT 1) AS one"
                " LEFT JOIN projection_status AS s ON s.projection = %s",
                (projection.name, projection.name),
            ).fetchone()  # type: ignore[misc]
            found.append(
                ProjectionStatus(
                    name=projection.name,
                    description=projection.description,
                    position=sum(at.values()),
                    lag=sum(ends[tp] - off for tp, off in behind.items()),
                    lag_s=_oldest_age(consumer, behind),
                    last_event_at=last_event,
                    last_error=error,
                    last_error_at=error_at,
                )
            )
        return found
    finally:
        consumer.close()


def _oldest_age(consumer: Consumer, behind: Mapping[TopicPartition, int]) -> float:
    """Seconds since the oldest of the first unapplied records was written (0: none)."""
    if not behind:
        return 0.0
    consumer.assign([KafkaPartition(t, p, off) for (t, p), off in behind.items()])
    oldest: float | None = None
    waiting, deadline = set(behind), time.monotonic() + 5
    while waiting and time.monotonic() < deadline:
        for msg in consumer.consume(len(waiting), 0.5):
            tp = (msg.topic(), msg.partition())
            if msg.error() is None and tp in waiting:
                waiting.discard(tp)
                stamp = msg.timestamp()[1] / 1000
                oldest = stamp if oldest is None else min(oldest, stamp)
    consumer.unassign()
    return max(0.0, time.time() - oldest) if oldest is not None else 0.0
