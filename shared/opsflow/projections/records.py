"""Records as projections see them: the decoded Avro datum, not a pydantic model.

A rebuild reads every record of its topics, so the per-record cost decides
how fast a read model comes back. Building the typed model of each event
(``WireCodec.decode``) caps a single process at about 14,000 events/s on the
bench machine (``python -m tests.bench --only codec``); projections need the
fields, not the validation (the producers validated them before writing).
So a projection gets an ``EventRecord``: the event type, the envelope fields
it needs, the datum as plain dicts with logical types left as plain values
(timestamps as epoch milliseconds, ready for ``to_timestamp`` in SQL), and
where the record sits in the log.

Decoding them is ``opsflow.projections.decoder``'s (it loads cavro and the
registry's client, which a reader of projection names, such as ``opsflow
status``, does not need).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class EventRecord:
    """One event of a topic, decoded for projecting.

    ``data`` is the whole datum (``data["envelope"]`` holds the envelope);
    timestamps in it are epoch milliseconds. ``key`` is the value of the topic's
    key field: the id of the workflow instance the event belongs to.
    """

    event_type: str
    data: dict[str, Any]
    key: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes

    @property
    def envelope(self) -> dict[str, Any]:
        return self.data["envelope"]  # type: ignore[no-any-return]

    @property
    def event_id(self) -> str:
        return self.data["envelope"]["event_id"]  # type: ignore[no-any-return]

    @property
    def occurred_at_ms(self) -> int:
        return self.data["envelope"]["occurred_at"]  # type: ignore[no-any-return]

    def value_sha256(self) -> bytes:
        """The hash of the record's bytes as written (the audit log keeps it)."""
        return hashlib.sha256(self.value).digest()
