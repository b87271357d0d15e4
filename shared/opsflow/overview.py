"""The on-call operator's one screen: services, consumer lag, read models, dead letters, and
the numbers the application says to watch (work waiting for people, say).

``opsflow status`` shows the stack's processes; this adds what they are doing,
read from where the truth is: consumer lag from the broker (each service's
committed offsets against the partitions' ends), throughput from the
services' own ``/metrics``, read-model positions from PostgreSQL, dead-letter
counts from the ``.dlq`` topics, open reviews and SLA breaches from the read
models. Each part that cannot be read (no database, a table not there yet) is
reported as unavailable rather than failing the whole screen.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from opsflow import db
from opsflow.application import Application, load_application
from opsflow.errors import ConfigurationError, RetryableError
from opsflow.projections.status import ProjectionStatus, statuses
from opsflow.settings import TopicSettings
from opsflow.stack.health import probe_client
from opsflow.topics import dead_letter_topic, end_offsets, partitions_in, topic_name

if TYPE_CHECKING:
    from opsflow.stack.components import StackPlan

_PROCESSED = re.compile(r"^opsflow_events_processed_total\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


@dataclass
class ServiceLag:
    """A service (its consumer group) and how far behind it is per input topic."""

    name: str
    lag: dict[str, int]
    processed_total: float | None = None
    processed_per_s: float | None = None


@dataclass
class Overview:
    services: list[ServiceLag] = field(default_factory=list)
    projections: list[ProjectionStatus] = field(default_factory=list)
    dead_letters: dict[str, int] = field(default_factory=dict)  # not yet redriven
    # The application's gauges (``Application.gauges``): label -> count (None: unreadable).
    gauges: dict[str, int | None] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "services": [vars(s) for s in self.services],
            "projections": [p.as_json() for p in self.projections],
            "dead_letters": self.dead_letters,
            "gauges": self.gauges,
            "unavailable": self.unavailable,
        }


def _committed(
    kafka: Mapping[str, Any], group: str, parts: list[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The offsets ``group`` committed on ``parts`` (0 where it committed none)."""
    consumer = Consumer({**kafka, "group.id": group, "enable.auto.commit": False})
    try:
        committed = consumer.committed([KafkaPartition(*tp) for tp in parts], timeout=10)
        return {(kp.topic, kp.partition): max(kp.offset, 0) for kp in committed}
    finally:
        consumer.close()


def _lag(
    name: str, committed: Mapping[tuple[str, int], int], ends: Mapping[tuple[str, int], int]
) -> ServiceLag:
    lag: dict[str, int] = {}
    for (topic, partition), at in committed.items():
        lag[topic] = lag.get(topic, 0) + max(0, ends[(topic, partition)] - at)
    return ServiceLag(name, lag)


