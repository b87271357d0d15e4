"""Publishing events into opsflow from outside a service: the producer SDK.

This is the one way opsflow builds, encodes and sends an event that no other
event caused (the ingest HTTP service uses it too), so every producer gets the
same envelope:

- ``producer`` is the producer's name (for the ingest service: the API key's);
- ``correlation_id`` is the instance's id (the topic's key field), ``causation_id`` is empty;
- ``idempotency_key`` is the caller's key, or a random one when none is given;
  in ``send_many`` each event gets ``<key>#<index>``;
- ``event_id`` is a UUIDv5 of the producer and that key, so a retried send with
  the same key writes records with the very same ids and consumers can drop the
  repeat;
- ``occurred_at`` is now (one instant per call), ``contract_version`` the model's.

Callers describe an event without its envelope, as an ``EventBody``
(``body_model(InvoiceSubmitted)``, or ``event_bodies()`` by event type), the same
shape the ingest API takes as JSON. An ``Event`` that already has an envelope is
sent as it is.

Records are Confluent-framed Avro (``WireCodec``), keyed by the instance's id, written
to the event type's topic of record (with ``OPSFLOW_TOPIC_PREFIX``) by an
idempotent librdkafka producer (``acks=all``: the broker drops the duplicates
of its own internal retries). ``send`` and ``send_many`` return only once the
broker acknowledged every record, or raise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Self

import pydantic
from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KafkaProducer
from confluent_kafka.schema_registry import SchemaRegistryClient
from pydantic import BaseModel, ConfigDict

from opsflow.apikeys import check_producer_name
from opsflow.application import load_application
from opsflow.contracts import Envelope, Event
from opsflow.contracts.bounds import MAX_TEXT, violation
from opsflow.contracts.lineage import derived_event_id
from opsflow.contracts.wire import WireCodec
from opsflow.errors import BadInputError, ConfigurationError, RetryableError
from opsflow.settings import KafkaSettings, RegistrySettings, TopicSettings
from opsflow.topics import topic_name

log = logging.getLogger(__name__)

# librdkafka's own limit on one record (message.max.bytes, default 1,000,000):
# records are checked against it before anything is written, so a batch with
# one record too large is refused whole instead of being half written.
_DEFAULT_MAX_RECORD_BYTES = 1_000_000


class EventBody(BaseModel):
    """An event without its envelope: what a producer says; the SDK adds the envelope.

    One subclass per event type (``body_model``), with the event model's fields
    and rules minus ``envelope``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", str_max_length=MAX_TEXT)

    event_model: ClassVar[type[Event]]


@cache
def body_model(model: type[Event]) -> type[EventBody]:
    """The body model of an event model: ``body_model(InvoiceSubmitted)(invoice_id=...)``."""
    fields: dict[str, Any] = {
        name: (info.annotation, info)
        for name, info in model.model_fields.items()
        if name not in EventBody.model_fields and name != "envelope"
    }
    body = pydantic.create_model(
        f"{model.__name__}Body",
        __base__=EventBody,
        __doc__=f"{model.__doc__} Sent without its envelope, which opsflow adds.",
        __module__=__name__,
        **fields,
    )
    body.event_model = model
    return body


def event_bodies(events: Iterable[type[Event]] | None = None) -> dict[str, type[EventBody]]:
    """Event type name -> the model of its body (the event minus its envelope), for
    ``events`` (default: the application's)."""
    if events is None:
        events = load_application().events
    return {model.event_type: body_model(model) for model in events}


def event_id_for(producer: str, idempotency_key: str) -> uuid.UUID:
    """The id of the event ``producer`` sends under ``idempotency_key``: the same inputs
    always give the same id, so a retry is recognisable downstream."""
    return derived_event_id(f"{producer}\x1f{idempotency_key}")


def batch_item_key(idempotency_key: str, index: int) -> str:
    """The idempotency key of the ``index``-th event sent in one ``send_many`` call."""
    return f"{idempotency_key}#{index}"


