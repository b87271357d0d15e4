"""The Quix Streams baseline of the ``onehop`` case, run by its own interpreter.

``<quix venv>/bin/python tests/bench/quixhop.py --bootstrap ... --input T --output T
--group G --schema FILE --state DIR --commit-every N --commit-interval S``

Quix Streams 3.28.1 pins confluent-kafka below 2.13 and an older pydantic than
opsflow's, so it cannot share the project's virtualenv; the harness builds one
for it (``tests/bench/quixenv.py``) and runs this file there. That is why it is
a script importing only Quix Streams, fastavro and the standard library: the
batch policy arrives as arguments instead of from ``opsflow``.

The hop is the one of ``tests/bench/hops.py``: decode the Confluent-framed
Avro body with fastavro, encode it again with the header kept, and produce it
with the same key and stamped with the time it is produced, exactly once
(``processing_guarantee="exactly-once"``: Kafka transactions, the consumer's
offsets committed in them). Its checkpoints are committed every
``--commit-every`` records or ``--commit-interval`` seconds, set to opsflow's
batch policy, so both pay for the same number of commits.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import fastavro
from quixstreams import Application

HEADER = 5  # magic byte and schema id, kept as they are


def now_ms(_value: object, _key: object, _timestamp: int, _headers: object) -> int:
    """The wall clock in milliseconds, as librdkafka stamps a record it produces."""
    return time.time_ns() // 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(prog="quixhop.py")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--schema", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True, help="Quix's state directory")
    parser.add_argument("--commit-every", type=int, required=True)
    parser.add_argument("--commit-interval", type=float, required=True)
    parser.add_argument(
        "--guarantee", default="exactly-once", choices=("exactly-once", "at-least-once")
    )
    args = parser.parse_args()

    schema = fastavro.parse_schema(json.loads(args.schema.read_text(encoding="utf-8")))
    reader, writer = fastavro.schemaless_reader, fastavro.schemaless_writer

    def hop(value: bytes) -> bytes:
        datum = reader(io.BytesIO(value[HEADER:]), schema, None)
        out = io.BytesIO()
        out.write(value[:HEADER])
        writer(out, schema, datum)
        return out.getvalue()

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        processing_guarantee=args.guarantee,
        auto_offset_reset="earliest",
        commit_every=args.commit_every,
        commit_interval=args.commit_interval,
        state_dir=args.state,
        use_changelog_topics=False,
        loglevel="WARNING",
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        producer_extra_config={"linger.ms": 5},
    )
    source = app.topic(args.input, key_deserializer="bytes", value_deserializer="bytes")
    sink = app.topic(args.output, key_serializer="bytes", value_serializer="bytes")
    # Quix stamps an output with its input's timestamp; the case's latency is output
    # minus input timestamp, so the output is stamped when produced, as the others are.
    app.dataframe(source).apply(hop).set_timestamp(now_ms).to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
