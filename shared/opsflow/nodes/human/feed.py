"""A human step's threads next to its HTTP API: opening tasks, reading the log, timers.

Three daemon threads, started and stopped with the API (``Feed.start``/``stop``):

1. **opener**: the opsflow runtime ``Worker`` running the step's opener service
   (an event needing a person -> the step's requested event, exactly once,
   consumer group ``<prefix><opener's name>``).
2. **reader**: a plain consumer assigned every partition of the step's topic,
   ``read_committed``, from the beginning, under a throwaway group id (it
   commits nothing: the log is read whole on every start). It replays the
   topic up to its end into the desk's table, then keeps following it. It
   starts once the opener has taken its partitions: on a broker that never
   times out a dead producer's transaction (the embedded one), the opener's
   take-over commit is what unblocks ``read_committed`` readers after a crash,
   and reading "to the end" before that would stop short of events already
   written, such as escalations, which would then fire again.
3. **timers**: once the replay is done, writes the events a killed instance
   recorded but never saw acknowledged (``Desk.finish_unwritten``, then every
   ``UNWRITTEN_INTERVAL_S``), fires every due timer, earliest deadline first,
   then looks again every ``TIMER_INTERVAL_S``. Due times are in the log and so
   is every timer's event, so after a restart the rebuilt table knows which
   fired; the overdue ones fire once each, in deadline order. Every instance
   of the step runs its timers: a timer fires in a turn on its task (``desk``),
   so only the first instance to take the turn fires it.

``ready`` is set after the replay and the first round of timers: until then
the API answers 503, so nobody acts on a table still being rebuilt.
If a thread dies, the process stops (SIGTERM to itself) so its supervisor
restarts it, rather than serving with a table that no longer follows the log.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts.wire import WireCodec
from opsflow.errors import ConfigurationError, OpsflowError
from opsflow.nodes.human.desk import Desk
from opsflow.runtime import Delivery, Worker, load_service
from opsflow.settings import RuntimeSettings
from opsflow.topics import reader_config, topic_name

log = logging.getLogger("opsflow.nodes.human")

TIMER_INTERVAL_S = 0.2
# How often the timers look for events recorded by a turn that never saw them written.
UNWRITTEN_INTERVAL_S = 2.0
# The opener joins its group in about half a session timeout (6 s); a broker
# that is down for longer makes the service wait, not fail.
_JOIN_LOG_EVERY_S = 30.0


class Feed:
    """The opener, reader and timer threads of one human step's process.

    Args:
        desk: the table they keep current and the timers they fire.
        kafka: librdkafka settings (bootstrap servers, security).
        registry: the schema registry client.
    """

    def __init__(
        self, desk: Desk, *, kafka: dict[str, Any], registry: SchemaRegistryClient
    ) -> None:
        self.desk = desk
        self.kafka = kafka
        self.codec = WireCodec(registry)
        self.topic = topic_name(desk.spec.topic)
        name = desk.spec.name
        self.worker = Worker(
            load_service(desk.spec.opener),
            kafka=kafka,
            registry=registry,
            delivery=Delivery(RuntimeSettings().delivery),
        )
        self.ready = threading.Event()
        self.replayed = threading.Event()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._guard(self.worker.run), name=f"{name}-opener"),
            threading.Thread(target=self._guard(self._read), name=f"{name}-reader"),
            threading.Thread(target=self._guard(self._time), name=f"{name}-timers"),
        ]

    def start(self) -> None:
        """Start the three threads."""
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the threads (the opener commits what it has) and wait for them."""
        self._stopping.set()
        self.worker.stop()
        for thread in self._threads:
            thread.join(timeout)

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except Exception:
                log.exception("%s thread failed; stopping the process", self.desk.spec.name)
                os.kill(os.getpid(), signal.SIGTERM)

        return run

    # --- reader ------------------------------------------------------------------------

    def _read(self) -> None:
        waited = time.monotonic()
        while not self.worker.health.joined:
            if self._stopping.wait(0.05):
                return
            if time.monotonic() - waited > _JOIN_LOG_EVERY_S:
                log.warning("still waiting for the opener to join its group")
                waited = time.monotonic()
        consumer = Consumer(
            {
                **reader_config(self.kafka, f"{self.worker.group}-reader"),
                "queued.max.messages.kbytes": 4096,
            }
        )
        try:
            partitions = consumer.list_topics(self.topic, timeout=30).topics[self.topic].partitions
            if not partitions:
                raise ConfigurationError(
                    "OPSFLOW_TOPIC_PREFIX",
                    f"the topic {self.topic} does not exist",
                    "Create the topics of record (`python -m opsflow.provision`, or `opsflow up`)",
                )
            # Not ``ReadToEnd``: this reading never ends, and a partition replayed to its
            # end is still applied while the others catch up (the end events only say
            # when the whole topic has been replayed).
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            remaining = set(partitions)
            started = time.monotonic()
            while not self._stopping.is_set():
                for msg in consumer.consume(1000, 0.1):
                    error = msg.error()
                    if error is None:
                        self._apply(msg.value(), f"{msg.partition()}/{msg.offset()}")
                    elif error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(msg.partition() or 0)
                    else:
                        log.warning("task topic read error", extra={"error": str(error)})
                if not remaining and not self.replayed.is_set():
                    self.replayed.set()
                    log.info(
                        "%s topic replayed",
                        self.desk.spec.name,
                        extra={
                            "tasks": len(self.desk.read(lambda t: t.tasks)),
                            "seconds": round(time.monotonic() - started, 3),
                        },
                    )
        finally:
            consumer.close()

    def _apply(self, value: bytes | None, where: str) -> None:
        # The runtime's dead letters are for inputs; the log cannot be rewritten, so a
        # record that cannot be taken is logged and passed over: it must not stop the
        # replay every start begins with (a crash loop), nor the records after it.
        try:
            event = self.codec.decode(value)
            # Only the step itself writes its tasks' events (its ``emitted_by``).
            self.codec.contracts.check_producer(event.event_type, event.envelope.producer)
            self.desk.apply(event)
        except Exception as err:
            log.error("task record skipped", extra={"at": where, "error": str(err)[:500]})

    # --- timers ------------------------------------------------------------------------

    def _time(self) -> None:
        while not self.replayed.wait(0.05):
            if self._stopping.is_set():
                return
        swept = -UNWRITTEN_INTERVAL_S
        while not self._stopping.is_set():
            try:
                if time.monotonic() - swept >= UNWRITTEN_INTERVAL_S:
                    self.desk.finish_unwritten()
                    swept = time.monotonic()
                self.desk.fire_due()
            except OpsflowError as err:
                log.warning("timers wait for the broker", extra={"error": str(err)})
            except psycopg.Error as err:
                log.warning("timers wait for the database", extra={"error": str(err)[:500]})
            self.ready.set()
            self._stopping.wait(TIMER_INTERVAL_S)
