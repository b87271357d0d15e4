"""Projections: read models in PostgreSQL kept exactly once from the topics, and rebuilt
from them without downtime.

- ``Projection``: the topics a read model reads, the tables it owns, how a batch is written;
- ``MergeTable``: rows merged from events in any arrival order, written with COPY + one merge;
- ``ProjectionRunner``: applies batches with the position in the same transaction;
- ``rebuild``: replays into shadow tables, catches up, swaps them in atomically.
"""

from __future__ import annotations

from opsflow.projections.merge import Latest, MergeTable
from opsflow.projections.projection import Projection, Tables, shadow_name
from opsflow.projections.records import EventRecord

__all__ = [
    "EventRecord",
    "Latest",
    "MergeTable",
    "Projection",
    "Tables",
    "shadow_name",
]