def build_event(
    body: EventBody, *, producer: str, idempotency_key: str, occurred_at: datetime
) -> Event:
    """The event a body becomes, with its envelope built by the rules in the module docstring."""
    model = body.event_model
    envelope = Envelope(
        event_id=event_id_for(producer, idempotency_key),
        idempotency_key=idempotency_key,
        occurred_at=occurred_at,
        correlation_id=getattr(body, model.topic.key),
        causation_id=None,
        producer=producer,
        contract_version=model.contract_version,
    )
    # The body was validated with the very field definitions of the model, so
    # validating again would only cost time (measurable at 1,000 events a call).
    return model.model_construct(envelope=envelope, **dict(body))


@dataclass(frozen=True)
class DeliveryReport:
    """Where the broker put one event; returned once it acknowledged the record."""

    event_id: uuid.UUID
    event_type: str
    idempotency_key: str
    topic: str
    partition: int
    offset: int


class EventRejected(BadInputError):
    """An event cannot be written (too large, out of bounds, or not encodable); nothing of
    the call was.

    Attributes:
        index: the event's position in the call.
        field: the dotted path of the offending field, or ``""`` for the whole event.
        reason: what is wrong, without the position.
    """

    def __init__(self, index: int, field: str, reason: str) -> None:
        self.index = index
        self.field = field
        self.reason = reason
        where = f"event {index}" + (f", field {field}" if field else "")
        super().__init__(f"{where}: {reason}")


class DeliveryError(RetryableError):
    """The broker did not acknowledge every event of a call.

    Some events may have been written: sending the same events again with the
    same idempotency key writes them with the same event ids, so consumers can
    drop the ones they already have.

    Attributes:
        event_ids: every event's id, in the order given.
        reports: per event, its report if it was acknowledged, else None.
        failures: per failed event index, the broker's or client's reason.
    """

    def __init__(
        self,
        message: str,
        *,
        event_ids: Sequence[uuid.UUID],
        reports: Sequence[DeliveryReport | None],
        failures: Mapping[int, str],
    ) -> None:
        self.event_ids = tuple(event_ids)
        self.reports = tuple(reports)
        self.failures = dict(failures)
        super().__init__(message)


class _Pending:
    """Delivery results of one call, filled in by librdkafka callbacks on the poller thread."""

    def __init__(self, count: int) -> None:
        self.results: list[tuple[int, int] | KafkaError | None] = [None] * count
        self.done = threading.Event()
        self._left = count
        self._lock = threading.Lock()
        if count == 0:
            self.done.set()

    def delivered(self, index: int, err: KafkaError | None, msg: Message | None) -> None:
        if err is None and msg is not None:
            # Both are known once a record is acknowledged; -1 is librdkafka's "unknown".
            partition, offset = msg.partition(), msg.offset()
            self.results[index] = (
                -1 if partition is None else partition,
                -1 if offset is None else offset,
            )
        else:
            self.results[index] = err
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.done.set()


