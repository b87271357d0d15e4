"""``codec``: opsflow's ``WireCodec`` against confluent-kafka's stock Avro serde.

Both sides write the same bytes (checked in ``prepare``), so the question is only
what opsflow's code around fastavro costs. To compare like with like:

- *encode* is timed from the event model to framed bytes on both sides: opsflow's
  ``encode(event)`` calls ``event.to_avro()`` itself, so the stock serializer is
  timed on ``event.to_avro()`` too. The stock serializer on ready-made dicts, and
  ``to_avro()`` alone, are timed as well, to show what the model costs.
- *decode* is timed from framed bytes to the model on both sides, resolving the
  writer schema against the latest ``order.received`` schema on both sides
  (opsflow always does; the stock deserializer gets it as reader schema). The
  stock deserializer returning dicts, and ``OrderReceived.from_avro`` alone,
  are timed as well.

The Avro libraries are also timed alone on the bodies (no framing, no model),
fastavro against cavro, the one ``WireCodec`` uses: the figures the switch
between them was decided on.

Both sides use their own registry client against the benchmark stack's
registry, warmed in ``prepare``, so no registry call falls in a timed loop.
"""

from __future__ import annotations

import io
import json
from typing import Any, ClassVar

import cavro
import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from opsflow.contracts import catalogue
from opsflow.contracts.wire import WireCodec
from services.contracts import OrderReceived
from services.demo.orders import varied_orders
from tests.bench.harness import BenchError, Case, Metric, Ratio, StackInfo, interleaved_rates

EVENTS = 20_000


