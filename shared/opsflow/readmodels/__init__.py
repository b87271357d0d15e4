"""opsflow's read models: the projections ``shared/opsflow/projector`` keeps current.

Their tables are a contract for the people and programs that read them
(reviewer screens, operators, analytics); ``docs/contracts.md`` documents each
column. Every one can be rebuilt from the topics: ``opsflow projections rebuild NAME``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from opsflow.projections import Projection
from opsflow.readmodels import audit, dispatches, orders, reviews

PROJECTIONS: Mapping[str, Projection] = MappingProxyType(
    {
        p.name: p
        for p in (
            orders.projection,
            reviews.review_queue,
            reviews.sla_breaches,
            dispatches.projection,
            audit.projection,
        )
    }
)
"""Every read model by name."""
