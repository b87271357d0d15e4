"""Dead letters: what a record that could not be processed carries to ``<topic>.dlq``.

The dead-letter record is the original key, value and headers, plus headers
saying where it came from, who failed on it and why, so an operator can list,
read and redrive it after a fix. Services and projections write the same
headers; the operator's tools read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from opsflow.topics import DEAD_LETTER_SUFFIX

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


REDRIVEN_FROM = "opsflow-redriven-from"
"""Set on a record ``opsflow dlq redrive`` wrote back to its source topic: the dead letter it
came from, ``<dlq topic>/<partition>/<offset>`` (the topic as named in the environment)."""


@dataclass(frozen=True)
class DeadLetter:
    """One record of a ``<topic>.dlq`` topic, read back: where it sits, and what it carries.

    Whoever dead-letters a record appends ``dead_letter_headers()`` (and possibly
    more, see ``opsflow.contracts.headers``) after the record's own headers, so the
    headers before the first ``opsflow-error-class`` are the original record's:
    that split is what lets a redrive put back exactly the record that failed.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def _split(self) -> int:
        for index, (name, _) in enumerate(self.headers):
            if name == ERROR_CLASS:
                return index
        return len(self.headers)

    @property
    def original_headers(self) -> list[tuple[str, bytes]]:
        """The failed record's own headers, in their order."""
        return list(self.headers[: self._split])

    @property
    def added_headers(self) -> list[tuple[str, bytes]]:
        """What dead-lettering added: the error, the source, who failed, trace context."""
        return list(self.headers[self._split :])

    def _added(self, name: str) -> str | None:
        for key, value in self.added_headers:
            if key == name:
                return value.decode("utf-8", errors="replace")
        return None

    @property
    def error_class(self) -> str:
        return self._added(ERROR_CLASS) or "unknown"

    @property
    def error_message(self) -> str:
        return self._added(ERROR_MESSAGE) or ""

    @property
    def source_topic(self) -> str:
        """The topic the record failed on (with the prefix); from the DLQ's name if unsaid."""
        found = self._added(SOURCE_TOPIC)
        if found:
            return found
        return self.topic.removesuffix(DEAD_LETTER_SUFFIX)

    @property
    def source_partition(self) -> int | None:
        found = self._added(SOURCE_PARTITION)
        return int(found) if found and found.isdigit() else None

    @property
    def source_offset(self) -> int | None:
        found = self._added(SOURCE_OFFSET)
        return int(found) if found and found.isdigit() else None

    @property
    def consumer(self) -> str:
        """The service, or ``projection:<name>``, that could not process the record."""
        return self._added(SERVICE) or "unknown"

    @property
    def attempts(self) -> int | None:
        found = self._added(ATTEMPTS)
        return int(found) if found and found.isdigit() else None

    @property
    def failed_at(self) -> str | None:
        return self._added(FAILED_AT)

    @property
    def redriven_from(self) -> str | None:
        """The dead letter this record's earlier copy was redriven from, if it was."""
        for key, value in self.original_headers:
            if key == REDRIVEN_FROM:
                return value.decode("utf-8", errors="replace")
        return None

    def redrive_headers(self) -> list[tuple[str, bytes]]:
        """The headers of the record to write back: the original's, minus an earlier
        redrive's mark, plus this dead letter's."""
        where = f"{self.topic}/{self.partition}/{self.offset}"
        kept = [(k, v) for k, v in self.original_headers if k != REDRIVEN_FROM]
        return [*kept, (REDRIVEN_FROM, where.encode())]