class CodecCase(Case):
    """Encode and decode throughput of realistic ``OrderReceived`` events."""

    name: ClassVar[str] = "codec"
    summary: ClassVar[str] = (
        f"varied OrderReceived ({EVENTS:,} unless --events), opsflow WireCodec vs stock serde"
    )
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("opsflow_encode", "opsflow  encode(event)"),
        Metric("stock_encode", "stock    serializer(event.to_avro())"),
        Metric("stock_encode_dict", "stock    serializer(dict)"),
        Metric("model_to_avro", "model    event.to_avro()"),
        Metric("opsflow_decode", "opsflow  decode(bytes) -> event"),
        Metric("stock_decode", "stock    from_avro(deserializer(bytes))"),
        Metric("stock_decode_dict", "stock    deserializer(bytes) -> dict"),
        Metric("model_from_avro", "model    from_avro(dict)"),
        Metric("fastavro_encode", "fastavro schemaless_writer(dict)"),
        Metric("cavro_encode", "cavro    binary_encode(dict)"),
        Metric("fastavro_decode", "fastavro schemaless_reader(body)"),
        Metric("cavro_decode", "cavro    binary_decode(body)"),
    )
    ratios: ClassVar[tuple[Ratio, ...]] = (
        Ratio(
            "encode_vs_stock",
            "encode opsflow/stock, same work",
            "opsflow_encode",
            "stock_encode",
        ),
        Ratio(
            "decode_vs_stock",
            "decode opsflow/stock, same work",
            "opsflow_decode",
            "stock_decode",
        ),
        Ratio(
            "encode_vs_stock_dict",
            "encode opsflow/stock(dict)",
            "opsflow_encode",
            "stock_encode_dict",
        ),
        Ratio(
            "decode_vs_stock_dict",
            "decode opsflow/stock(-> dict)",
            "opsflow_decode",
            "stock_decode_dict",
        ),
        Ratio("cavro_encode", "encode cavro/fastavro", "cavro_encode", "fastavro_encode"),
        Ratio("cavro_decode", "decode cavro/fastavro", "cavro_decode", "fastavro_decode"),
        # events/s of the whole over events/s of the part = the part's share of the time
        Ratio(
            "encode_model_share",
            "to_avro() in opsflow encode",
            "opsflow_encode",
            "model_to_avro",
            percent=True,
        ),
        Ratio(
            "decode_model_share",
            "from_avro() in opsflow decode",
            "opsflow_decode",
            "model_from_avro",
            percent=True,
        ),
    )

    def __init__(self, stack: StackInfo, *, events: int | None = None) -> None:
        super().__init__(stack, events=events)
        self.count = events or EVENTS

    def params(self) -> dict[str, Any]:
        return {
            "events": self.count,
            "event_type": "order.received",
            "schema_version": catalogue()["order.received"].latest_version,
            "mean_value_bytes": round(sum(map(len, self.values)) / len(self.values), 1),
        }

    def prepare(self) -> None:
        """Build the samples and both codecs, then prove they agree on every sample.

        Checked for each of the samples: both sides write identical bytes, and
        both read them back as the original event, so the timed loops below do
        equivalent, correct work.
        """
        event_type = catalogue()["order.received"]
        url = self.stack.env["SCHEMA_REGISTRY_URL"]
        schema = json.dumps(event_type.latest_schema)
        self.ctx = SerializationContext(str(event_type.topic), MessageField.VALUE)
        self.codec = WireCodec(SchemaRegistryClient({"url": url}))
        stock_registry = SchemaRegistryClient({"url": url})
        conf = {"subject.name.strategy": topic_record_subject_name_strategy}
        self.serializer = AvroSerializer(stock_registry, schema, conf=conf)
        self.deserializer = AvroDeserializer(stock_registry, schema, conf=conf)

        self.events = varied_orders(self.count)
        self.dicts = [event.to_avro() for event in self.events]
        self.values = [self.codec.encode(event) for event in self.events]
        for n, (event, datum, value) in enumerate(
            zip(self.events, self.dicts, self.values, strict=True)
        ):
            problem = None
            if self.serializer(datum, self.ctx) != value:
                problem = "stock serializer wrote different bytes than WireCodec.encode"
            elif self.codec.decode(value) != event:
                problem = "WireCodec.decode did not return the original event"
            elif OrderReceived.from_avro(self.deserializer(value, self.ctx)) != event:
                # Not compared as dicts: fastavro reads the uuid logical type back
                # as uuid.UUID where to_avro() wrote text; the model takes either.
                problem = "AvroDeserializer's dict is not the original event"
            if problem:
                raise BenchError(f"codec: sample {n} ({event.order_id}): {problem}")
        self.fastavro = fastavro.parse_schema(event_type.latest_schema)
        self.cavro = cavro.Schema(
            schema, options=cavro.DEFAULT_OPTIONS.replace(record_decodes_to_dict=True)
        )
        self.bodies = [value[5:] for value in self.values]
        for n, (datum, body) in enumerate(zip(self.dicts, self.bodies, strict=True)):
            if self._fastavro_encode(datum) != body or self.cavro.binary_encode(datum) != body:
                raise BenchError(f"codec: sample {n}: fastavro or cavro wrote other bytes")
            if self.cavro.binary_decode(body) != self._fastavro_decode(body):
                raise BenchError(f"codec: sample {n}: cavro and fastavro read different data")

    def _fastavro_encode(self, datum: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self.fastavro, datum)
        return out.getvalue()

    def _fastavro_decode(self, body: bytes) -> object:
        return fastavro.schemaless_reader(io.BytesIO(body), self.fastavro, None)

    def _stock_encode(self, event: OrderReceived) -> object:
        return self.serializer(event.to_avro(), self.ctx)

    def _stock_encode_dict(self, datum: dict[str, Any]) -> object:
        return self.serializer(datum, self.ctx)

    def _stock_decode(self, value: bytes) -> object:
        return OrderReceived.from_avro(self.deserializer(value, self.ctx))

    def _stock_decode_dict(self, value: bytes) -> object:
        return self.deserializer(value, self.ctx)

    def measure(self, repetition: int) -> dict[str, float]:
        """Time every figure over all samples, interleaved (see ``interleaved_rates``)."""
        return interleaved_rates(
            [
                ("opsflow_encode", self.codec.encode, self.events),
                ("stock_encode", self._stock_encode, self.events),
                ("stock_encode_dict", self._stock_encode_dict, self.dicts),
                ("model_to_avro", OrderReceived.to_avro, self.events),
                ("opsflow_decode", self.codec.decode, self.values),
                ("stock_decode", self._stock_decode, self.values),
                ("stock_decode_dict", self._stock_decode_dict, self.values),
                ("model_from_avro", OrderReceived.from_avro, self.dicts),
                ("fastavro_encode", self._fastavro_encode, self.dicts),
                ("cavro_encode", self.cavro.binary_encode, self.dicts),
                ("fastavro_decode", self._fastavro_decode, self.bodies),
                ("cavro_decode", self.cavro.binary_decode, self.bodies),
            ]
        )