@dataclass(frozen=True)
class _Record:
    event: Event
    topic: str
    key: bytes
    value: bytes


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Producer:
    """Sends events to their topics of record and waits for the broker's acknowledgement.

    Thread-safe: one instance serves a whole process (the ingest service shares
    one between its request threads). Use it as a context manager, or call
    ``close``.

    Args:
        name: the producer's name, written into every envelope it builds.
        bootstrap_servers: the Kafka cluster; ``KAFKA_BOOTSTRAP_SERVERS`` if omitted.
            Other ``KAFKA_*`` variables reach librdkafka as for every opsflow client.
        registry_url: the schema registry; ``SCHEMA_REGISTRY_URL`` if omitted.
        registry: a registry client to share instead of ``registry_url``.
        idempotence: librdkafka's idempotent producer (no duplicates from its own
            retries). ``None``: ``KAFKA_ENABLE_IDEMPOTENCE`` if set, else on. Turn
            it off for brokers that cannot keep producer state (see the README).
        topic_prefix: prepended to topic names; ``OPSFLOW_TOPIC_PREFIX`` if omitted.
        delivery_timeout: seconds a record may take to be acknowledged
            (librdkafka's ``message.timeout.ms``, retries included).
        connect_timeout: seconds to wait for the cluster to answer at construction.
        clock: the time written as ``occurred_at``.
        config: further librdkafka properties, applied last.

    Raises:
        ConfigurationError: a setting is missing, or the cluster does not answer.
        BadInputError: ``name`` is not a plain identifier.
    """

    def __init__(
        self,
        name: str,
        *,
        bootstrap_servers: str | None = None,
        registry_url: str | None = None,
        registry: SchemaRegistryClient | None = None,
        idempotence: bool | None = None,
        topic_prefix: str | None = None,
        delivery_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        clock: Callable[[], datetime] = _utc_now,
        config: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        self.name = check_producer_name(name)
        kafka = KafkaSettings()
        self.bootstrap_servers = bootstrap_servers or kafka.bootstrap_servers or ""
        if not self.bootstrap_servers:
            raise ConfigurationError(
                "KAFKA_BOOTSTRAP_SERVERS",
                "is not set, so the producer does not know which Kafka cluster to use",
                "Set it to host:port of a broker, or run under `opsflow up`",
            )
        if registry is None:
            url = registry_url or RegistrySettings().schema_registry_url
            if not url:
                raise ConfigurationError(
                    "SCHEMA_REGISTRY_URL",
                    "is not set, so events cannot be encoded",
                    "Set it to the registry's http://host:port, or run under `opsflow up`",
                )
            registry = SchemaRegistryClient(RegistrySettings().client_config(url))
        self._codec = WireCodec(registry)
        self._prefix = TopicSettings().prefix if topic_prefix is None else topic_prefix
        self._topics: dict[str, str] = {}
        self._clock = clock
        self._delivery_timeout = delivery_timeout

        settings: dict[str, str | int | float | bool] = {
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": int(delivery_timeout * 1000),
            "client.id": f"opsflow-{self.name}",
            **kafka.client_config(),
            "bootstrap.servers": self.bootstrap_servers,
        }
        if idempotence is not None:
            settings["enable.idempotence"] = idempotence
        settings.update(config or {})
        self.config: Mapping[str, str | int | float | bool] = MappingProxyType(settings)
        self._max_record_bytes = int(settings.get("message.max.bytes", _DEFAULT_MAX_RECORD_BYTES))
        self._fatal: KafkaError | None = None
        self._replacing = threading.Lock()
        self._kafka = self._new_client()
        self._closed = threading.Event()
        # Delivery callbacks run in whichever thread polls; one thread polling
        # all the time lets every caller simply wait for its own records.
        self._poller = threading.Thread(target=self._poll, name="opsflow-producer", daemon=True)
        self._poller.start()
        try:
            self.check_connection(timeout=connect_timeout)
        except ConfigurationError:
            self.close(timeout=0)
            raise

    # --- lifecycle -------------------------------------------------------------------

    def _new_client(self) -> KafkaProducer:
        return KafkaProducer(
            {
                **self.config,
                # librdkafka's own log lines (connection refused, ...) go to Python
                # logging instead of stderr; both callbacks are served by the poller.
                "logger": logging.getLogger("opsflow.kafka"),
                "error_cb": self._on_error,
            }
        )

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("Kafka producer failed for good; replacing it", extra={"error": err.str()})
            self._fatal = err
        else:
            log.warning("Kafka client error", extra={"error": err.str()})

    def _poll(self) -> None:
        while not self._closed.is_set():
            try:
                self._client().poll(0.1)
            except KafkaException as err:  # raised by poll for a fatal error
                self._on_error(err.args[0])

    def _client(self) -> KafkaProducer:
        """The librdkafka producer, new after a fatal error.

        An idempotent producer stops for good on a fatal error (e.g. the
        broker lost track of its sequence numbers: seen on the embedded
        broker's durable store with 6 concurrent producers), failing every
        later send. The sends that were in flight fail with a ``DeliveryError``
        (a retry with the same idempotency key writes the same event ids); the
        ones after get a fresh producer.
        """
        if self._fatal is None:
            return self._kafka
        with self._replacing:
            if self._fatal is not None:
                old, self._kafka = self._kafka, self._new_client()
                self._fatal = None
                # Fail what the old producer still holds now, rather than at its
                # delivery timeout, so its callers get their answer.
                with contextlib.suppress(KafkaException, RuntimeError):
                    old.purge()
                with contextlib.suppress(KafkaException, RuntimeError):
                    old.flush(1.0)
        return self._kafka

    def check_connection(self, *, timeout: float = 5.0) -> None:
        """Ask the cluster for its metadata, so an unreachable broker is reported by name.

        Raises:
            ConfigurationError: no broker answered within ``timeout`` seconds.
        """
        try:
            self._client().list_topics(timeout=timeout)
        except KafkaException as err:
            raise ConfigurationError(
                "KAFKA_BOOTSTRAP_SERVERS",
                f"cannot reach Kafka at {self.bootstrap_servers} ({err.args[0].str()})",
                "Check that the cluster is running and that KAFKA_BOOTSTRAP_SERVERS "
                "(or bootstrap_servers=) names it",
            ) from err

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record handed to librdkafka is acknowledged or failed.

        ``send`` already waits for its own records; this is for shutting down.

        Raises:
            RetryableError: records were still undelivered after ``timeout`` seconds.
        """
        left = self._client().flush(self._delivery_timeout if timeout is None else timeout)
        if left:
            raise RetryableError(
                f"{left} record(s) still not acknowledged by Kafka at {self.bootstrap_servers}"
            )

    def close(self, timeout: float | None = None) -> None:
        """Flush what is in flight (within ``timeout``), then stop the poller thread."""
        try:
            self._client().flush(self._delivery_timeout if timeout is None else timeout)
        finally:
            self._closed.set()
            if self._poller is not threading.current_thread():
                self._poller.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- sending ---------------------------------------------------------------------

    def topic_for(self, event: type[Event]) -> str:
        """The Kafka topic that carries ``event`` in this environment."""
        found = self._topics.get(event.topic)
        if found is None:
            found = self._topics[event.topic] = topic_name(event.topic, prefix=self._prefix)
        return found

    def send(
        self,
        event: EventBody | Event,
        *,
        idempotency_key: str | None = None,
        on_behalf_of: str | None = None,
    ) -> DeliveryReport:
        """Write one event and wait for the broker to acknowledge it.

        Args:
            event: a body (the envelope is built as the module docstring says) or
                an event with its envelope, which is sent as it is.
            idempotency_key: the key of this fact; a random one if omitted. Sending
                again with the same key writes the same event id.
            on_behalf_of: the producer named in the envelope, for a gateway that
                sends for others (the ingest service: the API key's producer);
                this producer's own name if omitted.

        Raises:
            EventRejected: the event cannot be encoded or is too large; nothing written.
            DeliveryError: the broker did not acknowledge it.
            RetryableError: the schema registry could not be reached; nothing written.
        """
        key = idempotency_key or uuid.uuid4().hex
        return self._send([event], [key], on_behalf_of)[0]

    def send_many(
        self,
        events: Sequence[EventBody | Event],
        *,
        idempotency_key: str | None = None,
        on_behalf_of: str | None = None,
    ) -> list[DeliveryReport]:
        """Write several events and wait until the broker acknowledged all of them.

        Every event is built and encoded before the first is written, so an event
        that cannot be written fails the call with nothing written. The records
        are produced in one go and awaited together, which is what makes a batch
        cheap.

        Args:
            events: bodies or full events, as for ``send``.
            idempotency_key: the key of the whole call; event ``i`` gets
                ``<key>#<i>``. A random one if omitted.
            on_behalf_of: as for ``send``.

        Returns:
            One report per event, in the order given.

        Raises:
            EventRejected: an event cannot be encoded or is too large; nothing written.
            DeliveryError: some events were not acknowledged (see its ``reports``).
            RetryableError: the schema registry could not be reached; nothing written.
        """
        key = idempotency_key or uuid.uuid4().hex
        keys = [batch_item_key(key, i) for i in range(len(events))]
        return self._send(events, keys, on_behalf_of)

    def _send(
        self, events: Sequence[EventBody | Event], keys: Sequence[str], on_behalf_of: str | None
    ) -> list[DeliveryReport]:
        producer = self.name if on_behalf_of is None else check_producer_name(on_behalf_of)
        records = self._encode(events, keys, producer)
        pending = _Pending(len(records))
        deadline = time.monotonic() + self._delivery_timeout + 5.0
        client = self._client()
        for index, record in enumerate(records):
            self._produce(client, record, pending, index, deadline)
        # librdkafka reports every record within message.timeout.ms; the margin
        # only guards against a callback that never comes.
        pending.done.wait(max(deadline - time.monotonic(), 0.0))
        return self._reports(records, pending)

    def _encode(
        self, events: Sequence[EventBody | Event], keys: Sequence[str], producer: str
    ) -> list[_Record]:
        occurred_at = self._clock()
        records = []
        for index, (item, key) in enumerate(zip(events, keys, strict=True)):
            event = (
                item
                if isinstance(item, Event)
                else build_event(
                    item, producer=producer, idempotency_key=key, occurred_at=occurred_at
                )
            )
            # Consumers would dead-letter it: say so here, to the one who sent it.
            self._codec.contracts.check_producer(event.event_type, event.envelope.producer)
            out_of_bounds = violation(event)
            if out_of_bounds is not None:
                raise EventRejected(index, *out_of_bounds)
            try:
                value = self._codec.encode(event)
                record_key = event.key.encode("utf-8")
            except UnicodeEncodeError as err:
                raise EventRejected(
                    index, _unencodable_field(event), "text is not valid Unicode"
                ) from err
            except (ValueError, TypeError) as err:
                raise EventRejected(index, "", f"cannot be encoded as Avro: {err}") from err
            if len(value) + len(record_key) > self._max_record_bytes:
                raise EventRejected(
                    index,
                    "",
                    f"its record would be {len(value) + len(record_key)} bytes, "
                    f"over the {self._max_record_bytes} bytes Kafka takes",
                )
            records.append(_Record(event, self.topic_for(type(event)), record_key, value))
        return records

    def _produce(
        self,
        client: KafkaProducer,
        record: _Record,
        pending: _Pending,
        index: int,
        deadline: float,
    ) -> None:
        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None and err.fatal():
                self._fatal = err
            pending.delivered(index, err, msg)

        while True:
            try:
                client.produce(record.topic, record.value, record.key, on_delivery=delivered)
                return
            except BufferError:
                # librdkafka's queue is full: wait for deliveries to make room.
                if time.monotonic() > deadline:
                    pending.delivered(index, KafkaError(KafkaError._QUEUE_FULL), None)
                    return
                time.sleep(0.01)
            except KafkaException as err:
                if err.args[0].code() == KafkaError._FATAL:
                    self._fatal = err.args[0]
                pending.delivered(index, err.args[0], None)
                return

    def _reports(self, records: list[_Record], pending: _Pending) -> list[DeliveryReport]:
        reports: list[DeliveryReport | None] = []
        failures: dict[int, str] = {}
        for index, (record, result) in enumerate(zip(records, pending.results, strict=True)):
            envelope = record.event.envelope
            if isinstance(result, tuple):
                reports.append(
                    DeliveryReport(
                        event_id=envelope.event_id,
                        event_type=record.event.event_type,
                        idempotency_key=envelope.idempotency_key,
                        topic=record.topic,
                        partition=result[0],
                        offset=result[1],
                    )
                )
                continue
            reports.append(None)
            failures[index] = result.str() if result is not None else "no delivery report in time"
        if failures:
            first = next(iter(failures.items()))
            raise DeliveryError(
                f"{len(failures)} of {len(records)} event(s) not acknowledged by Kafka at "
                f"{self.bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS); event {first[0]}: {first[1]}",
                event_ids=[record.event.envelope.event_id for record in records],
                reports=reports,
                failures=failures,
            )
        return [report for report in reports if report is not None]


def _unencodable_field(event: Event) -> str:
    """The dotted path of the first string that UTF-8 cannot encode (a lone surrogate)."""

    def walk(value: Any, path: str) -> str | None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                found = walk(item, f"{path}.{key}" if path else str(key))
                if found is not None:
                    return found
        elif isinstance(value, list):
            for i, item in enumerate(value):
                found = walk(item, f"{path}.{i}")
                if found is not None:
                    return found
        return None

    return walk(event.model_dump(exclude={"envelope"}), "") or ""
