"""Replay: re-drive a range of a topic into a service or a projection, harmless by construction.

A replay is an operator's command, not a recovery hack: it reads the chosen
records again (a partition and offset range, or a time range, optionally only
some workflow instances, by key) and gives them to one target:

- a **service** of the application (``Application.programs``):
  its handlers run here on each record exactly as the service would run them,
  and the outputs are written to the service's topics. Outputs derive their
  idempotency keys and event ids from the input (``opsflow.contracts.lineage``)
  and their time from the input record's timestamp, so they are the very same
  events as the first time: downstream steps treat them as repeats, a
  partner honouring idempotency keys answers a repeated key with what it did
  the first time, read models apply an event id once. Outputs carry ``opsflow-replay`` naming
  the replay, and ``opsflow-source`` naming their input like any output.
- a **projection**: the records are applied to its live tables in one
  transaction, without moving its position; projections are idempotent per
  event, so the rows come out as the log says (which is what a replay after a
  fix of the projection is for).

``dry_run`` reads the range and reports what would happen without writing:
how many events of which types, which instances, and, for a service, how many
inputs already have their outputs in the log (looked up in ``audit_log`` by
the event id the first output of each type would get): their effects are sent
again under the same idempotency keys, which downstream steps and a partner
honouring the keys treat as repeats.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Message, Producer
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db
from opsflow.application import load_application
from opsflow.contracts import Event, Topic
from opsflow.contracts.lineage import caused_by, derive_idempotency_key, derived_event_id
from opsflow.contracts.record import utc_millis
from opsflow.contracts.wire import WireCodec
from opsflow.errors import BadInputError, ConfigurationError, OpsflowError
from opsflow.projections import Projection
from opsflow.projections.decoder import RecordDecoder
from opsflow.readmodels import projections
from opsflow.runtime import Service, load_service
from opsflow.runtime.recovery import SOURCE_HEADER, source_of
from opsflow.runtime.worker import EVENT_TYPE_HEADER
from opsflow.topics import (
    ReadToEnd,
    consumer_config,
    end_offsets,
    offsets_at,
    partitions_of,
    topic_name,
)

REPLAY_HEADER = "opsflow-replay"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Selection:
    """Which records: one topic, some partitions (None: all), an offset or time window
    (``to`` bounds are exclusive), some instances by record key (empty: all)."""

    topic: Topic
    partitions: tuple[int, ...] | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    from_time: datetime | None = None
    to_time: datetime | None = None
    keys: frozenset[str] = frozenset()

    def as_json(self) -> dict[str, Any]:
        """The selection as data: what an operator action records it chose."""
        return {
            "topic": self.topic.value,
            "partitions": None if self.partitions is None else list(self.partitions),
            "from_offset": self.from_offset,
            "to_offset": self.to_offset,
            "from_time": None if self.from_time is None else self.from_time.isoformat(),
            "to_time": None if self.to_time is None else self.to_time.isoformat(),
            "keys": sorted(self.keys),
        }


def selection_of(
    topic: str,
    *,
    partitions: str = "",
    from_offset: str = "",
    to_offset: str = "",
    from_time: str = "",
    to_time: str = "",
    keys: str = "",
) -> Selection:
    """A selection from text, as a form gives it (the console's replay page): the same
    choices as ``opsflow replay``'s arguments, checked with an error naming the field.

    ``partitions`` and ``keys`` are lists separated by commas or spaces; times are ISO
    8601, UTC unless they say otherwise; an empty field is not a bound.

    Raises:
        BadInputError: an unknown topic, a malformed number or time, or a range whose
            end comes before its start.
    """
    import re

    known = {t.value: t for t in load_application().topics}
    if topic not in known:
        raise BadInputError(f"topic: there is no topic {topic!r} (topics: {', '.join(known)})")

    def number(field: str, text: str) -> int | None:
        if not text.strip():
            return None
        if not text.strip().isdigit():
            raise BadInputError(f"{field}: {text!r} is not a whole number of 0 or more")
        return int(text)

    def moment(field: str, text: str) -> datetime | None:
        if not text.strip():
            return None
        try:
            at = datetime.fromisoformat(text.strip())
        except ValueError as err:
            raise BadInputError(
                f"{field}: {text!r} is not a time (ISO 8601, e.g. 2024-05-01T09:30)"
            ) from err
        return at.replace(tzinfo=at.tzinfo or UTC)

    parts = [number("partitions", p) for p in re.split(r"[,\s]+", partitions.strip()) if p]
    selection = Selection(
        topic=known[topic],
        partitions=tuple(p for p in parts if p is not None) or None,
        from_offset=number("from offset", from_offset),
        to_offset=number("to offset", to_offset),
        from_time=moment("from", from_time),
        to_time=moment("to", to_time),
        keys=frozenset(k for k in re.split(r"[,\s]+", keys.strip()) if k),
    )
    if None not in (selection.from_offset, selection.to_offset) and (
        selection.to_offset < selection.from_offset  # type: ignore[operator]
    ):
        raise BadInputError(
            f"to offset: {selection.to_offset} comes before the from offset {selection.from_offset}"
        )
    if None not in (selection.from_time, selection.to_time) and (
        selection.to_time < selection.from_time  # type: ignore[operator]
    ):
        raise BadInputError("to: the end of the time range comes before its start")
    return selection


@dataclass
class Report:
    """What a replay read and did (or, for a dry run, would do)."""

    target: str
    dry_run: bool
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)
    instances: set[str] = field(default_factory=set)
    handled: int = 0
    already_done: int = 0
    outputs: int = 0
    undecodable: int = 0
    replay_id: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "dry_run": self.dry_run,
            "replay_id": self.replay_id,
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "events": dict(self.events),
            "instances": sorted(self.instances),
            "handled": self.handled,
            "already_done": self.already_done,
            "outputs": self.outputs,
            "undecodable": self.undecodable,
        }


def target_of(name: str) -> Service | Projection:
    """The service or projection called ``name``."""
    services, views = load_application().services, projections()
    if name in services:
        return load_service(services[name])
    if name in views:
        return views[name]
    import difflib

    known = [*services, *views]
    near = difflib.get_close_matches(name, known, n=1)
    raise ConfigurationError(
        "--into",
        f"no service or projection called {name!r}"
        + (f" (did you mean {near[0]!r}?)" if near else ""),
        f"Choose one of: {', '.join(known)}",
    )


def bounds(
    consumer: Consumer, kafka: Mapping[str, Any], selection: Selection
) -> dict[tuple[str, int], tuple[int, int]]:
    """Per partition, the offsets ``[start, end)`` the selection covers."""
    name = topic_name(selection.topic)
    parts = partitions_of(consumer, [name])
    if selection.partitions is not None:
        missing = set(selection.partitions) - {p for _, p in parts}
        if missing:
            raise BadInputError(f"{name} has no partition {sorted(missing)}")
        parts = [(t, p) for t, p in parts if p in selection.partitions]
    found = {}
    ends = end_offsets(kafka, parts)
    for t, p in parts:
        low = consumer.get_watermark_offsets(KafkaPartition(t, p), timeout=10, cached=False)[0]
        high = ends[(t, p)]
        start = max(low, selection.from_offset or 0)
        end = high if selection.to_offset is None else min(high, selection.to_offset)
        found[(t, p)] = (start, end)
    for at, bound in ((selection.from_time, max), (selection.to_time, min)):
        if at is not None:
            when = offsets_at(consumer, int(utc_millis(at).timestamp() * 1000), ends)
            found = {tp: _bounded(found[tp], when[tp], bound is max) for tp in found}
    return {tp: (start, max(start, end)) for tp, (start, end) in found.items()}


def _bounded(span: tuple[int, int], offset: int, is_start: bool) -> tuple[int, int]:
    start, end = span
    return (max(start, offset), end) if is_start else (start, min(end, offset))


def read(
    consumer: Consumer,
    ranges: Mapping[tuple[str, int], tuple[int, int]],
    keys: frozenset[str],
) -> Iterator[Message]:
    """The records of ``ranges``, partition by partition in offset order, filtered by key."""
    wanted_keys = {k.encode() for k in keys}
    for msg in ReadToEnd(
        consumer,
        {tp: start for tp, (start, _) in ranges.items()},
        ends={tp: end for tp, (_, end) in ranges.items()},
        wait_s=1.0,
    ):
        if not wanted_keys or msg.key() in wanted_keys:
            yield msg


class Replay:
    """One replay of a selection into a target (see the module docstring)."""

    def __init__(
        self,
        target: Service | Projection,
        selection: Selection,
        *,
        kafka: Mapping[str, Any],
        registry: SchemaRegistryClient,
        database_url: str | None,
    ) -> None:
        self.target, self.selection = target, selection
        self.kafka, self.registry, self.database_url = dict(kafka), registry, database_url
        # One connection for the "already done" lookups of the whole replay, not one per input.
        self._audit: Any = None
        if isinstance(target, Service) and selection.topic not in target.consumes:
            raise BadInputError(
                f"{target.name} does not consume {selection.topic.value} "
                f"(it consumes {', '.join(t.value for t in target.consumes)})"
            )
        if isinstance(target, Projection) and selection.topic not in target.topics:
            raise BadInputError(
                f"projection {target.name} does not read {selection.topic.value} "
                f"(it reads {', '.join(t.value for t in target.topics)})"
            )
        if isinstance(target, Projection) and not database_url:
            raise ConfigurationError(
                "DATABASE_URL", "is not set", "A projection replay writes to its tables."
            )

    def run(self, *, dry_run: bool, progress: Progress | None = None) -> Report:
        report = Report(self.target.name, dry_run, replay_id=str(uuid.uuid4()))
        consumer = Consumer(consumer_config(self.kafka, f"opsflow-replay-{report.replay_id}"))
        try:
            ranges = bounds(consumer, self.kafka, self.selection)
            report.ranges = {f"{t}/{p}": r for (t, p), r in ranges.items()}
            total = sum(end - start for start, end in ranges.values())
            messages = read(consumer, ranges, self.selection.keys)
            if isinstance(self.target, Projection):
                self._into_projection(self.target, messages, report, dry_run, progress, total)
            else:
                # One event loop for the whole replay: an async service's partners
                # (connection pools, HTTP sessions) live on the loop they were made on.
                asyncio.run(
                    self._into_service(self.target, messages, report, dry_run, progress, total)
                )
        finally:
            consumer.close()
            if self._audit is not None:
                self._audit.close()
        return report

    # --- into a service ------------------------------------------------------------------

    async def _into_service(
        self,
        service: Service,
        messages: Iterator[Message],
        report: Report,
        dry_run: bool,
        progress: Progress | None,
        total: int,
    ) -> None:
        codec = WireCodec(self.registry)
        producer = None if dry_run else Producer({**self.kafka, "linger.ms": 5})
        produced_types = [
            name
            for name, model in load_application().models.items()
            if model.topic in service.produces
        ]
        seen = 0
        try:
            for msg in messages:
                seen += 1
                try:
                    event = codec.decode(msg.value())
                except BadInputError:
                    report.undecodable += 1
                    continue
                report.events[event.event_type] += 1
                report.instances.add(event.key)
                if event.event_type not in service.handlers:
                    continue
                report.handled += 1
                if self._already_done(service, event, produced_types):
                    report.already_done += 1
                if producer is not None:
                    report.outputs += await self._drive(
                        service, codec, producer, msg, event, report
                    )
                if progress:
                    progress(seen, total)
            if producer is not None and producer.flush(60) > 0:
                raise OpsflowError("the broker did not acknowledge every replayed output")
        finally:
            # Its dependencies (pools, partners' clients) close on the loop they were
            # made on, as when the service stops; run again, it makes them afresh.
            await service.stop_async()

    async def _drive(
        self,
        service: Service,
        codec: WireCodec,
        producer: Producer,
        msg: Message,
        event: Event,
        report: Report,
    ) -> int:
        """Run the service's handler on one input and write its outputs, as the runtime would."""
        _, timestamp_ms = msg.timestamp()
        seconds, millis = divmod(timestamp_ms, 1000)  # exact, as the runtime reads it
        occurred = datetime.fromtimestamp(seconds, UTC).replace(microsecond=millis * 1000)
        topic, partition, offset = (
            str(msg.topic()),
            int(msg.partition() or 0),
            int(msg.offset() or 0),
        )
        with caused_by(event.envelope, producer=service.name, occurred_at=occurred):
            outputs = await service.handle_async(event)
        for index, out in enumerate(outputs):
            producer.produce(
                topic_name(out.topic),
                key=out.key.encode(),
                value=codec.encode(out),
                headers=[
                    (EVENT_TYPE_HEADER, out.event_type.encode()),
                    (SOURCE_HEADER, source_of(topic, partition, offset, index).encode()),
                    (REPLAY_HEADER, report.replay_id.encode()),
                ],
            )
            producer.poll(0)
        return len(outputs)

    def _already_done(self, service: Service, event: Event, produced: Sequence[str]) -> bool:
        """Whether the log already holds an output of this input (by its derived event id)."""
        if not self.database_url or not produced:
            return False
        ids = [
            str(derived_event_id(derive_idempotency_key(
                event.envelope.idempotency_key, service.name, event_type, 0)))
            for event_type in produced
        ]  # fmt: skip
        try:
            if self._audit is None:
                self._audit = db.connect(self.database_url, autocommit=True)
            row = self._audit.execute(
                "SELECT count(*) FROM audit_log WHERE event_id = ANY(%s::uuid[])", (ids,)
            ).fetchone()
        except Exception:  # no audit log to ask: nothing is claimed as done
            return False
        return bool(row and row[0])

    # --- into a projection ---------------------------------------------------------------

    def _into_projection(
        self,
        projection: Projection,
        messages: Iterator[Message],
        report: Report,
        dry_run: bool,
        progress: Progress | None,
        total: int,
    ) -> None:
        decoder = RecordDecoder(self.registry)
        records = []
        for seen, msg in enumerate(messages, 1):
            try:
                record = decoder.decode(msg)
            except BadInputError:
                report.undecodable += 1
                continue
            report.events[record.event_type] += 1
            report.instances.add(record.key)
            records.append(record)
            if progress:
                progress(seen, total)
        report.handled = len(records)
        if dry_run or not records:
            return
        with db.connect(self.database_url) as conn, conn.transaction():  # type: ignore[arg-type]
            projection.apply(conn, records, projection.live_tables(), False)
        report.outputs = len(records)