def processed_total(metrics_url: str) -> float | None:
    """The inputs a runtime service has processed since it started (None: no answer)."""
    try:
        text = probe_client().get(f"{metrics_url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    return sum(float(n) for n in _PROCESSED.findall(text))


def overview(
    kafka: Mapping[str, Any], database_url: str | None, plan: StackPlan | None = None
) -> Overview:
    """Everything on the screen. With the local stack's ``plan``, its services' processed
    counters are read before and after the rest, which gives the rates, and what each
    service reads is the plan's record, not learnt by importing the service."""
    found = Overview()
    metrics = plan.metrics if plan is not None else {}
    recorded = {c.name: c for c in plan.components if c.consumes} if plan is not None else {}
    # The broker's answers are awaited in threads (librdkafka releases the interpreter):
    # each part of the screen costs what its slowest request does, not the sum of them
    # all (measured: 0.45 s in turn, on an idle stack).
    with ThreadPoolExecutor(max_workers=16) as pool:
        before_f = {name: pool.submit(processed_total, url) for name, url in metrics.items()}
        started = time.monotonic()
        try:
            application = load_application()
        except ConfigurationError as err:  # the rest of the screen cannot be known
            found.unavailable.append(f"services: {err}")
            return found
        prefix = TopicSettings().prefix
        consumer = Consumer({**kafka, "group.id": "opsflow-status"})
        try:
            metadata = consumer.list_topics(timeout=10)
        finally:
            consumer.close()
        topics = [topic_name(t, prefix=prefix) for t in application.topics]
        dead_letter_parts: dict[str, list[tuple[str, int]]] = {}
        for topic in application.topics:
            with contextlib.suppress(RetryableError):  # a cluster provisioned without this DLQ
                dead_letter_parts[topic.value] = partitions_in(
                    metadata, [dead_letter_topic(topic_name(topic, prefix=prefix))]
                )
        wanted = {tp for parts in dead_letter_parts.values() for tp in parts}
        provisioned = True
        try:
            wanted |= set(partitions_in(metadata, topics))
        except RetryableError as err:  # not provisioned yet
            provisioned = False
            found.unavailable.append(f"read models: {err}")
        ends_f = pool.submit(end_offsets, kafka, sorted(wanted))
        starts_f = pool.submit(
            _log_starts, kafka, [tp for parts in dead_letter_parts.values() for tp in parts]
        )
        committed_f: dict[str, Future[dict[tuple[str, int], int]]] = {}
        inputs: set[tuple[str, int]] = set()
        for program, target in application.services.items():
            try:
                known = recorded.get(program)
                name, consumes = (
                    (known.service, known.consumes) if known is not None else _reads(target)
                )
                parts = partitions_in(metadata, [topic_name(t, prefix=prefix) for t in consumes])
                inputs.update(parts)
                committed_f[name] = pool.submit(
                    _committed, kafka, topic_name(name, prefix=prefix), parts
                )
            except Exception as err:  # one service's trouble must not hide the others
                found.unavailable.append(f"{target}: {err}")
        ends = ends_f.result()
        if inputs - wanted:  # a service reading a topic that is not the application's
            ends.update(end_offsets(kafka, sorted(inputs - wanted)))
        for name, committed in committed_f.items():
            try:
                found.services.append(_lag(name, committed.result(), ends))
            except Exception as err:
                found.unavailable.append(f"{name}: {err}")
        starts = starts_f.result()
        before = {name: f.result() for name, f in before_f.items()}
    for topic_value, parts in dead_letter_parts.items():
        found.dead_letters[topic_value] = sum(ends[tp] - starts.get(tp, 0) for tp in parts)
    if database_url and provisioned:
        _from_database(found, kafka, database_url, ends, application)
    elif not database_url:
        found.unavailable.append("read models: DATABASE_URL is not set")
    elapsed = max(time.monotonic() - started, 1e-3)
    with ThreadPoolExecutor(max_workers=8) as pool:
        after = dict(zip(metrics, pool.map(processed_total, metrics.values()), strict=True))
    for row in found.services:
        if row.name not in metrics:
            continue
        row.processed_total = after[row.name]
        first = before.get(row.name)
        if row.processed_total is not None and first is not None:
            row.processed_per_s = (row.processed_total - first) / elapsed
    return found


def _reads(target: str) -> tuple[str, Sequence[str]]:
    """The name and input topics of the service ``target``, by importing it."""
    from opsflow.runtime import load_service

    service = load_service(target)
    return service.name, service.consumes


def _log_starts(
    kafka: Mapping[str, Any], parts: list[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """Each partition's first offset, in one request to the cluster."""
    if not parts:
        return {}
    admin = AdminClient(dict(kafka))
    earliest = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
    asked = {KafkaPartition(t, p): earliest for t, p in parts}
    return {
        (tp.topic, tp.partition): max(future.result().offset, 0)
        for tp, future in admin.list_offsets(asked, request_timeout=10).items()
    }


def _from_database(
    found: Overview,
    kafka: Mapping[str, Any],
    database_url: str,
    ends: Mapping[tuple[str, int], int],
    application: Application,
) -> None:
    from opsflow.readmodels import projections

    try:
        with db.connect(database_url, autocommit=True) as conn:
            found.projections = statuses(conn, projections().values(), kafka, ends=ends)
            redriven = dict(
                conn.execute("SELECT dlq_topic, count(*) FROM dlq_redrives GROUP BY 1").fetchall()
            )
            for topic in found.dead_letters:
                found.dead_letters[topic] -= redriven.get(dead_letter_topic(topic_name(topic)), 0)
    except Exception as err:  # no database, or a table not there yet
        found.unavailable.append(f"read models: {str(err).splitlines()[0]}")
        return
    _gauges(found, database_url, application)


def _gauges(found: Overview, database_url: str, application: Application) -> None:
    """The application's gauges, each on its own: one whose table is not there yet (a
    read model not migrated) shows as unknown, not as a broken screen."""
    gauges = application.gauges
    if not gauges:
        return
    # Autocommit: a failing query ends only its own transaction, not the connection.
    with db.connect(database_url, autocommit=True) as conn:
        for gauge in gauges:
            try:
                row = conn.execute(gauge.sql.encode()).fetchone()
                found.gauges[gauge.label] = int(row[0]) if row and row[0] is not None else 0
            except Exception as err:
                found.gauges[gauge.label] = None
                found.unavailable.append(f"{gauge.label}: {str(err).splitlines()[0]}")
