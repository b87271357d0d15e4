"""The Kafka headers of opsflow's records, as the contract documents them.

The services' runtime writes these headers (``opsflow.runtime``: ``opsflow-event-type``
in the worker, ``opsflow-source`` in recovery, the W3C trace context from
OpenTelemetry), and services and projections add the dead-letter headers
(``opsflow.deadletters``) when they give up on a record. They are listed here, with what
they mean to a reader, so the AsyncAPI document and docs/contracts.md describe the
same set; a test compares the names with those the runtime's code writes.

Header values are bytes on the wire; every one of these is UTF-8 text.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

EVENT_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "opsflow-event-type": (
            "The event type (its schema directory's name), so a reader can skip a record "
            "without decoding it."
        ),
        "opsflow-source": (
            "Which input the record was produced from: `<topic>/<partition>/<offset>#<n>`, "
            "the topic as named in the environment (with its prefix) and `n` the output's "
            "index. The runtime uses it to skip outputs it already wrote after a crash."
        ),
        "traceparent": "W3C trace context of the processing that wrote the record.",
        "tracestate": "W3C trace state, when the trace has any.",
        "opsflow-redriven-from": (
            "Only on a record `opsflow dlq redrive` wrote back after a fix: the dead letter "
            "it came from, `<topic>.dlq/<partition>/<offset>` (with the prefix). Key, value, "
            "timestamp and the other headers are the original record's."
        ),
        "opsflow-replay": (
            "Only on an output `opsflow replay` wrote: the replay's id. The record is the "
            "same event (same idempotency key and event id) as the one first written for "
            "that input."
        ),
    }
)
"""Headers of an event record. The service runtime writes all of them (``tracestate``
only when non-empty) but ``opsflow-redriven-from``, which only a redrive
(``opsflow.dlq``) writes, and ``opsflow-replay``, which only a replay writes;
records written through the producer SDK (the ingest API, webhooks, the review
inbox) carry none, so readers must not require them."""

DEAD_LETTER_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "opsflow-error-class": "The exception class that made processing fail.",
        "opsflow-error-message": "The error message, at most 2,000 characters.",
        "opsflow-source-topic": "The topic the record was read from (with the prefix).",
        "opsflow-source-partition": "Its partition, in decimal.",
        "opsflow-source-offset": "Its offset, in decimal.",
        "opsflow-service": (
            "Who failed to process it: a service's name, or `projection:<name>` for a "
            "read-model projection."
        ),
        "opsflow-attempts": "How many times processing was tried, in decimal.",
        "opsflow-failed-at": "When it was dead-lettered: ISO 8601, UTC, milliseconds.",
    }
)
"""Headers every dead-lettered record carries, whoever dead-lettered it (``opsflow.deadletters``
writes them for services and projections alike), after the original record's own."""

OPTIONAL_DEAD_LETTER_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "opsflow-source": (
            "Written by a service in place of the original's: "
            "`<topic>/<partition>/<offset>#dlq`, naming the dead-lettered input. A "
            "projection keeps the original record's (if it had one)."
        ),
        "traceparent": (
            "A service adds the trace context of the failed processing, so this header "
            "can appear twice: the original record's first."
        ),
    }
)
"""Headers a dead-lettered record may carry besides ``DEAD_LETTER_HEADERS``, depending on
who dead-lettered it; readers must not require them."""
