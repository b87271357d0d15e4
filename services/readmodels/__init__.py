"""The order workflow's read models: the tables reviewers, operators and analytics read.

Declared as the application's ``read_models``; the projector keeps them current
and ``opsflow projections rebuild NAME`` rebuilds any from the topics.
``docs/contracts.md`` documents each column.
"""

from __future__ import annotations

from opsflow.projections import Projection
from services.readmodels import dispatches, orders, reviews

READ_MODELS: tuple[Projection, ...] = (
    orders.projection,
    reviews.review_queue,
    reviews.sla_breaches,
    dispatches.projection,
)
