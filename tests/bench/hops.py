"""The baselines of the ``onehop`` case, each run as its own process.

``python -m tests.bench.hops {raw,faust,faststream} --bootstrap ... --input T --output T
--group G --schema FILE``

Every baseline does the same hop as opsflow's ``tests.services.relay`` minus
opsflow itself: read a Confluent-framed ``order.received`` record, decode its
Avro body with fastavro, encode it again and produce it, header and key kept,
to the output topic. The schema is handed over in a file (it is what the
registry holds for the header's id) so that no baseline spends time on the
registry; opsflow asks it once per schema, which is as good as free.

Each runs in a process of its own, like opsflow's service, so that its memory
can be measured alone and it competes for the CPU on the same terms.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import fastavro
from confluent_kafka import Consumer, KafkaException, Producer

from opsflow.runtime.service import BatchPolicy

HEADER = 5  # magic byte and schema id, kept as they are
BATCH = BatchPolicy()  # opsflow's defaults: the same N and T for every transactional hop


def avro_hop(schema_file: Path) -> Callable[[bytes], bytes]:
    """A function that decodes a framed value and encodes the datum again, header kept."""
    schema = fastavro.parse_schema(json.loads(schema_file.read_text(encoding="utf-8")))
    reader, writer = fastavro.schemaless_reader, fastavro.schemaless_writer

    def hop(value: bytes) -> bytes:
        datum = reader(io.BytesIO(value[HEADER:]), schema, None)
        out = io.BytesIO()
        out.write(value[:HEADER])
        writer(out, schema, datum)
        return out.getvalue()

    return hop


# --- raw: confluent-kafka, one transactional producer ----------------------------------


def run_raw(args: argparse.Namespace) -> None:
    """A byte loop with opsflow's transaction batching and nothing else.

    One read_committed consumer and one transactional producer; a transaction
    covers up to ``BATCH.max_events`` inputs or ``BATCH.max_interval_s``,
    whichever comes first, or is committed as soon as the consumer has nothing
    more buffered, and commits the consumer's positions with it
    (``send_offsets_to_transaction``), as opsflow does per partition.
    """
    hop = avro_hop(args.schema)
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    producer = Producer(
        {"bootstrap.servers": args.bootstrap, "transactional.id": args.group, "linger.ms": 5}
    )
    producer.init_transactions(30)
    consumer.subscribe([args.input])
    in_txn, pending, started = False, 0, 0.0

    def commit() -> None:
        nonlocal in_txn, pending
        producer.send_offsets_to_transaction(
            consumer.position(consumer.assignment()), consumer.consumer_group_metadata(), 30
        )
        producer.commit_transaction(30)
        in_txn, pending = False, 0

    try:
        while not stopping:
            # What is buffered at once, else wait for the first record (as opsflow polls).
            messages = consumer.consume(BATCH.max_events, 0)
            if not messages:
                first = consumer.poll(0.05)
                messages = [first, *consumer.consume(BATCH.max_events - 1, 0)] if first else []
            for msg in messages:
                if msg.error() is not None:
                    continue
                value = hop(msg.value() or b"")
                if not in_txn:
                    producer.begin_transaction()
                    in_txn, started = True, time.monotonic()
                while True:
                    try:
                        producer.produce(args.output, key=msg.key(), value=value)
                        break
                    except BufferError:
                        producer.poll(0.05)
                pending += 1
            producer.poll(0)
            if in_txn and (
                len(messages) < BATCH.max_events
                or pending >= BATCH.max_events
                or time.monotonic() - started >= BATCH.max_interval_s
            ):
                commit()
        if in_txn:
            commit()
    except KafkaException as err:
        sys.exit(f"raw hop failed: {err}")
    finally:
        consumer.close()


# --- faust ------------------------------------------------------------------------------


def run_faust(args: argparse.Namespace) -> None:
    """A faust-streaming agent: bytes in, the Avro hop, ``send`` to the output topic.

    Transactions are committed every ``broker_commit_every`` events or
    ``broker_commit_interval`` seconds, set to opsflow's batch policy so both
    pay for the same number of commits and bound latency the same way.
    """
    import faust

    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        processing_guarantee=args.guarantee,
        web_enabled=False,
        store="memory://",
        datadir=str(args.schema.parent / f"{args.group}faust"),  # not in the working directory
        topic_partitions=6,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=BATCH.max_events,
        broker_commit_interval=BATCH.max_interval_s,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        producer_linger=0.005,
    )
    hop = avro_hop(args.schema)
    source = app.topic(args.input, key_serializer="raw", value_serializer="raw")
    sink = app.topic(args.output, key_serializer="raw", value_serializer="raw")

    @app.agent(source)
    async def relay(stream: Any) -> None:
        async for event in stream.events():
            await sink.send(key=event.key, value=hop(event.value))

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()


# --- faststream ---------------------------------------------------------------------------


def run_faststream(args: argparse.Namespace) -> None:
    """A FastStream batch subscriber: hop each record, publish, wait, then commit.

    FastStream has no Kafka transactions, so this is at-least-once: the batch's
    offsets are committed (``AckPolicy.ACK``) only after every output of the
    batch is confirmed. Records are published without waiting one by one
    (``no_confirm``) and confirmed together, since a per-record round trip would
    measure the broker's latency instead of the framework. Batches are bounded
    like opsflow's transactions.
    """
    from faststream import AckPolicy, FastStream
    from faststream.kafka import KafkaBroker, KafkaMessage

    hop = avro_hop(args.schema)
    broker = KafkaBroker(args.bootstrap, linger_ms=5)

    @broker.subscriber(
        args.input,
        group_id=args.group,
        auto_offset_reset="earliest",
        batch=True,
        max_records=BATCH.max_events,
        batch_timeout_ms=int(BATCH.max_interval_s * 1000),
        ack_policy=AckPolicy.ACK,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        isolation_level="read_committed",
    )
    async def relay(body: list[bytes], message: KafkaMessage) -> None:
        records = message.raw_message
        assert isinstance(records, tuple)
        sent = [
            await broker.publish(hop(record.value), args.output, key=record.key, no_confirm=True)
            for record in records
        ]
        await asyncio.gather(*sent)

    asyncio.run(FastStream(broker).run())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.hops")
    parser.add_argument("system", choices=("raw", "faust", "faststream"))
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True, help="consumer group, app id, transactional id")
    parser.add_argument("--schema", type=Path, required=True, help="the writer schema, as JSON")
    parser.add_argument(
        "--guarantee", default="exactly_once", choices=("exactly_once", "at_least_once")
    )
    args = parser.parse_args()
    {"raw": run_raw, "faust": run_faust, "faststream": run_faststream}[args.system](args)


if __name__ == "__main__":
    main()
