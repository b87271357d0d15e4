"""Dead letters: what a record that could not be processed carries to ``<topic>.dlq``.

The dead-letter record is the original key, value and headers, plus headers
saying where it came from, who failed on it and why, so an operator can list,
read and redrive it after a fix. Services and projections write the same
headers; the operator's tools read them.
"""

from __future__ import annotations

from datetime import UTC, datetime

ERROR_CLASS = "opsflow-error-class"
ERROR_MESSAGE = "opsflow-error-message"
SOURCE_TOPIC = "opsflow-source-topic"
SOURCE_PARTITION = "opsflow-source-partition"
SOURCE_OFFSET = "opsflow-source-offset"
SERVICE = "opsflow-service"
ATTEMPTS = "opsflow-attempts"
FAILED_AT = "opsflow-failed-at"

MAX_MESSAGE_CHARS = 2000


def dead_letter_headers(
    err: BaseException, *, topic: str, partition: int, offset: int, consumer: str, attempts: int
) -> list[tuple[str, bytes]]:
    """The headers added to a dead-lettered record (after the record's own headers).

    Args:
        err: why it was dead-lettered.
        topic, partition, offset: where the record sits in its source topic.
        consumer: the service or projection that could not process it.
        attempts: how many times it was tried.
    """
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return [
        (ERROR_CLASS, type(err).__name__.encode()),
        (ERROR_MESSAGE, str(err)[:MAX_MESSAGE_CHARS].encode()),
        (SOURCE_TOPIC, topic.encode()),
        (SOURCE_PARTITION, str(partition).encode()),
        (SOURCE_OFFSET, str(offset).encode()),
        (SERVICE, consumer.encode()),
        (ATTEMPTS, str(attempts).encode()),
        (FAILED_AT, now.encode()),
    ]
